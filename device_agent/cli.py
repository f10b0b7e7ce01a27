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
from .canary import CanaryConfig
from .localapi import LocalAPI
from .resources import PsutilResources


def _tag(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _kind_speed(text: str) -> tuple[str, float]:
    key, value = _tag(text)
    try:
        return key, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected KIND=GFLOPS, got {text!r}") from None


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
    p.add_argument("--kind-gflops", type=_kind_speed, action="append", default=[],
                   metavar="KIND=GFLOPS",
                   help="this board's nominal speed for one operator kind where it differs from "
                        "the overall figure, e.g. attention=0.13 (repeatable; protocol §4.1)")
    p.add_argument("--serve-port", type=int, default=0, metavar="PORT",
                   help="serve the local inference API on 127.0.0.1:PORT (0: off); see "
                        "`restnet infer`")
    p.add_argument("--serve-socket", type=Path, metavar="PATH",
                   help="serve the local inference API on this Unix socket instead")
    p.add_argument("--max-queue", type=int, default=16,
                   help="inference requests that may wait for the model; more get 503")
    p.add_argument("--metrics-port", type=int, default=0, metavar="PORT",
                   help="serve Prometheus metrics on 127.0.0.1:PORT (0: off)")
    c = CanaryConfig()
    p.add_argument("--canary-requests", type=int, default=c.requests, metavar="N",
                   help="after a healthy swap, compare the new model's served figures with "
                        "the previous model's until it served N requests (0: no limit; "
                        "default %(default)s) ...")
    p.add_argument("--canary-seconds", type=float, default=c.seconds, metavar="S",
                   help="... or S seconds passed (0: no limit; both 0: no canary window; "
                        "default %(default)s)")
    p.add_argument("--canary-min-samples", type=int, default=c.min_samples, metavar="N",
                   help="judge a figure only with N samples of each model (default "
                        "%(default)s)")
    p.add_argument("--canary-max-error-rise", type=float, default=c.max_error_rise,
                   metavar="F", help="roll back when the error rate exceeds the previous "
                   "model's by more (default %(default)s)")
    p.add_argument("--canary-max-confidence-drop", type=float, default=c.max_confidence_drop,
                   metavar="F", help="... when the mean top softmax probability falls below "
                   "the previous model's by more (default %(default)s)")
    p.add_argument("--canary-max-accuracy-drop", type=float, default=c.max_accuracy_drop,
                   metavar="F", help="... when the accuracy on labelled feedback (POST "
                   "/v1/feedback) falls below the previous model's by more (default "
                   "%(default)s)")
    add_connection_args(p)
    args = p.parse_args(argv)
    setup_logging(args.verbose)
    try:
        trust = tuple(load_public(path) for path in args.trust)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"restnet agent: --trust: {exc}") from exc
    host = ClientHost()
    try:
        canary = CanaryConfig(args.canary_requests, args.canary_seconds,
                              args.canary_min_samples, args.canary_max_error_rise,
                              args.canary_max_confidence_drop, args.canary_max_accuracy_drop)
        agent = Agent(AgentConfig(args.device_id, args.cache,
                                  telemetry_period=args.telemetry_period,
                                  chunk_size=args.chunk_size, trust=trust, tags=dict(args.tag),
                                  max_queue=args.max_queue, canary=canary, **login(args)),
                      PsutilResources(args.device_class, dict(args.kind_gflops)), host)
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
    p.add_argument("--run", metavar="ANCHOR",
                   help="the board serves this anchor (one of those provisioned) from its start "
                        "until the controller deploys a model (default: nothing until then)")
    args = p.parse_args(argv)
    try:
        catalog = Catalog.load(args.catalog)
        added = provision(SegmentCache(args.cache), catalog, args.anchor, args.run)
    except (FileNotFoundError, KeyError, ValueError) as exc:
        raise SystemExit(f"restnet agent provision: {exc}") from exc
    print(f"{len(added)} segments added to {args.cache}"
          + (f"; it boots serving {args.run}" if args.run else ""))
    return 0
