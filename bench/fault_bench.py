"""A fault run over a simulated fleet: a policy rollout that survives a broker crash, a
controller crash, agents killed mid-download and mid-swap, telemetry loss, a partition and full
disks; then bad inputs, which must be refused.

    python bench/fault_bench.py [--devices 200] [--catalog DIR] [--seed 0]

Everything runs on this machine; every wait has a deadline; the broker and every process are
cleaned up on error too. The faults are about the fleet, not model quality: by default the
catalog is the tests' tiny zoo (tests/conftest.py TINY_ZOO, built once into
.restnet/fault-bench/catalog), its accuracies set to rise with FLOPs as the tests' `catalog`
fixture does, so that max_accuracy and min_energy pick different models.

1. Set-up. A private Mosquitto with logins and ACLs for the controller and every device; a
   signing key; fleet.yaml (max_accuracy; battery below 0.3 → min_energy; hysteresis off;
   waves [10, 50, 100] 3 s apart, abort above 50% failures); the controller as a subprocess
   (so that it can be SIGKILLed); N simulated devices (real agent code, every segment
   provisioned) on one ClientHost thread in this process; 4 real agent processes
   (board-000..003). Wait until every device runs a HEALTHY first deployment.
2. Preparation. 10 simulated devices late in the rollout order lose the segments the
   min_energy target needs, and their disk is full (expected: FAILED "disk full" while the
   old model serves). The real agents stop and restart with RESTNET_CRASH_AT: board-000/001
   "chunk:3" (the target's segments discarded first, so that they download), board-002/003
   "swap". Each SIGKILLs itself during the rollout and is restarted without the variable as
   soon as it dies.
3. Rollout with faults. fleet.yaml's objective becomes min_energy (the controller reloads it
   within 2 s and rolls it out in waves); at fixed offsets from the edit: 20% telemetry loss
   on every simulated device, a partition of 20% of them for 10 s, the broker SIGKILLed and
   restarted, the controller SIGKILLed and restarted. Then wait until every device settled.
4. Bad inputs. With one device's login: garbage, malformed, oversized and wrong-schema
   payloads on its own topics (the controller must drop them), publishes on other devices'
   and the controller's topics (the broker must refuse them: PUBACK reason code 135). With the
   controller's login: unsigned, wrongly signed, tampered, replayed and misaddressed desired
   states to 3 devices (their agents must refuse them and keep their model).
5. Checks. Every deployment terminal, no duplicate (device, generation); the crashed agents'
   caches rebuild, their download resumed with only the missing chunks, and after the swap
   crash the first birth showed the old model and generation.
"""
from __future__ import annotations

import argparse
import bisect
import json
import logging
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

log = logging.getLogger("fault_bench")
START, END = "<!-- fault-bench:start -->", "<!-- fault-bench:end -->"
CRASH = {"board-000": "chunk:3", "board-001": "chunk:3", "board-002": "swap", "board-003": "swap"}
T_LOSS, T_CUT, T_BROKER, T_CONTROLLER = 1.0, 2.0, 5.0, 10.0  # seconds after the policy edit
CUT_S, BROKER_DOWN_S, POLL_S, SETTLE_TIMEOUT_S = 10.0, 1.0, 0.5, 240.0
JUNK = {"garbage": b"\x00\xff\xfe not json", "malformed JSON": b'{"v": 1, "kind": "telemetry",',
        "oversized (300 KB)": b"{" + b" " * 300_000 + b"}",
        "wrong schema": b'{"v": 1, "kind": "nonsense", "cpu": 7}'}


class PhaseTimeout(RuntimeError):
    """A phase did not reach its condition before its deadline."""


def wait_for(cond, timeout: float, what: str, poll: float = 0.2) -> float:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise PhaseTimeout(f"{what}: not reached within {timeout:.0f} s")
        time.sleep(poll)
    return time.monotonic() - t0


def call_in_host(host, fn, timeout: float = 30.0):
    """Run `fn` in the ClientHost's thread, where the fleet's state lives; its result."""
    box, done = {}, threading.Event()

    def run() -> None:
        try:
            box["value"] = fn()
        except Exception as exc:  # handed back to the caller
            box["error"] = exc
        done.set()

    host.submit(run)
    if not done.wait(timeout):
        raise PhaseTimeout(f"the fleet thread did not answer within {timeout:.0f} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def ensure_catalog(path: Path | None) -> Path:
    """`path`, or the tiny zoo catalog built once (accuracies rising with FLOPs)."""
    if path is not None:
        return path.resolve()
    from stitch_lib.catalog import Catalog

    root = ROOT / ".restnet" / "fault-bench"
    if not (root / "catalog" / "catalog.json").is_file():
        log.info("building the tiny zoo catalog into %s (once)", root / "catalog")
        sys.path.insert(0, str(ROOT / "tests"))
        from conftest import TINY_ZOO
        from stitch_lib.build import BuildConfig, build_catalog
        from stitch_lib.data import make_splits
        from stitch_lib.zoo import ZooSpec, build_zoo

        data = dict(source="fashion-mnist", image_size=32, n_train=1000, n_calib=160,
                    n_val=200, n_test=200, seed=0)
        splits = make_splits(**data)
        anchors = build_zoo(ZooSpec.from_dict(TINY_ZOO), splits, root / "anchors")
        build_catalog(anchors, splits, Catalog(root / "catalog"),
                      BuildConfig(top_k=2, screen=3, finetune="none", latency_rounds=3), data=data)
    cat = Catalog.load(root / "catalog")
    for rank, e in enumerate(sorted(cat.entries, key=lambda e: e.flops)):
        e.test_acc = 0.5 + 0.01 * rank
    cat.save()
    return cat.root.resolve()


def pick(cat, objective: str):
    """The planner's choice with finetune_on_demand off: anchors and fine-tuned stitches."""
    ok = [e for e in cat.entries if e.stitch_state in (None, "finetuned")]
    if objective == "min_energy":
        return min(ok, key=lambda e: (e.flops, -e.test_acc, e.id))
    return min(ok, key=lambda e: (-e.test_acc, e.flops, e.id))


def write_policy(path: Path, catalog: Path, objective: str) -> None:
    import yaml

    doc = {"catalog": str(catalog), "reconcile_interval_s": 1,
           "defaults": {"objective": objective,
                        "battery_modes": [{"below": 0.3, "objective": "min_energy"}],
                        "hysteresis": {"min_dwell_s": 0, "min_gain": 0.0},
                        "finetune_on_demand": False},
           "rollout": {"waves": [10, 50, 100], "wave_interval_s": 3, "max_failure_percent": 50}}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
    os.replace(tmp, path)


def secret_file(path: Path, text: str) -> Path:
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write(text)
    return path


class Procs:
    """The controller and the real agents as subprocesses; a dead agent is restarted at once
    (without its crash variable) by a watchdog thread, its death recorded."""

    def __init__(self, tmp: Path, url: str, creds, keys: Path, policy: Path) -> None:
        self.tmp, self.url, self.creds, self.keys, self.policy = tmp, url, creds, keys, policy
        self.ctl: subprocess.Popen | None = None
        self.agents: dict[str, subprocess.Popen] = {}
        self.deaths: dict[str, list[dict]] = defaultdict(list)
        self.lock, self.stopping = threading.Lock(), threading.Event()
        threading.Thread(target=self._watch, name="watchdog", daemon=True).start()

    def _spawn(self, name: str, args: list[str], env: dict | None = None) -> subprocess.Popen:
        pw = secret_file(self.tmp / f"{name}.password", self.creds[name if name in self.creds
                                                                   else "controller"])
        with open(self.tmp / f"{name}.log", "ab") as out:
            return subprocess.Popen(
                [sys.executable, "-m", "restnet.cli", *args, "--broker", self.url, "--username",
                 name if name in self.creds else "controller", "--password-file", str(pw)],
                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})

    def start_controller(self) -> None:
        self.ctl = self._spawn("ctl", ["controller", "--policy", str(self.policy), "--state-dir",
                                       str(self.tmp / "ctl"), "--keys", str(self.keys)])

    def kill_controller(self) -> None:
        self.ctl.send_signal(signal.SIGKILL)
        self.ctl.wait()

    def cache(self, dev: str) -> Path:
        return self.tmp / "boards" / dev

    def start_agent(self, dev: str, crash: str | None = None) -> None:
        env = {"RESTNET_CRASH_AT": crash} if crash else None
        with self.lock:
            self.agents[dev] = self._spawn(dev, [
                "agent", "--device-id", dev, "--cache", str(self.cache(dev)), "--trust",
                str(self.keys / "controller.pub"), "--chunk-size", "4096",
                "--telemetry-period", "1"], env)
            self.agents[dev].crash = crash

    def stop_agent(self, dev: str) -> None:
        with self.lock:
            p = self.agents.pop(dev)
        p.terminate()
        p.wait(20)

    def _watch(self) -> None:
        from device_agent.cache import SegmentCache

        while not self.stopping.wait(0.05):
            for dev, p in list(self.agents.items()):
                if p.poll() is None or self.stopping.is_set():
                    continue
                cache = SegmentCache(self.cache(dev))
                partial = {s.name: cache.in_progress(s.name)
                           for s in (cache.root / "partial").iterdir()}
                death = dict(fault=p.crash, rc=p.returncode, died=time.monotonic(),
                             died_ns=time.time_ns(), partial=partial)
                self.deaths[dev].append(death)
                log.info("%s died (exit %s, fault %s); restarting it", dev, p.returncode, p.crash)
                if len(self.deaths[dev]) <= 3:
                    self.start_agent(dev)
                    death["restarted"] = time.monotonic()

    def close(self) -> None:
        self.stopping.set()
        for p in [self.ctl, *self.agents.values()]:
            if p is not None and p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


class Sampler(threading.Thread):
    """The fleet host's connect counter, and how many of `watch` are connected, every 50 ms."""

    def __init__(self, host) -> None:
        super().__init__(name="sampler", daemon=True)
        self.host, self.watch, self.samples, self.stop = host, [], [], threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.05):
            self.samples.append((time.monotonic(), self.host.stats["connects"],
                                 sum(c.is_connected() for c in list(self.watch))))

    def burst(self, restart: float) -> dict:
        """Peak connects/s (1 s sliding window) after `restart`, and when every client watched
        (connected at the kill) was connected again."""
        s = [x for x in self.samples if x[0] >= restart - 1.0]
        times = [x[0] for x in s]
        back = next((t for t, _, n in s if t >= restart and n >= len(self.watch)), None)
        first = next((t for t, c, _ in s if t >= restart and c > s[0][1]), None)
        peak = max((c - s[max(0, bisect.bisect_left(times, t - 1.0))][1]
                    for t, c, _ in s if restart <= t <= (back or times[-1]) + 1.0), default=0)
        return dict(peak=peak, first=None if first is None else first - restart,
                    back=None if back is None else back - restart, clients=len(self.watch))


class Bench:
    def __init__(self, args, catalog: Path, tmp: Path) -> None:
        from stitch_lib.catalog import Catalog

        self.args, self.catalog, self.tmp = args, catalog, tmp
        self.cat = Catalog.load(catalog)
        self.old, self.target = pick(self.cat, "max_accuracy"), pick(self.cat, "min_energy")
        self.r: dict = {"faults": [], "notes": [], "bad": []}
        self.watched: list[tuple] = []  # (monotonic, topic, payload) the watcher received
        self.pubacks: dict[int, int] = {}
        self.loss = Counter()
        self.disk_acks: dict[str, list] = defaultdict(list)
        self.broker = self.procs = self.store = self.fleet = self.thread = self.sampler = None

    def note(self, text: str) -> None:
        log.warning("%s", text)
        self.r["notes"].append(text)

    def execute(self) -> dict:
        t0 = time.monotonic()
        try:
            self.setup()
            self.steady()
            self.prepare()
            self.rollout()
            self.bad_inputs()
            self.checks()
        except Exception as exc:
            log.error("stopped early: %s", exc, exc_info=log.isEnabledFor(logging.DEBUG))
            self.note(f"stopped early: {type(exc).__name__}: {str(exc).splitlines()[0]}")
        finally:
            self.cleanup()
        self.r["wall_s"] = time.monotonic() - t0
        return self.r

    # -- 1: set-up -------------------------------------------------------------------------------
    def setup(self) -> None:
        import torch
        from fleet_protocol.mqtt import run_in_thread
        from fleet_protocol.signing import KeyDir, load_public
        from simulators.broker import start_broker
        from simulators.devices import make_fleet
        from simulators.fleet import SimFleet

        torch.set_num_threads(1)
        if self.old.id == self.target.id:
            raise RuntimeError(f"max_accuracy and min_energy both pick {self.old.name}: "
                               "nothing to roll out with this catalog")
        sims = [d for d, _ in make_fleet(self.args.devices, None, self.args.seed)]
        self.ids = sorted([*sims, *CRASH])
        self.broker = start_broker(self.tmp / "broker", devices=self.ids)
        keys = self.tmp / "keys"
        KeyDir(keys).init()
        self.policy = self.tmp / "fleet.yaml"
        write_policy(self.policy, self.catalog, "max_accuracy")
        self.procs = Procs(self.tmp, self.broker.url, self.broker.creds, keys, self.policy)
        self.procs.start_controller()
        self.fleet = SimFleet(self.args.devices, self.broker.url, self.catalog,
                              self.tmp / "fleet", telemetry_period=2.0, seed=self.args.seed,
                              trust=(load_public(keys / "controller.pub"),))
        self.sims = {d.id: d for d in self.fleet.devices}
        for d in self.fleet.devices:
            d.agent._publish = self._lossy(d)
        rng = random.Random(self.args.seed)
        late = [d for d in sorted(self.ids)[int(0.6 * len(self.ids)):] if d in self.sims]
        self.full = sorted(rng.sample(late, min(10, len(late))))
        self.victims = sorted(rng.sample([d for d in self.sims if d not in self.full], 3))
        for dev in self.full:
            self.sims[dev].agent._ack = self._recording(self.sims[dev])
        master = self.tmp / "fleet" / "master" / "segments"
        for dev in CRASH:  # provisioned: hard links to the fleet's master copies
            (self.procs.cache(dev) / "segments").mkdir(parents=True)
            for f in master.iterdir():
                os.link(f, self.procs.cache(dev) / "segments" / f.name)
            self.procs.start_agent(dev)
        t = self.fleet.topics
        self.watcher = self.spy("watcher", "controller", [t.ctl_state] + [
            x for b in CRASH for x in (t.art_req(b), t.state(b))] + [
            x for v in self.victims for x in (t.ack(v), t.desired(v))])
        self.fleet.start(self.broker.creds)
        self.sampler = Sampler(self.fleet.host)
        self.sampler.start()
        self.thread = run_in_thread(self.fleet.host, "fleet")

    def _lossy(self, d):
        """Drop d's QoS 0 publishes (telemetry) with probability extra_loss: SimFleet applies
        extra_loss only to QoS 0 messages a device receives, and it receives none."""
        send = d.agent._publish

        def publish(topic, msg, qos=1, retain=False):
            if qos == 0 and d.res.state.extra_loss > 0:
                lost = d.res.rng.random() < d.res.state.extra_loss
                self.loss["lost" if lost else "sent"] += 1
                if lost:
                    return
            send(topic, msg, qos, retain)
        return publish

    def _recording(self, d):
        send = d.agent._ack

        def ack(dep, status, **kw):
            if status == "FAILED":
                cur = d.agent.slot.get()
                self.disk_acks[d.id].append((dep.hybrid, kw.get("reason", ""), cur and cur.hybrid))
            send(dep, status, **kw)
        return ack

    def spy(self, name: str, user: str, topics: list[str]):
        from fleet_protocol.mqtt import make_client, parse_url

        c = make_client(f"{name}-{os.getpid()}", username=user, password=self.broker.creds[user])
        c.on_message = lambda cl, u, m: self.watched.append((time.monotonic(), m.topic, m.payload))
        c.on_connect = lambda cl, u, f, rc, p: topics and cl.subscribe([(x, 1) for x in topics])
        c.on_publish = lambda cl, u, mid, rc, p: self.pubacks.__setitem__(mid, rc.value)
        self.fleet.host.add(c, *parse_url(self.broker.url))
        return c

    # -- what runs where -------------------------------------------------------------------------
    def seen(self, cls, suffix: str, dev: str, since: float = 0.0) -> list:
        from fleet_protocol.messages import decode

        return [(t, decode(cls, p)) for t, topic, p in list(self.watched)
                if t >= since and p and topic.endswith(f"/{dev}/{suffix}")]

    def running(self, dev: str) -> tuple[str | None, int] | None:
        """(hybrid, applied generation) the agent runs: the object itself for a simulated
        device, the newest birth on the wire for a real one."""
        from fleet_protocol.messages import State

        if dev in self.sims:
            a = self.sims[dev].agent
            cur = a.slot.get()
            return cur and cur.hybrid, a.applied
        births = [s for _, s in self.seen(State, "state", dev) if s.online]
        s = max(births, key=lambda s: s.ts, default=None)
        return None if s is None else (s.hybrid, s.generation)

    def unsettled(self, since: float) -> set[str]:
        """Devices not settled: an open deployment, none created after `since` (wall time), or
        the agent not running its last HEALTHY hybrid at its last deployment's generation."""
        last, healthy, open_ = {}, {}, set()
        for d in self.store.deployments():
            last[d.device_id] = d
            healthy[d.device_id] = d.hybrid if d.status == "HEALTHY" else healthy.get(d.device_id)
            open_ |= {d.device_id} if d.open else set()
        return {dev for dev in self.ids if dev in open_ or dev not in last
                or last[dev].created < since
                or self.running(dev) != (healthy.get(dev), last[dev].generation)}

    # -- 1: steady -------------------------------------------------------------------------------
    def steady(self) -> None:
        from fleet_controller.store import Store

        db = self.tmp / "ctl" / "controller.sqlite"
        wait_for(db.is_file, 120, "the controller's store")
        self.store = Store(db)
        took = wait_for(lambda: not self.unsettled(0.0), 120 + 0.5 * len(self.ids),
                        f"all {len(self.ids)} devices HEALTHY on a first model", poll=1.0)
        self.r["steady_s"] = took
        log.info("steady: %d devices HEALTHY on %s in %.0f s", len(self.ids), self.old.name, took)

    # -- 2: preparation ----------------------------------------------------------------------------
    def missing(self) -> list[str]:
        from fleet_controller.artifacts import Artifacts

        art = Artifacts(self.cat)
        return sorted(set(sum(art.split(self.target), [])) - set(sum(art.split(self.old), [])))

    def prepare(self) -> None:
        from device_agent.cache import SegmentCache
        from fleet_protocol.messages import State

        need = self.missing()
        if not need:
            self.note(f"{self.target.name} needs no segment {self.old.name} lacks: no download")

        def fill_disks() -> None:
            for dev in self.full:
                a = self.sims[dev]
                for s in need:
                    a.agent.cache.discard(s)
                a.res.state.disk_free_mb = 0.0
        call_in_host(self.fleet.host, fill_disks)
        self.replay = {v: self.seen_desired(v)[-1][1] for v in self.victims}
        t = time.monotonic()
        for dev, crash in CRASH.items():
            self.procs.stop_agent(dev)
            if crash.startswith("chunk"):
                for s in need:
                    SegmentCache(self.procs.cache(dev)).discard(s)
            self.procs.start_agent(dev, crash)
        wait_for(lambda: all(any(s.online for _, s in self.seen(State, "state", b, t))
                             for b in CRASH), 90, "the real agents back online")

    def seen_desired(self, dev: str) -> list[tuple[float, bytes]]:
        return [(t, p) for t, topic, p in list(self.watched) if topic.endswith(f"/{dev}/desired")]

    # -- 3: rollout with faults ----------------------------------------------------------------------
    def fault(self, name: str, affected, ref: float, fn=None, ref_label: str = "injection"):
        """Record a fault; run its injection; `ref` is the time its convergence is measured from
        (seconds after the edit)."""
        t = time.monotonic() - self.t0
        before = len(set(affected) & self.last_unsettled)
        if fn is not None:
            fn()
        self.r["faults"].append(dict(name=name, at=t, affected=sorted(affected), ref=ref,
                                     ref_label=ref_label, unsettled=before))
        log.info("fault %s at %.1f s: %d devices, %d unsettled then", name, t, len(affected),
                 before)

    def rollout(self) -> None:
        from simulators.fleet import Event

        host, sims = self.fleet.host, sorted(self.sims)
        self.last_unsettled = set(self.ids)
        self.t0, self.edit_wall = time.monotonic(), time.time()
        write_policy(self.policy, self.catalog, "min_energy")
        self.fault("policy edit: max_accuracy → min_energy (the rollout)", self.ids, 0.0)
        self.fault("full disk (prepared before the edit)", self.full, 0.0)
        schedule = [(T_LOSS, self.inject_loss), (T_CUT, self.inject_cut),
                    (T_BROKER, self.inject_broker), (T_CONTROLLER, self.inject_controller)]
        self.last_bad = {}  # device → the time it was last seen unsettled
        self.settled_at = {}
        deadline = None
        while True:
            now = time.monotonic() - self.t0
            while schedule and schedule[0][0] <= now:
                schedule.pop(0)[1](host, sims, Event)
            try:
                bad = self.unsettled(self.edit_wall)
            except Exception as exc:  # e.g. the store busy: next poll
                log.debug("poll failed: %s", exc)
                time.sleep(POLL_S)
                continue
            for dev in bad:
                self.last_bad[dev] = now
            for dev in self.last_unsettled - bad:
                self.settled_at[dev] = now
            self.last_unsettled = bad
            ctl_up = any(t > self.ctl_restart for t, _ in self.ctl_online()) \
                if not schedule else False
            if not schedule and not bad and ctl_up and self.crashes_done():
                break
            deadline = deadline or (None if schedule else now + SETTLE_TIMEOUT_S)
            if deadline and now > deadline:
                self.note(f"{len(bad)} devices never settled within {SETTLE_TIMEOUT_S:.0f} s "
                          f"after the last fault: {sorted(bad)[:8]}")
                break
            time.sleep(POLL_S)
        self.r["rollout_s"] = time.monotonic() - self.t0

    def ctl_online(self) -> list[tuple[float, bool]]:
        from fleet_protocol.messages import ControllerState, decode

        return [(t - self.t0, decode(ControllerState, p).online) for t, topic, p in
                list(self.watched) if topic.endswith("/ctl/state") and p
                and decode(ControllerState, p).online]

    def crashes_done(self) -> bool:
        return all(self.procs.deaths.get(b) and "restarted" in self.procs.deaths[b][0]
                   for b in CRASH)

    def inject_loss(self, host, sims, Event) -> None:
        self.fault("telemetry loss 20% (every simulated device)", sims, T_LOSS,
                   lambda: call_in_host(host, lambda: self.fleet.apply(
                       Event(at=0, set={"extra_loss": 0.2}))))

    def inject_cut(self, host, sims, Event) -> None:
        cut = call_in_host(host, lambda: self.fleet.apply(
            Event(at=0, set={}, fraction=0.2, cut_s=CUT_S)))
        self.fault(f"partition of 20% for {CUT_S:g} s", cut, T_CUT + CUT_S, ref_label="heal")

    def inject_broker(self, host, sims, Event) -> None:
        def crash() -> None:
            self.sampler.watch = [d.agent.client for d in self.fleet.devices
                                  if d.agent.client.is_connected()]
            self.broker.kill()
            time.sleep(BROKER_DOWN_S)
            self.broker.restart()
            self.broker_restart = time.monotonic()
        self.fault("broker SIGKILL + restart", self.ids, T_BROKER + BROKER_DOWN_S, crash,
                   "restart")
        self.r["faults"][-1]["ref"] = self.broker_restart - self.t0

    def inject_controller(self, host, sims, Event) -> None:
        def crash() -> None:
            self.procs.kill_controller()
            self.procs.start_controller()
            self.ctl_restart = time.monotonic() - self.t0
        self.fault("controller SIGKILL + restart", self.ids, T_CONTROLLER, crash, "respawn")
        self.r["faults"][-1]["ref"] = self.ctl_restart

    # -- 4: bad inputs -----------------------------------------------------------------------------
    def bad_inputs(self) -> None:
        from fleet_protocol.messages import Ack, Desired, encode
        from fleet_protocol.signing import KeyDir, SigningKey, seal

        t, host = self.fleet.topics, self.fleet.host
        me, other = self.victims[0], self.victims[1]
        cross = [t.telemetry(other), t.state(other), t.ack(other), t.art_req(other),
                 t.desired(me), t.desired(other), t.art_data(me), t.ctl_state, t.ctl_keys,
                 t.rebirth]
        leaks = self.spy("leak-spy", "controller", cross)
        dev, ctl = self.spy("evil-dev", me, []), self.spy("evil-ctl", "controller", [])
        wait_for(lambda: all(c.is_connected() for c in (leaks, dev, ctl)), 20, "bad clients")
        time.sleep(1.0)  # the leak spy's subscription is in place
        t_bad, drops0 = time.monotonic(), self.ctl_log_count("dropped message on")
        own = [t.telemetry(me), t.state(me), t.ack(me), t.art_req(me)]
        mids = {"own": [dev.publish(x, p, qos=1).mid for x in own for p in JUNK.values()],
                "cross": [dev.publish(x, b'{"evil": "cross-device"}', qos=1).mid for x in cross]}
        wait_for(lambda: all(m in self.pubacks for ms in mids.values() for m in ms), 20,
                 "PUBACKs of the device's bad publishes")
        try:
            wait_for(lambda: self.ctl_log_count("dropped message on") - drops0 >= len(mids["own"]),
                     20, "the controller's drops")
        except PhaseTimeout as exc:
            self.note(str(exc))
        drops = self.ctl_log_count("dropped message on") - drops0
        leaked = sum(1 for x, topic, p in list(self.watched) if x >= t_bad and b"evil" in p)
        self.r["bad"] += [
            (f"{', '.join(JUNK)} payloads on the device's own telemetry/state/ack/art-req "
             "topics (its own login)", len(mids["own"]), drops, "controller (dropped, logged)"),
            ("publishes on another device's telemetry/state/ack/art-req, on desired (own and "
             "other's), art data, ctl/state, ctl/keys, bcast/rebirth", len(mids["cross"]),
             sum(self.pubacks[m] == 135 for m in mids["cross"]),
             f"broker (PUBACK 135; {leaked} reached a subscriber)")]
        key = KeyDir(self.tmp / "keys").load()[0]
        before = {v: (dict(self.sims[v].agent.stats), self.running(v)) for v in self.victims}
        t_sig, sent = time.monotonic(), Counter()
        for k, v in enumerate(self.victims):
            gen = self.sims[v].agent.applied + 1
            front, back = [s for s in self.old.segments], []

            def desired(kind: str) -> Desired:
                return Desired(device_id=v, generation=gen, deployment_id=f"evil-{kind}-{v}",
                               hybrid=self.old.id, front=front, back=back, ts=time.time(),
                               reason="ok")
            env = json.loads(seal(desired("tampered"), [key]))
            env["body"] = env["body"].replace('"reason":"ok"', '"reason":"ko"')
            for kind, payload in [("unsigned", encode(desired("unsigned"))),
                                  ("wrongly signed", seal(desired("wrong-key"),
                                                          [SigningKey.generate()])),
                                  ("tampered", json.dumps(env).encode()),
                                  ("replayed (an older genuine one)", self.replay[v]),
                                  ("misaddressed (another device's genuine one)",
                                   self.replay[self.victims[k - 1]])]:
                ctl.publish(t.desired(v), payload, qos=1)
                sent[kind] += 1
        refusals = lambda: sum(self.sims[v].agent.stats[c] - before[v][0].get(c, 0)  # noqa: E731
                               for v in self.victims for c in ("refused", "replayed"))
        try:
            wait_for(lambda: refusals() >= sum(sent.values()), 20, "the agents' refusals")
        except PhaseTimeout as exc:
            self.note(str(exc))
        time.sleep(2.0)  # the FAILED acks reach the watcher
        reasons = Counter()
        for v in self.victims:
            for _, a in self.seen(Ack, "ack", v, t_sig):
                if a.status == "FAILED":
                    r = a.reason or ""
                    reasons["unsigned" if "not signed" in r else "wrongly signed" if "untrusted"
                            in r else "tampered" if "bad signature" in r else "replayed (an "
                            "older genuine one)" if "replayed" in r else "misaddressed (another "
                            "device's genuine one)" if "addressed to" in r else r] += 1
        kept = all(self.running(v) == before[v][1] for v in self.victims)
        for kind, n in sent.items():
            self.r["bad"].append((f"{kind} desired state, controller login, {len(self.victims)} "
                                  "devices", n, reasons[kind], "agent (FAILED ack; model and "
                                  f"generation {'unchanged' if kept else 'CHANGED'})"))
        self.r["agent_refusals"] = {c: sum(self.sims[v].agent.stats[c] - before[v][0].get(c, 0)
                                           for v in self.victims) for c in ("refused", "replayed")}

    def ctl_log_count(self, text: str) -> int:
        return (self.tmp / "ctl.log").read_text(errors="replace").count(text)

    # -- 5: checks ---------------------------------------------------------------------------------
    def checks(self) -> None:
        from device_agent.cache import SegmentCache, SegmentRegistry
        from fleet_protocol.messages import ArtifactRequest, State

        deps = self.store.deployments()
        self.r["deployments"] = deps
        self.r["since_edit"] = [d for d in deps if d.created >= self.edit_wall]
        self.r["open"] = [d for d in deps if d.open]
        self.r["dups"] = [k for k, n in Counter((d.device_id, d.generation)
                                                for d in deps).items() if n > 1]
        self.r["sim_errors"] = sum(d.agent.stats["errors"] for d in self.fleet.devices)
        self.r["disk"] = {dev: self.disk_acks[dev] for dev in self.full}
        for dev in CRASH:
            self.procs.stop_agent(dev)
        logs = {p: p.read_text(errors="replace") for p in self.tmp.glob("board-*.log")}
        self.r["board_errors"] = sum(t.count(" error in ") + t.count("error handling")
                                     for t in logs.values())
        self.r["ctl_errors"] = self.ctl_log_count("error handling") + self.ctl_log_count(
            "Traceback")
        self.r["crash"] = []
        for dev, fault in CRASH.items():
            row = dict(dev=dev, fault=fault)
            death = (self.procs.deaths.get(dev) or [None])[0]
            cache = SegmentCache(self.procs.cache(dev))
            registry = SegmentRegistry()
            try:
                for s in cache.ids():
                    registry.get(s, lambda: cache.read(s))
                row["cache"] = f"yes ({len(cache.ids())} segments rebuild)"
            except Exception as exc:
                row["cache"] = f"NO: {exc}"
            if death is not None:
                row.update(died=death["died"] - self.t0, rc=death["rc"],
                           restart=death.get("restarted", float("nan")) - death["died"])
                row["detail"] = (self.resumed(dev, death) if fault.startswith("chunk")
                                 else self.first_birth(dev, death))
            self.r["crash"].append(row)

    def resumed(self, dev: str, death: dict) -> str:
        from fleet_protocol.messages import ArtifactRequest

        out = []
        for seg, prog in death["partial"].items():
            if prog is None:
                continue
            total, held = prog
            reqs = [r for _, r in self.seen(ArtifactRequest, "req", dev, death["died"])
                    if r.artifact == seg]
            want = sorted(set(range(total)) - held)
            got = reqs[0].chunks if reqs else "no request"
            out.append(f"{seg[:8]}: {len(held)}/{total} chunks held at death; first request "
                       f"after restart: {'only the ' + str(len(want)) + ' missing' if got == want else got}")
        return "; ".join(out) or "no partial download at death"

    def first_birth(self, dev: str, death: dict) -> str:
        from fleet_protocol.messages import State

        births = sorted((s for _, s in self.seen(State, "state", dev)
                         if s.online and s.session > death["died_ns"] - 60e9
                         and s.ts * 1e9 > death["died_ns"]), key=lambda s: s.ts)
        if not births:
            return "no birth after restart"
        b, name = births[0], self.cat.get(births[0].hybrid).name if births[0].hybrid else None
        old = "the old model" if births[0].hybrid == self.old.id else "NOT the old model"
        return f"first birth after restart: {name} gen {b.generation} ({old})"

    def cleanup(self) -> None:
        if self.sampler is not None:
            self.sampler.stop.set()
        if self.procs is not None:
            self.procs.close()
        if self.fleet is not None:
            self.fleet.host.stop()
            if self.thread is not None:
                self.thread.join(10)
            self.fleet.host.close()
        if self.store is not None:
            self.store.close()
        if self.broker is not None:
            self.broker.stop()


# ---- report -----------------------------------------------------------------------------------

def _s(x, spec: str = "{:.1f}") -> str:
    return "—" if x is None else spec.format(x)


def reason_class(status: str, reason: str) -> str:
    for key in ("disk full", "verification", "signature", "settled by device state", "no progress"):
        if key in reason:
            return f"{status} ({key})"
    return f"{status} ({reason[:40]})" if status == "FAILED" and reason else status


def fault_rows(b: Bench) -> tuple[list[str], list[str]]:
    """The faults table and what fell short."""
    r, short = b.r, []
    faults = list(r["faults"])
    for dev, deaths in b.procs.deaths.items():
        for d in deaths:
            if d.get("restarted"):
                faults.append(dict(name=f"{dev} killed at {d['fault'] or 'an unplanned point'} "
                                        f"(exit {d['rc']})", at=d["died"] - b.t0, affected=[dev],
                                   ref=d["restarted"] - b.t0, ref_label="restart", unsettled=1))
    unsettled = b.last_unsettled
    out = ["| fault | at s | devices | unsettled then | measured from (s) | survived "
           "| converge s |", "|---|---|---|---|---|---|---|"]
    for f in faults:
        left = sorted(set(f["affected"]) & unsettled)
        conv = max((b.settled_at.get(d, 0.0) for d in f["affected"]), default=0.0) - f["ref"]
        ok = not left
        if f["name"].startswith("full disk"):
            fails = {d: a for d, a in r["disk"].items() if any(
                h == b.target.id and "disk full" in why and run == b.old.id for h, why, run in a)}
            ok = ok and len(fails) == len(f["affected"])
            f["name"] += f": {len(fails)}/{len(f['affected'])} FAILED \"disk full\" on " \
                         f"{b.target.name} with {b.old.name} serving"
        if not ok:
            short.append(f"{f['name']}: not survived ({len(left)} affected devices never "
                         f"settled: {left[:5]})")
        out.append(f"| {f['name']} | {f['at']:.1f} | {len(f['affected'])} | {f['unsettled']} | "
                   f"{f['ref_label']} ({f['ref']:.1f}) | {'yes' if ok else 'NO'} | "
                   f"{max(conv, 0.0):.1f}{'' if conv >= 0 else ' (settled before)'} |")
    for dev in CRASH:
        if not b.procs.deaths.get(dev):
            short.append(f"{dev} never died at its fault point {CRASH[dev]}")
    return out, short


def tables(b: Bench, cmd: str, wall: float, load: float) -> list[str]:
    r = b.r
    lines = [f"`{cmd}`", "",
             f"{len(b.sims) if b.fleet else '?'} simulated devices (real agent code on one "
             f"ClientHost thread) + {len(CRASH)} real agent processes + the controller "
             f"process + Mosquitto (logins and ACLs) on {os.cpu_count()} cores (load average "
             f"{load:.1f} at the start); the whole run took {wall:.0f} s. Catalog "
             f"{b.catalog.relative_to(ROOT) if b.catalog.is_relative_to(ROOT) else b.catalog}: "
             "the faults are about the fleet, not model quality. Rollout: "
             f"{b.old.name} (max_accuracy) → {b.target.name} (min_energy), waves [10, 50, 100] "
             f"3 s apart; steady state before it took {_s(r.get('steady_s'), '{:.0f}')} s, the "
             f"rollout with its faults {_s(r.get('rollout_s'), '{:.0f}')} s.", "",
             "A device is *settled* when the controller's store holds no open deployment for it, "
             "its last deployment was created after the policy edit, and its agent runs the "
             "hybrid of its last HEALTHY deployment at the generation of its last deployment "
             "(a simulated agent's objects; a real agent's newest birth on the wire). Polled "
             f"every {POLL_S:g} s. *Converge s*: from the reference time (the injection, the "
             "heal, the broker's restart, the controller's or agent's respawn) to the first poll "
             "after which every affected device stayed settled to the end. *At s* and "
             "reference times are seconds after the policy edit; *unsettled then*: affected "
             "devices not settled when the fault hit (the rollout was under way for them).", ""]
    rows, short = fault_rows(b)
    lines += rows + [""]
    deps, since = r.get("deployments", []), r.get("since_edit", [])
    by = Counter(reason_class(d.status, d.reason) for d in deps)
    lines += ["| deployments | started | terminal | open at the end | duplicate (device, "
              "generation) |", "|---|---|---|---|---|",
              f"| whole run | {len(deps)} | {len(deps) - len(r.get('open', []))} | "
              f"{len(r.get('open', []))} | {len(r.get('dups', []))} |",
              f"| from the policy edit on | {len(since)} | "
              f"{sum(not d.open for d in since)} | {sum(d.open for d in since)} | — |", "",
              "Terminal statuses (whole run): " + ", ".join(
                  f"{k} {n}" for k, n in sorted(by.items(), key=lambda kv: -kv[1])) + ".", ""]
    if r.get("open") or r.get("dups"):
        short.append(f"{len(r.get('open', []))} deployments open at the end, "
                     f"{len(r.get('dups', []))} duplicate (device, generation)")
    lines += ["| bad input | tried | refused | by |", "|---|---|---|---|"]
    for what, n, refused, by_whom in r["bad"]:
        lines.append(f"| {what} | {n} | {refused} | {by_whom} |")
        if refused < n or "CHANGED" in by_whom or by_whom.startswith("broker (PUBACK 135; 0") is False and "broker" in by_whom:
            short.append(f"bad input not refused every time: {what} ({refused}/{n})")
    lines += ["", "| real agent | fault | died at s | exit | restarted after s | cache intact "
              "| resumed / first birth |", "|---|---|---|---|---|---|---|"]
    for c in r.get("crash", []):
        lines.append(f"| {c['dev']} | {c['fault']} | {_s(c.get('died'))} | {c.get('rc', '—')} | "
                     f"{_s(c.get('restart'))} | {c['cache']} | {c.get('detail', 'did not die')} |")
        if "NO" in c["cache"] or "NOT" in c.get("detail", "") or "missing" not in c.get(
                "detail", "old model"):
            short.append(f"{c['dev']}: {c['cache']}; {c.get('detail', 'did not die')}")
    burst = r.get("burst") or {}
    lines += ["", f"Reconnects after the broker's restart (this process's ClientHost, sampled "
              f"every 50 ms): peak {burst.get('peak', '—')} connects/s (1 s sliding window); "
              f"the first came {_s(burst.get('first'), '{:.2f}')} s after the restart, and all "
              f"{burst.get('clients', '—')} simulated devices connected at the kill were back "
              f"{_s(burst.get('back'), '{:.2f}')} s after it.",
              f"Telemetry loss: {b.loss['lost']} of {b.loss['lost'] + b.loss['sent']} telemetry "
              "messages dropped while it was on "
              f"({b.loss['lost'] / max(1, b.loss['lost'] + b.loss['sent']):.0%}), by the bench "
              "at the devices' side (SimFleet's `extra_loss` alone drops nothing: it applies to "
              "QoS 0 messages a device receives, and devices receive only QoS 1).",
              f"Errors: simulated agents {r.get('sim_errors', '—')}, real agents "
              f"{r.get('board_errors', '—')} (log lines), controller {r.get('ctl_errors', '—')} "
              "(log lines)."]
    if any(r.get(k) for k in ("sim_errors", "board_errors", "ctl_errors")):
        short.append("errors counted (see above)")
    short += r["notes"]
    lines += ["", "Falls short: " + ("nothing." if not short else ""), *[f"- {s}" for s in short]]
    return lines


def write_results(lines: list[str]) -> Path:
    path = ROOT / "docs" / "results.md"
    text = path.read_text() if path.exists() else "# Results\n"
    block = START + "\n" + "\n".join(lines).rstrip() + "\n" + END
    if START in text and END in text:
        text = re.sub(re.escape(START) + r".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    else:
        text += "\n## Faults: a rollout through crashes, partitions and bad inputs\n\n" + block + "\n"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, default=200, help="simulated devices")
    p.add_argument("--catalog", type=Path, default=None,
                   help="catalog directory (default: the tiny zoo, built once)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-write", dest="write", action="store_false",
                   help="do not update docs/results.md")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(threadName)s %(name)s %(levelname)s %(message)s")
    log.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    signal.signal(signal.SIGTERM, _interrupt)
    cmd = shlex.join([os.path.relpath(sys.argv[0]) if Path(sys.argv[0]).is_file() else
                      sys.argv[0], *sys.argv[1:]] if argv is None else ["fault_bench.py", *argv])
    load, t0 = os.getloadavg()[0], time.monotonic()
    catalog = ensure_catalog(args.catalog)
    root = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
    with tempfile.TemporaryDirectory(prefix="fault-bench-", dir=root) as tmp:
        bench = Bench(args, catalog, Path(tmp))
        try:
            bench.execute()
        except KeyboardInterrupt:
            bench.note("interrupted")
        lines = tables(bench, f"python {cmd}", time.monotonic() - t0, load)
    print("\n".join(lines), flush=True)
    if args.write:
        log.info("written to %s", write_results(lines))
    return 0 if lines[-1] == "Falls short: nothing." else 1


if __name__ == "__main__":
    sys.exit(main())
