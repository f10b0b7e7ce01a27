"""Stitch-aware anchor training, the zoo's one budget rule, and the catalog's usefulness
figures (useful hybrids, coverage, the frontier against the line between anchors)."""
import math

import pytest
import torch
import yaml

from conftest import TINY_VIT, tiny
from restnet.stitch_cmd import load_zoo
from stitch_lib import split_model
from stitch_lib.build import BuildConfig, build_catalog
from stitch_lib.catalog import Catalog, Entry, chord_margins, coverage, useful
from stitch_lib.cotrain import Layout, Point, _tail, hybrid_flops, plan_points
from stitch_lib.data import make_splits, split_sizes
from stitch_lib.train import TrainConfig
from stitch_lib.zoo import ZooSpec, build_zoo

SA_ZOO = {
    "train": {"epochs": 1, "batch_size": 64, "lr": 3e-3},
    "stitch_aware": {"weight": 0.5, "distill": 0.5},
    "anchors": [
        {"name": "res", "model": "test_resnet"},
        {"name": "vit", "model": "vit_tiny_patch16_224", "kwargs": TINY_VIT,
         "train": {"lr": 1e-3}},
        {"name": "mnv3", "model": "mobilenetv3_small_050"},
    ],
}


def test_plan_points_follow_the_restnet_direction_and_grids(splits):
    segs = {"big": split_model(tiny("resnet18")), "small": split_model(tiny("mobilenetv3_small_050"))}
    layouts = {n: Layout.of(s, splits.calib.x) for n, s in segs.items()}
    points = plan_points(layouts)
    assert points and all(p.front == "big" and p.back == "small" for p in points)
    assert len({p.i for p in points}) == len(points)  # one back point per front cut
    for p in points:
        src, dst = layouts["big"].ports[p.i], layouts["small"].ports[p.j]
        assert src.grid == dst.grid  # these two CNNs share every grid size
        assert hybrid_flops(layouts["big"], p.i, layouts["small"], p.j) < layouts["big"].flops[-1]
    assert Point.parse(points[0].key) == points[0]


def test_the_hybrid_path_leaves_the_back_statistics_alone():
    segs = split_model(tiny("mobilenetv3_small_050")).copy()
    for s in segs:
        s.train()
    before = {k: v.clone() for s in segs for k, v in s.state_dict().items()}
    x = torch.randn(8, 16, 16, 16, requires_grad=True)  # the stem's output: 16 channels, 16x16
    _tail(segs, 0, x).sum().backward()
    after = {k: v for s in segs for k, v in s.state_dict().items()}
    assert all(torch.equal(before[k], after[k]) for k in before)  # running stats untouched
    assert any(k.endswith("running_mean") for k in before)
    assert all(s.training for s in segs)  # modes restored
    assert x.grad is not None and any(p.grad is not None for p in segs[1].parameters())
    for s in segs:
        s.zero_grad(set_to_none=True)
    x.grad = None
    _tail(segs, 0, x, learns=False).sum().backward()  # the back stays as trained alone
    assert x.grad is not None and all(p.grad is None for s in segs for p in s.parameters())


@pytest.fixture(scope="module")
def sa_zoo(splits, tmp_path_factory):
    root = tmp_path_factory.mktemp("sa-zoo")
    return root, build_zoo(ZooSpec.from_dict(SA_ZOO), splits, root)


def test_stitch_aware_zoo_trains_once_and_is_reused(sa_zoo, splits):
    root, zoo = sa_zoo
    assert [a.training for a in zoo.anchors] == ["stitch-aware"] * 3
    assert zoo.stitches and set(zoo.info["stitch_val_acc"]) == {p.key for p in zoo.stitches}
    again = build_zoo(ZooSpec.from_dict(SA_ZOO), splits, root)  # from the cache
    assert again.info["seconds"] == zoo.info["seconds"]
    for a, b in zip(zoo.anchors, again.anchors):
        assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(),
                                                     b.model.state_dict().values()))
    for p, st in zoo.stitches.items():
        assert all(torch.equal(x, y) for x, y in zip(st.state_dict().values(),
                                                     again.stitches[p].state_dict().values()))


def test_catalog_of_a_stitch_aware_zoo(sa_zoo, splits, tmp_path):
    _, zoo = sa_zoo
    cfg = BuildConfig(ft=TrainConfig(lr=1e-3, steps=8, n_train=200), latency_rounds=2)
    cat = build_catalog(zoo, splits, Catalog(tmp_path / "catalog"), cfg)
    flops = {a.name: a.flops for a in cat.anchors}
    assert cat.hybrids and cat.meta["build"]["anchors"] == "stitch-aware"
    for e in cat.hybrids:
        assert e.init in ("co-trained", "ls") and e.stitch_state == "finetuned"
        assert e.val_acc >= e.init_val_acc  # the start is kept when fine-tuning does not help
        assert e.flops <= max(flops[e.front], flops[e.back])
        assert (Point(e.front, e.i, e.back, e.j) in zoo.stitches)
    assert {"coverage", "useful"} <= set(cat.meta["usefulness"]["flops"])
    # every stitch gets the build's residual branch, at zero: the co-trained start is exactly
    # the co-trained stitch
    assert {e.stitch_hidden for e in cat.hybrids} == {cfg.stitch_hidden} != {0}
    for c in cat.meta["candidates"]:
        key = Point(c["front"], c["i"], c["back"], c["j"]).key
        assert c["cotrained_val_acc"] == zoo.info["stitch_val_acc"][key]


def entry(name, kind, acc, flops):
    return Entry(id=name, name=name, kind=kind, test_acc=acc, params=1, flops=flops,
                 act_peak_bytes=1, latency_ms=flops, model_bytes=1, segments=[])


def test_useful_coverage_and_the_line_between_anchors():
    es = [entry("small", "anchor", 0.70, 1), entry("big", "anchor", 0.90, 100),
          entry("h-good", "hybrid", 0.85, 10),  # beats the small anchor, the only one as cheap
          entry("h-bad", "hybrid", 0.65, 5),  # worse than the small anchor
          entry("h-below", "hybrid", 0.99, 0.5)]  # cheaper than every anchor: never "useful"
    assert [e.name for e in useful(es)] == ["h-good"]
    # from 10 to 100 the best that fits is h-good (h-below is more accurate and cheaper!)
    assert coverage(es) == 0.0
    es = es[:4]
    assert coverage(es) == pytest.approx(math.log(100 / 10) / math.log(100))
    # the line in log cost at 10 is 0.70 + 0.5 * 0.20 = 0.80; h-good is 5 points above it
    assert chord_margins(es) == {"h-good": pytest.approx(0.05)}


def test_split_sizes_scale_with_the_data(tmp_path):
    assert split_sizes(60000) == (1000, 2000)
    rng = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (1500, 12, 12), dtype=torch.uint8, generator=rng).numpy()
    y = (torch.arange(1500) % 3).numpy()
    import numpy as np
    np.savez(tmp_path / "small.npz", x=x, y=y)
    s = make_splits(tmp_path / "small.npz", image_size=16)
    assert len(s.calib) >= 100 and len(s.val) >= 150 and len(s.train) >= 900


def test_zoo_budget_is_one_rule_and_paths_are_relative(tmp_path):
    with pytest.raises(ValueError, match=r"anchors\[0\]\.train.*'epochs'.*one budget"):
        ZooSpec.from_dict({**SA_ZOO, "anchors": [{"name": "a", "model": "test_resnet",
                                                   "train": {"epochs": 9}}]})
    with pytest.raises(ValueError, match="needs one budget"):
        ZooSpec.from_dict({"stitch_aware": True, "anchors": SA_ZOO["anchors"]})
    spec = ZooSpec.from_dict(SA_ZOO)
    assert {a.train.epochs for a in spec.anchors} == {1}
    assert [a.train.lr for a in spec.anchors] == [3e-3, 1e-3, 3e-3]
    (tmp_path / "zoo.yaml").write_text(yaml.safe_dump({**SA_ZOO, "dataset": "data/mine.npz"}))
    assert load_zoo(tmp_path / "zoo.yaml").dataset == str(tmp_path / "data/mine.npz")
    with pytest.raises(ValueError, match=r"zoo\.yaml.*augment"):
        (tmp_path / "zoo.yaml").write_text(yaml.safe_dump({**SA_ZOO, "train": {"augment": "x"}}))
        load_zoo(tmp_path / "zoo.yaml")
