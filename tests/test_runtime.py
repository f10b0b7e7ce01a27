"""The agent's model slot: atomic swaps, requests in flight finish on the old model."""
import math
import threading

import pytest
import torch
from torch import nn

from device_agent.runtime import LatencyWindow, Loaded, ModelSlot, health_verdict
from fleet_protocol.messages import Desired
from stitch_lib.inputs import InputSpec


class Gate(nn.Module):
    """Returns a constant; waits for `release` when asked to, to hold a request in flight."""

    def __init__(self, value: float, gate: threading.Event | None = None) -> None:
        super().__init__()
        self.value, self.gate = value, gate
        self.entered = threading.Event()

    def forward(self, x):
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(5)
        return torch.full((x.shape[0], 2), self.value)


def loaded(module, gen):
    d = Desired(device_id="a", generation=gen, deployment_id=f"d{gen}", hybrid=f"h{gen}",
                front=["5e" * 32], ts=0.0)
    return Loaded(module, d, flops=1, input=InputSpec(1, (1, 1)))


def test_requests_in_flight_finish_on_the_old_model():
    release = threading.Event()
    old, new = Gate(1.0, release), Gate(2.0)
    slot = ModelSlot()
    slot.swap(loaded(old, 1))
    results = {}
    t = threading.Thread(target=lambda: results.setdefault("inflight", slot.infer(torch.zeros(1, 1))))
    t.start()
    assert old.entered.wait(5)
    slot.swap(loaded(new, 2))  # swaps while a request is inside the old model
    out, which = slot.infer(torch.zeros(1, 1))
    assert which.generation == 2 and out[0, 0] == 2.0
    release.set()
    t.join(5)
    out, which = results["inflight"]
    assert which.generation == 1 and out[0, 0] == 1.0
    assert slot.rollback().generation == 1 and slot.get().generation == 1


def test_latency_window_and_health_verdict():
    w = LatencyWindow(size=100)
    for ms in range(1, 101):
        w.add(float(ms), None)
    assert 49 <= w.percentile(50) <= 51 and 94 <= w.percentile(95) <= 96
    now = [0.0]  # a window by age: a slowed device's figures move within max_age_s
    w = LatencyWindow(size=64, max_age_s=10.0, clock=lambda: now[0])
    for t in range(21):
        now[0] = float(t)
        w.add(2.0 if t < 15 else 5.0, None)
        if t == 19:
            assert w.percentile(50) == 2.0  # t 9..19: 6 fast, 5 slow
    assert w.percentile(50) == 5.0 and w.percentile(5) == 2.0  # t 10..20: 5 fast, 6 slow
    now[0] = 31.0
    assert w.percentile(50) is None
    # every sample since the reset (15 of 2 ms, 6 of 5 ms), however old
    assert w.percentile(50, max_age_s=math.inf) == 2.0 and w.percentile(95, math.inf) == 5.0
    with pytest.raises(ValueError, match="max_age_s > 0"):
        LatencyWindow(max_age_s=0)
    assert health_verdict(96.0, 50.0, None, None).startswith("latency p95 96.0 ms > budget")
    assert health_verdict(10.0, 50.0, 0.5, 0.7).startswith("probe accuracy 0.500 < 0.700")
    assert health_verdict(10.0, 50.0, 0.9, 0.7) is None


def test_the_health_check_judges_a_slow_model_on_every_probe(tmp_path):
    """A model so slow that each probe takes longer than the telemetry window's age limit is
    still judged on all of its probes, not on none (which would pass it as healthy)."""
    from device_agent.agent import Agent, AgentConfig
    from device_agent.cache import SegmentRegistry
    from device_agent.worker import InlineWorker
    from fleet_runtime.mqtt import ClientHost
    from simulators.devices import CLASSES, SimResources, SimState

    now = [0.0]

    def clock():  # each reading is an hour after the one before
        now[0] += 3600.0
        return now[0]
    host = ClientHost()
    agent = Agent(AgentConfig("rpi4-000", tmp_path / "board"),
                  SimResources(CLASSES["rpi4"], SimState()), host, SegmentRegistry(),
                  monotonic=clock, worker=InlineWorker())
    try:
        d = Desired(device_id="rpi4-000", generation=1, deployment_id="d1", hybrid="h1",
                    front=["5e" * 32], ts=0.0, latency_budget_ms=1e-3)  # under any latency
        slow = Loaded(Gate(1.0), d, flops=10**8, input=InputSpec(1, (8, 8)))
        agent.latency.reset(slow)
        problem, _ = agent._health(slow)
        assert problem is not None and problem.startswith("latency p95 "), problem
        assert agent.latency.percentile(95) is None  # telemetry's window has aged them out
    finally:
        agent.worker.stop()
        host.close()


def test_a_wall_clock_jump_changes_nothing_the_board_times(tmp_path):
    """A board without a real-time clock boots in 1970 and NTP sets its clock later: what the
    agent times itself runs on the monotonic clock, so the jump ages nothing out."""
    from device_agent.agent import Agent, AgentConfig
    from device_agent.cache import SegmentRegistry
    from device_agent.worker import InlineWorker
    from fleet_runtime.mqtt import ClientHost
    from simulators.devices import CLASSES, SimResources, SimState

    wall = [0.0]
    host = ClientHost()
    agent = Agent(AgentConfig("rpi4-000", tmp_path / "board"),
                  SimResources(CLASSES["rpi4"], SimState()), host, SegmentRegistry(),
                  clock=lambda: wall[0], worker=InlineWorker())
    try:
        model = loaded(Gate(1.0), 1)
        agent.latency.reset(model)
        agent.latency.add(5.0, model)
        wall[0] = 1.8e9  # NTP: 57 years later
        assert agent.latency.percentile(95) == 5.0
        wall[0] = -1.8e9  # and back
        assert agent.latency.percentile(95) == 5.0
    finally:
        agent.worker.stop()
        host.close()


def test_the_registry_computes_once_per_key_and_remembers_refusals(monkeypatch):
    from device_agent import cache
    from device_agent.cache import SegmentRegistry

    monkeypatch.setattr(cache, "ONCE_ENTRIES", 2)
    reg, calls = SegmentRegistry(), []

    def compute(value):
        calls.append(value)
        if value == "bad":
            raise ValueError("model outputs are not finite")
        return value

    assert [reg.once(("a",), lambda: compute(1)) for _ in range(3)] == [1, 1, 1]
    for _ in range(2):
        try:
            reg.once(("b",), lambda: compute("bad"))
        except ValueError as exc:
            assert "not finite" in str(exc)
        else:
            raise AssertionError("a remembered refusal must be raised again")
    assert calls == [1, "bad"]
    reg.once(("c",), lambda: compute(3))  # the oldest key ("a") is dropped: bounded
    assert reg.once(("a",), lambda: compute(4)) == 4 and calls == [1, "bad", 3, 4]


@pytest.mark.parametrize("hidden", [0, 8])
@torch.no_grad()
def test_a_stitch_travels_as_its_tensors_and_width(hidden):
    """What the controller packs (fp16 tensors plus ports and width) rebuilds on the board
    into the same stitch; a delta whose width disagrees with its tensors is refused."""
    from device_agent.runtime import build_stitch
    from fleet_protocol import codec
    from fleet_protocol.messages import PortSpec, StitchDelta
    from stitch_lib.segments import Port
    from stitch_lib.stitch import Stitch

    src, dst = Port("map", 6, (4, 4)), Port("tokens", 8, (2, 2), 1)
    stitch = Stitch(src, dst, hidden)
    for p in stitch.parameters():
        p.normal_()
    blob = codec.pack_delta({k: v.numpy() for k, v in stitch.state_dict().items()})

    def delta(width):
        return StitchDelta(src=PortSpec(**vars(src)), dst=PortSpec(**vars(dst)), hidden=width,
                           size=len(blob), sha256=codec.sha256_hex(blob), data=codec.b64(blob))

    x = torch.randn(2, 6, 4, 4)
    assert torch.allclose(build_stitch(delta(hidden))(x), stitch(x), atol=0.05, rtol=0.01)
    with pytest.raises(codec.ArtifactError):
        build_stitch(delta(4 if hidden else 8))
