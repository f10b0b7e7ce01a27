"""`restnet simulate`: a simulated fleet of real agents against a running broker/controller."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import yaml

from fleet_runtime.brokerconf import Credentials
from fleet_protocol.signing import load_public

from .fleet import Scenario, SimFleet


def load_scenario(path: Path) -> Scenario:
    try:
        return Scenario.from_dict(yaml.safe_load(path.read_text()))
    except (OSError, yaml.YAMLError, ValueError, KeyError, TypeError) as exc:
        raise SystemExit(f"restnet simulate: bad scenario {path}: {exc}") from exc


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="restnet simulate")
    p.add_argument("--devices", type=int, default=50)
    p.add_argument("--scenario", type=Path, default=Path("scenarios/demo.yaml"))
    p.add_argument("--broker", default="mqtt://127.0.0.1:1883", help="mqtt://HOST:PORT")
    p.add_argument("--trust", type=Path, required=True,
                   help="the controller's public key (controller.pub from `restnet keys init`)")
    p.add_argument("--credentials", type=Path,
                   help="credentials.json from `restnet broker config` (default: anonymous)")
    p.add_argument("--catalog", type=Path, default=Path(".restnet/catalog"))
    p.add_argument("--workdir", type=Path, default=Path(".restnet/sim"))
    p.add_argument("--telemetry-period", type=float, default=2.0)
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    scenario = load_scenario(args.scenario)
    try:
        trust = (load_public(args.trust),)
        creds = Credentials.load(args.credentials) if args.credentials else None
    except (OSError, ValueError) as exc:
        raise SystemExit(f"restnet simulate: {exc}") from exc
    fleet = SimFleet(args.devices, args.broker, args.catalog, args.workdir,
                     telemetry_period=args.telemetry_period, trust=trust,
                     provision=scenario.provision)
    missing = sorted(set(fleet.ids) - set(creds or fleet.ids))
    if missing:
        raise SystemExit(f"restnet simulate: no credentials for {missing[:5]}...; add them with "
                         "`restnet broker config --devices ...`")
    fleet.start(creds)
    try:
        fleet.run(scenario)
    except KeyboardInterrupt:
        pass
    fleet.stop()
    print(f"{len(fleet.devices)} devices ran {scenario.duration_s:.0f} s; host {fleet.host.stats}")
    return 0
