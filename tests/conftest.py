"""Shared fixtures: a small real Fashion-MNIST subset and tiny timm models."""
from __future__ import annotations

import pytest
import timm
import torch

from stitch_lib.data import DataSplits, make_splits

TINY_VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)


@pytest.fixture(scope="session")
def splits() -> DataSplits:
    """1,000 training images, 160 calibration, 200 validation and 200 test images at 32px."""
    return make_splits("fashion-mnist", image_size=32, n_train=1000, n_calib=160, n_val=200,
                       n_test=200, seed=0)


def tiny(name: str, **kwargs) -> torch.nn.Module:
    """A tiny timm model for 1-channel 32px images, in eval mode, seeded."""
    torch.manual_seed(0)
    if name == "vit":
        return timm.create_model("vit_tiny_patch16_224", num_classes=10, in_chans=1,
                                 **(TINY_VIT | kwargs)).eval()
    return timm.create_model(name, num_classes=10, in_chans=1, **kwargs).eval()
