import copy

import pytest
import torch
from torch import nn

from conftest import tiny, tiny_recipe
from stitch_lib import split_model
from stitch_lib.segments import SUPPORTED_FAMILIES

FAMILIES = [
    ("test_resnet", {}), ("mobilenetv3_small_050", {}), ("test_efficientnet", {}),
    ("test_convnext", {}), ("regnetx_002", {}), ("test_vit", {"img_size": 32}),
    ("vit", {}), ("vit", {"class_token": False, "global_pool": "avg"}),
    ("vit", {"reg_tokens": 2, "no_embed_class": True}),
]


def run(segments, x):
    outs = []
    for s in segments:
        x = s(x)
        outs.append(x)
    return outs


@pytest.mark.parametrize("name,kwargs", FAMILIES)
@torch.no_grad()
def test_segments_reproduce_the_model(name, kwargs):
    model = tiny(name, **kwargs)
    x = torch.randn(3, 1, 32, 32)
    segments = split_model(model)
    assert segments[-1].form == "logits" and len(segments) >= 4
    assert torch.allclose(run(segments, x)[-1], model(x), atol=1e-5)


@torch.no_grad()
def test_stage_outputs_match_forward_intermediates_resnet():
    model, x = tiny("test_resnet"), torch.randn(2, 1, 32, 32)
    ours = run(split_model(model), x)[1:5]  # layer1..layer4
    oracle = model.forward_intermediates(x, intermediates_only=True)[1:]  # [0] is pre-maxpool
    for a, b in zip(ours, oracle, strict=True):
        assert torch.allclose(a, b, atol=1e-6)


@torch.no_grad()
def test_block_outputs_match_forward_intermediates_vit():
    model, x = tiny("vit"), torch.randn(2, 1, 32, 32)
    segments = split_model(model)
    ours = run(segments, x)[1:-1]  # every block's output
    oracle = model.forward_intermediates(x, intermediates_only=True)  # NCHW patch tokens
    assert len(ours) == len(oracle)
    for seg, a, b in zip(segments[1:], ours, oracle):
        patches = a[:, seg.num_prefix:].transpose(1, 2).reshape(b.shape)
        assert torch.allclose(patches, b, atol=1e-6)


@torch.no_grad()
def test_convnext_stages_match_forward_intermediates():
    model, x = tiny("test_convnext"), torch.randn(2, 1, 32, 32)
    ours = run(split_model(model), x)[1:-1]
    for a, b in zip(ours, model.forward_intermediates(x, intermediates_only=True), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_segment_id_is_a_content_hash():
    recipe = tiny_recipe("test_resnet")
    a, b = tiny("test_resnet"), tiny("test_resnet")  # same seed: same weights
    ids_a = [s.segment_id() for s in split_model(a, recipe)]
    assert ids_a == [s.segment_id() for s in split_model(b, recipe)]
    assert len(set(ids_a)) == len(ids_a)
    c = copy.deepcopy(a)
    with torch.no_grad():
        c.layer2[0].conv1.weight[0, 0, 0, 0] += 1e-3
    ids_c = [s.segment_id() for s in split_model(c, recipe)]
    assert ids_c[2] != ids_a[2]  # layer2 changed
    assert ids_c[:2] == ids_a[:2] and ids_c[3:] == ids_a[3:]
    other = recipe | {"kwargs": {"drop_rate": 0.1}}  # same weights, another recipe
    assert [s.segment_id() for s in split_model(a, other)][0] != ids_a[0]


def test_a_segment_id_needs_the_recipe():
    segments = split_model(tiny("test_resnet"))
    assert segments[1].index == 1 and segments[1].recipe is None
    with pytest.raises(ValueError, match=r"split_model\(model, recipe=\.\.\.\)"):
        segments[0].segment_id()
    with pytest.raises(ValueError, match="not this model's architecture 'test_resnet'"):
        split_model(tiny("test_resnet"), tiny_recipe("vit"))
    with pytest.raises(ValueError, match="exactly the keys"):
        split_model(tiny("test_resnet"), {"model": "test_resnet"})


def test_unsupported_family_is_named():
    with pytest.raises(ValueError, match="Sequential family.*supported families: ResNet"):
        split_model(nn.Sequential(nn.Conv2d(1, 4, 3)))
    with pytest.raises(ValueError, match="ByobNet"):
        split_model(tiny("test_byobnet"))
    assert "VisionTransformer" in SUPPORTED_FAMILIES
