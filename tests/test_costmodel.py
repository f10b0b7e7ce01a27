"""A cost model that predicts: per-segment costs in the catalog, devices with a hidden truth,
and a planner that learns each device's speed per operator kind from its reports alone."""
import json
import random
import statistics
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from conftest import tiny, tiny_recipe, tiny_segments
from fleet_controller.planner import Candidate, Term, Twin, learn_speed, predict_ms
from simulators.devices import CLASSES, NOISE, NOISE_P50, Hidden, SimResources, SimState, \
    make_fleet
from stitch_lib.catalog import Catalog
from stitch_lib.cost import catalog_segment_costs, flops, machine, segment_costs
from stitch_lib.segment_ids import SCHEME
from stitch_lib.segments import split_model
from stitch_lib.stitch import build_hybrid


def model(name: str, *terms: tuple[str, float]) -> Candidate:
    ts = tuple(Term(kind, int(f), 0.1) for kind, f in terms)
    return Candidate(id=name, name=name, kind="anchor", accuracy=0.8, latency_ms=1.0,
                     flops=sum(t.flops for t in ts), model_bytes=1, act_peak_bytes=1,
                     delta_bytes=None, segments=(name,), stitch_state=None, terms=ts)


# per-segment (kind, FLOPs) as `segment_costs` measures the tiny test models and their hybrids
RES = model("res", ("conv", 3.6e6), ("conv", 2.36e6), ("conv", 1.16e6), ("conv", 3.9e5),
            ("conv", 5.3e5), ("mlp", 1920))
VIT = model("vit", ("conv", 65536), ("attention", 454784), ("attention", 454784), ("mlp", 640))
MNV3 = model("mnv3", ("conv", 73728), ("dwconv", 35328), ("dwconv", 146432),
             ("dwconv", 276224), ("dwconv", 97920), ("dwconv", 376992), ("conv", 27648),
             ("conv", 610304))
RES_VIT = model("res:layer1→vit:blocks.0", ("conv", 3.6e6), ("conv", 2.36e6), ("conv", 1.2e5),
                ("attention", 454784), ("mlp", 640))
MNV3_VIT = model("mnv3:blocks.0→vit:blocks.0", ("conv", 73728), ("dwconv", 35328),
                 ("conv", 3e4), ("attention", 454784), ("attention", 454784), ("mlp", 640))
VIT_RES = model("vit:blocks.0→res:layer1", ("conv", 65536), ("attention", 454784),
                ("conv", 5e4), ("conv", 1.16e6), ("conv", 3.9e5), ("conv", 5.3e5),
                ("mlp", 1920))


def one_scalar(c: Candidate) -> Candidate:
    """The same model with every segment of one kind: what one learned scalar can know."""
    return replace(c, terms=tuple(Term("model", t.flops, t.latency_ms) for t in c.terms))


def true_terms(c: Candidate) -> tuple[tuple[str, int], ...]:
    return tuple((t.kind, t.flops) for t in c.terms)


def prediction_errors(runs: list[Candidate], target: Candidate, scalar: bool = False,
                      n: int = 60) -> list[float]:
    """|predicted − true| / true p50 of `target` on `n` simulated devices with hidden
    variation, after each reported the p50 (median of 9 noisy runs) of each of `runs`."""
    shape = one_scalar if scalar else (lambda c: c)
    errors = []
    for dev_id, res in make_fleet(n, seed=3):
        twin = Twin(device_id=dev_id, online=True, gflops=res.cls.gflops)  # nominal only
        for c in runs:
            p50 = statistics.median(res.true_ms(true_terms(c)) * res.rng.uniform(*NOISE)
                                    for _ in range(9))
            twin.speed = learn_speed(twin, shape(c), p50)
        truth = res.true_ms(true_terms(target)) * NOISE_P50
        errors.append(abs(predict_ms(twin, shape(target)) - truth) / truth)
    return errors


@pytest.mark.parametrize("runs, target", [
    ((RES, VIT, RES), RES_VIT), ((MNV3, VIT, MNV3), MNV3_VIT), ((VIT, RES, VIT), VIT_RES)])
def test_cost_learning_on_hidden_variation(runs, target):
    """Three reports on two models predict a third within 15% (median over the devices);
    one scalar speed, learned the same way, cannot."""
    per_kind = statistics.median(prediction_errors(list(runs), target))
    scalar = statistics.median(prediction_errors(list(runs), target, scalar=True))
    prior = statistics.median(prediction_errors([], target))
    assert per_kind <= 0.15, per_kind
    assert per_kind < scalar and per_kind < prior / 5, (per_kind, scalar, prior)


def test_one_scalar_is_far_off_where_the_kinds_differ():
    errors = [e for runs, target in (((MNV3, VIT, MNV3), MNV3_VIT), ((VIT, RES, VIT), VIT_RES))
              for e in prediction_errors(list(runs), target, scalar=True)]
    assert statistics.median(errors) > 0.15


def test_hidden_truth_is_per_device_seeded_and_not_the_nominal_figure():
    a, b = make_fleet(8, seed=5), make_fleet(8, seed=5)
    assert [r.hidden for _, r in a] == [r.hidden for _, r in b]
    mcus = [r for dev, r in a if r.cls.name == "mcu"]
    assert len({r.hidden.speed for r in mcus}) == len(mcus)  # each device its own
    nominal = SimResources(CLASSES["mcu"], SimState(cpu_other=0.0))
    assert nominal.hidden == Hidden.nominal(CLASSES["mcu"])
    conv, att = nominal.true_ms((("conv", 10**6),)), nominal.true_ms((("attention", 10**6),))
    assert conv == pytest.approx(1e6 / 0.4e6) and att / conv == pytest.approx(1 / 0.33)


def test_batteries_drain_by_the_energy_spent():
    def drained(terms) -> float:
        res = SimResources(CLASSES["rpi3"], SimState(battery=1.0, cpu_other=0.0),
                           random.Random(0), costs={"m": terms})
        loaded = SimpleNamespace(hybrid="m", flops=0)
        res.sample(0.0)
        ms = res.latency_ms(loaded, None)
        res.sample(100.0)
        watts = res.cls.idle_w + res.hidden.power_w * ms / 100.0
        assert 1.0 - res.state.battery == pytest.approx(watts * 100 / (5.4 * 3600))
        return 1.0 - res.state.battery

    assert drained((("conv", 10**8),)) > drained((("conv", 10**7),))


def test_segment_costs_add_up_and_name_their_kinds():
    x = torch.zeros(1, 1, 32, 32)
    kinds = {"test_resnet": {"conv", "mlp"}, "vit": {"conv", "attention", "mlp"},
             "mobilenetv3_small_050": {"conv", "dwconv"}}
    for name, expected in kinds.items():
        m = tiny(name)
        costs = segment_costs([(s.segment_id(), s) for s in split_model(m, tiny_recipe(name))],
                              x, rounds=2)
        assert sum(c["flops"] for c in costs) == flops(m, x)
        assert {c["kind"] for c in costs} == expected
        assert all(c["latency_ms"] > 0 for c in costs)


def test_a_hybrid_costs_its_anchors_segments_plus_the_stitch():
    torch.manual_seed(0)
    front, back = tiny_segments("test_resnet"), tiny_segments("vit")
    h, _ = build_hybrid(front, 1, back, 0, torch.randn(10, 1, 32, 32),
                        front_name="res", back_name="vit")
    x = torch.zeros(1, 1, 32, 32)
    costs = catalog_segment_costs({"res": front, "vit": back}, [h], x, rounds=2)
    mine = costs[h.name]
    assert [c["segment_id"] for c in mine] == [*h.segment_ids()[:2], "stitch",
                                               *h.segment_ids()[2:]]
    assert mine[2]["kind"] == "conv" and sum(c["flops"] for c in mine) == flops(h, x)
    assert mine[:2] == costs["res"][:2] and mine[3:] == costs["vit"][1:]
    assert {"platform", "cpu", "cores", "threads"} <= set(machine())


def test_a_catalog_without_segment_costs_still_loads_and_plans(tmp_path):
    entry = dict(id="a", name="a", kind="anchor", test_acc=0.8, params=1, flops=10**6,
                 act_peak_bytes=1, latency_ms=2.0, model_bytes=1, segments=["s"])
    (tmp_path / "catalog.json").write_text(json.dumps({"version": 1, "segment_id_scheme": SCHEME,
                                                       "entries": [entry]}))
    e = Catalog.load(tmp_path).entries[0]
    assert e.segment_costs is None
    c = Candidate.from_entry(e)
    assert predict_ms(Twin(device_id="d"), c) == 2.0  # the catalog machine's latency
    assert predict_ms(Twin(device_id="d", gflops=1.0), c) == pytest.approx(1.0)


# ---- telemetry_timeout_s: a silent device is offline ------------------------------------
def test_silent_devices_are_offline_and_get_nothing(catalog, keys, tmp_path):
    from types import SimpleNamespace

    from fleet_controller.planner import silent
    from fleet_controller.service import Controller
    from fleetloop import write_policy

    assert silent(Twin(device_id="d", online=True, last_seen=0.0), 31.0, 30.0)
    assert not silent(Twin(device_id="d", online=True, last_seen=2.0), 31.0, 30.0)
    assert not silent(Twin(device_id="d", online=False), 99.0, 30.0)
    now = [1000.0]
    policy = write_policy(tmp_path / "fleet.yaml", catalog.root)
    policy.write_text(policy.read_text() + "telemetry_timeout_s: 30\n")
    ctl = Controller(policy, tmp_path / "ctl", SimpleNamespace(submit=lambda fn: fn()), keys,
                     clock=lambda: now[0])
    ctl.client = SimpleNamespace(publish=lambda *a, **kw: SimpleNamespace(mid=1))
    try:
        for dev, seen in (("quiet", 960.0), ("chatty", 990.0)):
            ctl.twins[dev] = Twin(device_id=dev, online=True, device_class="rpi4",
                                  mem_mb=4096, gflops=8.0, last_seen=seen)
        ctl._reconcile_all()
        assert not ctl.twins["quiet"].online and ctl.twins["chatty"].online
        assert [d.device_id for d in ctl.store.deployments()] == ["chatty"]
        assert any(e[2] == "offline" and "silent for 40 s" in e[3] for e in ctl.store.events())
    finally:
        ctl.store.close()


# ---- the cost model's error, as the controller scores it --------------------------------
def test_cost_errors_skip_the_first_reports_and_tell_new_models_apart():
    from fleet_controller.costerror import CostErrors

    e = CostErrors()
    for k in range(3):  # a device's first three reports teach, they are not scored
        assert e.observe("d", "a", 10.0, 8.0) is None
    assert e.observe("d", "b", 9.0, 10.0) == pytest.approx(0.1)  # new to the device
    assert e.observe("d", "b", 12.0, 10.0) == pytest.approx(0.2)  # b again: neither kind
    assert e.observe("d", "a", 6.0, 8.0) == pytest.approx(0.25)  # its first model
    assert e.observe("other", "b", 1.0, 1.0) is None  # counted per device
    s = e.summary()
    assert (s["n"], s["median"], s["p90"]) == (3, pytest.approx(0.2), pytest.approx(0.25))
    assert s["first_model"] == {"median": pytest.approx(0.25), "p90": pytest.approx(0.25),
                                "n": 1}
    assert s["new_model"]["n"] == 1 and s["new_model"]["median"] == pytest.approx(0.1)
    assert CostErrors().summary()["new_model"] == {"median": None, "p90": None, "n": 0}


def test_the_controller_scores_the_p95_it_predicted_before_learning(catalog, keys, tmp_path):
    """Each report is scored against the p95 predicted from the twin as it was before the
    report (its speed not yet learned from it, its tail the previous report's)."""
    import copy
    from types import SimpleNamespace

    from fleet_controller.planner import predict_p95
    from fleet_controller.service import Controller
    from fleet_protocol.messages import Telemetry
    from fleetloop import write_policy

    ctl = Controller(write_policy(tmp_path / "fleet.yaml", catalog.root), tmp_path / "ctl",
                     SimpleNamespace(submit=lambda fn: fn()), keys)
    ctl.client = SimpleNamespace(publish=lambda *a, **kw: SimpleNamespace(mid=1))
    try:
        c = Candidate.from_entry(catalog.anchors[0])
        ctl.twins["d"] = Twin(device_id="d", online=True, device_class="rpi4", gflops=8.0)
        scored = []
        for seq, (p50, p95) in enumerate([(5.0, 6.0), (5.5, 7.0), (5.2, 6.5), (5.1, 6.9),
                                          (5.3, 6.4)], start=1):
            before = copy.deepcopy(ctl.twins["d"])
            ctl._on_telemetry("d", Telemetry(seq=seq, ts=1.0, cpu=0.1, mem_free_mb=900,
                                             temp_c=40, hybrid=c.id, lat_p50_ms=p50,
                                             lat_p95_ms=p95), 1.0)
            scored.append(abs(predict_p95(before, c) - p95) / p95)
            after = abs(predict_p95(ctl.twins["d"], c) - p95) / p95
            assert after < scored[-1]  # learning from the report would have flattered it
        assert list(ctl.metrics.cost_errors.errors["all"]) == pytest.approx(scored[3:])
        assert ctl.prom.registry.get_sample_value(
            "restnet_controller_cost_error_ratio_sum") == pytest.approx(sum(scored[3:]))
        before = copy.deepcopy(ctl.twins["d"])  # a heat wave: 40 °C → 80 °C in one report
        ctl._on_telemetry("d", Telemetry(seq=9, ts=1.0, cpu=0.1, mem_free_mb=900, temp_c=80,
                                         hybrid=c.id, lat_p50_ms=5.3, lat_p95_ms=6.4), 1.0)
        assert ctl.twins["d"].speed == learn_speed(before, c, 5.3).heated(40.0)
    finally:
        ctl.store.close()


def test_a_health_check_that_fails_on_latency_teaches_the_controller(catalog, keys, tmp_path):
    """A device far slower on the model the controller picks than its figures so far said:
    the model fails its health check on latency and the device goes back, so no telemetry
    will ever report it; the FAILED ack's measured p50 is what the controller learns from."""
    from fleet_controller.service import Controller
    from fleet_protocol.messages import Ack
    from fleetloop import write_policy

    policy = write_policy(tmp_path / "fleet.yaml", catalog.root,
                          constraints={"latency_p95_ms": 1e6})
    ctl = Controller(policy, tmp_path / "ctl", SimpleNamespace(submit=lambda fn: fn()), keys)
    ctl.client = SimpleNamespace(publish=lambda *a, **kw: SimpleNamespace(mid=1))
    try:
        cands = {c.id: c for c in ctl.candidates}
        boot = min(cands.values(), key=lambda c: c.flops)
        twin = ctl.twins["d"] = Twin(device_id="d", online=True, device_class="rpi4",
                                     gflops=8.0, running=boot.id, since=0.0,
                                     kind_gflops={"attention": 4.0})
        for _ in range(3):
            twin.speed = learn_speed(twin, boot, predict_ms(twin, boot))  # as announced
        ctl._reconcile("d", 100.0)
        dep = ctl.open["d"]
        target = cands[dep.hybrid]
        predicted = predict_ms(twin, target)
        measured = 5 * predicted
        before = twin.speed.reports
        ctl._on_ack("d", Ack(device_id="d", deployment_id=dep.id, generation=dep.generation,
                             status="FAILED", ts=101.0, reason="latency p95 over budget",
                             lat_p50_ms=measured, lat_p95_ms=measured * 1.05), 101.0)
        assert ctl.twins["d"].speed.reports == before + 1
        assert predict_ms(ctl.twins["d"], target) > 0.75 * measured  # from 0.2 × measured
        assert ctl.store.twins()["d"]["speed"]["reports"] == before + 1  # and it is stored
    finally:
        ctl.store.close()


def test_mispredicted_rollbacks_count_failed_health_checks_once_the_class_was_observed():
    """A health check that finds p95 over the budget acks FAILED, then ROLLED_BACK, and the
    deployment keeps FAILED: it counts once the device's class had a HEALTHY model a telemetry
    period earlier. Canary rollbacks, other failures and unobserved classes do not count."""
    from fleet_controller.store import Deployment
    from restnet.demo import mispredicted_rollbacks

    late = "latency p95 9.0 ms > budget 8.0 ms"
    deps = [Deployment(f"{dev}.{gen}", dev, gen, "h", status, reason, created, created + 1, 0)
            for dev, gen, status, reason, created in [
                ("a-1", 1, "HEALTHY", "", 4.0),  # class a observed at 5.0
                ("a-2", 1, "FAILED", late, 3.0),  # before that: the class was not known
                ("a-2", 2, "FAILED", late, 10.0),  # counted
                ("a-2", 3, "ROLLED_BACK", late, 11.0),  # counted
                ("a-2", 4, "ROLLED_BACK", "canary: probe accuracy fell", 12.0),
                ("a-2", 5, "FAILED", "verification: delta sha256 mismatch", 13.0),
                ("b-1", 1, "FAILED", late, 20.0),  # class b never ran a model healthily
            ]]
    twins = {d: SimpleNamespace(device_class=d[0]) for d in ("a-1", "a-2", "b-1")}
    ctl = SimpleNamespace(store=SimpleNamespace(deployments=lambda: deps), twins=twins)
    assert mispredicted_rollbacks(ctl, telemetry_period=2.0) == 2
    assert mispredicted_rollbacks(ctl, telemetry_period=5.5) == 1  # a-2.2 within the period
