import json

import pytest
import torch
from safetensors.torch import save_file

from conftest import TINY_VIT
from stitch_lib import Catalog, Entry, pareto
from stitch_lib.assemble import anchor_segments
from stitch_lib.build import BuildConfig, load_hybrid, to_finetune
from stitch_lib.train import TrainConfig, evaluate
from stitch_lib.zoo import (AnchorSpec, ZooSpec, _provenance, build_zoo, cache_key, create,
                            load_anchor)

QUICK = {"epochs": 1, "batch_size": 64, "lr": 3e-3}
TINY_ZOO = {
    "anchors": [
        {"name": "resnet", "model": "test_resnet", "train": QUICK},
        {"name": "vit", "model": "vit_tiny_patch16_224", "kwargs": TINY_VIT, "train": QUICK},
        {"name": "mnv3", "model": "mobilenetv3_small_050", "train": QUICK},
    ],
}


@pytest.fixture(scope="module")
def built(splits, tmp_path_factory):
    from stitch_lib.build import build_catalog
    root = tmp_path_factory.mktemp("cat")
    anchors = build_zoo(ZooSpec.from_dict(TINY_ZOO), splits, root / "anchors")
    cfg = BuildConfig(top_k=2, screen=3, finetune="all", latency_rounds=3,
                      ft=TrainConfig(epochs=1, lr=1e-3, n_train=300))
    return anchors, build_catalog(anchors, splits, Catalog(root / "catalog"), cfg)


def test_catalog_holds_measured_anchors_and_hybrids(built):
    anchors, cat = built
    assert len(cat.anchors) == 3 and 6 <= len(cat.hybrids) <= 12  # 6 ordered pairs, top 2
    joints = {e.joint for e in cat.hybrids}
    assert {"CNN→CNN", "CNN→ViT", "ViT→CNN"} <= joints
    for e in cat.hybrids:
        assert e.stitch_state in ("ls", "finetuned") and e.artifact and e.delta_bytes > 0
        assert e.flops > 0 and e.latency_ms > 0 and e.act_peak_bytes > 0 and e.params > 0
        assert 0 <= e.test_acc <= 1 and e.cka is not None and e.ls_val_acc is not None
        assert e.segments and e.direction in ("large→small", "small→large")
    assert all(e.stitch_state == "finetuned" for e in cat.hybrids)
    assert all(e.val_acc >= e.ls_val_acc for e in cat.hybrids)  # the LS start is kept if best
    for e in cat.entries:  # per-segment costs: the anchors' segments, plus a hybrid's stitch
        assert sum(c["flops"] for c in e.segment_costs) == e.flops
        ids = [c["segment_id"] for c in e.segment_costs]
        assert ids == (e.segments if e.kind == "anchor" else
                       [*e.segments[: e.i + 1], "stitch", *e.segments[e.i + 1:]])
    reloaded = Catalog.load(cat.root)
    assert [e.name for e in reloaded.entries] == [e.name for e in cat.entries]
    assert reloaded.entries[-1].segment_costs == cat.entries[-1].segment_costs
    meta = json.loads((cat.root / "catalog.json").read_text())["meta"]
    assert meta["candidates"] and meta["machine"]["threads"] == 1
    flops = {a.name: a.flops for a in cat.anchors}
    for fa, fb in {(c["front"], c["back"]) for c in meta["candidates"]}:
        # a point dearer than its pair's dearer anchor is never ranked, so never takes a place
        ranked = [c for c in meta["candidates"] if (c["front"], c["back"]) == (fa, fb)]
        kept = [e for e in cat.hybrids if (e.front, e.back) == (fa, fb)]
        assert len(kept) == min(2, len(ranked))
        assert all(e.flops <= max(flops[fa], flops[fb]) for e in kept)


def test_hybrid_reloads_from_its_artifact(built, splits):
    anchors, cat = built
    e = cat.hybrids[0]
    rebuilt = {a.name: anchor_segments(a, cat) for a in cat.anchors}
    h = load_hybrid(e, rebuilt, cat)  # from the catalog alone: recipes and artifacts
    assert evaluate(h, splits.test) == pytest.approx(e.test_acc)
    assert h.segment_ids() == e.segments


def test_a_hybrid_is_measured_as_the_wire_carries_it(built, splits):
    """The stitch a device receives is fp16 (docs/protocol.md §5.1): the catalog stores,
    sizes and evaluates exactly that stitch, not the fp32 one training left."""
    from fleet_protocol.codec import pack_delta, sha256_hex, unpack_delta
    _, cat = built
    rebuilt = {a.name: anchor_segments(a, cat) for a in cat.anchors}
    for e in cat.hybrids:
        stored = cat.load_artifact(e.artifact)
        blob = pack_delta({k: v.numpy() for k, v in stored.items()})
        received = unpack_delta(blob, sha256_hex(blob), {k: v.shape for k, v in stored.items()})
        assert all(torch.equal(torch.from_numpy(received[k]).float(), v)
                   for k, v in stored.items())
        h = load_hybrid(e, rebuilt, cat)
        h.stitch.load_state_dict({k: torch.from_numpy(v).float() for k, v in received.items()})
        assert evaluate(h, splits.test) == e.test_acc


def test_ranking_by_a_short_finetune_keeps_the_best_at_their_start(built, splits, tmp_path):
    from stitch_lib.build import build_catalog
    anchors, _ = built
    cfg = BuildConfig(top_k=1, screen=3, finetune="none", latency_rounds=1, rank_steps=4,
                      ft=TrainConfig(lr=3e-2, n_train=300))
    cat = build_catalog(anchors, splits, Catalog(tmp_path / "catalog"), cfg)
    meta = json.loads((cat.root / "catalog.json").read_text())["meta"]
    assert meta["build"]["rank_steps"] == 4
    segments = {a.spec.name: a.segments for a in anchors.anchors}
    for e in cat.hybrids:
        pair = [c for c in meta["candidates"] if (c["front"], c["back"]) == (e.front, e.back)]
        # the 3 screened points, less any dearer than the pair's dearer anchor
        assert 1 <= len(pair) <= 3 and e.rank_val_acc == max(c["rank_val_acc"] for c in pair)
        assert any(c["rank_val_acc"] != c["ls_val_acc"] for c in meta["candidates"])
        # the short fine-tuning only measured: the hybrid ships its least-squares start
        assert e.stitch_state == "ls"
        assert evaluate(load_hybrid(e, segments, cat), splits.val) == pytest.approx(e.ls_val_acc)
    with pytest.raises(ValueError, match="rank_steps"):
        BuildConfig(rank_steps=-1)


def test_ranked_points_resume_their_short_finetune(built, splits, tmp_path):
    from stitch_lib.build import build_catalog
    anchors, _ = built
    ft = TrainConfig(lr=3e-2, steps=8, n_train=300, patience=None)  # validates every 2 steps
    cfg = BuildConfig(top_k=1, screen=2, finetune="all", latency_rounds=1, rank_steps=4, ft=ft)
    cat = build_catalog(anchors, splits, Catalog(tmp_path / "catalog"), cfg)
    for e in cat.hybrids:
        # one run of 8 steps, the ranking's 4 and then the rest: its reading at step 4 is the
        # run's own validation there
        assert e.stitch_state == "finetuned" and len(e.finetune_curve) == 4
        assert e.rank_val_acc == e.finetune_curve[1]  # step 4 is a validation of the run
        assert e.val_acc == max(e.init_val_acc, *e.finetune_curve)


def test_tampered_artifact_is_refused(built):
    _, cat = built
    sha = cat.hybrids[0].artifact
    path = cat.root / "artifacts" / f"{sha}.safetensors"
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="corrupt or tampered"):
        cat.load_artifact(sha)


def entry(name, acc, lat):
    return Entry(id=name, name=name, kind="hybrid", test_acc=acc, params=1, flops=1,
                 act_peak_bytes=1, latency_ms=lat, model_bytes=1, segments=[])


def test_frontier_mode_finetunes_the_validation_frontier():
    es = [entry("a", 0.0, 10), entry("b", 0.0, 5), entry("c", 0.0, 6)]
    for e, val in zip(es, (0.9, 0.8, 0.7)):
        e.val_acc = val  # test accuracy is not looked at
    es.append(Entry(id="x", name="x", kind="anchor", test_acc=0.0, params=1, flops=1,
                    act_peak_bytes=1, latency_ms=1, model_bytes=1, segments=[], val_acc=0.75))
    assert to_finetune(es, "frontier") == {"a", "b"}  # c is dominated by b; x is an anchor
    assert to_finetune(es, "all") == {"a", "b", "c"} and to_finetune(es, "none") == set()


def test_pareto_frontier():
    es = [entry("a", 0.9, 10), entry("b", 0.8, 5), entry("c", 0.7, 6), entry("d", 0.95, 12),
          entry("e", 0.8, 5.5)]
    assert [e.name for e in pareto(es)] == ["b", "a", "d"]


def test_anchor_cache_and_checkpoint(splits, tmp_path):
    spec = AnchorSpec(name="r", model="test_resnet", train=TrainConfig(**QUICK))
    a = load_anchor(spec, splits, tmp_path)
    b = load_anchor(spec, splits, tmp_path)  # from the cache: no second training
    assert a.train_seconds == b.train_seconds
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(),
                                                 b.model.state_dict().values()))
    ckpt = tmp_path / "r.safetensors"
    save_file({k: v.contiguous() for k, v in a.model.state_dict().items()}, str(ckpt))
    c = load_anchor(AnchorSpec(name="r2", model="test_resnet", checkpoint=str(ckpt)), splits,
                    tmp_path)
    assert evaluate(c.model, splits.val) == pytest.approx(a.val_acc)


def test_an_anchor_trains_to_the_same_weights_whatever_ran_before(splits, tmp_path):
    """One cache key, one set of weights: the initial weights come from the anchor's seed,
    not from whatever the process drew from the global RNG before (the first anchor of a
    build used to retrain to different weights under one key)."""
    spec = AnchorSpec(name="r", model="test_resnet", train=TrainConfig(**QUICK))
    weights = []
    for before in (1, 2):
        torch.manual_seed(before)
        state = torch.random.get_rng_state()
        create(spec, splits)
        assert torch.equal(torch.random.get_rng_state(), state)  # create draws from its own
        a = load_anchor(spec, splits, tmp_path / str(before))
        weights.append(a.model.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_a_gpu_trained_anchor_has_a_key_of_its_own(splits):
    """Weights trained on another device differ (kernels sum in another order), so the device
    is in the key; CPU keys are unchanged by it ("meta" stands in for a GPU here)."""
    spec = AnchorSpec(name="r", model="test_resnet", train=TrainConfig(**QUICK))
    assert cache_key(spec, splits) == cache_key(spec, splits, "cpu")
    assert "device" not in _provenance([spec])
    assert cache_key(spec, splits, torch.device("meta")) != cache_key(spec, splits)


def test_zoo_spec_errors_name_the_key():
    with pytest.raises(ValueError, match=r"anchors\[0\].*unknown key.*'epochz'"):
        ZooSpec.from_dict({"anchors": [{"name": "a", "model": "test_resnet", "epochz": 1}]})
    with pytest.raises(ValueError, match=r"anchors\[0\]\.train.*'lrr'"):
        ZooSpec.from_dict({"anchors": [{"name": "a", "model": "test_resnet",
                                        "train": {"lrr": 1}}]})
    with pytest.raises(ValueError, match="not a timm model"):
        ZooSpec.from_dict({"anchors": [{"name": "a", "model": "resnet9000"}]})


def test_a_catalog_of_another_segment_id_scheme_is_refused(tmp_path):
    root = tmp_path / "home" / "catalog"
    assert not Catalog.is_current(root)
    Catalog(root, [entry("a", 0.9, 1.0)]).save()
    assert Catalog.is_current(root) and Catalog.load(root).entries[0].name == "a"
    doc = json.loads((root / "catalog.json").read_text())
    del doc["segment_id_scheme"]  # as every catalog before scheme 2 was written
    (root / "catalog.json").write_text(json.dumps(doc))
    assert not Catalog.is_current(root)
    with pytest.raises(ValueError, match=r"ID scheme 1, this version by scheme 2 .*rebuild it "
                                         rf"with `restnet catalog build --home {tmp_path}/home`"):
        Catalog.load(root)
