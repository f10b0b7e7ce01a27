"""Faults against a real Mosquitto, each bounded in time: the broker killed mid-rollout, the
controller SIGKILLed mid-rollout, an agent killed mid-download and mid-swap, lossy and
partitioned links, a full disk. The fleet must converge; nothing may be lost or half-built."""
import base64
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml

from device_agent.agent import CRASH_ENV
from device_agent.cache import SegmentCache, SegmentRegistry, provision
from fleet_controller.store import Store
from fleet_protocol.messages import Ack, ArtifactRequest, Desired, State, decode
from fleet_protocol.signing import KeyDir, seal, unverified
from fleetloop import T, Loop, healthy
from simulators.fleet import Event, SimFleet

def cheapest(catalog):
    return min((e for e in catalog.entries if e.stitch_state != "ls"), key=lambda e: e.flops)


def settled(ctl, devices):
    """Every device has a deployment, the last one HEALTHY, and none is open."""
    deps = ctl.store.deployments()
    last = {d.device_id: d for d in deps}
    return (not ctl.store.deployments(open_only=True) and set(devices) <= set(last)
            and all(last[d].status == "HEALTHY" for d in devices))


def no_duplicates(deps):
    keys = [(d.device_id, d.generation) for d in deps]
    return len(keys) == len(set(keys))


def test_broker_killed_mid_rollout_every_device_converges(loop, broker):
    ctl = loop.start_controller()
    agents = [loop.add_agent(f"jetson-{k:03d}", cls="jetson", provisioned=False, chunk_size=2048)
              for k in range(5)]
    loop.run_until(lambda: sum(len(f.held) for a in agents for f in a.fetching.values()) >= 5)
    broker.kill()  # SIGKILL: no goodbye, no persistence flush
    broker.restart()
    loop.run_until(lambda: settled(ctl, loop.agents), timeout=60)
    assert all(healthy(a) >= 1 and a.cache.ids() for a in agents)
    assert loop.host.stats["reconnects"] >= 6  # five agents and the controller came back
    assert no_duplicates(ctl.store.deployments())


@pytest.fixture
def spawn(tmp_path):
    """Start `restnet ARGS...` as a process (output in tmp_path/<name>.log); every process
    started is killed when the test ends, whatever happened."""
    procs = []

    def start(name, args, env=None):
        with open(tmp_path / f"{name}.log", "ab") as log:
            procs.append(subprocess.Popen([sys.executable, "-m", "restnet.cli", *args],
                                          stdout=log, stderr=subprocess.STDOUT,
                                          env={**os.environ, **(env or {})}))
        return procs[-1]
    yield start
    for p in procs:
        p.kill()
        p.wait()


def connection(loop, user, tmp_path):
    args = ["--broker", loop.broker.url]
    login = loop.login(user)
    if login:
        pw = tmp_path / f"{user}.password"
        pw.write_text(login["password"])
        args += ["--username", user, "--password-file", str(pw)]
    return args


@pytest.mark.slow  # real processes, started and killed
def test_controller_sigkilled_mid_rollout_resumes_from_its_store(loop, tmp_path, spawn):
    cmd = ["controller", "--policy", str(loop.policy), "--state-dir", str(tmp_path / "ctl"),
           "--keys", str(loop.keys), *connection(loop, "controller", tmp_path)]
    proc = spawn("controller", cmd)
    agents = [loop.add_agent(f"jetson-1{k:02d}", cls="jetson", provisioned=False,
                             chunk_size=1024) for k in range(4)]
    loop.run_until(lambda: any(a.fetching for a in agents), timeout=60)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not all(healthy(a) for a in agents), "the rollout ended before the kill"
    spawn("controller", cmd)  # a new process on the same store
    loop.run_until(lambda: all(healthy(a) >= 1 for a in agents), timeout=90)
    store = Store(tmp_path / "ctl" / "controller.sqlite")
    loop.run_until(lambda: not store.deployments(open_only=True), timeout=30)
    deps = store.deployments()
    store.close()
    assert no_duplicates(deps)
    for a in agents:  # none lost: each device's last deployment is what it runs
        mine = [d for d in deps if d.device_id == a.cfg.device_id]
        assert mine[-1].status == "HEALTHY"
        assert mine[-1].hybrid == loop.running(a.cfg.device_id)


class Watch:
    """What a device process says on the wire: its retained states, acks and chunk requests."""

    def __init__(self, loop, dev):
        self.client, self.raw = loop.spy(f"watch-{dev}", f"fleet/v1/+/{dev}/#")

    def of(self, cls, suffix):
        return [decode(cls, p) for t, p in self.raw if t.endswith(suffix) and p]


def agent_cmd(loop, dev, cache, tmp_path, *extra):
    return ["agent", "--device-id", dev, "--cache", str(cache), "--telemetry-period", "0.5",
            "--trust", str(loop.keys / "controller.pub"), *extra,
            *connection(loop, dev, tmp_path)]


@pytest.mark.slow  # real processes, started and killed
def test_agent_killed_mid_download_resumes_with_its_cache_intact(loop, tmp_path, spawn):
    loop.start_controller()
    dev, cache = "board-001", tmp_path / "board-001"
    watch = Watch(loop, dev)
    cmd = agent_cmd(loop, dev, cache, tmp_path, "--chunk-size", "4096")
    proc = spawn(dev, cmd, env={CRASH_ENV: "chunk:3"})
    loop.run_until(lambda: proc.poll() is not None, timeout=60)
    assert proc.returncode == -signal.SIGKILL
    seg_id, (total, held) = next((s, SegmentCache(cache).in_progress(s, 4096))
                                 for s in os.listdir(cache / "partial"))
    assert len(held) == 3 and total > 3
    watch.raw.clear()
    spawn(dev, cmd)  # restarted, no fault this time
    loop.run_until(lambda: any(a.status == "HEALTHY" for a in watch.of(Ack, "/ack")),
                   timeout=90)
    resumed = next(r for r in watch.of(ArtifactRequest, "/req") if r.artifact == seg_id)
    assert sorted(resumed.chunks) == sorted(set(range(total)) - held)  # only what was missing
    c = SegmentCache(cache)
    registry = SegmentRegistry()
    for s in c.ids():  # every cached artifact rebuilds the segment it is named after
        registry.get(s, lambda: c.read(s))


def test_a_download_complete_before_a_crash_is_assembled_without_asking(loop, catalog):
    """Every chunk was on disk, the agent died before assembling: nothing is fetched again."""
    ctl = loop.start_controller()
    target = max(catalog.entries, key=lambda e: (e.test_acc, -e.flops))  # what it will get
    seg_id = ctl.artifacts.split(target)[0][0]
    cache = SegmentCache(loop.tmp / "dev" / "rpi4-070")
    first = ctl.artifacts.chunk(seg_id, 0, 64 * 1024)
    cache.partial(seg_id, first.artifact_sha256, first.size, first.total)
    for k in range(first.total):
        cache.put_chunk(seg_id, k, base64.b64decode(ctl.artifacts.chunk(seg_id, k, 64 * 1024).data))
    _, asked = loop.spy("watch", T.art_req("rpi4-070"))
    agent = loop.add_agent("rpi4-070", provisioned=False)
    loop.run_until(lambda: healthy(agent) >= 1, timeout=60)
    assert agent.cache.has(seg_id)
    assert all(decode(ArtifactRequest, p).artifact != seg_id for _, p in asked)


@pytest.mark.slow  # real processes, started and killed
def test_agent_killed_mid_swap_serves_the_old_model_then_the_new(loop, catalog, keys, tmp_path,
                                                                  spawn):
    ctl = loop.start_controller()
    dev, cache = "board-002", tmp_path / "board-002"
    provision(SegmentCache(cache), catalog)  # no downloads: the controller goes away below
    watch = Watch(loop, dev)
    cmd = agent_cmd(loop, dev, cache, tmp_path)
    proc = spawn(dev, cmd)
    loop.run_until(lambda: any(a.status == "HEALTHY" for a in watch.of(Ack, "/ack")), timeout=90)
    old = ctl.store.deployments(dev)[-1]
    proc.terminate()
    proc.wait()
    ctl.stop()  # from here on the operator alone says what the device should run
    loop.controller = None
    new = next(e for e in catalog.entries if e.id != old.hybrid and e.kind == "hybrid")
    front, back = ctl.artifacts.split(new)
    d = Desired(device_id=dev, generation=old.generation + 1, deployment_id="op.1",
                hybrid=new.id, front=front, back=back, stitch=ctl.artifacts.delta(new),
                ts=time.time())
    client, _ = loop.spy("operator", "fleet/v1/none")
    client.publish(T.desired(dev), seal(d, [KeyDir(keys).load()[0]]), qos=1, retain=True)
    proc = spawn(dev, cmd, env={CRASH_ENV: "swap"})
    loop.run_until(lambda: proc.poll() is not None, timeout=60)
    assert proc.returncode == -signal.SIGKILL
    watch.raw.clear()
    spawn(dev, cmd)
    loop.run_until(lambda: any(s.online and s.generation == d.generation
                               for s in watch.of(State, "/state")), timeout=90)
    births = [s for s in watch.of(State, "/state") if s.online]
    assert (births[0].hybrid, births[0].generation) == (old.hybrid, old.generation)
    assert (births[-1].hybrid, births[-1].generation) == (new.id, d.generation)
    assert any(a.status == "HEALTHY" and a.generation == d.generation
               for a in watch.of(Ack, "/ack"))


def test_lossy_and_partitioned_links_converge_once_healed(loop, catalog, tmp_path):
    ctl = loop.start_controller()
    fleet = SimFleet(10, loop.broker.url, catalog.root, tmp_path / "fleet", mix={"rpi4": 1},
                     telemetry_period=0.3, host=loop.host, trust=loop.trust)
    fleet.start(loop.credentials(fleet.ids))
    loop.run_until(lambda: settled(ctl, fleet.ids), timeout=60)
    def heard():  # applied or replaced by a newer report before it was applied
        return ctl.stats["in_telemetry"] + ctl.stats["telemetry_conflated"]

    sent, before = sum(d.agent.seq for d in fleet.devices), heard()
    fleet.apply(Event(at=0, set={"extra_loss": 0.2}))  # 20% of telemetry lost from here on
    cut = fleet.apply(Event(at=0, set={}, fraction=0.4, cut_s=4.0))
    fleet.apply(Event(at=0, set={"battery": 0.1}))  # everyone should now save energy
    target = cheapest(catalog).id

    def converged():
        return settled(ctl, fleet.ids) and all(
            (d.agent.slot.get().hybrid == target) for d in fleet.devices)
    loop.run_until(converged, timeout=90)
    sent = sum(d.agent.seq for d in fleet.devices) - sent
    assert heard() - before < 0.9 * sent  # the loss was real
    assert len(cut) == 4 and all(ctl.twins[d].online for d in fleet.ids)
    assert no_duplicates(ctl.store.deployments())
    fleet.stop()


def test_a_full_disk_fails_the_deployment_while_the_old_model_serves(loop, catalog):
    ctl = loop.start_controller()
    agent = loop.add_agent("rpi4-060")
    loop.run_until(lambda: healthy(agent) >= 1)
    before = loop.running("rpi4-060")
    target = cheapest(catalog)
    need = set(sum(ctl.artifacts.split(target), [])) - set(sum(ctl.artifacts.split(
        ctl.entries[before]), []))
    assert need, "the test needs a target with segments the running model lacks"
    for s in need:
        agent.cache.discard(s)
    agent.resources.state.disk_free_mb = 0.01
    agent.resources.state.battery = 0.1

    def failed():
        return [d for d in ctl.store.deployments("rpi4-060") if d.status == "FAILED"]
    loop.run_until(lambda: failed())
    assert failed()[0].hybrid == target.id and "disk full" in failed()[0].reason
    assert loop.running("rpi4-060") == before  # it never stopped serving
    assert len(agent.infer(np.zeros((2, 32, 32), np.uint8)).classes) == 2


def test_a_controller_killed_between_waves_resumes_the_rollout(broker, catalog, tmp_path, keys):
    """The waves of a policy change survive a controller crash: the devices not yet released
    keep the old policy until their wave, not all at once when the controller comes back."""
    lp = Loop(broker, catalog, tmp_path, keys)
    doc = yaml.safe_load(lp.policy.read_text())
    doc["rollout"] = {"waves": [25, 50, 100], "wave_interval_s": 3, "max_failure_percent": 50}
    lp.policy.write_text(yaml.safe_dump(doc))
    try:
        ctl = lp.start_controller()
        agents = [lp.add_agent(f"rpi4-20{k}") for k in range(4)]
        lp.run_until(lambda: ctl.metrics.adaptations >= 4)
        doc["defaults"]["objective"] = "min_energy"
        lp.policy.write_text(yaml.safe_dump(doc))
        t_edit = time.time()
        lp.run_until(lambda: len(ctl.released) == 1, timeout=30)  # wave 1 is out
        ctl.scheduler.shutdown(wait=False)  # the controller dies
        lp.host.remove(ctl.client)
        ctl.store.close()
        ctl2 = lp.start_controller()  # a new process, same store, the edited fleet.yaml
        assert ctl2.rollout is not None and len(ctl2.released) == 1
        lp.run_until(lambda: ctl2.rollout is None and all(
            lp.running(a.cfg.device_id) == cheapest(catalog).id for a in agents), timeout=90)
        times = sorted(d.created for d in ctl2.store.deployments() if d.created > t_edit)
        assert len(times) == 4 and no_duplicates(ctl2.store.deployments())
        assert times[1] - times[0] >= 2.5 and times[3] - times[1] >= 2.5  # still in waves
    finally:
        lp.close()


def test_after_a_broker_crash_the_controller_reasserts_every_desired_state(loop, catalog):
    """A SIGKILLed broker loses the retained messages since its last autosave; once the
    controller is back, the retained desired state of every device is its newest again."""
    ctl = loop.start_controller()
    agent = loop.add_agent("rpi4-080")
    loop.run_until(lambda: healthy(agent) >= 1)
    agent.resources.state.battery = 0.1  # a second deployment, within the autosave interval
    loop.run_until(lambda: healthy(agent) >= 2)
    newest = ctl.store.deployments("rpi4-080")[-1].generation
    loop.broker.kill()
    loop.broker.restart()
    loop.run_until(lambda: ctl.client.is_connected() and ctl.stats["in_state"] >= 3, timeout=30)
    _, got = loop.spy("late-reader", T.desired("rpi4-080"))  # reads the retained copy
    loop.run_until(lambda: got, timeout=10)
    assert unverified(Desired, got[-1][1])[1].generation == newest
