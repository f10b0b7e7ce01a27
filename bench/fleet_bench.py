"""The fleet measured end to end: controller, simulated devices and Mosquitto on this machine.

    python bench/fleet_bench.py [--sizes 100,500,1000] [--catalog DIR]

For every fleet size N, in a fresh private broker:

1. Reaction time. The controller runs in this process on its own ClientHost thread; the
   simulated fleet (N real device agents on one ClientHost) runs in a separate spawned process,
   so the two use both cores. The fleet connects first (paced: the broker's listen backlog is
   100; "connect s"), then the controller starts and every device gets its first model. Once
   all are HEALTHY, the battery of every battery-powered device is dropped below the policy's
   0.3 threshold, the crossings staggered over `--stagger` seconds in random order (a stream,
   not one burst); then, after the batteries are restored, once more all at the same instant
   (the burst). The reaction is what the controller measures (`metrics.reactions_ms`): from
   the `ts` of the telemetry that reported the crossing to the controller receiving the
   device's HEALTHY ack. A crossing waits up to one telemetry period (2 s) before any telemetry
   reports it; that wait is not in the reaction, and is shown separately as "crossing →
   HEALTHY". Each reaction is also split into legs (controller / delivery / device / ack)
   from the deployment's SQLite row and the device's own ack times.
2. Controller intake. The fleet is stopped; a flood process (4 paho clients) publishes valid
   Telemetry JSON, QoS 0, as fast as it can for `--flood-s` seconds, for the stopped fleet's
   device IDs (so the controller plans on every message: twin update, open-deployment lookup
   in SQLite, the planner over the catalog — its real work). The controller and a bare paho
   subscriber that only counts (its own ClientHost thread in this process, so the two share
   one GIL) both receive it; intake = messages taken in per second during the flood window,
   also given per CPU-second of each one's thread. The controller conflates telemetry (a
   device's newest report replaces an unapplied older one), so the messages it took in are
   split into applied (validated, twin updated, planned) and conflated.
3. Bytes per adaptation. For each deployment the staggered drop caused: the desired payload
   the controller sent (SQLite `payload_bytes`, plus any segment chunks) against the whole
   model it deploys (catalog `model_bytes`); the median of the per-deployment ratios.
4. Memory per simulated device: RSS of the fleet process once all N are steady, minus its RSS
   before any agent was created (torch imported, shared segments loaded, one verification
   per anchor run), divided by N.
5. Served accuracy, four ways (`--served N` devices, 0 to skip): the demo's policy and
   scenario run as `restnet demo` runs them, with the catalog and then with its anchors only
   (same seed); the simulator's truth judges each, plus an oracle and the best static model
   (restnet/demo.py). Devices start with the anchors the scenario's `provision` gives their
   class, serving the first from their start (its boot model), and fetch other segments as
   chunks (phases 1–4: every anchor, no boot model). Also the seconds over
   budget or without a model, mispredicted rollbacks, the hybrids' share, the bytes of
   stitches and of segments against whole models, and the cost model's error: predicted
   against measured p95 after each device's first three reports, median / p90 (n), for every
   scored report, on a device's first model, and on the first report of a model new to it.

Prints markdown tables (the command line first) and writes them into docs/results.md between
the fleet-bench markers. Targets (figures, not assertions), from the denial-of-service issue:
reaction p99 ≤ 250 ms staggered and ≤ 600 ms all at once; intake ≥ 0.8 of the bare
subscriber; median adaptation < 2% of the whole model.
Every phase has a deadline; brokers and processes are cleaned up on error too.
"""
from __future__ import annotations

import argparse
import gc
import logging
import math
import multiprocessing as mp
import os
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

from benchlib import command_line, write_block  # bench/ is the script's own folder

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

log = logging.getLogger("fleet_bench")

THRESHOLD = 0.3  # the policy's battery mode: below it → min_energy
LOW, HIGH = 0.2, 0.9  # battery levels the scenario sets (crossing down / back up)
START, END = "<!-- fleet-bench -->", "<!-- /fleet-bench -->"


class PhaseTimeout(RuntimeError):
    """A phase did not reach its condition before its deadline."""


def setup_logging(level: int) -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(processName)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("fleet_bench").setLevel(level)
    if level <= logging.DEBUG:
        logging.getLogger().setLevel(logging.INFO)


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    v = sorted(values)
    return v[max(0, min(len(v), math.ceil(q / 100 * len(v))) - 1)]


def thread_cpu(native_ids) -> list[float]:
    """CPU seconds (user + system) used so far by each of this process's threads given."""
    import psutil

    times = {t.id: t.user_time + t.system_time for t in psutil.Process().threads()}
    return [times.get(i, 0.0) for i in native_ids]


def rss_bytes() -> int:
    import psutil

    gc.collect()
    return psutil.Process().memory_info().rss


# ---- the simulated fleet (a spawned process) --------------------------------------------------

def fleet_process(conn, cfg: dict) -> None:
    """N real agents on one ClientHost in this process's main thread, driven by commands from
    the benchmark over `conn`: status, rss, set (battery change), crossings, stop."""
    setup_logging(cfg["log_level"])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    try:
        _fleet_main(conn, cfg)
    except Exception:
        log.exception("fleet process failed")
        try:
            conn.send(("error", traceback.format_exc()))
        except OSError:
            pass


def _fleet_main(conn, cfg: dict) -> None:
    import torch

    torch.set_num_threads(1)  # two cores: the controller needs the other one
    from device_agent.cache import SegmentCache, SegmentRegistry, provision
    from device_agent.runtime import assemble, verify
    from simulators.devices import with_changes
    from fleet_protocol.signing import load_public
    from simulators.fleet import SimFleet
    from stitch_lib.catalog import Catalog

    n, workdir = cfg["n"], Path(cfg["workdir"])
    catalog = Catalog.load(cfg["catalog"])
    master = SegmentCache(workdir / "master")
    provision(master, catalog)  # SimFleet finds the master cache already filled
    registry = SegmentRegistry()  # the shared segment modules, loaded before the baseline
    for seg_id in master.ids():
        registry.get(seg_id, lambda: master.read(seg_id))
    # one forward pass per anchor, as an agent's verification does: torch's one-time
    # allocations belong to the baseline, not to the devices
    for a in catalog.anchors:
        probe = torch.zeros(2, *registry.input_spec(a.segments[0]).shape)
        verify(assemble([registry.get(s, lambda: master.read(s)) for s in a.segments], None, []),
               probe)
    rss0 = rss_bytes()
    t_build = time.monotonic()
    fleet = SimFleet(n, cfg["url"], catalog.root, workdir, telemetry_period=cfg["period"],
                     seed=cfg["seed"], trust=(load_public(Path(cfg["trust"])),))
    fleet.registry = registry
    for d in fleet.devices:
        d.agent.registry = registry
    build_s = time.monotonic() - t_build
    acks: dict[str, dict[str, float]] = {}  # deployment → status → device time of the ack
    recording_on = [False]  # from the first battery change on (nothing in the RSS figure)

    def recording(agent):
        send = agent._ack

        def ack(d, status, **kw):
            if recording_on[0]:
                acks.setdefault(d.deployment_id, {})[status] = time.time()
            send(d, status, **kw)
        return ack

    for d in fleet.devices:
        d.agent._ack = recording(d.agent)
    devices = [(d.id, d.res.cls.battery_powered) for d in fleet.devices]
    by_id = {d.id: d for d in fleet.devices}
    conn.send(("ready", dict(rss0=rss0, build_s=build_s, devices=devices)))

    cmd = conn.recv()  # ("start",) or ("stop",)
    if cmd[0] != "start":
        conn.send(("stopped", None))
        return
    host = fleet.host
    crossings: dict[str, float] = {}
    connect = {"s": None}
    stop = threading.Event()

    def cross(dev_id: str, changes: dict) -> None:  # in the loop thread
        d = by_id[dev_id]
        d.res.state = with_changes(d.res.state, changes)
        crossings[dev_id] = time.time()

    def control() -> None:
        """Answer the benchmark from this thread: one loop pass busy with hundreds of swaps
        would otherwise hold a reply up for seconds."""
        try:
            while not stop.is_set():
                if conn.poll(0.1):
                    cmd = conn.recv()
                    try:
                        _command(*cmd)
                    except Exception:
                        log.exception("fleet command %s failed", cmd[0])
                        conn.send(("error", traceback.format_exc()))
        except (EOFError, OSError):  # the benchmark is gone: stop too
            pass
        finally:
            stop.set()
            host.stop()

    def _command(cmd: str, *arg) -> None:
        if cmd == "status":
            devs = fleet.devices
            conn.send(("status", dict(
                connected=sum(1 for d in devs
                              if d.agent.client is not None and d.agent.client.is_connected()),
                connects=host.stats["connects"], reconnects=host.stats["reconnects"],
                connect_s=connect["s"],
                healthy=sum(1 for d in devs if d.agent.stats["HEALTHY"] >= 1),
                failed=sum(d.agent.stats["FAILED"] for d in devs),
                errors=sum(d.agent.stats["errors"] for d in devs),
                dropped=sum(d.agent.stats["dropped"] for d in devs))))
        elif cmd == "rss":
            conn.send(("rss", rss_bytes()))
        elif cmd == "set":  # (changes, device IDs, stagger seconds)
            changes, ids, stagger = arg
            crossings.clear()
            recording_on[0] = True
            for k, dev_id in enumerate(ids):
                delay = stagger * k / max(1, len(ids) - 1) if stagger > 0 else 0.0
                host.call_later(delay, lambda i=dev_id: cross(i, changes))
            conn.send(("set", len(ids)))
        elif cmd == "crossings":
            conn.send(("crossings", dict(crossings)))
        elif cmd == "acks":  # (deployment IDs,)
            conn.send(("acks", {i: dict(acks.get(i, {})) for i in arg[0]}))
        elif cmd == "stop":
            stop.set()

    controller = threading.Thread(target=control, name="fleet-control", daemon=True)
    controller.start()
    profiler = None
    if cfg.get("profile"):
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    t0 = time.monotonic()
    fleet.start(cfg["credentials"])  # paced connects, in this (the loop's) thread
    log.info("fleet.start() returned after %.2f s, %d connected", time.monotonic() - t0,
             host.stats["connects"])
    def check() -> bool:  # between loop passes
        if connect["s"] is None and host.stats["connects"] >= n:
            connect["s"] = time.monotonic() - t0
        return stop.is_set()

    while not stop.is_set():
        host.run(until=check, timeout=1.0)
    controller.join(5)
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(cfg["profile"])
    fleet.stop()  # death states out, clean disconnects
    host.close()
    conn.send(("stopped", None))


class FleetHandle:
    """The benchmark's side of the fleet process."""

    def __init__(self, ctx, cfg: dict) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=fleet_process, args=(child, cfg), name="fleet",
                                daemon=True)
        self.proc.start()
        child.close()

    def recv(self, expect: str, timeout: float):
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise PhaseTimeout(f"fleet process: no {expect!r} reply within {timeout:.0f} s")
            if self.conn.poll(min(left, 0.5)):
                kind, payload = self.conn.recv()
                if kind == "error":
                    raise RuntimeError(f"fleet process failed:\n{payload}")
                if kind != expect:
                    raise RuntimeError(f"fleet process: expected {expect!r}, got {kind!r}")
                return payload
            if not self.proc.is_alive():
                raise RuntimeError(f"fleet process died (exit code {self.proc.exitcode})")

    def ask(self, cmd: str, *args, timeout: float = 10.0):
        self.conn.send((cmd, *args))
        return self.recv(cmd if cmd != "stop" else "stopped", timeout)

    def close(self) -> None:
        if self.proc.is_alive():
            try:
                self.ask("stop", timeout=10)
            except Exception as exc:
                log.warning("fleet did not stop cleanly: %s", exc)
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.conn.close()


# ---- the telemetry flood (a spawned process) ---------------------------------------------------

def flood_process(conn, cfg: dict) -> None:
    """`clients` paho clients publishing valid Telemetry, QoS 0, as fast as they can."""
    setup_logging(cfg["log_level"])
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        _flood_main(conn, cfg)
    except Exception:
        log.exception("flood process failed")
        try:
            conn.send(("error", traceback.format_exc()))
        except OSError:
            pass


def _flood_main(conn, cfg: dict) -> None:
    from fleet_protocol.messages import Telemetry, decode
    from fleet_runtime.mqtt import ClientHost, make_client, parse_url
    from fleet_protocol.topics import Topics

    t = Topics()
    host = ClientHost()
    clients = [make_client(f"flood-{os.getpid()}-{k}", **login)
               for k, login in enumerate(cfg["logins"])]
    for c in clients:
        host.add(c, *parse_url(cfg["url"]))
    host.run(until=lambda: all(c.is_connected() for c in clients), timeout=15)
    if not all(c.is_connected() for c in clients):
        raise RuntimeError("flood clients did not connect")
    devices = cfg["devices"]  # (device ID, battery powered)
    topics = [t.telemetry(d) for d, _ in devices]
    # the devices' current state: battery devices low (as the scenario left them), mains None
    fmt = [('{"v":1,"kind":"telemetry","seq":%d,"ts":%.6f,"cpu":0.2,"mem_free_mb":512.0,'
            + (f'"battery":{LOW},' if bat else "")
            + '"charging":false,"temp_c":40.0,"inferences":0}') for _, bat in devices]
    for f in {*fmt}:
        decode(Telemetry, (f % (1, time.time())).encode())  # valid, or fail loudly now
    conn.send(("ready", None))
    if not conn.poll(30) or conn.recv()[0] != "go":
        return
    n, sent, batch = len(devices), 0, 100
    t0 = time.time()
    end = t0 + cfg["seconds"]
    while time.time() < end:
        for c in clients:
            if c.want_write():  # the last batch is not on the wire yet: back-pressure
                continue
            for _ in range(batch):
                k = sent % n
                c.publish(topics[k], (fmt[k] % (sent // n + 1, time.time())).encode(), qos=0)
                sent += 1
        host.run_once(0.0)
    t1 = time.time()
    host.run(until=lambda: not any(c.want_write() for c in clients), timeout=5)
    conn.send(("done", dict(sent=sent, t0=t0, t1=t1)))
    for c in clients:
        host.remove(c)
    host.run(timeout=0.3)
    host.close()


# ---- the controller side (this process) ---------------------------------------------------------

def write_policy(path: Path, catalog_dir: Path, reconcile_s: float) -> Path:
    import yaml

    doc = {"catalog": str(Path(catalog_dir).resolve()), "reconcile_interval_s": reconcile_s,
           "defaults": {"objective": "max_accuracy",
                        "constraints": {"min_accuracy": 0.0},
                        "battery_modes": [{"below": THRESHOLD, "objective": "min_energy",
                                           "min_accuracy": 0.0}],
                        "hysteresis": {"min_dwell_s": 0, "min_gain": 0.0},
                        "finetune_on_demand": False}}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def call_in_host(host, fn, timeout: float = 10.0):
    """Run `fn` in the ClientHost's thread (where fleet state lives) and return its result."""
    box: dict = {}
    done = threading.Event()

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed back to the caller
            box["error"] = exc
        finally:
            done.set()

    host.submit(run)
    if not done.wait(timeout):
        raise PhaseTimeout(f"controller thread did not answer within {timeout:.0f} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def wait_for(cond, timeout: float, what: str, poll: float = 0.25, strict: bool = True) -> float:
    """Poll `cond()` until true; returns the seconds it took. At `timeout`: PhaseTimeout, or
    with strict=False a warning and the seconds waited (the caller checks what it got)."""
    t0 = time.monotonic()
    while True:
        if cond():
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            if strict:
                raise PhaseTimeout(f"{what}: not reached within {timeout:.0f} s")
            log.warning("%s: not reached within %.0f s; going on", what, timeout)
            return time.monotonic() - t0
        time.sleep(poll)


class TriggerLog(dict):
    """The controller's `triggers` dict (deployment → trigger telemetry ts) that also keeps
    every entry in `.seen` after the controller pops it, to split reactions into parts."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[str, float] = {}

    def __setitem__(self, key: str, value: float) -> None:
        self.seen[key] = value
        super().__setitem__(key, value)


class Run:
    """One fleet size in its own broker, temp dir and processes."""

    def __init__(self, n: int, args, ctx, catalog_dir: Path, tmp: Path) -> None:
        self.n, self.args, self.ctx, self.catalog_dir, self.tmp = n, args, ctx, catalog_dir, tmp
        self.row: dict = {"N": n, "label": str(n), "notes": []}
        self.broker = self.fleet = self.host = self.ctl = self.thread = None

    def note(self, text: str) -> None:
        log.warning("N=%s: %s", self.row["label"], text)
        self.row["notes"].append(text)

    # -- the whole run, always cleaned up ----------------------------------------------------
    def execute(self) -> dict:
        t0 = time.monotonic()
        try:
            self._setup()
            self._steady()
            self._reactions()
            self._intake()
        except Exception as exc:
            log.error("N=%d failed: %s", self.n, exc, exc_info=log.isEnabledFor(logging.DEBUG))
            self.note(f"stopped early: {type(exc).__name__}: {str(exc).splitlines()[0]}")
        finally:
            self._cleanup()
        self.row["wall_s"] = time.monotonic() - t0
        return self.row

    def _setup(self) -> None:
        from fleet_controller.service import Controller
        from fleet_runtime.mqtt import ClientHost
        from fleet_protocol.signing import KeyDir
        from simulators.broker import start_broker

        from simulators.devices import make_fleet

        ids = [dev_id for dev_id, _ in make_fleet(self.n, None, self.args.seed)]
        # logins and ACLs on; client IDs are usernames, so every connection beside the
        # controller's (the bare subscriber, each flood client) has an operator login
        floods = [f"flood-{k}" for k in range(self.args.flood_clients)]
        self.broker = start_broker(self.tmp / "broker", devices=ids,
                                   operators=["bare-counter", *floods])
        self.login = {"username": "controller", "password": self.broker.creds["controller"]}
        self.logins = {u: {"username": u, "password": self.broker.creds[u]}
                       for u in ["bare-counter", *floods]}
        self.url = self.broker.url
        log.info("N=%d: broker %s", self.n, self.url)
        policy = write_policy(self.tmp / "fleet.yaml", self.catalog_dir, self.args.reconcile_s)
        self.host = ClientHost()
        KeyDir(self.tmp / "keys").init()
        self.ctl = Controller(policy, self.tmp / "controller", self.host, self.tmp / "keys",
                              **self.login)
        self.ctl.triggers = self.trigger_log = TriggerLog()  # a record of what it measures from
        self.fleet = FleetHandle(self.ctx, dict(
            n=self.n, url=self.url, catalog=str(self.catalog_dir),
            workdir=str(self.tmp / "fleet"), period=self.args.period, seed=self.args.seed,
            trust=str(self.tmp / "keys" / "controller.pub"), credentials=dict(self.broker.creds),
            log_level=log.getEffectiveLevel(),
            profile=(str(self.args.profile_fleet / f"fleet-{self.row['label'].replace(' ', '-')}"
                         ".prof") if self.args.profile_fleet else None)))
        ready = self.fleet.recv("ready", timeout=180 + 0.2 * self.n)
        self.devices = ready["devices"]
        # in a seeded random order, so the stagger does not cross one device class after another
        bat = [d for d, b in self.devices if b]
        self.battery_ids = random.Random(self.args.seed).sample(bat, len(bat))
        self.row["rss0"] = ready["rss0"]
        log.info("N=%d: fleet process ready (agents built in %.1f s, baseline RSS %.0f MB)",
                 self.n, ready["build_s"], ready["rss0"] / 2**20)

    def _status(self) -> dict:
        return self.fleet.ask("status")

    def _open_deployments(self) -> int:
        return len(self.ctl.store.deployments(open_only=True))

    def _steady(self) -> None:
        """Connect the fleet (before the controller, so that the connect time is the
        connections alone, not the first deployments the simulator runs meanwhile), then start
        the controller and wait until every device runs its first model."""
        from fleet_runtime.mqtt import parse_url, run_in_thread

        n = self.n
        self.fleet.conn.send(("start",))
        state: dict = {}

        def connected() -> bool:
            state.update(self._status())
            return state["connects"] >= n

        wait_for(connected, 60 + 0.05 * n, f"all {n} devices connected", poll=0.1,
                 strict=False)
        self.row["connect_s"] = state.get("connect_s")
        if state.get("connect_s") is None:
            self.note(f"only {state.get('connects')} of {n} devices connected")
        self.thread = run_in_thread(self.host, "controller")
        self.ctl.start(*parse_url(self.url))
        wait_for(lambda: self.ctl.client is not None and self.ctl.client.is_connected(), 15,
                 "controller connected", poll=0.05)
        deadline = self.args.steady_timeout or (60 + 0.2 * n)

        def steady() -> bool:
            state.update(self._status())
            return (state["healthy"] >= n and self.ctl.metrics.adaptations >= n
                    and self._open_deployments() == 0)

        took = wait_for(steady, deadline, f"all {n} devices HEALTHY on a first model",
                        strict=False)
        self.row["steady_s"] = took
        if state.get("healthy", 0) < n:
            self.note(f"steady state not reached: {state.get('healthy')} of {n} HEALTHY "
                      f"after {took:.0f} s ({state.get('failed')} FAILED acks, "
                      f"{self._open_deployments()} deployments open)")
        rss1 = self.fleet.ask("rss")
        self.row["kb_per_device"] = (rss1 - self.row["rss0"]) / n / 1024
        self.row["rss1"] = rss1
        log.info("N=%d: steady in %.1f s (connect %.2f s); fleet RSS %.0f → %.0f MB", n, took,
                 state.get("connect_s") or float("nan"), self.row["rss0"] / 2**20,
                 rss1 / 2**20)

    # -- 1 and 3: reactions and bytes ----------------------------------------------------------
    def _drop(self, label: str, level: float, stagger: float) -> dict:
        """Set every battery device's battery to `level` (staggered); wait until the
        controller has seen each crossing and every resulting deployment has settled."""
        ctl, ids = self.ctl, self.battery_ids
        m = ctl.metrics
        before = dict(r=len(m.reactions_ms), adaptations=m.adaptations, failures=m.failures,
                      desired=m.desired_bytes, chunk=m.chunk_bytes, whole=m.whole_model_bytes)
        known = {d.id for d in ctl.store.deployments()}
        t_set = time.time()
        self.fleet.ask("set", {"battery": level, "charging": False}, ids, stagger)
        below = level < THRESHOLD

        def reported() -> int:
            def count() -> int:
                hits = 0
                for i in ids:
                    tw = ctl.twins.get(i)
                    if tw is not None and tw.battery is not None and \
                            (tw.battery < THRESHOLD) == below:
                        hits += 1
                return hits
            return call_in_host(self.host, count)

        state: dict = {}

        def settled() -> bool:
            if len(m.reactions_ms) - before["r"] >= len(ids) and self._open_deployments() == 0:
                return True
            if time.time() < t_set + stagger + 0.5:
                return False
            state["reported"] = reported()
            if state["reported"] < len(ids) or self._open_deployments():
                state.pop("quiet_since", None)
                return False
            # every crossing reported, nothing open: done once no new reaction for a moment
            r = len(m.reactions_ms)
            if state.get("quiet_r") != r:
                state["quiet_r"], state["quiet_since"] = r, time.monotonic()
            return time.monotonic() - state["quiet_since"] > 1.0

        timeout = stagger + 3 * self.args.period + 30 + 0.03 * self.n
        took = wait_for(settled, timeout, f"{label}: adaptations settled", poll=0.1,
                        strict=False)
        reactions = list(m.reactions_ms[before["r"]:])
        deps = [d for d in ctl.store.deployments() if d.id not in known]
        healthy = [d for d in deps if d.status == "HEALTHY"]
        crossings = self.fleet.ask("crossings")
        e2e = [(d.updated - crossings[d.device_id]) * 1e3 for d in healthy
               if d.device_id in crossings]
        # the reaction in parts: controller (trigger ts → desired published), delivery
        # (→ device RECEIVED: broker, simulated link, fleet loop), device (RECEIVED →
        # HEALTHY: verify, swap, health check), ack (device HEALTHY → controller)
        dev = self.fleet.ask("acks", [d.id for d in healthy])
        parts: dict[str, list[float]] = {k: [] for k in ("controller", "delivery", "device",
                                                         "ack")}
        for d in healthy:
            trig, a = self.trigger_log.seen.get(d.id), dev.get(d.id, {})
            if trig is None or "RECEIVED" not in a or "HEALTHY" not in a:
                continue
            parts["controller"].append((d.created - trig) * 1e3)
            parts["delivery"].append((a["RECEIVED"] - d.created) * 1e3)
            parts["device"].append((a["HEALTHY"] - a["RECEIVED"]) * 1e3)
            parts["ack"].append((d.updated - a["HEALTHY"]) * 1e3)
        res = dict(label=label, devices=len(ids), settle_s=took, reactions=reactions,
                   deployments=len(deps), healthy=len(healthy),
                   not_healthy=[(d.device_id, d.status, d.reason) for d in deps
                                if d.status != "HEALTHY"],
                   adaptations=m.adaptations - before["adaptations"],
                   failures=m.failures - before["failures"],
                   desired_bytes=m.desired_bytes - before["desired"],
                   chunk_bytes=m.chunk_bytes - before["chunk"],
                   whole_bytes=m.whole_model_bytes - before["whole"],
                   ratios=[d.payload_bytes / ctl.entries[d.hybrid].model_bytes for d in healthy
                           if d.hybrid in ctl.entries and ctl.entries[d.hybrid].model_bytes],
                   e2e=e2e, parts=parts, targets=sorted({ctl.entries[d.hybrid].name for d in healthy
                                            if d.hybrid in ctl.entries}))
        log.info("N=%d %s: %d crossings → %d reactions (p50 %s, p99 %s ms), %d deployments "
                 "(%d HEALTHY) in %.1f s; parts p50/p99 ms: %s", self.n, label, len(ids),
                 len(reactions), _fmt(percentile(reactions, 50)),
                 _fmt(percentile(reactions, 99)), len(deps), len(healthy), took,
                 ", ".join(f"{k} {_pp(v)}" for k, v in parts.items()))
        if len(healthy) < len(ids):
            self.note(f"{label}: {len(ids)} crossings, {len(healthy)} HEALTHY adaptations "
                      f"({len(deps) - len(healthy)} other deployments: "
                      f"{res['not_healthy'][:3]}; {state.get('reported', '?')} crossings "
                      f"reported to the controller)")
        return res

    def _reactions(self) -> None:
        if not self.battery_ids:
            self.note("no battery-powered devices: nothing to adapt")
            return
        a = self.args
        self.row["stagger"] = self._drop(f"stagger {a.stagger:g} s", LOW, a.stagger)
        if a.burst:
            self._drop("restore", HIGH, a.stagger)
            self.row["burst"] = self._drop("burst", LOW, 0.0)

    # -- 2: intake -------------------------------------------------------------------------------
    def _intake(self) -> None:
        from fleet_runtime.mqtt import ClientHost, make_client, parse_url, run_in_thread
        from fleet_protocol.topics import Topics

        st = self._status()
        self.row["agent_errors"] = st["errors"]
        self.row["reconnects"] = st["reconnects"]
        self.fleet.close()  # the flood speaks for the fleet's devices from here on
        self.fleet = None

        bare = {"n": 0}
        subscribed = threading.Event()
        bare_host = ClientHost()
        client = make_client(f"bare-counter-{os.getpid()}", **self.logins["bare-counter"])

        def on_message(c, u, msg) -> None:
            bare["n"] += 1

        client.on_message = on_message
        client.on_connect = lambda c, u, f, rc, p: c.subscribe(Topics().all_telemetry, qos=0)
        client.on_subscribe = lambda c, u, mid, rcs, p: subscribed.set()
        bare_host.add(client, *parse_url(self.url))
        bare_thread = run_in_thread(bare_host, "bare-subscriber")
        flood_conn, child = self.ctx.Pipe()
        flood = self.ctx.Process(target=flood_process, name="flood", daemon=True, args=(child, dict(
            url=self.url, devices=self.devices, clients=self.args.flood_clients,
            logins=[self.logins[f"flood-{k}"] for k in range(self.args.flood_clients)],
            seconds=self.args.flood_s, log_level=log.getEffectiveLevel())))
        try:
            flood.start()
            child.close()
            if not subscribed.wait(15):
                raise PhaseTimeout("bare subscriber did not subscribe within 15 s")
            kind, _ = _recv(flood_conn, 60, flood)
            if kind != "ready":
                raise RuntimeError(f"flood process: {_}")
            stats = self.ctl.stats

            def applied() -> int:
                return stats["in_telemetry"] + stats["dropped"]

            def ctl_count() -> int:  # taken in: applied, or replaced by a newer report
                return applied() + stats["telemetry_conflated"]

            tids = (self.thread.native_id, bare_thread.native_id)
            c0, b0, p0, a0 = ctl_count(), bare["n"], self.ctl.stats["errors"], applied()
            cpu0 = thread_cpu(tids)
            w0 = time.monotonic()
            flood_conn.send(("go",))
            kind, done = _recv(flood_conn, self.args.flood_s + 30, flood)
            if kind != "done":
                raise RuntimeError(f"flood process: {done}")
            c1, b1, a1 = ctl_count(), bare["n"], applied()
            window = time.monotonic() - w0
            cpu1 = thread_cpu(tids)
            state = {"last": None, "since": time.monotonic()}

            def drained() -> bool:  # both counters still for a second
                now = (ctl_count(), bare["n"])
                if now != state["last"]:
                    state["last"], state["since"] = now, time.monotonic()
                return time.monotonic() - state["since"] > 1.0

            drain_s = wait_for(drained, 30, "intake drained", poll=0.1, strict=False)
            c2, b2 = ctl_count(), bare["n"]
            sent = done["sent"]
            self.row["intake"] = dict(
                sent=sent, pub_rate=sent / (done["t1"] - done["t0"]), window=window,
                ctl_rate=(c1 - c0) / window, bare_rate=(b1 - b0) / window,
                applied_rate=(a1 - a0) / window,
                ctl_total=c2 - c0, bare_total=b2 - b0, drain_s=drain_s,
                ctl_errors=self.ctl.stats["errors"] - p0,
                ctl_cpu=cpu1[0] - cpu0[0], bare_cpu=cpu1[1] - cpu0[1])
            i = self.row["intake"]
            i["ratio"] = i["ctl_rate"] / i["bare_rate"] if i["bare_rate"] else None
            # per CPU-second of each one's own thread: what each costs per message, whatever
            # share of the GIL and the cores it got
            i["ctl_per_cpu"] = (c1 - c0) / i["ctl_cpu"] if i["ctl_cpu"] > 0 else None
            i["bare_per_cpu"] = (b1 - b0) / i["bare_cpu"] if i["bare_cpu"] > 0 else None
            i["cpu_ratio"] = (i["ctl_per_cpu"] / i["bare_per_cpu"]
                              if i["ctl_per_cpu"] and i["bare_per_cpu"] else None)
            log.info("N=%d intake: published %d (%.0f/s); controller %.0f/s, bare %.0f/s "
                     "(ratio %s; per CPU-second %s / %s, ratio %s); totals after drain "
                     "%d / %d", self.n, sent, i["pub_rate"], i["ctl_rate"], i["bare_rate"],
                     _fmt(i["ratio"], "{:.2f}"), _fmt(i["ctl_per_cpu"]),
                     _fmt(i["bare_per_cpu"]), _fmt(i["cpu_ratio"], "{:.2f}"), i["ctl_total"],
                     i["bare_total"])
            flood.join(10)
        finally:
            if flood.is_alive():
                flood.terminate()
                flood.join(5)
            if flood.is_alive():
                flood.kill()
                flood.join()
            flood_conn.close()
            bare_host.remove(client)
            time.sleep(0.2)
            bare_host.stop()
            bare_thread.join(5)
            bare_host.close()

    # -- cleanup ---------------------------------------------------------------------------------
    def _cleanup(self) -> None:
        if self.fleet is not None:
            self.fleet.close()
        if self.ctl is not None and self.thread is None:  # never started
            self.ctl.store.close()
        elif self.ctl is not None:
            try:
                self.row["ctl_errors"] = self.ctl.stats["errors"]
                call_in_host(self.host, self.ctl.stop, timeout=10)
                time.sleep(0.3)  # the offline state and the disconnect go out
            except Exception as exc:
                log.warning("controller did not stop cleanly: %s", exc)
                if self.ctl.scheduler.running:
                    self.ctl.scheduler.shutdown(wait=False)
        if self.host is not None:
            self.host.stop()
            if self.thread is not None:
                self.thread.join(5)
            self.host.close()
        if self.broker is not None:
            self.broker.stop()


def _recv(conn, timeout: float, proc):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if conn.poll(0.5):
            kind, payload = conn.recv()
            if kind == "error":
                raise RuntimeError(f"{proc.name} process failed:\n{payload}")
            return kind, payload
        if not proc.is_alive():
            raise RuntimeError(f"{proc.name} process died (exit code {proc.exitcode})")
    raise PhaseTimeout(f"{proc.name} process: no reply within {timeout:.0f} s")


# ---- report ---------------------------------------------------------------------------------

def _fmt(x, spec: str = "{:.0f}") -> str:
    return "—" if x is None else spec.format(x)


def _pp(values: list[float]) -> str:
    """'p50 / p99' of `values`, in whole units."""
    return " / ".join(_fmt(percentile(values, q)) for q in (50, 99)) if values else "—"


def tables(rows: list[dict], args) -> list[str]:
    out = ["| N | reaction p50 ms | p99 ms | max ms | adaptations | intake ratio "
           "(ctl/bare) | median bytes ratio | KB/device | connect s |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s, i = r.get("stagger") or {}, r.get("intake") or {}
        rx = s.get("reactions") or []
        ratios = s.get("ratios") or []
        out.append("| " + " | ".join([
            r["label"], _fmt(percentile(rx, 50), "{:.1f}"), _fmt(percentile(rx, 99), "{:.1f}"),
            _fmt(max(rx) if rx else None, "{:.1f}"),
            f"{len(rx)}/{s['devices']}" if s else "—",
            _fmt(i.get("ratio"), "{:.2f}"),
            _fmt(statistics.median(ratios) if ratios else None, "{:.2%}"),
            _fmt(r.get("kb_per_device"), "{:.1f}"), _fmt(r.get("connect_s"), "{:.2f}")]) + " |")
    out.append("")
    out.append("Reactions in detail (ms, p50 / p99): as the controller measures them (from the "
               "crossing telemetry's ts), then in parts — controller: trigger ts → desired "
               "published; delivery: → the device's RECEIVED (broker, simulated link, fleet "
               "loop); device: RECEIVED → HEALTHY (verify, swap, health check; all simulated "
               "devices share one core); ack: → controller. crossing → HEALTHY adds the wait of "
               f"up to one telemetry period ({args.period:g} s) before a crossing is reported. "
               "burst: every battery crosses at the same instant.")
    out.append("")
    out.append("| N | crossings | reactions | reaction p50 / p99 / max | crossing → HEALTHY "
               "| controller | delivery | device | ack |")
    out.append("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        for key in ("stagger", "burst"):
            ph = r.get(key)
            if not ph:
                continue
            rx, parts = ph["reactions"], ph["parts"]
            out.append("| " + " | ".join([
                r["label"], ph["label"], f"{len(rx)}/{ph['devices']}",
                " / ".join(_fmt(x, "{:.1f}") for x in (percentile(rx, 50), percentile(rx, 99),
                                                      max(rx) if rx else None)),
                _pp(ph["e2e"]), _pp(parts["controller"]), _pp(parts["delivery"]),
                _pp(parts["device"]), _pp(parts["ack"])]) + " |")
    out.append("")
    out.append("Intake (messages/s taken in during the flood, and per CPU-second of the handling "
               "thread; of the controller's, those applied — the rest were conflated, replaced "
               "by a newer report of the same device before they were applied) and bytes "
               "(summed over the staggered adaptations):")
    out.append("")
    out.append("| N | flood sent/s | controller msg/s (per CPU-s) | of which applied/s "
               "| bare msg/s (per CPU-s) "
               "| ratio per CPU-s | handled after drain ctl / bare | bytes sent / adaptation "
               "| whole model / adaptation | aggregate ratio | steady s | wall s |")
    out.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        s, i = r.get("stagger") or {}, r.get("intake") or {}
        ad = s.get("healthy") or 0
        sent = (s.get("desired_bytes", 0) + s.get("chunk_bytes", 0)) / ad if ad else None
        whole = s.get("whole_bytes", 0) / ad if ad else None
        out.append("| " + " | ".join([
            r["label"], _fmt(i.get("pub_rate")),
            f"{_fmt(i.get('ctl_rate'))} ({_fmt(i.get('ctl_per_cpu'))})" if i else "—",
            _fmt(i.get("applied_rate")),
            f"{_fmt(i.get('bare_rate'))} ({_fmt(i.get('bare_per_cpu'))})" if i else "—",
            _fmt(i.get("cpu_ratio"), "{:.2f}"),
            f"{i['ctl_total']} / {i['bare_total']} of {i['sent']}" if i else "—",
            _fmt(sent), _fmt(whole),
            _fmt(sent / whole if sent is not None and whole else None, "{:.2%}"),
            _fmt(r.get("steady_s"), "{:.1f}"), _fmt(r.get("wall_s"), "{:.0f}")]) + " |")
    out.append("")
    targets = [t for r in rows for t in (r.get("stagger") or {}).get("targets", [])]
    if targets:
        out.append(f"Adaptations went to: {', '.join(sorted(set(targets)))}.")
    for variant in dict.fromkeys(r["label"].partition(" ")[2] for r in rows):
        same = sorted((r for r in rows if r["label"].partition(" ")[2] == variant
                       and r.get("rss1") and r.get("rss0")), key=lambda r: r["N"])
        if len(same) >= 2 and same[-1]["N"] > same[0]["N"]:
            a, b = same[0], same[-1]
            slope = ((b["rss1"] - b["rss0"]) - (a["rss1"] - a["rss0"])) / (b["N"] - a["N"])
            out.append(f"Memory{' (' + variant + ')' if variant else ''}: "
                       f"{slope / 1024:.1f} KB per additional device between N={a['N']} and "
                       f"N={b['N']} (the KB/device column also spreads the fleet process's "
                       "fixed growth over N).")
    out += target_lines(rows)
    for r in rows:
        for note in r["notes"]:
            out.append(f"- N={r['label']}: {note}")
    out.append("")
    return out


def target_lines(rows: list[dict]) -> list[str]:
    """The targets, checked against the largest fleet of each variant measured."""
    out = []
    for r in rows:
        s, i = r.get("stagger") or {}, r.get("intake") or {}
        ratios, checks = s.get("ratios") or [], []
        for phase, limit in (("stagger", 250), ("burst", 600)):
            rx = (r.get(phase) or {}).get("reactions") or []
            if rx:
                p99 = percentile(rx, 99)
                checks.append(f"reaction p99 ({phase}) {p99:.0f} ms "
                              f"{'≤' if p99 <= limit else '>'} {limit} ms "
                              f"({'met' if p99 <= limit else 'NOT met'})")
        if i.get("ratio") is not None:
            checks.append(f"intake {i['ratio']:.2f} {'≥' if i['ratio'] >= 0.8 else '<'} 0.8 "
                          f"({'met' if i['ratio'] >= 0.8 else 'NOT met'})")
        if ratios:
            med = statistics.median(ratios)
            checks.append(f"median adaptation {med:.2%} {'<' if med < 0.02 else '≥'} 2% "
                          f"({'met' if med < 0.02 else 'NOT met'})")
        if checks:
            out.append(f"- Targets at N={r['label']}: " + "; ".join(checks) + ".")
    return out


def hybrid_payload_ratios(cat) -> list[float]:
    """Desired payload / model_bytes for every hybrid of the catalog, encoded the way the
    controller encodes a deployment (stitch delta inline, segments by ID)."""
    from fleet_controller.artifacts import Artifacts
    from fleet_protocol.messages import Desired
    from fleet_protocol.signing import SigningKey, seal

    art, out, key = Artifacts(cat), [], SigningKey.generate()
    for e in cat.hybrids:
        front, back = art.split(e)
        d = Desired(device_id="device-000", generation=1, deployment_id="device-000.1",
                    hybrid=e.id, name=e.name, front=front, back=back, stitch=art.delta(e),
                    expected_latency_ms=10.0, ts=time.time(),
                    reason=f"battery 0.20 < 0.30: min_energy → {e.name} "
                           f"({e.flops / 1e6:.1f} MFLOPs)")
        out.append(len(seal(d, [key])) / e.model_bytes)
    return out


def served_comparison(args, catalog_dir: Path, tmp: Path) -> dict:
    """Phase 5: the demo's scenario with the catalog, then with its anchors only."""
    from restnet.demo import anchors_only, run, with_catalog
    from stitch_lib.catalog import Catalog

    demo = argparse.Namespace(scenario=args.served_scenario, devices=args.served,
                              seed=args.seed)
    catalog = Catalog.load(catalog_dir)
    result = run(demo, with_catalog(args.served_policy, catalog_dir, tmp / "fleet.yaml"),
                 catalog, tmp / "restnet", live=False)
    base = anchors_only(catalog, tmp / "anchors-catalog")
    other = run(demo, with_catalog(args.served_policy, base.root, tmp / "anchors.yaml"), base,
                tmp / "anchors", live=False)
    result["served_accuracy"]["anchors_only"] = other["served_accuracy"]["restnet"]
    return result


def served_lines(r: dict, args) -> list[str]:
    from restnet.demo import cost_error_text, error_figures

    acc, err = r["served_accuracy"], r["cost_error"]
    return ["", f"Served accuracy ({r['devices']} devices, {args.served_scenario}, policy "
                f"{args.served_policy}, seed {args.seed}): mean test accuracy of the model "
                "serving within its budget, over device-seconds; devices start with the "
                "scenario's `provision`, serving its first anchor. Cost model: "
                f"{cost_error_text(err)}.", "",
            "| restnet | anchors only | static | oracle | over budget s | no model s | "
            "rollbacks mispredicted | hybrid share | stitch KB | segment KB (fetched) | "
            "whole models KB | p95 error | on first model | on a new model |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
            "| " + " | ".join([_fmt(acc.get(k), "{:.3f}") for k in
                               ("restnet", "anchors_only", "static", "oracle")] + [
                _fmt(r["budget_violation_s"], "{:.0f}"), _fmt(r["no_model_s"], "{:.0f}"),
                str(r["rollbacks_mispredicted"]), _fmt(r["hybrid_share"], "{:.2f}"),
                _fmt(r["stitch_bytes"] / 1e3, "{:.0f}"),
                f"{_fmt(r['segment_bytes'] / 1e3, '{:.0f}')} ({r['segments_fetched']})",
                _fmt(r["whole_model_bytes"] / 1e3, "{:.0f}"), error_figures(err),
                error_figures(err["first_model"]), error_figures(err["new_model"])]) + " |"]


def write_results(lines: list[str]) -> Path:
    return write_block(START, END, lines, "## Fleet: reaction, intake, bytes, memory")


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="100,500,1000", help="fleet sizes, comma-separated")
    p.add_argument("--catalog", type=Path, default=None,
                   help="catalog directory (default: .restnet/catalog)")
    p.add_argument("--period", type=float, default=2.0, help="telemetry period, seconds")
    p.add_argument("--stagger", type=float, default=5.0,
                   help="seconds over which the battery crossings are spread")
    p.add_argument("--no-burst", dest="burst", action="store_false",
                   help="skip the restore + all-at-once drop")
    p.add_argument("--flood-s", type=float, default=5.0)
    p.add_argument("--flood-clients", type=int, default=4)
    p.add_argument("--reconcile-s", type=float, default=5.0,
                   help="the controller's periodic reconcile-all interval")
    p.add_argument("--steady-timeout", type=float, default=None,
                   help="seconds to wait for all devices HEALTHY (default 60 + 0.2 N)")
    p.add_argument("--profile-fleet", type=Path, default=None, metavar="DIR",
                   help="write a cProfile of each fleet process's loop thread into DIR")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--served", type=int, default=100, metavar="N",
                   help="devices of the served-accuracy runs (0: skip them)")
    p.add_argument("--served-policy", type=Path, default=ROOT / "fleet.yaml")
    p.add_argument("--served-scenario", type=Path, default=ROOT / "scenarios" / "demo.yaml")
    p.add_argument("--workroot", type=Path,
                   default=Path("/dev/shm") if Path("/dev/shm").is_dir() else None,
                   help="where the temp dirs go (default /dev/shm: the one thread that "
                        "simulates all devices fsyncs each device's applied.json)")
    p.add_argument("--no-write", dest="write", action="store_false",
                   help="do not update docs/results.md")
    p.add_argument("-v", "--verbose", action="count", default=0)
    args = p.parse_args(argv)
    setup_logging(logging.DEBUG if args.verbose > 1 else logging.INFO)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    catalog = args.catalog or ROOT / ".restnet" / "catalog"
    if not (catalog / "catalog.json").is_file():
        p.error(f"no catalog at {catalog}: build one with `restnet catalog build` or pass "
                "--catalog DIR")
    catalog = catalog.resolve()
    cmd = command_line()

    signal.signal(signal.SIGTERM, _interrupt)  # clean up brokers and processes on kill too
    ctx = mp.get_context("spawn")
    load = os.getloadavg()
    rows: list[dict] = []
    served: dict | None = None
    t0 = time.monotonic()
    try:
        for n in sizes:
            with tempfile.TemporaryDirectory(prefix=f"fleet-bench-{n}-",
                                             dir=args.workroot) as tmp:
                log.info("=== N=%d (catalog %s) ===", n, catalog)
                rows.append(Run(n, args, ctx, catalog, Path(tmp)).execute())
        if args.served:
            with tempfile.TemporaryDirectory(prefix="fleet-bench-served-",
                                             dir=args.workroot) as tmp:
                log.info("=== served accuracy, N=%d ===", args.served)
                served = served_comparison(args, catalog, Path(tmp))
    except KeyboardInterrupt:
        log.error("interrupted; reporting what was measured")
    total = time.monotonic() - t0

    from stitch_lib.catalog import Catalog

    cat = Catalog.load(catalog)
    lines = [f"`{cmd}`", "",
             f"Catalog {catalog.relative_to(ROOT) if catalog.is_relative_to(ROOT) else catalog} "
             f"({len(cat.anchors)} anchors, {len(cat.hybrids)} hybrids); telemetry every "
             f"{args.period:g} s; battery crossings staggered over {args.stagger:g} s; "
             f"{os.cpu_count()} cores (load average {load[0]:.1f} at the start); the whole run "
             f"took {total:.0f} s.", ""]
    lines += tables(rows, args)
    try:
        hr = hybrid_payload_ratios(cat)
        if hr:
            lines.insert(-1, f"Had an adaptation gone to a hybrid: the desired payload of each of "
                             f"the catalog's {len(hr)} hybrids is {statistics.median(hr):.2%} "
                             f"of its model (median; {min(hr):.2%}–{max(hr):.2%}).")
    except Exception as exc:  # a figure beside the measurement: never fatal
        log.warning("could not size the hybrids' desired payloads: %s", exc)
    if served:
        lines += served_lines(served, args)
    print("\n".join(lines), flush=True)
    if args.write and rows:
        log.info("written to %s", write_results(lines))
    return 0 if rows and all(not any(n.startswith("stopped early") for n in r["notes"])
                             for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
