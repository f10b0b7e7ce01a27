"""`restnet agent`: run the agent on a board, or provision a board's segment cache."""
from __future__ import annotations

import argparse
from pathlib import Path

from fleet_runtime.mqtt import (ClientHost, add_connection_args, login, parse_url, serve,
                                 serve_metrics, setup_logging)
from fleet_protocol.signing import load_public
from stitch_lib.catalog import Catalog

from .agent import Agent, AgentConfig
from .cache import SegmentCache, provision
from .localapi import LocalAPI
from .resources import PsutilResources


def _tag(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def main(argv: list[str]) -> int:
    if argv[:1] == ["provision"]:
        return provision_main(argv[1:])
    p = argparse.ArgumentParser(prog="restnet agent", description="run the device agent "
                                "(`restnet agent provision --help` to fill its cache first)")
    p.add_argument("--device-id", required=True)
    p.add_argument("--cache", type=Path, required=True, help="segment cache directory")
    p.add_argument("--device-class", default="board")
    p.add_argument("--telemetry-period", type=float, default=5.0)
    p.add_argument("--chunk-size", type=int, default=64 * 1024,
                   help="bytes per segment-download chunk (smaller on slow, lossy links)")
    p.add_argument("--trust", type=Path, action="append", required=True,
                   help="the controller's public key (controller.pub from `restnet keys init`); "
                        "only desired states it signed are applied (repeatable)")
    p.add_argument("--tag", type=_tag, action="append", default=[], metavar="KEY=VALUE",
                   help="a label fleet.yaml groups match on, e.g. site=north (repeatable)")
    p.add_argument("--serve-port", type=int, default=0, metavar="PORT",
                   help="serve the local inference API on 127.0.0.1:PORT (0: off); see "
                        "`restnet infer`")
    p.add_argument("--serve-socket", type=Path, metavar="PATH",
                   help="serve the local inference API on this Unix socket instead")
    p.add_argument("--max-queue", type=int, default=16,
                   help="inference requests that may wait for the model; more get 503")
    p.add_argument("--metrics-port", type=int, default=0, metavar="PORT",
                   help="serve Prometheus metrics on 127.0.0.1:PORT (0: off)")
    add_connection_args(p)
    args = p.parse_args(argv)
    setup_logging(args.verbose)
    try:
        trust = tuple(load_public(path) for path in args.trust)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"restnet agent: --trust: {exc}") from exc
    host = ClientHost()
    try:
        agent = Agent(AgentConfig(args.device_id, args.cache,
                                  telemetry_period=args.telemetry_period,
                                  chunk_size=args.chunk_size, trust=trust, tags=dict(args.tag),
                                  max_queue=args.max_queue, **login(args)),
                      PsutilResources(args.device_class), host)
    except ValueError as exc:
        raise SystemExit(f"restnet agent: {exc}") from exc
    api = None
    if args.serve_port or args.serve_socket:
        try:
            api = LocalAPI(agent.serving, port=None if args.serve_socket else args.serve_port,
                           path=args.serve_socket)
        except OSError as exc:
            raise SystemExit(f"restnet agent: cannot serve the local API: {exc} (pick another "
                             "--serve-port, or check --serve-socket's directory)") from exc
        api.start()
    serve_metrics("restnet agent", args.metrics_port, agent.prom.registry)
    agent.start(*parse_url(args.broker))

    def stop() -> None:
        if api is not None:
            api.stop()
        agent.stop()
    serve(host, stop)
    return 0


def provision_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="restnet agent provision",
                                description="put a catalog's anchor segments on a board")
    p.add_argument("--catalog", type=Path, required=True, help="catalog directory")
    p.add_argument("--cache", type=Path, required=True, help="the board's segment cache")
    p.add_argument("--anchor", action="append", help="only this anchor (repeatable)")
    args = p.parse_args(argv)
    try:
        catalog = Catalog.load(args.catalog)
        added = provision(SegmentCache(args.cache), catalog, args.anchor)
    except (FileNotFoundError, KeyError) as exc:
        raise SystemExit(f"restnet agent provision: {exc}") from exc
    print(f"{len(added)} segments added to {args.cache}")
    return 0
