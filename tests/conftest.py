"""Shared fixtures: a small real Fashion-MNIST subset and tiny timm models."""
from __future__ import annotations

import shutil

import pytest
import torch

from stitch_lib.assemble import from_recipe
from stitch_lib.data import DataSplits, make_splits
from stitch_lib.segments import split_model

TINY_VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)


@pytest.fixture(scope="session")
def splits() -> DataSplits:
    """1,000 training images, 160 calibration, 200 validation and 200 test images at 32px."""
    return make_splits("fashion-mnist", image_size=32, n_train=1000, n_calib=160, n_val=200,
                       n_test=200, seed=0)


def tiny_recipe(name: str, **kwargs) -> dict:
    """The recipe of `tiny(name, **kwargs)` (stitch_lib.assemble.from_recipe makes it)."""
    if name == "vit":
        name, kwargs = "vit_tiny_patch16_224", TINY_VIT | kwargs
    return {"model": name, "num_classes": 10, "in_chans": 1, "kwargs": kwargs}


def tiny(name: str, **kwargs) -> torch.nn.Module:
    """A tiny timm model for 1-channel 32px images, in eval mode, seeded."""
    torch.manual_seed(0)
    return from_recipe(tiny_recipe(name, **kwargs))


def tiny_segments(name: str, **kwargs) -> list:
    """`split_model` of `tiny(name, **kwargs)`, with its recipe (so with segment IDs)."""
    return split_model(tiny(name, **kwargs), tiny_recipe(name, **kwargs))


@pytest.fixture(scope="session")
def keys(tmp_path_factory):
    """The controller's key directory, as `restnet keys init` makes it (one per session)."""
    from fleet_protocol.signing import KeyDir

    root = tmp_path_factory.mktemp("keys")
    KeyDir(root).init()
    return root


@pytest.fixture
def broker(tmp_path):
    """A private Mosquitto on a free loopback port, stopped after the test."""
    from simulators.broker import start_broker

    with start_broker(tmp_path / "broker") as running:
        yield running


TINY_ZOO = {  # the tiny zoo of the fleet tests
    "anchors": [
        {"name": "res", "model": "test_resnet", "train": {"epochs": 1, "batch_size": 64, "lr": 3e-3}},
        {"name": "vit", "model": "vit_tiny_patch16_224", "kwargs": TINY_VIT,
         "train": {"epochs": 1, "batch_size": 64, "lr": 3e-3}},
        {"name": "mnv3", "model": "mobilenetv3_small_050",
         "train": {"epochs": 1, "batch_size": 64, "lr": 3e-3}},
    ],
}


@pytest.fixture(scope="session")
def tiny_catalog(splits, tmp_path_factory):
    """A real catalog of three tiny trained anchors and their LS-initialised hybrids."""
    from stitch_lib.build import BuildConfig, build_catalog
    from stitch_lib.catalog import Catalog
    from stitch_lib.zoo import ZooSpec, build_zoo

    root = tmp_path_factory.mktemp("tiny-catalog")
    anchors = build_zoo(ZooSpec.from_dict(TINY_ZOO), splits, root / "anchors")
    # ranked by the least-squares start: these tests need hybrids, not the best ones
    cfg = BuildConfig(top_k=2, screen=3, finetune="none", latency_rounds=3, rank_steps=0)
    data = dict(source="fashion-mnist", image_size=32, n_train=1000, n_calib=160, n_val=200,
                n_test=200, seed=0)
    return build_catalog(anchors, splits, Catalog(root / "catalog"), cfg, data=data)


@pytest.fixture
def catalog(tiny_catalog, tmp_path):
    """A copy of the tiny catalog whose accuracies rise with FLOPs (1-epoch tiny anchors give
    near-random ones), so that max_accuracy and min_energy pick different models."""
    from stitch_lib.catalog import Catalog

    shutil.copytree(tiny_catalog.root, tmp_path / "catalog")
    cat = Catalog.load(tmp_path / "catalog")
    for rank, e in enumerate(sorted(cat.entries, key=lambda e: e.flops)):
        e.test_acc = 0.5 + 0.01 * rank
    cat.save()
    return cat


@pytest.fixture
def loop(broker, catalog, tmp_path, keys):
    """A controller and agents against `broker` (see tests/fleetloop.py)."""
    from fleetloop import Loop

    lp = Loop(broker, catalog, tmp_path, keys)
    yield lp
    lp.close()
