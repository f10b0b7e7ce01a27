"""The closed loop against a real Mosquitto: controller, real agents, simulated resources."""
import json
import time

import pytest
import torch
import yaml

from device_agent.cache import SegmentCache
from fleet_runtime.mqtt import make_client, parse_url
from fleetloop import T, Loop, healthy, write_policy
from stitch_lib.catalog import Catalog



def test_low_battery_gets_a_cheaper_hybrid(loop, catalog):
    loop.start_controller()
    agent = loop.add_agent("rpi4-000", battery=0.9)
    loop.run_until(lambda: healthy(agent) >= 1)
    best = max((e for e in catalog.entries if e.stitch_state != "ls"),
               key=lambda e: (e.test_acc, -e.flops))
    assert loop.running("rpi4-000") == best.id
    agent.resources.state.battery = 0.1  # below the 0.3 battery mode: min_energy
    eligible = [e for e in catalog.entries if e.stitch_state != "ls"]  # no on-demand tuning
    cheapest = min(eligible, key=lambda e: e.flops)
    loop.run_until(lambda: loop.running("rpi4-000") == cheapest.id
                   and loop.controller.metrics.adaptations >= 2)
    deps = loop.controller.store.deployments("rpi4-000")
    assert [d.status for d in deps] == ["HEALTHY", "HEALTHY"]
    assert "battery" in deps[-1].reason
    m = loop.controller.metrics
    assert m.adaptations == 2 and m.desired_bytes < m.whole_model_bytes


def test_missing_segments_are_fetched_and_resume_after_a_broker_restart(loop, broker):
    loop.start_controller()
    agent = loop.add_agent("mcu-000", cls="jetson", provisioned=False, chunk_size=2048)
    chunks_seen = []

    def some_chunks_then_cut():
        held = sum(len(f.held) for f in agent.fetching.values())
        chunks_seen.append(held)
        return held >= 3

    loop.run_until(some_chunks_then_cut)
    broker.kill()
    broker.restart()
    loop.run_until(lambda: healthy(agent) >= 1, timeout=40)
    assert agent.cache.ids()  # the segments are in the cache now
    assert loop.host.stats["reconnects"] >= 2  # the agent and the controller came back
    assert agent.stats["FETCHING"] >= 1


def test_malformed_telemetry_is_dropped_and_counted(loop):
    ctl = loop.start_controller()
    spam = make_client("spam", **loop.login("ghost"))  # a device sending garbage
    loop.host.add(spam, *parse_url(loop.broker.url))
    loop.run_until(lambda: spam.is_connected() and ctl.client.is_connected())
    for k in range(300):
        spam.publish(T.telemetry("ghost"), b"\x00garbage" * (k % 5), qos=0)
    spam.publish(T.telemetry("ghost"), b'{"seq": -5}', qos=1)
    # each one dropped when applied, or replaced by the next before it was (conflated)
    loop.run_until(lambda: ctl.stats["dropped"] + ctl.stats["telemetry_conflated"] >= 301)
    assert ctl.stats["dropped"] >= 1 and not ctl.inbox and ctl.stats["in_telemetry"] == 0
    assert ctl.stats["errors"] == 0
    agent = loop.add_agent("rpi4-002")  # the controller still works
    loop.run_until(lambda: healthy(agent) >= 1)


def test_controller_restarted_mid_adaptation_makes_no_duplicate(loop, tmp_path):
    ctl = loop.start_controller()
    agent = loop.add_agent("rpi4-003")
    loop.run_until(lambda: agent.stats["RECEIVED"] >= 1)
    ctl.scheduler.shutdown(wait=False)  # the controller dies: no clean goodbye
    loop.host.remove(ctl.client)
    ctl.store.close()
    loop.run_until(lambda: healthy(agent) >= 1)  # the device finishes on its own
    ctl2 = loop.start_controller()  # a new process, same store
    loop.run_until(lambda: not ctl2.store.deployments("rpi4-003", open_only=True)
                   and ctl2.stats["in_state"] >= 1)
    for _ in range(10):  # several telemetry rounds: no new deployment is made
        seq = agent.seq
        loop.run_until(lambda: agent.seq > seq)
    deps = ctl2.store.deployments("rpi4-003")
    assert len(deps) == 1 and deps[0].status == "HEALTHY"
    assert deps[0].artifact == ctl2.entries[deps[0].hybrid].artifact
    assert ctl2.running_artifact["rpi4-003"] == deps[0].artifact  # known after a restart too


@pytest.mark.slow
def test_demo_runs_headless_and_summarises(catalog, tmp_path):
    """`restnet demo` end to end: private broker, controller, simulated fleet, summary."""
    from restnet.cli import main

    policy = write_policy(tmp_path / "fleet.yaml", catalog.root)
    scenario = tmp_path / "s.yaml"
    # every anchor held; each device serves the first from its start (its boot model): the
    # cheapest, so that max_accuracy still replaces it on every device
    anchors = [e.name for e in sorted(catalog.anchors, key=lambda e: e.flops)]
    scenario.write_text(yaml.safe_dump({"duration_s": 20, "events": [
        {"at": 10, "classes": ["rpi3", "rpi4", "mcu"], "set": {"battery": 0.1}}],
        "provision": {c: list(anchors) for c in ("mcu", "rpi3", "rpi4", "jetson")}}))
    out = tmp_path / "summary.json"
    assert main(["demo", "--devices", "8", "--policy", str(policy), "--home",
                 str(catalog.root.parent), "--scenario", str(scenario), "--headless",
                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["devices"] == 8 and result["adaptations"] >= 8
    assert result["controller_errors"] == 0 and result["agent_errors"] == 0
    assert 0 < result["bytes_ratio"] < 1 and result["reaction_ms_p50"] > 0
    assert result["segment_bytes"] == result["segments_fetched"] == 0  # every anchor held
    assert result["no_model_s"] == 0  # a model serves on every device from the first second
    assert result["cost_error"]["n"] > 0 and result["cost_error"]["median"] >= 0


def test_policy_and_provision_commands(catalog, tmp_path, capsys):
    from restnet.cli import main

    policy = write_policy(tmp_path / "fleet.yaml", catalog.root)
    assert main(["policy", "check", str(policy)]) == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text(policy.read_text().replace("objective: max_accuracy", "objectiv: max_accuracy"))
    assert main(["policy", "check", str(bad)]) == 1
    assert "did you mean 'objective'" in capsys.readouterr().out
    assert main(["agent", "provision", "--catalog", str(catalog.root), "--cache",
                 str(tmp_path / "board"), "--anchor", "res"]) == 0
    assert len(SegmentCache(tmp_path / "board").ids()) == len(catalog.get("res").segments)


def test_ls_hybrid_is_deployed_then_its_finetuned_stitch_follows(broker, catalog, tmp_path, keys):
    target = catalog.hybrids[0]
    target.test_acc = 0.99  # the policy's best: an LS-initialised hybrid
    catalog.save()
    lp = Loop(broker, catalog, tmp_path, keys, finetune_on_demand=True,
              hysteresis={"min_dwell_s": 0, "min_gain": 1.0})
    try:
        ctl = lp.start_controller()
        agent = lp.add_agent("rpi4-009")
        lp.run_until(lambda: ctl.metrics.adaptations >= 2, timeout=180)
        deps = ctl.store.deployments("rpi4-009")
        assert [d.hybrid for d in deps[:2]] == [target.id, target.id]
        assert "fine-tuned" in deps[1].reason
        tuned = Catalog.load(catalog.root)
        assert tuned.get(target.id).stitch_state == "finetuned"
        stitch = tuned.load_artifact(tuned.get(target.id).artifact)  # as the wire carries it
        assert all(torch.equal(v.half().float(), v) for v in stitch.values())
        assert agent.slot.get().desired.stitch.sha256 != agent.slot.previous.desired.stitch.sha256
    finally:
        lp.close()


def test_a_policy_change_rolls_out_in_waves(broker, catalog, tmp_path, keys):
    lp = Loop(broker, catalog, tmp_path, keys)
    doc = yaml.safe_load(lp.policy.read_text())
    doc["rollout"] = {"waves": [25, 100], "wave_interval_s": 2, "max_failure_percent": 50}
    lp.policy.write_text(yaml.safe_dump(doc))
    try:
        ctl = lp.start_controller()
        agents = [lp.add_agent(f"rpi4-10{k}") for k in range(4)]
        lp.run_until(lambda: ctl.metrics.adaptations >= 4)
        doc["defaults"]["objective"] = "min_energy"  # the operator edits fleet.yaml
        lp.policy.write_text(yaml.safe_dump(doc))
        t_edit = time.time()
        lp.run_until(lambda: ctl.metrics.adaptations >= 8 and ctl.rollout is None, timeout=90)
        second = sorted(d.created for d in ctl.store.deployments() if d.created > t_edit)
        assert len(second) == 4
        assert second[1] - second[0] >= 1.5  # wave 1 (25% = 1 device), then the rest
        assert all(lp.running(a.cfg.device_id) == min(
            (e for e in catalog.entries if e.stitch_state != "ls"), key=lambda e: e.flops).id
            for a in agents)
        assert any("wave 1/2" in e[3] for e in ctl.store.events())
    finally:
        lp.close()


def test_a_hybrid_that_serves_badly_halts_the_rollout_in_its_first_wave(broker, catalog, tmp_path,
                                                                        keys, splits):
    """A correctly signed hybrid whose stitch is all zeros installs fine, but its probe
    accuracy is far under the catalog's: the first wave's device reports it, the rollout halts
    and that device goes back to what it ran; nobody else is touched."""
    cheapest = min((e for e in catalog.entries if e.stitch_state != "ls"), key=lambda e: e.flops)
    bad = next(h for h in catalog.hybrids if h.flops > cheapest.flops)
    zeros = {k: torch.zeros_like(v) for k, v in catalog.load_artifact(bad.artifact).items()}
    bad.artifact = catalog.put_artifact(zeros)
    bad.test_acc, bad.stitch_state = 0.99, "finetuned"  # the best model, on paper
    catalog.save()
    lp = Loop(broker, catalog, tmp_path, keys, objective="min_energy")
    doc = yaml.safe_load(lp.policy.read_text())
    doc["rollout"] = {"waves": [25, 100], "wave_interval_s": 1, "max_failure_percent": 20,
                      "kpi_window_s": 60}
    lp.policy.write_text(yaml.safe_dump(doc))
    x, y = splits.test.x[:40], splits.test.y[:40]

    def served_accuracy(agent):
        with torch.no_grad():
            return float((agent.slot.get().module(x).argmax(1) == y).float().mean())

    try:
        ctl = lp.start_controller()
        agents = [lp.add_agent(f"rpi4-20{k}", probe=(x, y), num_classes=10) for k in range(4)]
        lp.run_until(lambda: all(lp.running(a.cfg.device_id) == cheapest.id for a in agents)
                     and not ctl.open)
        before = [served_accuracy(a) for a in agents]
        t_edit = ctl.clock()  # min_energy may have tried another model first: count from here
        doc["defaults"]["objective"] = "max_accuracy"  # the operator edits fleet.yaml
        lp.policy.write_text(yaml.safe_dump(doc))
        lp.run_until(lambda: ctl.rollout_note.startswith("aborted") and not ctl.open
                     and all(lp.running(a.cfg.device_id) == cheapest.id for a in agents),
                     timeout=60)
        assert sorted(ctl.released) == ["rpi4-200"]  # the first wave only

        def since_edit(device):
            return [d for d in ctl.store.deployments(device) if d.created > t_edit]

        first = since_edit("rpi4-200")
        assert [(d.hybrid, d.status) for d in first] == [
            (bad.id, "HEALTHY"), (cheapest.id, "HEALTHY")]
        assert "probe accuracy" in first[-1].reason
        assert all(not since_edit(a.cfg.device_id) for a in agents[1:])
        assert [served_accuracy(a) for a in agents] == before
        halted = [e for e in ctl.store.events() if e[2] == "rollout" and "aborted" in e[3]]
        assert len(halted) == 1 and "rpi4-200: probe accuracy" in halted[0][3]
        assert ctl.stats["rollouts_aborted"] == 1 and ctl.stats["kpi_breaches"] == 1
    finally:
        lp.close()


def test_controller_metrics_move_with_a_deployment(loop):
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    def scrape():
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for f in text_string_to_metric_families(
                    generate_latest(ctl.prom.registry).decode()) for s in f.samples}

    ctl = loop.start_controller()
    assert scrape()[("restnet_controller_reaction_ms_count", ())] == 0
    agent = loop.add_agent("rpi4-300")
    loop.run_until(lambda: healthy(agent) >= 1 and not ctl.open)
    loop.run_until(lambda: scrape()[("restnet_controller_cost_error_ratio_count", ())] >= 1)
    got = scrape()
    assert got[("restnet_controller_deployments", (("status", "HEALTHY"),))] == 1
    assert got[("restnet_controller_bytes_sent_total", (("kind", "desired"),))] > 0
    assert got[("restnet_controller_adaptations_total", ())] == 1
    assert got[("restnet_controller_reaction_ms_count", ())] == 1
    agent.infer(torch.zeros(2, 32, 32, dtype=torch.uint8))
    served = {s.name: s.value for f in text_string_to_metric_families(
        generate_latest(agent.prom.registry).decode()) for s in f.samples}
    assert served["restnet_agent_requests_total"] == 1
    assert served["restnet_agent_swaps_total"] == 1
    assert served["restnet_agent_served_latency_ms_count"] == 1
