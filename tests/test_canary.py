"""The canary window: after a healthy swap the agent compares what the new model serves on
real traffic (latency, errors, confidence, accuracy on the labels applications send back) with
what the previous model served before the swap, and goes back to the previous model on a
regression without dropping a request; the controller records that and avoids the model."""
import json
import random
import time

import numpy as np
import pytest
import torch

from device_agent.canary import CanaryConfig, ServedFigures, Summary, canary_verdict
from device_agent.localapi import LocalAPI
from device_agent.runtime import LatencyWindow, ModelSlot
from device_agent.serving import BadInput, Serving, UnknownRequest
from fleet_protocol.messages import Ack, Capabilities, Desired, State, Telemetry, decode, encode
from fleet_protocol.signing import unverified
from fleetloop import T, healthy
from stitch_lib.inputs import InputSpec
from test_dos import device_client
from test_serving import Traffic, check_answers, loaded, log_swaps, post

RNG = np.random.default_rng(1)


def test_the_verdict_names_the_figure_and_both_values():
    cfg = CanaryConfig(min_samples=30)
    same = Summary(total=50, requests=50, answered=50, p95_ms=4.0, images=50, confidence=0.8,
                   confidence_var=0.01, labelled=40, correct=32)
    assert canary_verdict(same, same, 5.0, cfg) is None
    assert canary_verdict(same, Summary(), None, cfg) is None  # nothing to compare with
    few = Summary(total=10, requests=10, answered=10, p95_ms=90.0, labelled=10, correct=0)
    assert canary_verdict(few, same, 5.0, cfg) is None  # too few samples to judge
    slow = Summary(total=40, requests=40, answered=40, p95_ms=9.0)
    assert canary_verdict(slow, same, 5.0, cfg) == \
        "canary: served latency p95 9.00 ms > budget 5.00 ms (40 requests)"
    failing = Summary(total=100, requests=100, errors=20, answered=80)
    assert canary_verdict(failing, same, None, cfg).startswith(
        "canary: error rate 0.200 > previous 0.000 + 0.05 (20/100 vs 0/50 requests)")
    wrong = Summary(labelled=40, correct=12)
    assert canary_verdict(wrong, same, None, cfg) == ("canary: accuracy on feedback 0.300 < "
                                                      "previous 0.800 - 0.1 (12/40 vs 32/40 "
                                                      "labelled)")
    unsure = Summary(images=60, confidence=0.45, confidence_var=0.01)
    assert canary_verdict(unsure, same, None, cfg).startswith(
        "canary: mean confidence 0.450 < previous 0.800 - 0.15")
    with pytest.raises(ValueError, match="max_accuracy_drop"):
        CanaryConfig(max_accuracy_drop=2)


def test_two_draws_of_the_same_model_rarely_look_like_a_regression():
    """Noise: 1,000 pairs of windows drawn from one model (80% right, confidence around 0.7)
    at sample sizes from the minimum up. A difference must pass its threshold and 3 standard
    errors, so about 1 in 700 looks finds a regression that is not there (one-sided 3σ)."""
    rng = random.Random(0)
    cfg = CanaryConfig(min_samples=30)
    false_alarms = []
    for trial in range(1000):
        figures = ServedFigures()
        figures.track(1, 2)
        for gen in (1, 2):
            for _ in range(rng.randrange(30, 200)):
                top = min(1.0, max(0.1, rng.gauss(0.7, 0.15)))
                rid = figures.answered(gen, rng.uniform(2, 4), [1], [top], 10)
                figures.label(rid, [1 if rng.random() < 0.8 else 2])
        why = canary_verdict(figures.summary(2), figures.summary(1), 10.0, cfg)
        if why is not None:
            false_alarms.append(why)
    assert len(false_alarms) <= 5, false_alarms  # ≤ 0.5%


def test_feedback_in_process_and_over_the_local_api():
    slot = ModelSlot()
    serving = Serving(slot, LatencyWindow())
    slot.swap(loaded(2.0, 7))
    serving.figures.track(7)
    api = LocalAPI(serving, port=0)
    api.start()
    url = f"http://127.0.0.1:{api.port}"
    img = np.full((8, 8), 200, np.uint8)
    try:
        status, answer = post(f"{url}/v1/infer",
                              json.dumps({"array": [img.tolist()] * 2}).encode())
        assert status == 200 and answer["classes"] == [0, 0] and answer["request_id"]
        rid = answer["request_id"]
        for body, code, says in [
                (b"{", 400, "not JSON"),
                (b'{"labels": [0, 0]}', 400, "request_id"),
                (json.dumps({"request_id": rid, "labels": [0]}).encode(), 400, "1 labels for"),
                (json.dumps({"request_id": rid, "labels": [0, 3]}).encode(), 400, "label 3"),
                (json.dumps({"request_id": rid, "labels": [True, 0]}).encode(), 400, "labels"),
                (json.dumps({"request_id": rid, "labels": [-1, 0]}).encode(), 400, "labels"),
                (json.dumps({"request_id": "nope", "labels": [0]}).encode(), 404, "nope"),
                (b'{"request_id": "x", "labels": [' + b"0," * 40000 + b"0]}", 413, "at most")]:
            status, doc = post(f"{url}/v1/feedback", body)
            assert status == code and says in doc["error"], (body[:60], status, doc)
        status, doc = post(f"{url}/v1/feedback",
                           json.dumps({"request_id": rid, "labels": [0, None]}).encode())
        assert status == 200 and doc == {"request_id": rid, "generation": 7, "labelled": 1,
                                         "correct": 1}
        status, doc = post(f"{url}/v1/feedback",
                           json.dumps({"request_id": rid, "labels": [0, 1]}).encode())
        assert status == 404 and "labelled already" in doc["error"]  # once per answer
    finally:
        api.stop()
    p = serving.infer(img[None])
    assert serving.feedback({"request_id": p.request_id, "labels": [1]})["correct"] == 0
    with pytest.raises(UnknownRequest):
        serving.feedback({"request_id": p.request_id, "labels": [1]})
    with pytest.raises(BadInput, match="labels"):
        serving.feedback({"request_id": "x", "labels": []})
    s = serving.figures.summary(7)
    assert (s.total, s.answered, s.images, s.labelled, s.correct) == (2, 2, 3, 2, 1)
    assert serving.figures.summary(6) == Summary()  # an untracked generation keeps nothing


def statuses(acks):
    return [decode(Ack, p) for _, p in acks]


def pixels(splits, spec: InputSpec) -> torch.Tensor:
    """The test split's images as float pixels (0–1), as an application would send them."""
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in (spec.mean, spec.std))
    return (splits.test.x * std + mean).clamp(0, 1)


class App:
    """An application on the board: it asks for the classes of images and, for every
    answer, sends the true classes back (`truth`)."""

    def __init__(self, agent, images: torch.Tensor, truth: torch.Tensor, batch: int = 4):
        self.agent, self.images, self.truth, self.batch = agent, images, truth, batch
        self.k = 0

    def ask(self) -> None:
        idx = [(self.k + j) % len(self.images) for j in range(self.batch)]
        self.k += self.batch
        p = self.agent.infer(self.images[idx])
        self.agent.feedback(p.request_id, self.truth[idx].tolist())

    def labelled(self, generation: int) -> int:
        return self.agent.serving.figures.summary(generation).labelled


def test_a_model_worse_on_labelled_feedback_is_rolled_back_and_avoided(loop, catalog, splits):
    """The controller moves a device to a hybrid that is the best on paper but whose stitch
    is all zeros (it installs and passes the health check: no probes, no budget). On the
    labels the application sends back it answers far worse than the model before it: the
    canary rolls it back, the controller records it and deploys it there no more."""
    cheapest = min((e for e in catalog.entries if e.stitch_state != "ls"), key=lambda e: e.flops)
    bad = next(h for h in catalog.hybrids if h.flops > cheapest.flops)
    zeros = {k: torch.zeros_like(v) for k, v in catalog.load_artifact(bad.artifact).items()}
    bad.artifact = catalog.put_artifact(zeros)
    bad.test_acc, bad.stitch_state = 0.99, "finetuned"
    catalog.save()
    ctl = loop.start_controller()
    dev = "rpi4-canary-bad"
    agent = loop.add_agent(dev, battery=0.1, canary=CanaryConfig(
        requests=10_000, seconds=60, min_samples=24,
        max_confidence_drop=1.0))  # this test judges accuracy alone
    loop.run_until(lambda: loop.running(dev) == cheapest.id and not ctl.open)
    first = agent.slot.get()
    with torch.no_grad():  # the truth, here: what the model before answers (all right)
        said = first.module(splits.test.x).argmax(1)
    chosen = [i for c in range(10) for i in (said == c).nonzero().flatten()[:6].tolist()]
    assert len(set(said[chosen].tolist())) >= 3, said  # a constant model cannot get these
    app = App(agent, pixels(splits, first.input)[chosen], said[chosen])
    loop.run_until(lambda: app.ask() or app.labelled(first.generation) >= 40)

    agent.resources.state.battery = 0.9  # max_accuracy: the bad hybrid
    loop.run_until(lambda: app.ask() or agent.stats["ROLLED_BACK"] >= 1, timeout=60)
    gone = {}

    def recorded():
        dep = next((d for d in ctl.store.deployments(dev) if d.hybrid == bad.id), None)
        if dep is not None and dep.status == "ROLLED_BACK" and not gone:
            gone.update(dep=dep, running=ctl.twins[dev].running)
        return bool(gone)
    loop.run_until(recorded)
    assert gone["dep"].reason.startswith("canary: accuracy on feedback "), gone["dep"].reason
    assert gone["running"] == cheapest.id  # the twin runs the model before again
    assert bad.id in ctl.avoid[dev] and ctl.metrics.failures >= 1
    assert any(e[2] == "rolled_back" and gone["dep"].id in e[3] for e in ctl.store.events())
    loop.run_until(lambda: not ctl.open and ctl.twins[dev].running not in (None, bad.id))
    assert [d.hybrid for d in ctl.store.deployments(dev)].count(bad.id) == 1

    # one device's stray acks change nothing: a repeat, an older deployment, an unknown one
    before = [(d.id, d.status) for d in ctl.store.deployments(dev)]
    late, unknown = ctl.stats["late_ack"], ctl.stats["unknown_ack"]
    for dep_id, gen in [(gone["dep"].id, gone["dep"].generation), (f"{dev}.1", 1),
                        (f"{dev}.999", 999)]:
        ctl._on_ack(dev, Ack(device_id=dev, deployment_id=dep_id, generation=gen,
                             status="ROLLED_BACK", ts=time.time(), reason="canary: lie"),
                    time.time())
    assert ctl.stats["late_ack"] == late + 2 and ctl.stats["unknown_ack"] == unknown + 1
    assert [(d.id, d.status) for d in ctl.store.deployments(dev)] == before


def test_a_model_that_serves_as_well_passes_its_window_and_stays(loop, catalog, keys, splits):
    """A new deployment that answers as the model before it did (the same anchor again)
    passes its window on requests and labels; one with no traffic at all passes at its time
    limit: nothing to judge is no regression."""
    dev = "rpi4-canary-good"
    agent = loop.add_agent(dev, canary=CanaryConfig(requests=60, seconds=0, min_samples=20))
    deploy, acks = loop.publisher(keys, catalog, dev)
    model = catalog.anchors[0]
    deploy(1, model)
    first = agent.slot.get()
    with torch.no_grad():
        said = first.module(splits.test.x).argmax(1)
    app = App(agent, pixels(splits, first.input), said)
    loop.run_until(lambda: app.ask() or app.labelled(1) >= 40)
    deploy(2, model)
    assert agent.serving.figures.tracked == {1, 2}  # the window runs
    loop.run_until(lambda: app.ask() or agent.stats["canary_passed"] >= 1)
    assert agent.slot.get().generation == 2 and agent.serving.figures.tracked == {2}
    summary = agent.serving.figures.summary(2)
    assert summary.total >= 60 and summary.labelled >= 20 and summary.accuracy == 1.0

    agent.cfg.canary = CanaryConfig(requests=100, seconds=0.5)  # idle from here on
    deploy(3, catalog.anchors[1])
    loop.run_until(lambda: agent.stats["canary_passed"] >= 2)
    assert agent.slot.get().generation == 3 and agent.serving.figures.tracked == {3}
    assert "ROLLED_BACK" not in [a.status for a in statuses(acks)]


def test_requests_are_answered_through_a_canary_rollback(loop, catalog, keys):
    """Threads classify images, in process and over HTTP, while a deployment passes its
    health check (simulated batch-1 latency within the budget) and then serves batches of
    32 far slower than the budget: the canary rolls it back. No request fails, and each
    answer is exactly what the generation it names computes, a generation that was serving
    at some moment while the request ran."""
    dev = "jetson-canary"
    agent = loop.add_agent(dev, cls="jetson", canary=CanaryConfig(min_samples=10))
    deploy, acks = loop.publisher(keys, catalog, dev)
    changes, modules = log_swaps(agent)
    first, second = catalog.anchors[0], catalog.anchors[1]
    deploy(1, first)
    api = LocalAPI(agent.serving, port=0)
    api.start()
    images = RNG.integers(0, 256, (32, 32, 32), dtype=np.uint8)
    traffic = Traffic(agent, api.port, images)
    answers, failures = traffic.answers, traffic.failures
    try:
        loop.run_until(lambda: agent.serving.figures.summary(1).answered >= 10)
        # the simulated batch-1 latency of the health check fits 5 times over; 32 real
        # images per request take far longer
        budget = 5 * agent.resources.true_ms((("model", second.flops),))
        deploy(2, second, latency_budget_ms=budget)
        loop.run_until(lambda: agent.stats["ROLLED_BACK"] >= 1)
        n = len(answers)
        loop.run_until(lambda: len(answers) >= n + 5)  # the model before serves again
    finally:
        traffic.stop()
        api.stop()

    assert not failures and agent.serving.errors == 0, failures[:3]
    got = [(a.generation, a.status, a.reason) for a in statuses(acks) if a.generation == 2]
    assert [s for _, s, _ in got] == ["RECEIVED", "VERIFIED", "SWAPPED", "HEALTHY",
                                      "ROLLED_BACK"], got
    assert got[-1][2].startswith("canary: served latency p95 ") and f"budget {budget:.2f}" \
        in got[-1][2], got[-1]
    assert [g for _, _, g in changes] == [1, 2, 1]
    assert {1, 2} <= {g for _, _, g, _ in answers}

    check_answers(answers, changes, images, modules)
    assert healthy(agent) == 2 and agent.slot.previous is None


def test_a_birth_settles_a_canary_rollback_whose_ack_was_lost(loop, catalog):
    """A device (here a raw client with a device's login) reports HEALTHY twice, then a birth
    that runs the model before at the same generation: its canary ROLLED_BACK ack was lost.
    The controller records the rollback from the birth; the ack arriving after all is late."""
    ctl = loop.start_controller()
    dev = "rpi4-canary-lost"
    client, got = device_client(loop, dev, [T.desired(dev)])
    session = time.time_ns()

    def birth(generation=0, hybrid=None):
        client.publish(T.state(dev), encode(State(
            device_id=dev, online=True, session=session, ts=time.time(), generation=generation,
            hybrid=hybrid, capabilities=Capabilities(device_class="rpi4", mem_mb=4096,
                                                     gflops=8))), qos=1, retain=True)

    def telemetry(battery):
        client.publish(T.telemetry(dev), encode(Telemetry(
            seq=1, ts=time.time(), cpu=0.1, mem_free_mb=3000, battery=battery, temp_c=40)),
            qos=1)

    def deployed(n):
        loop.run_until(lambda: len(got) >= n)
        d = unverified(Desired, got[n - 1][1])[1]
        client.publish(T.ack(dev), encode(Ack(device_id=dev, deployment_id=d.deployment_id,
                                              generation=d.generation, status="HEALTHY",
                                              ts=time.time())), qos=1)
        loop.run_until(lambda: not ctl.open.get(dev) and ctl.twins[dev].running == d.hybrid)
        return d

    birth()
    telemetry(0.9)
    first = deployed(1)
    telemetry(0.1)  # min_energy: another model
    second = deployed(2)
    assert second.hybrid != first.hybrid
    failures = ctl.metrics.failures
    birth(second.generation, first.hybrid)  # rolled back; the ack never came
    dep = lambda: next(d for d in ctl.store.deployments(dev) if d.generation == 2)  # noqa: E731
    loop.run_until(lambda: dep().status == "ROLLED_BACK")
    assert "settled by device state" in dep().reason and second.hybrid in ctl.avoid[dev]
    assert ctl.twins[dev].running == first.hybrid and ctl.metrics.failures == failures + 1
    assert ctl.running_artifact[dev] == next(d for d in ctl.store.deployments(dev)
                                             if d.generation == 1).artifact
    late = ctl.stats["late_ack"]
    client.publish(T.ack(dev), encode(Ack(device_id=dev, deployment_id=second.deployment_id,
                                          generation=2, status="ROLLED_BACK", ts=time.time(),
                                          reason="canary: lost and found")), qos=1)
    loop.run_until(lambda: ctl.stats["late_ack"] == late + 1)
    assert ctl.metrics.failures == failures + 1 and "lost and found" not in dep().reason
