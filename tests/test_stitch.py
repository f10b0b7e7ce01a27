import pytest
import torch

from conftest import tiny
from stitch_lib import build_hybrid, feasible_points, split_model
from stitch_lib.stitch import Stitch
from stitch_lib.segments import Port


@pytest.mark.parametrize("name", ["test_resnet", "vit"])
@torch.no_grad()
def test_self_stitch_recovers_the_identity(name, splits):
    """A model stitched to itself at one boundary: least squares must find the identity."""
    model = tiny(name)
    segs = split_model(model)
    k = len(segs) - 3  # the last boundary that leaves the back a body segment
    hybrid, fit = build_hybrid(segs, k, segs, k, splits.calib.x, batch_size=32)
    assert fit["heldout_r2"] > 0.999
    x = splits.test.x[:16]
    assert torch.allclose(hybrid(x), model(x), atol=1e-2)


JOINTS = [("test_resnet", "mobilenetv3_small_050", "map", "map"),
          ("test_resnet", "vit", "map", "tokens"),
          ("vit", "test_resnet", "tokens", "map"),
          ("vit", "vit_noclass", "tokens", "tokens")]


def make(name):
    if name == "vit_noclass":
        return tiny("vit", embed_dim=48, class_token=False, global_pool="avg")
    return tiny(name)


@pytest.mark.parametrize("front,back,src,dst", JOINTS)
def test_every_joint_builds_and_runs(front, back, src, dst, splits):
    fs, bs = split_model(make(front)), split_model(make(back))
    pts = feasible_points(fs, bs, splits.calib.x)
    assert pts and all(j <= len(bs) - 3 for _, j in pts)  # never straight into the head
    i, j = pts[len(pts) // 2]
    hybrid, fit = build_hybrid(fs, i, bs, j, splits.calib.x, batch_size=32)
    assert (hybrid.stitch.src.form, hybrid.stitch.dst.form) == (src, dst)
    assert hybrid(splits.test.x[:4]).shape == (4, 10)
    assert 0 < fit["ridge"] and fit["heldout_r2"] <= 1
    assert len(hybrid.segment_ids()) == (i + 1) + (len(bs) - j - 1)


@torch.no_grad()
def test_cnn_to_vit_derives_cls_from_the_image(splits):
    fs, bs = split_model(tiny("test_resnet")), split_model(tiny("vit"))
    i, j = next((i, j) for i, j in feasible_points(fs, bs, splits.calib.x) if j == 0)
    hybrid, _ = build_hybrid(fs, i, bs, j, splits.calib.x, batch_size=32)
    assert hybrid.stitch.pos_bias is not None and hybrid.stitch.prefix_bias is not None
    tokens = hybrid.stitch(hybrid.front(splits.test.x[:8]))
    cls = tokens[:, 0]
    assert (cls - cls[0]).abs().max() > 1e-3  # the CLS token differs between images


def test_bad_stitch_points_are_refused(splits):
    fs, bs = split_model(tiny("test_resnet")), split_model(tiny("vit"))
    with pytest.raises(ValueError, match="out of range"):
        build_hybrid(fs, 0, bs, len(bs) - 2, splits.calib.x)  # straight into the head
    with pytest.raises(ValueError, match="cannot stitch"):
        Stitch(Port("map", 8, (16, 16)), Port("map", 8, (2, 2)))
