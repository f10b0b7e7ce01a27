"""`restnet demo` (what `make demo` runs): a private Mosquitto, the controller with fleet.yaml,
and a simulated fleet of real agents going through a scenario, shown live; then a summary.

This module only wires the sides together (the one place allowed to); every decision is made
by the controller's planner and the agents. Served accuracy is judged by the simulator's truth
(simulators.fleet): this system's, an oracle's (the planner's rules with every device's true
costs, switching at once), the best static model's, and — with `--compare` — the same
scenario and seed with an anchors-only catalog.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import re
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import yaml

from rich.console import Console
from rich.live import Live
from rich.table import Table

from fleet_controller.costerror import WARMUP_REPORTS
from fleet_controller.planner import Twin, best_static, plan
from fleet_controller.policy import effective_rule
from fleet_controller.service import Controller
from fleet_runtime.brokerconf import CONTROLLER
from fleet_runtime.mqtt import ClientHost, parse_url
from fleet_protocol.signing import KeyDir
from simulators.broker import start_broker
from simulators.cli import load_scenario
from simulators.fleet import SimDevice, SimFleet
from stitch_lib.catalog import Catalog
from stitch_lib.data import make_splits

console = Console()
COST_ERROR_TARGET = 0.15  # median |predicted − measured| / measured p95 (costerror)


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
        if d.id in ctl.twins and not ctl.twins[d.id].online:
            last = f"offline ({last})" if last else "offline"  # as the controller sees it
        battery = "mains" if not d.res.cls.battery_powered else (
            f"{s.battery:.0%}{' ⚡' if s.charging else ''}")
        t.add_row(d.id, d.res.cls.name, battery, f"{d.res.cls.mem_mb - s.mem_taken_mb:.0f}",
                  f"{s.temp_c:.0f}", entry.name if entry else "—",
                  f"{p95:.1f}" if p95 is not None else "", f"{entry.test_acc:.1%}" if entry else "",
                  last)
    return t


def truth_twin(d: SimDevice) -> Twin:
    """What the controller would know of `d` if it saw the simulator's state itself."""
    s, cls = d.res.state, d.res.cls
    return Twin(device_id=d.id, device_class=cls.name, tags=dict(d.agent.cfg.tags), online=True,
                mem_mb=cls.mem_mb, gflops=cls.gflops,
                battery=s.battery if cls.battery_powered else None, charging=s.charging,
                temp_c=s.temp_c, mem_free_mb=max(0.0, cls.mem_mb - s.mem_taken_mb))


def judge(ctl: Controller, fleet: SimFleet) -> None:
    """Let `fleet` account served accuracy by the simulator's truth: each device's p95 budget
    under the policy; an oracle (the planner's rules on the true p95 of every model, no
    hysteresis); the best static model (fits every device as the run starts)."""
    def rule(d: SimDevice):
        return effective_rule(ctl.policy, d.id, d.res.cls.name, d.agent.cfg.tags)

    def known(d: SimDevice) -> dict[str, float]:
        return {c.id: fleet.true_p95(d, c.id) for c in ctl.candidates}

    def budget(d: SimDevice) -> float | None:
        b = rule(d).latency_p95_ms
        return b if math.isfinite(b) else None

    static = best_static([(truth_twin(d), rule(d), known(d)) for d in fleet.devices],
                         ctl.candidates)
    fleet.budget = budget
    fleet.choosers = {
        "oracle": lambda d: plan(truth_twin(d), ctl.candidates, rule(d), 0.0, known(d)).target,
        "static": lambda d: static.id if static else None}


def mispredicted_rollbacks(ctl: Controller, telemetry_period: float) -> int:
    """Health-check rollbacks for latency of deployments made after the controller observed
    the device's class: one telemetry period after the class's first HEALTHY model. A failed
    health check acks FAILED, then ROLLED_BACK, and the deployment keeps the first status."""
    deps = ctl.store.deployments()
    cls = {d: t.device_class for d, t in ctl.twins.items()}
    first: dict[str, float] = {}
    for dep in deps:
        if dep.status == "HEALTHY":
            c = cls.get(dep.device_id, "")
            first[c] = min(first.get(c, math.inf), dep.updated)
    return sum(dep.status in ("FAILED", "ROLLED_BACK") and dep.reason.startswith("latency")
               and dep.created > first.get(cls.get(dep.device_id, ""), math.inf)
               + telemetry_period for dep in deps)


def summary(ctl: Controller, fleet: SimFleet, seconds: float) -> dict:
    """The figures a run ends with (all measured in this run)."""
    m = ctl.metrics
    r = sorted(m.reactions_ms)
    sent = m.desired_bytes + m.chunk_bytes
    served = {way: s.figures() for way, s in sorted(fleet.served.items())}
    return {
        "devices": len(fleet.devices), "seconds": round(seconds, 1),
        "served_accuracy": {way: f["served_accuracy"] for way, f in served.items()},
        **{k: served["restnet"][k] for k in ("budget_violation_s", "no_model_s",
                                              "hybrid_share")},
        "rollbacks_mispredicted": mispredicted_rollbacks(ctl, fleet.telemetry_period),
        "adaptations": m.adaptations, "failures": m.failures,
        "failure_reasons": dict(Counter(
            re.sub(r"[\d.]+", "N", d.reason.split(";")[0])[:60] for d in ctl.store.deployments()
            if d.status in ("FAILED", "ROLLED_BACK", "TIMEOUT")).most_common(5)),
        # desired states (stitch tensors inline) and the chunks of segments devices lacked
        # (fp32 safetensors, base64), against shipping every deployed model whole (fp16)
        "stitch_bytes": m.desired_bytes, "segment_bytes": m.chunk_bytes,
        "segments_fetched": fleet.fetched(),
        "bytes_sent": sent, "whole_model_bytes": m.whole_model_bytes,
        "bytes_ratio": sent / m.whole_model_bytes if m.whole_model_bytes else None,
        "cost_error": m.cost_errors.summary(),
        "reaction_ms_p50": statistics.median(r) if r else None,
        "reaction_ms_p95": r[min(len(r) - 1, int(0.95 * len(r)))] if r else None,
        "dropped_messages": ctl.stats["dropped"], "controller_errors": ctl.stats["errors"],
        "agent_errors": sum(d.agent.stats["errors"] for d in fleet.devices),
        "reconnects": fleet.host.stats.get("reconnects", 0),
    }


def error_figures(f: dict) -> str:
    """{median, p90, n} of relative errors (fleet_controller.costerror) as one cell."""
    return f"{f['median']:.1%} / {f['p90']:.1%} (n {f['n']})" if f["n"] else "— (n 0)"


def cost_error_text(e: dict) -> str:
    """The summary's `cost_error` in words, against its target."""
    verdict = ", ".join(f"{what} {'met' if f['median'] <= COST_ERROR_TARGET else 'NOT met'}"
                        for what, f in (("every report", e), ("new models", e["new_model"]))
                        if f["n"])
    verdict = f"; target median ≤ {COST_ERROR_TARGET:.0%}: {verdict}" if verdict else ""
    return (f"predicted vs measured p95, median / p90 — every report after a device's first "
            f"{WARMUP_REPORTS}: {error_figures(e)}; on its first model: "
            f"{error_figures(e['first_model'])}; first report on a model new to it: "
            f"{error_figures(e['new_model'])}{verdict}")


def anchors_only(catalog: Catalog, root: Path) -> Catalog:
    """A copy of `catalog` under `root` that holds its anchors only (artifacts linked)."""
    root.mkdir(parents=True)
    (root / "artifacts").symlink_to((catalog.root / "artifacts").resolve())
    cat = Catalog(root, catalog.anchors, catalog.meta)
    cat.save()
    return cat


def with_catalog(policy: Path, catalog_dir: Path, out: Path) -> Path:
    """A copy of the policy file at `out` whose catalog is `catalog_dir`."""
    doc = yaml.safe_load(policy.read_text())
    doc["catalog"] = str(catalog_dir.resolve())
    out.write_text(yaml.safe_dump(doc, sort_keys=False))
    return out


def run(args, policy: Path, catalog: Catalog, tmp: Path, live: bool) -> dict:
    """One run of the scenario: broker, controller and fleet in `tmp`; returns the summary."""
    scenario = load_scenario(args.scenario)
    test = make_splits(**catalog.meta["dataset"]).test
    probe = (test.x[:16], test.y[:16])  # each device's labelled probe images
    with start_broker(tmp / "broker") as broker:
        host = ClientHost()
        signing = KeyDir(tmp / "keys").init()  # the demo fleet's own key pair
        ctl = Controller(policy, tmp / "controller", host, tmp / "keys",
                         username=CONTROLLER, password=broker.creds[CONTROLLER])
        fleet = SimFleet(args.devices, broker.url, catalog.root, tmp / "fleet", probe=probe,
                         host=host, trust=(signing.public,), seed=args.seed,
                         provision=scenario.provision)
        broker.add_devices(fleet.ids)  # one login per device; ACLs confine each to its topics
        console.print(f"broker {broker.url}, {len(fleet.devices)} devices, "
                      f"{len(catalog.entries)} catalog models, scenario {args.scenario}")
        ctl.start(*parse_url(broker.url))
        fleet.start(broker.creds)
        judge(ctl, fleet)
        t0 = time.monotonic()
        if live:
            with Live(console=console, refresh_per_second=2) as view:
                fleet.run(scenario, on_tick=lambda el: view.update(
                    _table(fleet, ctl, el, scenario.duration_s)))
        else:
            fleet.run(scenario)
        result = summary(ctl, fleet, time.monotonic() - t0)
        fleet.stop()
        ctl.stop()
        host.run(timeout=0.5)
        host.close()
    return result


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="restnet demo")
    p.add_argument("--devices", type=int, default=30)
    p.add_argument("--policy", type=Path, default=Path("fleet.yaml"))
    p.add_argument("--scenario", type=Path, default=Path("scenarios/demo.yaml"))
    p.add_argument("--zoo", type=Path, default=Path("zoo.yaml"))
    p.add_argument("--home", type=Path, default=Path(".restnet"))
    p.add_argument("--seed", type=int, default=0, help="the fleet's devices and their truth")
    p.add_argument("--compare", action="store_true",
                   help="run the scenario again with an anchors-only catalog (same seed) for "
                        "served_accuracy.anchors_only; doubles the run time")
    p.add_argument("--headless", action="store_true", help="no live table")
    p.add_argument("--json", type=Path, help="write the summary here")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.ERROR)
    if not Catalog.is_current(args.home / "catalog"):  # none, or of an older segment ID scheme
        from restnet.stitch_cmd import catalog_main

        console.print("[bold]No catalog of this version yet: building the default zoo and "
                      "catalog first.")
        catalog_main(["build", "--zoo", str(args.zoo), "--home", str(args.home)])
    catalog = Catalog.load(args.home / "catalog")
    with tempfile.TemporaryDirectory(prefix="restnet-demo-") as tmp:
        result = run(args, args.policy, catalog, Path(tmp) / "restnet", not args.headless)
        if args.compare:
            console.print("[bold]The same scenario and seed, anchors only:")
            base = anchors_only(catalog, Path(tmp) / "anchors-catalog")
            policy = with_catalog(args.policy, base.root, Path(tmp) / "anchors-fleet.yaml")
            other = run(args, policy, base, Path(tmp) / "anchors", live=False)
            result["served_accuracy"]["anchors_only"] = other["served_accuracy"]["restnet"]
    t = Table(title="summary")
    t.add_column("figure")
    t.add_column("value", justify="right")
    for k, v in result.items():
        if k == "cost_error":
            continue
        shown = {w: round(a, 4) for w, a in v.items()} if isinstance(v, dict) else v
        t.add_row(k, f"{v:.4g}" if isinstance(v, float) else str(shown))
    console.print(t)
    console.print(f"cost model: {cost_error_text(result['cost_error'])}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0
