"""`restnet controller` and `restnet policy check|schema`."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from fleet_protocol.mqtt import ClientHost, add_connection_args, parse_url, serve, setup_logging

from .policy import PolicyError, load_policy, policy_schema


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="restnet controller")
    p.add_argument("--policy", type=Path, default=Path("fleet.yaml"))
    p.add_argument("--state-dir", type=Path, default=Path(".restnet/controller"))
    add_connection_args(p)
    args = p.parse_args(argv)
    setup_logging(args.verbose)
    from .service import Controller  # torch and the catalog load only when running

    host = ClientHost()
    try:
        ctl = Controller(args.policy, args.state_dir, host, username=args.username,
                         password=args.password)
    except (PolicyError, FileNotFoundError) as exc:
        raise SystemExit(f"restnet controller: {exc}") from exc
    ctl.start(*parse_url(args.broker))
    serve(host, ctl.stop)
    return 0


def policy_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="restnet policy")
    sub = p.add_subparsers(dest="action", required=True)
    c = sub.add_parser("check", help="validate a fleet.yaml")
    c.add_argument("file", type=Path)
    s = sub.add_parser("schema", help="write the JSON Schema of fleet.yaml")
    s.add_argument("--out", type=Path, help="file to write (default: stdout)")
    args = p.parse_args(argv)
    if args.action == "check":
        try:
            policy = load_policy(args.file)
        except PolicyError as exc:
            print(exc)
            return 1
        print(f"{args.file}: OK ({len(policy.groups)} groups, {len(policy.devices)} device "
              f"overrides, catalog {policy.catalog})")
        return 0
    text = json.dumps(policy_schema(), indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    else:
        print(text)
    return 0
