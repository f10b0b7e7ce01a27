"""The local inference API's overhead over an in-process call, at batch 1.

    python bench/serve_bench.py [--rounds 80] [--catalog DIR] [--no-write]

The default catalog's anchors (`.restnet/catalog`, built by `make demo`), else the tiny test
models (random weights: only the time counts), are assembled as an agent assembles them —
segments provisioned into a segment cache, rebuilt by a `SegmentRegistry`, joined by
`runtime.assemble` — and served by `serving.Serving`:

- in process: `Serving.infer(images)`, what `Agent.infer` does for an application that embeds
  the agent, timed inside the agent's process;
- over the local API: the same process serves the same models with
  `device_agent.localapi.LocalAPI` (one server per model and transport), and this process —
  another program, as an application on a board is, with no torch of its own — asks it as
  `restnet infer` does (`device_agent.infer_client.Connection`): one kept-alive HTTP/1.1
  connection, the array as a .npy body, on TCP localhost and on a Unix socket. For
  comparison: the JSON body (nested lists, as earlier clients sent), the standard library's
  `http.client` on a kept-alive connection (it writes a request's head and body apart, as
  most HTTP libraries do), and `urllib` (a new connection per request). The body is made
  from the array inside the timed call, as an application makes it for each request, and
  the answer is decoded.

One uint8 image of the model's own size per request. In every round each model and way runs
in turn: 25 ms of untimed calls, then 10 timed ones; the rounds interleave them so that
machine noise falls on all alike. The ms columns are medians of all calls; the overhead is
paired by round — the median over rounds of (the round's API median ÷ its in-process median −
1) — with the middle half of the rounds beside it, since this machine's noise is as large as
the effect. The untimed calls let the torch threads
of the way before stop: GNU OpenMP's threads spin ~10 ms after a forward pass, and every
thread that runs a model (the agent's main thread for in-process calls, one per connection)
has threads of its own, so two ways in a row would compete for the cores in a way neither
meets alone. Only one process computes at a time: the other waits on a pipe or a socket.
Prints a markdown table (the command line first) and writes it into docs/results.md
between the serve-bench markers. Target (a figure, not an assertion): the local API adds
≤ 10% to the in-process call.
"""
from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import multiprocessing as mp
import os
import sys
import statistics
import tempfile
import time
import urllib.request
from collections.abc import Callable
from multiprocessing.connection import Connection as PipeEnd
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from benchlib import command_line, write_block  # bench/ is the script's own folder

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from device_agent import infer_client  # noqa: E402  (numpy and the standard library only)

if TYPE_CHECKING:
    from device_agent.serving import Serving

START, END = "<!-- serve-bench -->", "<!-- /serve-bench -->"
SECTION = "## Serving: the local API's overhead"
TARGET = 0.10  # the API may add this share of the in-process time
TINY = [("test_resnet", {}), ("mobilenetv3_small_050", {}),
        ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, embed_dim=32, depth=2,
                                      num_heads=2))]  # tests/conftest.py's tiny zoo
WAYS = [  # (label, client, transport, body)
    ("TCP, .npy", "restnet", "tcp", "npy"),
    ("Unix socket, .npy", "restnet", "unix", "npy"),
    ("TCP, JSON", "restnet", "tcp", "json"),
    ("TCP, .npy, http.client", "http.client", "tcp", "npy"),
    ("TCP, JSON, urllib: a connection per request", "urllib", "tcp", "json"),
]
WARMUP, SETTLE_S, PER_ROUND = 2, 0.025, 10  # untimed rounds; per round: untimed s, timed calls
SHIPPED = [w[0] for w in WAYS if w[1] == "restnet" and w[3] == "npy"]  # `restnet infer`


def build(catalog_dir: Path | None, cache_dir: Path) -> dict[str, Serving]:
    """One `Serving` per model, named: the catalog's anchors from the segment cache at
    `cache_dir` (provisioned if empty), or the tiny test models when there is no catalog."""
    import torch

    from device_agent.cache import SegmentCache, SegmentRegistry, provision
    from device_agent.runtime import LatencyWindow, Loaded, ModelSlot, assemble
    from device_agent.serving import Serving
    from fleet_protocol.messages import Desired
    from stitch_lib.inputs import InputSpec

    models = {}  # name → (segments, input spec)
    if catalog_dir is not None:
        from stitch_lib.catalog import Catalog

        catalog, cache, registry = Catalog.load(catalog_dir), SegmentCache(cache_dir), \
            SegmentRegistry()
        provision(cache, catalog)
        for e in catalog.anchors:
            segs = [registry.get(s, lambda s=s: cache.read(s)) for s in e.segments]
            models[e.name] = segs, registry.input_spec(e.segments[0])
    else:
        import timm

        from stitch_lib.segments import split_model

        for name, kwargs in TINY:
            torch.manual_seed(0)
            model = timm.create_model(name, num_classes=10, in_chans=1, **kwargs).eval()
            models[name] = split_model(model), InputSpec(1, (32, 32))
    servings = {}
    for name, (segs, spec) in models.items():
        ids = [hashlib.sha256(f"{name}/{k}".encode()).hexdigest() for k in range(len(segs))]
        d = Desired(device_id="bench", generation=1, deployment_id="bench.1", hybrid=name,
                    name=name, front=ids, ts=0)  # names the model only: nothing reads the IDs
        slot, latency = ModelSlot(), LatencyWindow()
        slot.swap(Loaded(assemble(segs, None, []), d, 0, spec))
        latency.reset(slot.get())
        servings[name] = Serving(slot, latency)
    return servings


def agent(catalog_dir: Path | None, cache_dir: Path, sock_dir: Path, conn: PipeEnd) -> None:
    """The agent's process (spawned): serve every model on TCP and on a Unix socket, send
    ("ready", {name: (port, socket path, image)}) — or ("error", why) — then time in-process
    calls when asked — ("time", name) → (ms, classes) — until told to stop (or the parent
    goes away)."""
    from device_agent.localapi import LocalAPI

    try:
        servings = build(catalog_dir, cache_dir)
    except (OSError, ValueError, KeyError) as exc:  # e.g. a catalog of an older format
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    apis, where, rng = [], {}, np.random.default_rng(0)
    try:
        for k, (name, serving) in enumerate(servings.items()):
            spec = serving.slot.get().input
            shape = (1, *spec.size) if spec.channels == 1 else (1, spec.channels, *spec.size)
            path = sock_dir / f"{k}.sock"
            apis += [LocalAPI(serving, port=0), LocalAPI(serving, path=path)]
            for api in apis[-2:]:
                api.start()
            where[name] = (apis[-2].port, path, rng.integers(0, 256, shape, dtype=np.uint8))
        conn.send(("ready", where))
        while (msg := conn.recv())[0] == "time":
            x = where[msg[1]][2]
            t0 = time.perf_counter()
            pred = servings[msg[1]].infer(x)
            conn.send(((time.perf_counter() - t0) * 1e3, pred.classes))
    except EOFError:
        pass
    finally:
        for api in apis:
            api.stop()


def json_body(x: np.ndarray) -> bytes:
    """The JSON body of an earlier client: the array as nested lists."""
    return json.dumps({"array": x.tolist()}).encode()


def _answer(status: int, raw: bytes) -> list[int]:
    doc = json.loads(raw)
    if status != 200:
        raise RuntimeError(f"local API answered {status}: {doc}")
    return doc["classes"]


def asker(way: str, port: int, path: Path, x: np.ndarray) -> Callable[[], list[int]]:
    """One request of `way` (see WAYS) for `x`: the body made, POSTed, the answer decoded;
    returns the classes."""
    _, client, transport, body = next(w for w in WAYS if w[0] == way)
    encode, ctype = ((infer_client.npy_body, infer_client.NPY) if body == "npy"
                     else (json_body, "application/json"))
    if client == "restnet":
        conn = (infer_client.Connection(socket=path) if transport == "unix"
                else infer_client.Connection(port))
        return lambda: _answer(*conn.request("POST", "/v1/infer", encode(x), ctype))
    if client == "http.client":
        held = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

        def ask() -> list[int]:
            held.request("POST", "/v1/infer", encode(x), {"Content-Type": ctype})
            resp = held.getresponse()
            return _answer(resp.status, resp.read())
        return ask
    url = f"http://127.0.0.1:{port}/v1/infer"

    def ask_urllib() -> list[int]:
        req = urllib.request.Request(url, encode(x), {"Content-Type": ctype})
        with urllib.request.urlopen(req, timeout=30) as resp:
            return _answer(resp.status, resp.read())
    return ask_urllib


def measure(conn: PipeEnd, where: dict[str, tuple[int, Path, np.ndarray]],
            rounds: int) -> list[dict]:
    """Median ms of the in-process call and of each way over the API, per model: in every
    round, each in turn runs untimed for SETTLE_S, then PER_ROUND timed calls."""
    def in_process(name: str) -> Callable[[], tuple[float, list]]:
        def call() -> tuple[float, list]:
            conn.send(("time", name))
            return conn.recv()
        return call

    def timed(ask: Callable[[], list[int]]) -> Callable[[], tuple[float, list]]:
        def call() -> tuple[float, list]:
            t0 = time.perf_counter()
            classes = ask()
            return (time.perf_counter() - t0) * 1e3, classes
        return call

    calls: dict[tuple[str, str], Callable[[], tuple[float, list]]] = {}
    for name, (port, path, x) in where.items():
        calls[(name, "in process")] = in_process(name)
        for way, *_ in WAYS:
            calls[(name, way)] = timed(asker(way, port, path, x))
    for (name, way), call in calls.items():  # the same model must answer the same
        if (got := call()[1]) != (want := calls[(name, "in process")]()[1]):
            raise RuntimeError(f"{name} over {way}: classes {got}, in process {want}")
    times: dict[tuple[str, str], list[list[float]]] = {key: [] for key in calls}
    for r in range(WARMUP + rounds):
        for key, call in calls.items():
            settled = time.perf_counter() + SETTLE_S
            while time.perf_counter() < settled:
                call()
            got = [call()[0] for _ in range(PER_ROUND)]
            if r >= WARMUP:
                times[key].append(got)
    rows = []
    for name in where:
        base = times[(name, "in process")]
        for label, *_ in WAYS:
            api = times[(name, label)]
            # paired by round: a round's ways run within ~0.3 s of each other, so the
            # machine's drift (a VM's neighbours, clock changes) falls on both sides alike
            over = [statistics.median(a) / statistics.median(b) - 1 for a, b in zip(api, base)]
            rows.append({"model": name, "way": label, "inproc_ms": _median(base),
                         "api_ms": _median(api), "over": statistics.median(over),
                         "over_iqr": statistics.quantiles(over, n=4)[::2]})
    return rows


def _median(rounds: list[list[float]]) -> float:
    return statistics.median(ms for r in rounds for ms in r)


def table(rows: list[dict]) -> list[str]:
    lines = ["| model | local API (transport, body) | in-process ms | local API ms | "
             "overhead %, median of rounds | middle half of rounds |", "|---|---|---|---|---|---|"]
    for r in rows:
        lo, hi = r["over_iqr"]
        lines.append(f"| {r['model']} | {r['way']} | {r['inproc_ms']:.3f} | {r['api_ms']:.3f} | "
                     f"{100 * r['over']:+.1f}% | {100 * lo:+.1f}% … {100 * hi:+.1f}% |")
    return lines


def write_results(lines: list[str]) -> Path:
    """Put `lines` between the serve-bench markers of docs/results.md (a new section before
    the fleet's when there are none yet)."""
    return write_block(START, END, lines, SECTION, before="## Fleet")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=80,
                   help=f"rounds; each times {PER_ROUND} calls of every way and model")
    p.add_argument("--catalog", type=Path, default=ROOT / ".restnet" / "catalog",
                   help="catalog directory (default .restnet/catalog; none there: the tiny "
                        "test models)")
    p.add_argument("--no-write", dest="write", action="store_false",
                   help="do not update docs/results.md")
    args = p.parse_args(argv)
    if args.rounds < 2:
        p.error("--rounds must be at least 2 (the middle half of the rounds is reported)")
    catalog = args.catalog.resolve() if (args.catalog / "catalog.json").is_file() else None
    cmd, load = command_line(), os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        ctx = mp.get_context("spawn")
        conn, child = ctx.Pipe()
        proc = ctx.Process(target=agent, name="serve-bench-agent", daemon=True,
                           args=(catalog, Path(tmp) / "cache", Path(tmp), child))
        proc.start()
        child.close()
        try:
            if not conn.poll(600):
                raise SystemExit("serve_bench: the agent's process did not start in 600 s")
            state, where = conn.recv()
            if state == "error":
                raise SystemExit(f"serve_bench: the agent's process could not load the models: "
                                 f"{where}")
            rows = measure(conn, where, args.rounds)
            conn.send(("stop",))
        except EOFError:
            proc.join(30)
            raise SystemExit(f"serve_bench: the agent's process died (exit code "
                             f"{proc.exitcode})") from None
        finally:
            proc.join(30)
            if proc.is_alive():
                proc.terminate()
    source = (f"the anchors of {os.path.relpath(catalog, ROOT)}" if catalog is not None
              else f"the tiny test models, random weights (no catalog at {args.catalog})")
    worst = max(r["over"] for r in rows if r["way"] in SHIPPED)
    lines = [f"`{cmd}`", "",
             f"Batch 1 (one uint8 image of the model's size), {source}; {args.rounds} "
             f"interleaved rounds of {PER_ROUND} calls of every way (each settled "
             f"{SETTLE_S * 1e3:.0f} ms untimed first): ms columns are medians of all calls, the "
             "overhead is the median over rounds of each round's API ÷ in-process median − 1, "
             "and the middle half of the rounds' figures is beside it; "
             f"{os.cpu_count()} cores (load average {load[0]:.1f} at the start). In process: `Serving.infer` (what `Agent.infer` "
             "runs) timed in the agent's process. Local API: that process serving with "
             "`LocalAPI`, asked from another process; the first two rows as `restnet infer` "
             "asks (one kept-alive connection, a .npy body, request in one write), the others "
             "with a JSON body (nested lists, as earlier clients sent), the standard library's "
             "`http.client` (kept alive; a request's head and body in two writes) and `urllib` "
             "(a new connection per request). Every API row includes making the body and "
             "decoding the answer.", "", *table(rows), "",
             f"Target: the API adds ≤ {100 * TARGET:.0f}% ({' and '.join(SHIPPED)}): worst "
             f"{100 * worst:+.1f}% — {'met' if worst <= TARGET else 'NOT met'}."]
    print("\n".join(lines))
    if args.write:
        print(f"\nwritten to {write_results(lines)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
