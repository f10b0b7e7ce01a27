"""`restnet controller`, `restnet policy check|schema`, `restnet broker config` and
`restnet keys init|rotate|retire|show`."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from fleet_runtime.brokerconf import CONTROLLER, TlsFiles, write_broker_config
from fleet_runtime.mqtt import (ClientHost, add_connection_args, login, parse_url, serve,
                                 serve_metrics, setup_logging)
from fleet_protocol.signing import KeyDir
from fleet_protocol.topics import DEFAULT_ROOT, Topics

from .policy import PolicyError, load_policy, policy_schema


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="restnet controller")
    p.add_argument("--policy", type=Path, default=Path("fleet.yaml"))
    p.add_argument("--state-dir", type=Path, default=Path(".restnet/controller"))
    p.add_argument("--keys", type=Path, default=Path(".restnet/keys"),
                   help="signing key directory (`restnet keys init`); rotations are picked up "
                        "while running")
    p.add_argument("--retention-days", type=float, default=7.0,
                   help="events and closed deployments older than this are pruned (each "
                        "device's newest deployment stays)")
    p.add_argument("--metrics-port", type=int, default=0, metavar="PORT",
                   help="serve Prometheus metrics on 127.0.0.1:PORT (0: off)")
    add_connection_args(p)
    args = p.parse_args(argv)
    if args.retention_days <= 0:
        p.error("--retention-days must be > 0")
    setup_logging(args.verbose)
    from .service import Controller  # torch and the catalog load only when running

    host = ClientHost()
    try:
        ctl = Controller(args.policy, args.state_dir, host, args.keys,
                         retention_s=args.retention_days * 86400, **login(args))
    except (PolicyError, FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"restnet controller: {exc}") from exc
    serve_metrics("restnet controller", args.metrics_port, ctl.prom.registry)
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


def broker_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="restnet broker")
    sub = p.add_subparsers(dest="action", required=True)
    c = sub.add_parser("config", help="write mosquitto.conf, passwd, acl and credentials.json")
    c.add_argument("--out", type=Path, required=True, help="directory to write into")
    c.add_argument("--devices", default="", help="device IDs, comma-separated")
    c.add_argument("--devices-file", type=Path, help="a file of device IDs, one per line")
    c.add_argument("--operators", default="",
                   help="extra logins with the controller's rights (monitors, tools), "
                        "comma-separated; client IDs are usernames, so each connection that "
                        "runs beside the controller needs its own")
    c.add_argument("--port", type=int, default=1883)
    c.add_argument("--bind", default="0.0.0.0")
    c.add_argument("--root", default=DEFAULT_ROOT, help="topic root")
    for name in ("ca", "cert", "key"):
        c.add_argument(f"--tls-{name}", type=Path, help="PEM file of the TLS listener")
    c.add_argument("--tls-port", type=int, default=8883)
    args = p.parse_args(argv)
    devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    if args.devices_file:
        try:
            lines = args.devices_file.read_text().splitlines()
        except OSError as exc:
            p.error(f"--devices-file: {exc}")
        devices += [x.strip() for x in lines if x.strip() and not x.strip().startswith("#")]
    operators = [o.strip() for o in args.operators.split(",") if o.strip()]
    tls_paths = [args.tls_ca, args.tls_cert, args.tls_key]
    if any(tls_paths) and not all(tls_paths):
        p.error("--tls-ca, --tls-cert and --tls-key go together: give all three or none")
    tls = TlsFiles(*(x.absolute() for x in tls_paths)) if all(tls_paths) else None
    try:
        creds = write_broker_config(args.out, devices, topics=Topics(args.root), port=args.port,
                                    bind=args.bind, tls=tls, tls_port=args.tls_port,
                                    operators=operators)
    except ValueError as exc:
        p.error(str(exc))
    out = args.out.absolute()
    for name in ("mosquitto.conf", "passwd", "acl", "credentials.json"):
        print(f"wrote {out / name} (mode {(out / name).stat().st_mode & 0o777:o})")
    print(f"{len(creds)} logins: {CONTROLLER!r}, {len(set(operators))} operators, the rest "
          f"devices (passwords in credentials.json; keep it secret)"
          f"\nlisteners: {args.bind}:{args.port}"
          + (f", TLS {args.bind}:{args.tls_port}" if tls else "")
          + f"\nstart it:  mosquitto -c {out / 'mosquitto.conf'}"
          + ("\nnote: started as root, Mosquitto reads the TLS key as user 'mosquitto' "
             "(e.g. chgrp mosquitto KEY; chmod 640 KEY)" if tls else ""))
    return 0


def keys_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="restnet keys", description="the controller's Ed25519 signing keys. Rotation: "
        "`rotate` makes a new key while the running controller keeps announcing the old one "
        "too; once every device reports the new key set (keys_seq in its retained state on "
        "fleet/v1/dev/+/state), `retire` drops the old one.")
    p.add_argument("action", choices=["init", "rotate", "retire", "show"])
    p.add_argument("dir", type=Path, nargs="?", default=Path(".restnet/keys"))
    p.add_argument("--state-dir", type=Path, default=Path(".restnet/controller"),
                   help="the controller's state (retire checks every device has the new keys)")
    p.add_argument("--force", action="store_true", help="retire even if devices lag behind")
    args = p.parse_args(argv)
    keys = KeyDir(args.dir)
    try:
        if args.action == "init":
            key = keys.init()
            print(f"signing key {key.id} in {keys.current_path} (keep it secret); give devices "
                  f"{keys.current_path.with_suffix('.pub')} (`restnet agent --trust`)")
        elif args.action == "rotate":
            key = keys.rotate()
            print(f"new signing key {key.id}; the old one is announced until `restnet keys "
                  f"retire {args.dir}`")
        elif args.action == "retire":
            lagging = [] if args.force else _lagging(args.state_dir)
            if lagging:
                raise SystemExit(f"restnet keys retire: {len(lagging)} devices have not reported "
                                 f"the new key set yet ({', '.join(lagging[:8])}); they would "
                                 "trust no key left. Wait for them, or --force")
            gone = keys.retire()
            print(f"retired {', '.join(gone) or 'nothing'}")
        else:
            current, previous = keys.load()
            print(f"signing: {current.id}\nbeing rotated out: "
                  f"{', '.join(k.id for k in previous) or 'none'}")
    except (FileExistsError, FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"restnet keys: {exc}") from exc
    return 0


def _lagging(state_dir: Path) -> list[str]:
    """Devices whose last reported key set is older than the one the controller announces."""
    from .store import Store

    path = state_dir / "controller.sqlite"
    if not path.is_file():
        raise SystemExit(f"restnet keys retire: no controller state at {path}; pass "
                         "--state-dir, or --force")
    store = Store(path)
    try:
        keys = store.meta("keys")
        if keys is None:
            return []
        return sorted(d for d, doc in store.twins().items()
                      if doc.get("keys_seq", 0) < keys["since"])
    finally:
        store.close()
