"""`restnet demo` (what `make demo` runs): a private Mosquitto, the controller with fleet.yaml,
and a simulated fleet of real agents going through a scenario, shown live; then a summary.

This module only wires the sides together (the one place allowed to); every decision is made
by the controller's planner and the agents.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.table import Table

from fleet_controller.service import Controller
from fleet_protocol.brokerconf import CONTROLLER
from fleet_protocol.mqtt import ClientHost, parse_url
from fleet_protocol.signing import KeyDir
from simulators.broker import start_broker
from simulators.cli import load_scenario
from simulators.fleet import SimFleet
from stitch_lib.catalog import Catalog
from stitch_lib.data import make_splits

console = Console()


def _table(fleet: SimFleet, ctl: Controller, elapsed: float, duration: float) -> Table:
    t = Table(title=f"ReStNet fleet — {elapsed:4.0f} / {duration:.0f} s — "
                    f"{ctl.metrics.adaptations} adaptations, {ctl.metrics.failures} failures")
    for col in ("device", "class", "battery", "mem free MB", "temp °C", "hybrid", "p95 ms",
                "acc", "state"):
        t.add_column(col, justify="left" if col in ("device", "class", "hybrid", "state")
                     else "right")
    for d in fleet.devices:
        s, cur = d.res.state, d.agent.slot.get()
        entry = ctl.entries.get(cur.hybrid) if cur else None
        p95 = d.agent.latency.percentile(95)
        last = next((k for k in ("ROLLED_BACK", "FAILED", "HEALTHY", "SWAPPED", "FETCHING",
                                 "RECEIVED") if d.agent.stats[k]), "")
        battery = "mains" if not d.res.cls.battery_powered else (
            f"{s.battery:.0%}{' ⚡' if s.charging else ''}")
        t.add_row(d.id, d.res.cls.name, battery, f"{d.res.cls.mem_mb - s.mem_taken_mb:.0f}",
                  f"{s.temp_c:.0f}", entry.name if entry else "—",
                  f"{p95:.1f}" if p95 is not None else "", f"{entry.test_acc:.1%}" if entry else "",
                  last)
    return t


def summary(ctl: Controller, fleet: SimFleet, seconds: float) -> dict:
    """The figures a run ends with (all measured in this run)."""
    m = ctl.metrics
    r = sorted(m.reactions_ms)
    sent = m.desired_bytes + m.chunk_bytes
    return {
        "devices": len(fleet.devices), "seconds": round(seconds, 1),
        "adaptations": m.adaptations, "failures": m.failures,
        "bytes_sent": sent, "whole_model_bytes": m.whole_model_bytes,
        "bytes_ratio": sent / m.whole_model_bytes if m.whole_model_bytes else None,
        "reaction_ms_p50": statistics.median(r) if r else None,
        "reaction_ms_p95": r[min(len(r) - 1, int(0.95 * len(r)))] if r else None,
        "dropped_messages": ctl.stats["dropped"], "controller_errors": ctl.stats["errors"],
        "agent_errors": sum(d.agent.stats["errors"] for d in fleet.devices),
        "reconnects": fleet.host.stats.get("reconnects", 0),
    }


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="restnet demo")
    p.add_argument("--devices", type=int, default=30)
    p.add_argument("--policy", type=Path, default=Path("fleet.yaml"))
    p.add_argument("--scenario", type=Path, default=Path("scenarios/demo.yaml"))
    p.add_argument("--zoo", type=Path, default=Path("zoo.yaml"))
    p.add_argument("--home", type=Path, default=Path(".restnet"))
    p.add_argument("--headless", action="store_true", help="no live table")
    p.add_argument("--json", type=Path, help="write the summary here")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.ERROR)
    if not (args.home / "catalog" / "catalog.json").is_file():
        from restnet.stitch_cmd import catalog_main

        console.print("[bold]No catalog yet: building the default zoo and catalog first.")
        catalog_main(["build", "--zoo", str(args.zoo), "--home", str(args.home)])
    scenario = load_scenario(args.scenario)
    catalog = Catalog.load(args.home / "catalog")
    test = make_splits(**catalog.meta["dataset"]).test
    probe = (test.x[:16], test.y[:16])  # each device's labelled probe images

    with tempfile.TemporaryDirectory(prefix="restnet-demo-") as tmp, \
            start_broker(Path(tmp) / "broker") as broker:
        host = ClientHost()
        signing = KeyDir(Path(tmp) / "keys").init()  # the demo fleet's own key pair
        ctl = Controller(args.policy, Path(tmp) / "controller", host, Path(tmp) / "keys",
                         username=CONTROLLER, password=broker.creds[CONTROLLER])
        fleet = SimFleet(args.devices, broker.url, catalog.root, Path(tmp) / "fleet",
                         probe=probe, host=host, trust=(signing.public,))
        broker.add_devices(fleet.ids)  # one login per device; ACLs confine each to its topics
        console.print(f"broker {broker.url}, {len(fleet.devices)} devices, "
                      f"{len(catalog.entries)} catalog models, scenario {args.scenario}")
        ctl.start(*parse_url(broker.url))
        fleet.start(broker.creds)
        t0 = time.monotonic()
        if args.headless:
            fleet.run(scenario)
        else:
            with Live(console=console, refresh_per_second=2) as live:
                fleet.run(scenario, on_tick=lambda el: live.update(
                    _table(fleet, ctl, el, scenario.duration_s)))
        result = summary(ctl, fleet, time.monotonic() - t0)
        fleet.stop()
        ctl.stop()
        host.run(timeout=0.5)
        host.close()
    t = Table(title="summary")
    t.add_column("figure")
    t.add_column("value", justify="right")
    for k, v in result.items():
        t.add_row(k, f"{v:.4g}" if isinstance(v, float) else str(v))
    console.print(t)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0
