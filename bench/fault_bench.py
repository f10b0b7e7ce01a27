"""A policy rollout over a simulated fleet through crashes, a partition, telemetry loss and full
disks; then bad inputs, which must be refused.

    python bench/fault_bench.py [--devices 200] [--catalog DIR] [--seed 0]

Everything runs on this machine; every wait has a deadline; the broker and every process are
cleaned up on error too. The faults are about the fleet, not model quality: by default the
catalog is the tests' tiny zoo (tests/conftest.py TINY_ZOO, built once into
.restnet/fault-bench/catalog), its accuracies set to rise with FLOPs as the tests' `catalog`
fixture does, so that max_accuracy and min_energy pick different models.

1. Set-up: a private Mosquitto with logins and ACLs; a signing key; fleet.yaml (max_accuracy,
   battery below 0.3 → min_energy, hysteresis off, waves [10, 50, 100] 3 s apart, abort above
   50% failures); the controller as a subprocess (so that it can be SIGKILLed); N simulated
   devices (real agent code, every segment provisioned) on one ClientHost thread here; 4 real
   agent processes (board-000..003). Wait until every device is HEALTHY on a first model.
2. Preparation: 10 simulated devices late in the rollout order lose the segments the
   min_energy target needs and their disk is full (expected: FAILED "disk full" while the old
   model serves). The real agents restart with RESTNET_CRASH_AT: board-000/001 "chunk:3" (the
   target's segments discarded first, so that they download), board-002/003 "swap"; each
   SIGKILLs itself during the rollout and is restarted without the variable when it dies.
   Chunks are 4096 bytes, 2048 for board-001: with the tiny zoo, chunk 3 of 4096 bytes is the
   last of the target's first segment, so only board-001 dies with chunks left to fetch.
3. Rollout with faults: fleet.yaml's objective becomes min_energy (reloaded within 2 s, rolled
   out in waves); at fixed offsets from the edit: 20% telemetry loss on every simulated device,
   a partition of 20% of them for 10 s, the broker SIGKILLed and restarted, the controller
   SIGKILLed and restarted. Then wait until every device settled (or a deadline).
4. Bad inputs: with a device's login (`evil-dev`), junk on its own topics (the controller
   must drop it) and publishes on others' topics (the broker must refuse them: PUBACK 135);
   with an operator login (the controller's rights; client IDs are usernames, so it cannot
   share the controller's own), unsigned, wrongly signed, tampered, replayed and misaddressed desired
   states to 3 devices (their agents must refuse them and keep their model).
5. Checks: deployments all terminal, none duplicated; the crashed agents' caches rebuild,
   their download resumed with only the missing chunks, their first birth after a swap crash
   showed the old model and generation.
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

import torch  # noqa: E402
import yaml  # noqa: E402

from device_agent.cache import SegmentCache, SegmentRegistry  # noqa: E402
from fleet_controller.artifacts import Artifacts  # noqa: E402
from fleet_controller.store import Store  # noqa: E402
from fleet_protocol.messages import (Ack, ArtifactRequest, ControllerState, Desired,  # noqa: E402
                                     State, decode, encode)
from fleet_bench import call_in_host  # noqa: E402  (bench/ is on sys.path)
from fleet_runtime.mqtt import make_client, parse_url, run_in_thread  # noqa: E402
from fleet_protocol.signing import KeyDir, SigningKey, load_public, seal  # noqa: E402
from simulators.broker import start_broker  # noqa: E402
from simulators.devices import make_fleet  # noqa: E402
from simulators.fleet import Event, SimFleet  # noqa: E402
from stitch_lib.catalog import Catalog  # noqa: E402

log = logging.getLogger("fault_bench")
START, END = "<!-- fault-bench:start -->", "<!-- fault-bench:end -->"
EVIL = "evil-dev"  # a device login of the attacker's, beside the simulated fleet
SPIES = ["telemetry-counter", "watcher", "leak-spy", "evil-ctl"]  # operator logins
CRASH = {"board-000": "chunk:3", "board-001": "chunk:3", "board-002": "swap", "board-003": "swap"}
CHUNK = {"board-001": 2048}  # bytes per chunk, else 4096 (see above)
T_LOSS, T_CUT, T_BROKER, T_CONTROLLER = 1.0, 2.0, 5.0, 10.0  # seconds after the policy edit
CUT_S, BROKER_DOWN_S, POLL_S, SETTLE_TIMEOUT_S = 10.0, 1.0, 0.5, 120.0
JUNK = {"garbage": b"\x00\xff\xfe not json", "malformed JSON": b'{"v": 1, "kind": "telemetry",',
        "oversized (300 KB)": b"{" + b" " * 300_000 + b"}",
        "wrong schema": b'{"v": 1, "kind": "nonsense", "cpu": 7}'}
FORGED = {"unsigned": "not signed", "wrongly signed": "untrusted key", "tampered":
          "bad signature", "replayed": "replayed", "misaddressed": "addressed to"}


def wait_for(cond, timeout: float, what: str, poll: float = 0.2) -> float:
    """Poll `cond()` until true; the seconds it took, or TimeoutError."""
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"{what}: not reached within {timeout:.0f} s")
        time.sleep(poll)
    return time.monotonic() - t0


def ensure_catalog(path: Path | None) -> Path:
    """`path`, or the tiny zoo catalog, built once (accuracies rising with FLOPs)."""
    if path is not None:
        return path.resolve()
    root = ROOT / ".restnet" / "fault-bench"
    if not Catalog.is_current(root / "catalog"):  # none, or of an older segment ID scheme
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
                      BuildConfig(top_k=2, screen=3, finetune="none", latency_rounds=3,
                                  rank_steps=0), data=data)
    cat = Catalog.load(root / "catalog")
    for rank, e in enumerate(sorted(cat.entries, key=lambda e: e.flops)):
        e.test_acc = 0.5 + 0.01 * rank
    cat.save()
    return cat.root.resolve()


def pick(cat: Catalog, objective: str):
    """The planner's choice with finetune_on_demand off (anchors and fine-tuned stitches)."""
    ok = [e for e in cat.entries if e.stitch_state in (None, "finetuned")]
    key = {"min_energy": lambda e: (e.flops, -e.test_acc, e.id),
           "max_accuracy": lambda e: (-e.test_acc, e.flops, e.id)}[objective]
    return min(ok, key=key)


def write_policy(path: Path, catalog: Path, objective: str) -> None:
    doc = {"catalog": str(catalog), "reconcile_interval_s": 1,
           "defaults": {"objective": objective,
                        "battery_modes": [{"below": 0.3, "objective": "min_energy"}],
                        "hysteresis": {"min_dwell_s": 0, "min_gain": 0.0},
                        "finetune_on_demand": False},
           "rollout": {"waves": [10, 50, 100], "wave_interval_s": 3, "max_failure_percent": 50}}
    path.with_suffix(".tmp").write_text(yaml.safe_dump(doc, sort_keys=False))
    os.replace(path.with_suffix(".tmp"), path)


class Procs:
    """The controller and the real agents as subprocesses. A watchdog thread records each
    agent's death (with the downloads it left) and restarts it at once, without its fault."""

    def __init__(self, tmp: Path, url: str, creds, keys: Path, policy: Path) -> None:
        self.tmp, self.url, self.creds, self.keys, self.policy = tmp, url, creds, keys, policy
        self.ctl, self.agents, self.crash = None, {}, {}
        self.deaths: dict[str, list[dict]] = defaultdict(list)
        self.stopping = threading.Event()
        threading.Thread(target=self._watch, name="watchdog", daemon=True).start()

    def _spawn(self, name: str, user: str, args: list[str], env: dict) -> subprocess.Popen:
        pw = self.tmp / f"{name}.password"
        with os.fdopen(os.open(pw, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write(self.creds[user])
        with open(self.tmp / f"{name}.log", "ab") as out:
            return subprocess.Popen(
                [sys.executable, "-m", "restnet.cli", *args, "--broker", self.url,
                 "--username", user, "--password-file", str(pw)], cwd=ROOT, stdout=out,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, "OMP_NUM_THREADS": "1", **env})

    def start_controller(self) -> None:
        self.ctl = self._spawn("ctl", "controller", [
            "controller", "--policy", str(self.policy), "--state-dir", str(self.tmp / "ctl"),
            "--keys", str(self.keys)], {})

    def restart_controller(self) -> None:
        self.ctl.send_signal(signal.SIGKILL)
        self.ctl.wait()
        self.start_controller()

    def cache(self, dev: str) -> Path:
        return self.tmp / "boards" / dev

    def start_agent(self, dev: str, crash: str | None = None) -> None:
        self.crash[dev] = crash
        self.agents[dev] = self._spawn(dev, dev, [
            "agent", "--device-id", dev, "--cache", str(self.cache(dev)), "--trust",
            str(self.keys / "controller.pub"), "--chunk-size", str(CHUNK.get(dev, 4096)),
            "--telemetry-period", "1"], {"RESTNET_CRASH_AT": crash} if crash else {})

    def stop_agent(self, dev: str) -> None:
        p = self.agents.pop(dev)
        p.terminate()
        p.wait(20)

    def _watch(self) -> None:
        while not self.stopping.wait(0.05):
            for dev, p in list(self.agents.items()):
                if p.poll() is None or self.agents.get(dev) is not p:
                    continue
                death = dict(fault=self.crash[dev], rc=p.returncode, died=time.monotonic(),
                             died_ns=time.time_ns(), partial={})
                try:  # the downloads it left, before the next run touches them
                    cache = SegmentCache(self.cache(dev))
                    death["partial"] = {s.name: cache.in_progress(s.name, CHUNK.get(dev, 4096))
                                        for s in (cache.root / "partial").iterdir()}
                except Exception as exc:
                    log.error("%s: cannot read its partial downloads: %s", dev, exc)
                self.deaths[dev].append(death)
                log.info("%s died (exit %s, fault %s)", dev, p.returncode, self.crash[dev])
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
        """Peak connects/s (1 s sliding window) from `restart` until every client watched
        (those connected at the kill) is connected again, and when that was."""
        s = [x for x in self.samples if x[0] >= restart - 1.0]
        times = [x[0] for x in s]
        back = next((t for t, _, n in s if t >= restart and n >= len(self.watch)), None)
        first = next((t for t, c, _ in s if t >= restart and c > s[0][1]), None)
        peak = max((c - s[bisect.bisect_left(times, t - 1.0)][1] for t, c, _ in s
                    if restart <= t <= (back or times[-1]) + 1.0), default=0)
        return dict(peak=peak, clients=len(self.watch), first=first and first - restart,
                    back=back and back - restart)


class Bench:
    def __init__(self, args, catalog: Path, tmp: Path) -> None:
        self.args, self.catalog, self.tmp = args, catalog, tmp
        self.cat = Catalog.load(catalog)
        self.art = Artifacts(self.cat)
        self.old, self.target = pick(self.cat, "max_accuracy"), pick(self.cat, "min_energy")
        self.r: dict = {"faults": [], "notes": [], "bad": []}
        self.watched: list[tuple[float, str, bytes]] = []  # what the spies received
        self.pubacks: dict[int, int] = {}  # PUBACK reason codes by message ID
        self.loss, self.disk_acks = Counter(), defaultdict(list)
        self.last_unsettled, self.settled_at, self.t0 = set(), {}, time.monotonic()
        self.broker = self.procs = self.store = self.fleet = self.thread = self.sampler = None

    def note(self, text: str) -> None:
        log.warning("%s", text)
        self.r["notes"].append(text)

    def execute(self) -> None:
        try:
            for phase in (self.setup, self.steady, self.prepare, self.rollout, self.bad_inputs,
                          self.checks):
                log.info("phase %s", phase.__name__)
                phase()
        except Exception as exc:
            log.error("stopped early: %s", exc, exc_info=log.isEnabledFor(logging.DEBUG))
            self.note(f"stopped early: {type(exc).__name__}: {str(exc).splitlines()[0]}")
        finally:
            self.cleanup()

    # -- 1: set-up and steady state ----------------------------------------------------------------
    def setup(self) -> None:
        torch.set_num_threads(1)
        if self.old.id == self.target.id:
            raise RuntimeError(f"max_accuracy and min_energy both pick {self.old.name}")
        sims = [d for d, _ in make_fleet(self.args.devices, None, self.args.seed)]
        self.ids = sorted([*sims, *CRASH])  # the controller's rollout order
        self.broker = start_broker(self.tmp / "broker", devices=[*self.ids, EVIL],
                                   operators=SPIES)
        keys, self.policy = self.tmp / "keys", self.tmp / "fleet.yaml"
        KeyDir(keys).init()
        write_policy(self.policy, self.catalog, "max_accuracy")
        self.procs = Procs(self.tmp, self.broker.url, self.broker.creds, keys, self.policy)
        self.procs.start_controller()
        self.fleet = SimFleet(self.args.devices, self.broker.url, self.catalog,
                              self.tmp / "fleet", telemetry_period=2.0, seed=self.args.seed,
                              trust=(load_public(keys / "controller.pub"),))
        self.sims = {d.id: d for d in self.fleet.devices}
        rng = random.Random(self.args.seed)  # full disks in the last wave: no early abort
        late = [d for d in self.ids[int(0.6 * len(self.ids)):] if d in self.sims]
        self.full = sorted(rng.sample(late, min(10, len(late))))
        self.victims = sorted(rng.sample([d for d in sims if d not in self.full], 3))
        for d in self.fleet.devices:
            self._hook(d)
        for dev in CRASH:  # provisioned: hard links to the fleet's master copies
            (self.procs.cache(dev) / "segments").mkdir(parents=True)
            for f in (self.tmp / "fleet" / "master" / "segments").iterdir():
                os.link(f, self.procs.cache(dev) / "segments" / f.name)
            self.procs.start_agent(dev)
        t = self.fleet.topics
        def heard(client, userdata, msg) -> None:
            if self.fleet.devices[0].res.state.extra_loss > 0:  # the loss is on for all
                self.loss["heard"] += 1
        self.spy("telemetry-counter", "telemetry-counter", [t.all_telemetry]).on_message = heard
        self.spy("watcher", "watcher", [t.ctl_state] + [
            x for b in CRASH for x in (t.art_req(b), t.state(b))] + [
            x for v in self.victims for x in (t.ack(v), t.desired(v))])
        self.fleet.start(self.broker.creds)
        self.sampler = Sampler(self.fleet.host)
        self.sampler.start()
        self.thread = run_in_thread(self.fleet.host, "fleet")

    def _hook(self, d) -> None:
        """Count d's telemetry sent while its link loses messages (SimFleet drops them on the
        device's side; a subscriber counts what arrives); record its FAILED acks with the
        model it ran then."""
        publish, ack = d.agent._publish, d.agent._ack

        def counted(topic, msg, qos=1, retain=False):
            if qos == 0 and d.res.state.extra_loss > 0:
                self.loss["sent"] += 1
            publish(topic, msg, qos, retain)

        def recording(dep, status, **kw):
            if status == "FAILED":
                cur = d.agent.slot.get()
                self.disk_acks[d.id].append((dep.hybrid, kw.get("reason", ""), cur and cur.hybrid))
            ack(dep, status, **kw)
        d.agent._publish, d.agent._ack = counted, recording

    def spy(self, name: str, user: str, topics: list[str]):
        """A client on the fleet's host recording what arrives on `topics`, and its PUBACKs."""
        c = make_client(f"{name}-{os.getpid()}", username=user, password=self.broker.creds[user])
        c.on_message = lambda cl, u, m: self.watched.append((time.monotonic(), m.topic, m.payload))
        c.on_connect = lambda cl, u, f, rc, p: topics and cl.subscribe([(x, 1) for x in topics])
        c.on_publish = lambda cl, u, mid, rc, p: self.pubacks.__setitem__(mid, rc.value)
        self.fleet.host.add(c, *parse_url(self.broker.url))
        return c

    def wire(self, cls, dev: str, leaf: str, since: float = 0.0) -> list:
        """(time, message) of what arrived on `dev`'s `leaf` topic since `since`."""
        return [(t, decode(cls, p)) for t, topic, p in list(self.watched)
                if t >= since and p and topic.endswith(f"/{dev}/{leaf}")]

    def running(self, dev: str) -> tuple[str | None, int] | None:
        """(hybrid, generation) the agent runs: from the object for a simulated device, from
        the newest birth on the wire for a real one."""
        if dev in self.sims:
            cur = self.sims[dev].agent.slot.get()
            return cur and cur.hybrid, self.sims[dev].agent.applied
        births = [s for _, s in self.wire(State, dev, "state") if s.online]
        s = max(births, key=lambda s: s.ts, default=None)
        return s and (s.hybrid, s.generation)

    def unsettled(self, since: float) -> set[str]:
        """Devices with an open deployment, none created after `since` (wall time), or whose
        agent does not run their last HEALTHY hybrid at their last deployment's generation."""
        last, healthy, busy = {}, {}, set()
        for d in self.store.deployments():
            last[d.device_id] = d
            healthy[d.device_id] = d.hybrid if d.status == "HEALTHY" else healthy.get(d.device_id)
            busy |= {d.device_id} if d.open else set()
        return {dev for dev in self.ids if dev in busy or dev not in last
                or last[dev].created < since
                or self.running(dev) != (healthy.get(dev), last[dev].generation)}

    def steady(self) -> None:
        t0, db = time.monotonic(), self.tmp / "ctl" / "controller.sqlite"
        wait_for(db.is_file, 120, "the controller's store")
        self.store = Store(db)
        wait_for(lambda: not self.unsettled(0.0), 120 + 0.5 * len(self.ids),
                 f"all {len(self.ids)} devices HEALTHY", poll=1.0)
        self.r["steady_s"] = time.monotonic() - t0

    # -- 2: preparation ----------------------------------------------------------------------------
    def prepare(self) -> None:
        need = set(sum(self.art.split(self.target), [])) - set(sum(self.art.split(self.old), []))

        def fill_disks() -> None:
            for dev in self.full:
                for s in need:
                    self.sims[dev].agent.cache.discard(s)
                self.sims[dev].res.state.disk_free_mb = 0.0
        call_in_host(self.fleet.host, fill_disks)
        self.replay = {v: [p for _, topic, p in self.watched if topic.endswith(f"/{v}/desired")][-1]
                       for v in self.victims}  # each one's genuine first desired state
        self.old_gen = {b: self.running(b)[1] for b in CRASH}
        t = time.monotonic()
        for dev, crash in CRASH.items():
            self.procs.stop_agent(dev)
            for s in need if crash.startswith("chunk") else ():
                SegmentCache(self.procs.cache(dev)).discard(s)
            self.procs.start_agent(dev, crash)
        wait_for(lambda: all(any(s.online for _, s in self.wire(State, b, "state", t))
                             for b in CRASH), 90, "the real agents back online")

    # -- 3: rollout with faults --------------------------------------------------------------------
    def fault(self, name: str, affected, inject=None, label: str = "injection",
              ref: float | None = None) -> None:
        """Record a fault and inject it; its convergence is measured from `ref` (seconds after
        the edit; default: when the injection returned)."""
        f = dict(name=name, at=time.monotonic() - self.t0, affected=sorted(affected),
                 label=label, unsettled=len(set(affected) & self.last_unsettled))
        if inject is not None:
            inject()
        f["ref"] = ref if ref is not None else time.monotonic() - self.t0
        self.r["faults"].append(f)
        log.info("%s at %.1f s: %d devices, %d unsettled", name, f["at"], len(affected),
                 f["unsettled"])

    def _broker_crash(self) -> None:
        self.sampler.watch = [d.agent.client for d in self.fleet.devices
                              if d.agent.client.is_connected()]
        self.broker.kill()
        time.sleep(BROKER_DOWN_S)
        self.broker.restart()
        self.broker_up = time.monotonic()

    def rollout(self) -> None:
        host, sims = self.fleet.host, sorted(self.sims)
        self.last_unsettled = set(self.ids)
        self.t0, self.edit_wall = time.monotonic(), time.time()
        write_policy(self.policy, self.catalog, "min_energy")
        self.fault("policy edit max_accuracy → min_energy (the rollout)", self.ids, ref=0.0)
        self.fault("full disk (set before the edit)", self.full, ref=0.0)
        schedule = [
            (T_LOSS, lambda: self.fault("telemetry loss 20%", sims, lambda: call_in_host(
                host, lambda: self.fleet.apply(Event(0, {"extra_loss": 0.2}))))),
            (T_CUT, lambda: self.fault(
                f"partition of 20% for {CUT_S:g} s", call_in_host(host, lambda: self.fleet.apply(
                    Event(0, {}, fraction=0.2, cut_s=CUT_S))), label="heal", ref=T_CUT + CUT_S)),
            (T_BROKER, lambda: self.fault("broker SIGKILL + restart", self.ids,
                                          self._broker_crash, "restart")),
            (T_CONTROLLER, lambda: self.fault("controller SIGKILL + restart", self.ids,
                                              self.procs.restart_controller, "respawn"))]
        deadline = None
        while True:
            now = time.monotonic() - self.t0
            while schedule and schedule[0][0] <= now:
                schedule.pop(0)[1]()
            try:
                bad = self.unsettled(self.edit_wall)
            except Exception as exc:  # the store busy, say: the next poll
                log.debug("poll failed: %s", exc)
                bad = self.last_unsettled
            for dev in self.last_unsettled - bad:
                self.settled_at[dev] = now
            self.last_unsettled = bad
            if not schedule:
                deadline = deadline or now + SETTLE_TIMEOUT_S
                ctl_back = any(t - self.t0 > self.r["faults"][-1]["ref"]
                               and decode(ControllerState, p).online
                               for t, topic, p in list(self.watched) if topic.endswith("ctl/state"))
                if not bad and ctl_back and all(self.procs.deaths.get(b) for b in CRASH):
                    break
                if now > deadline:
                    log.warning("%d devices not settled %.0f s after the last fault", len(bad),
                                SETTLE_TIMEOUT_S)
                    break
            time.sleep(POLL_S)
        self.r["rollout_s"] = time.monotonic() - self.t0
        self.r["burst"] = self.sampler.burst(self.broker_up)
        self.r["stale_retained"] = sum(d.agent.stats["replayed"] for d in self.fleet.devices)

    # -- 4: bad inputs -----------------------------------------------------------------------------
    def bad_inputs(self) -> None:
        t, me = self.fleet.topics, EVIL
        other = next(d for d in sorted(self.sims) if d not in self.victims + self.full)
        cross = [t.telemetry(other), t.state(other), t.ack(other), t.art_req(other),
                 t.desired(me), t.desired(other), t.art_data(me), t.ctl_state, t.ctl_keys,
                 t.rebirth]
        clients = [self.spy("leak-spy", "leak-spy", cross), self.spy("evil-dev", me, []),
                   self.spy("evil-ctl", "evil-ctl", [])]
        wait_for(lambda: all(c.is_connected() for c in clients), 20, "the bad clients")
        time.sleep(1.0)  # the leak spy's subscription is in place
        dev, ctl = clients[1:]
        t_bad, drops0 = time.monotonic(), self.ctl_log("dropped message on")
        own = [dev.publish(x, p, qos=1).mid for x in (t.telemetry(me), t.state(me), t.ack(me),
                                                       t.art_req(me)) for p in JUNK.values()]
        denied = [dev.publish(x, b'{"evil": "cross"}', qos=1).mid for x in cross]
        wait_for(lambda: all(m in self.pubacks for m in own + denied), 20, "the PUBACKs")
        try:
            wait_for(lambda: self.ctl_log("dropped message on") - drops0 >= len(own), 20,
                     "the controller's drops")
        except TimeoutError as exc:
            self.note(str(exc))
        self.r["leaked"] = sum(x >= t_bad and b"evil" in p for x, _, p in list(self.watched))
        self.r["bad"] += [
            (f"{' / '.join(JUNK)} on its own telemetry, state, ack and art-req topics (a "
             "device's login)", len(own), self.ctl_log("dropped message on") - drops0,
             "controller: dropped, logged"),
            ("on another device's telemetry, state, ack, art-req; its own and another's desired; "
             "its art data; ctl/state; ctl/keys; bcast/rebirth (a device's login)", len(denied),
             sum(self.pubacks[m] == 135 for m in denied),
             f"broker: PUBACK 135; {self.r['leaked']} reached a subscriber")]
        key = KeyDir(self.tmp / "keys").load()[0]
        before = {v: (Counter(self.sims[v].agent.stats), self.running(v)) for v in self.victims}
        t_sig, front = time.monotonic(), self.art.split(self.old)[0]
        for v, neighbour in zip(self.victims, self.victims[-1:] + self.victims[:-1]):
            def desired(kind: str) -> Desired:
                return Desired(device_id=v, generation=self.sims[v].agent.applied + 1,
                               deployment_id=f"evil-{kind}-{v}", hybrid=self.old.id,
                               front=front, ts=time.time(), reason="ok")
            env = json.loads(seal(desired("tampered"), [key]))
            env["body"] = env["body"].replace('"reason":"ok"', '"reason":"ko"')
            for payload in (encode(desired("unsigned")),
                            seal(desired("forged"), [SigningKey.generate()]),
                            json.dumps(env).encode(), self.replay[v], self.replay[neighbour]):
                ctl.publish(t.desired(v), payload, qos=1)

        def refusals() -> Counter:
            return sum((self.sims[v].agent.stats - before[v][0] for v in self.victims), Counter())
        try:
            wait_for(lambda: refusals()["refused"] + refusals()["replayed"]
                     >= len(FORGED) * len(self.victims), 20, "the agents' refusals")
        except TimeoutError as exc:
            self.note(str(exc))
        time.sleep(2.0)  # their FAILED acks reach the watcher
        kinds = Counter(next((k for k, text in FORGED.items() if text in (a.reason or "")), "?")
                        for v in self.victims for _, a in self.wire(Ack, v, "ack", t_sig)
                        if a.status == "FAILED")
        kept = all(self.running(v) == before[v][1] for v in self.victims)
        self.r["bad"] += [(f"{kind} desired state (an operator login)", len(self.victims),
                           kinds[kind], "agent: FAILED ack; model and generation "
                           + ("unchanged" if kept else "CHANGED")) for kind in FORGED]
        self.r["refusals"] = {k: refusals()[k] for k in ("refused", "replayed")}

    def ctl_log(self, text: str) -> int:
        return (self.tmp / "ctl.log").read_text(errors="replace").count(text)

    def log_errors(self, pattern: str) -> int:
        """Errors a process logged: a callback's error (caught, counted) or a traceback. Its
        other ERROR lines (paho's, when the broker dies) are shown in the bench's log."""
        errors = 0
        for path in sorted(self.tmp.glob(pattern)):
            for line in path.read_text(errors="replace").splitlines():
                errors += bool(re.search(r": error (in|handling) |^Traceback", line))
                if " ERROR " in line:
                    log.info("%s: %s", path.name, line)
        return errors

    # -- 5: checks ---------------------------------------------------------------------------------
    def checks(self) -> None:
        deps = self.store.deployments()
        self.r.update(deployments=deps, sim_errors=sum(d.agent.stats["errors"]
                                                       for d in self.fleet.devices),
                      dups=[k for k, n in Counter((d.device_id, d.generation)
                                                  for d in deps).items() if n > 1],
                      ctl_errors=self.log_errors("ctl.log"))
        for dev in CRASH:
            self.procs.stop_agent(dev)
        self.r["board_errors"] = self.log_errors("board-*.log")
        self.r["crash"] = []
        for dev, fault in CRASH.items():
            cache, registry, row = SegmentCache(self.procs.cache(dev)), SegmentRegistry(), {}
            try:
                for s in cache.ids():
                    registry.get(s, lambda: cache.read(s))
                row["cache"] = f"yes: all {len(cache.ids())} cached segments rebuild"
            except Exception as exc:
                row["cache"] = f"NO: {exc}"
            for death in self.procs.deaths.get(dev, [])[:1]:
                row.update(died=death["died"] - self.t0, rc=death["rc"],
                           restart=death.get("restarted", float("nan")) - death["died"],
                           detail=(self.resumed if fault.startswith("chunk") else
                                   self.first_birth)(dev, death))
            self.r["crash"].append(dict(dev=dev, fault=fault, **row))

    def resumed(self, dev: str, death: dict) -> str:
        out = []
        for seg, (total, held) in ((s, p) for s, p in death["partial"].items() if p):
            want = sorted(set(range(total)) - held)
            reqs = [r.chunks for _, r in self.wire(ArtifactRequest, dev, "req", death["died"])
                    if r.artifact == seg]
            done = SegmentCache(self.procs.cache(dev)).has(seg)
            if not want:  # every chunk was on disk: it must be assembled without asking
                asked = f"asked for {reqs[0]} (NOT none)" if reqs else "asked for none (right)"
            else:
                first = reqs[0] if reqs else "none"
                ok = "only the missing ones" if first == want else "NOT only the missing"
                asked = f"the first request after restart asked for {first} ({ok})"
            out.append(f"{seg[:8]}: {len(held)} of {total} chunks held at death; {asked}; "
                       f"{'assembled' if done else 'NOT assembled by the end'}")
        return "; ".join(out) or "no partial download at death"

    def first_birth(self, dev: str, death: dict) -> str:
        births = sorted((s for _, s in self.wire(State, dev, "state")
                         if s.online and s.session > death["died_ns"]), key=lambda s: s.ts)
        if not births:
            return "no birth after restart"
        b, old = births[0], (self.old.id, self.old_gen[dev])
        return (f"first birth after restart: {b.hybrid and self.cat.get(b.hybrid).name} "
                f"generation {b.generation} ({'' if (b.hybrid, b.generation) == old else 'NOT '}"
                "the old model and generation)")

    def cleanup(self) -> None:
        for step in (self.sampler and self.sampler.stop.set, self.procs and self.procs.close,
                     self.fleet and self.fleet.host.stop,
                     self.thread and (lambda: self.thread.join(10)),
                     self.fleet and self.fleet.host.close, self.store and self.store.close,
                     self.broker and self.broker.stop):
            try:
                if step:
                    step()
            except Exception as exc:
                log.warning("cleanup: %s", exc)


# ---- report -----------------------------------------------------------------------------------

def _s(x, spec: str = "{:.1f}") -> str:
    return "—" if x is None else spec.format(x)


def status_class(status: str, reason: str) -> str:
    key = next((k for k in ("disk full", "verification", "signature", "settled by device state",
                            "no progress") if k in reason), None)
    return f"{status} ({key})" if key else status


def fault_table(b: Bench) -> tuple[list[str], list[str]]:
    """The faults table, and what fell short."""
    faults, short = list(b.r["faults"]), []
    for dev, deaths in b.procs.deaths.items() if b.procs else ():
        faults += [dict(name=f"{dev} SIGKILLed itself at {d['fault']}" if d["fault"] else
                        f"{dev} died unplanned (exit {d['rc']})", at=d["died"] - b.t0,
                        affected=[dev], ref=d.get("restarted", d["died"]) - b.t0,
                        label="restart", unsettled=1) for d in deaths]
    out = ["| fault | at s | devices | unsettled then | measured from (s) | survived | "
           "converge s |", "|---|---|---|---|---|---|---|"]
    for f in faults:
        left = set(f["affected"]) & b.last_unsettled
        conv = max((b.settled_at.get(d, 0.0) for d in set(f["affected"]) - left), default=0.0)
        name = f["name"]
        if name.startswith("full disk"):
            ok = sum(any(h == b.target.id and "disk full" in why and run == b.old.id
                         for h, why, run in b.disk_acks[d]) for d in f["affected"])
            name += (f": {ok} of {len(f['affected'])} FAILED \"disk full\" on {b.target.name} "
                     f"while {b.old.name} served")
            short += [name] if ok < len(f["affected"]) else []
        survived, conv = "yes", f"{max(conv - f['ref'], 0.0):.1f}"
        if left:
            survived = f"NO: {len(left)} never settled"
            conv = "—" if left == set(f["affected"]) else f"{conv} (the others)"
        out.append(f"| {name} | {f['at']:.1f} | {len(f['affected'])} | {f['unsettled']} | "
                   f"{f['label']} ({f['ref']:.1f}) | {survived} | {conv} |")
    short += [f"{dev} never died at {fault}" for dev, fault in CRASH.items()
              if not (b.procs and b.procs.deaths.get(dev))]
    if b.last_unsettled:
        short.append(f"never settled ({SETTLE_TIMEOUT_S:.0f} s after the last fault): "
                     f"{', '.join(sorted(b.last_unsettled)[:8])}"
                     f"{' …' if len(b.last_unsettled) > 8 else ''}")
    return out, short


def tables(b: Bench, cmd: str, wall: float, load: float) -> list[str]:
    r, (rows, short) = b.r, fault_table(b)
    deps = r.get("deployments", [])
    since, opened = [d for d in deps if d.created >= getattr(b, "edit_wall", 0)], \
        [d for d in deps if d.open]
    burst, sent = r.get("burst") or {}, b.loss["sent"]
    lost = sent - b.loss["heard"]
    lines = [
        f"`{cmd}`", "",
        f"{len(b.fleet.devices) if b.fleet else '?'} simulated devices (real agent code on one "
        f"ClientHost thread), {len(CRASH)} real agent processes, the controller process and "
        f"Mosquitto (logins, ACLs) on {os.cpu_count()} cores (load average {load:.1f} at the "
        f"start); the run took {wall:.0f} s. Tiny-zoo catalog: the faults are about the fleet, "
        f"not model quality. The rollout: {b.old.name} (max_accuracy) → {b.target.name} "
        f"(min_energy); steady state before it {_s(r.get('steady_s'), '{:.0f}')} s; the "
        f"rollout with its faults until all settled {_s(r.get('rollout_s'), '{:.0f}')} s.", "",
        "*Settled*: the controller's store holds no open deployment for the device, its last "
        "deployment was created after the policy edit, and its agent runs the hybrid of its last "
        "HEALTHY deployment at the generation of its last deployment (read from the agent object "
        "for a simulated device, from its newest birth on the wire for a real one); polled every "
        f"{POLL_S:g} s. *Converge s*: from the reference time (the injection, the heal, the "
        "broker's restart, the controller's or agent's respawn) to the first poll after which "
        "every affected device stayed settled (0: all were settled then already). Times are "
        "seconds after the policy edit; *unsettled then*: affected devices still rolling out when "
        "the fault hit.", "", *rows, "",
        "| deployments | started | terminal | open at the end | duplicate (device, generation) |",
        "|---|---|---|---|---|",
        f"| whole run | {len(deps)} | {len(deps) - len(opened)} | {len(opened)} | "
        f"{len(r.get('dups', []))} |",
        f"| since the policy edit | {len(since)} | {sum(not d.open for d in since)} | "
        f"{sum(d.open for d in since)} | — |", "",
        "Statuses at the end: " + ", ".join(f"{k} {n}" for k, n in Counter(
            status_class(d.status, d.reason) for d in deps).most_common()) + "; TIMEOUT on: "
        + (", ".join(sorted({d.device_id for d in deps if d.status == "TIMEOUT"})) or "none")
        + f". Older retained desired states the broker re-delivered after its restart, refused "
        f"by simulated agents as replayed: {r.get('stale_retained', '—')}.", "",
        "| bad input | tried | refused | by |", "|---|---|---|---|",
        *[f"| {what} | {n} | {refused} | {by} |" for what, n, refused, by in r["bad"]], "",
        "The forged desired states went to 3 simulated devices; *refused* counts their FAILED "
        "acks by reason. Their agents' counters rose by: " + ", ".join(
            f"{k} {n}" for k, n in r.get("refusals", {}).items()) + " (expected: refused "
        f"{3 * (len(FORGED) - 1)}, replayed 3).", "",
        "| real agent | fault | died at s | exit | restarted after s | cache intact | resumed "
        "download / first birth |", "|---|---|---|---|---|---|---|",
        *[f"| {c['dev']} | {c['fault']} | {_s(c.get('died'))} | {c.get('rc', '—')} | "
          f"{_s(c.get('restart'))} | {c['cache']} | {c.get('detail', 'did not die')} |"
          for c in r.get("crash", [])], "",
        f"Reconnects after the broker's restart (this process's ClientHost, sampled every 50 ms): "
        f"peak {burst.get('peak', '—')} connects/s (1 s sliding window); the first "
        f"{_s(burst.get('first'), '{:.2f}')} s after the restart; all {burst.get('clients', '—')} "
        f"simulated devices connected at the kill back after {_s(burst.get('back'), '{:.2f}')} s.",
        f"Telemetry loss: of {sent} telemetry messages the simulated devices sent while it was "
        f"on, {b.loss['heard']} reached a subscriber ({lost / max(1, sent):.0%} lost; SimFleet "
        "drops them at the device's side, and a partitioned device's are lost too).",
        f"Errors: simulated agents {r.get('sim_errors', '—')}; real agents "
        f"{r.get('board_errors', '—')}, controller {r.get('ctl_errors', '—')} (callback errors "
        "and tracebacks in their logs)."]
    short += [f"{len(opened)} deployments open at the end "
              f"({', '.join(sorted({d.device_id for d in opened}))})"] if opened else []
    short += [f"duplicate (device, generation): {r['dups']}"] if r.get("dups") else []
    short += [f"not all refused: {what} ({refused} of {n})" for what, n, refused, by in r["bad"]
              if refused < n or "CHANGED" in by]
    short += [f"{r['leaked']} forbidden publishes reached a subscriber"] if r.get("leaked") else []
    short += [f"{c['dev']}: {c['cache']}; {c.get('detail', 'did not die')}"
              for c in r.get("crash", []) if c["cache"].startswith("NO") or "NOT" in c.get(
                  "detail", "")]
    short += [f"errors: {k} {r[k]}" for k in ("sim_errors", "board_errors", "ctl_errors")
              if r.get(k)] + r["notes"]
    return lines + ["", "Falls short: " + ("nothing." if not short else ""),
                    *[f"- {s}" for s in short]]


def write_results(lines: list[str]) -> Path:
    path = ROOT / "docs" / "results.md"
    text = path.read_text() if path.exists() else "# Results\n"
    block = START + "\n" + "\n".join(lines).rstrip() + "\n" + END
    if START in text and END in text:
        text = re.sub(re.escape(START) + r".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    else:
        text += f"\n## Faults: a rollout through crashes and bad inputs\n\n{block}\n"
    path.with_name(path.name + ".tmp").write_text(text)
    os.replace(path.with_name(path.name + ".tmp"), path)
    return path


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, default=200, help="simulated devices")
    p.add_argument("--catalog", type=Path, help="catalog directory (default: the tiny zoo)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-write", dest="write", action="store_false",
                   help="do not update docs/results.md")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(threadName)s %(name)s %(levelname)s %(message)s")
    log.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    logging.getLogger("fleet_runtime.mqtt.paho").setLevel(logging.CRITICAL)  # the broker kill
    signal.signal(signal.SIGTERM, _interrupt)  # clean up the broker and processes on kill too
    cmd = shlex.join(["python", os.path.relpath(__file__), *(sys.argv[1:] if argv is None
                                                             else argv)])
    load, t0 = os.getloadavg()[0], time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fault-bench-", dir="/dev/shm"
                                     if Path("/dev/shm").is_dir() else None) as tmp:
        bench = Bench(args, ensure_catalog(args.catalog), Path(tmp))
        try:
            bench.execute()
        except KeyboardInterrupt:
            bench.note("interrupted")
        lines = tables(bench, cmd, time.monotonic() - t0, load)
    print("\n".join(lines), flush=True)
    if args.write:
        log.info("written to %s", write_results(lines))
    return 0 if lines[-1] == "Falls short: nothing." else 1


if __name__ == "__main__":
    sys.exit(main())
