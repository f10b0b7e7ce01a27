import pytest
import torch

from conftest import tiny, tiny_segments
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


def segments(name):
    if name == "vit_noclass":
        return tiny_segments("vit", embed_dim=48, class_token=False, global_pool="avg")
    return tiny_segments(name)


@pytest.mark.parametrize("front,back,src,dst", JOINTS)
def test_every_joint_builds_and_runs(front, back, src, dst, splits):
    fs, bs = segments(front), segments(back)
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


@pytest.mark.parametrize("front,back,src,dst", JOINTS)
def test_a_residual_stitch_starts_at_the_least_squares_fit_and_learns(front, back, src, dst,
                                                                      splits):
    fs, bs = segments(front), segments(back)
    i, j = feasible_points(fs, bs, splits.calib.x)[0]
    x = splits.test.x[:8]
    linear, _ = build_hybrid(fs, i, bs, j, splits.calib.x, batch_size=32)
    rich, _ = build_hybrid(fs, i, bs, j, splits.calib.x, batch_size=32, hidden=8)
    assert rich.stitch.hidden == 8 and linear.stitch.hidden == 0
    with torch.no_grad():
        assert torch.equal(rich(x), linear(x))  # the branch starts at zero
    opt = torch.optim.SGD(rich.stitch.parameters(), lr=0.1)
    for _ in range(2):  # the zero-initialised up projection still receives gradients
        opt.zero_grad()
        torch.nn.functional.cross_entropy(rich(x), splits.test.y[:8]).backward()
        opt.step()
    assert rich.stitch.up.weight.abs().sum() > 0
    with torch.no_grad():
        assert not torch.allclose(rich(x), linear(x))
    assert all(p.grad is None for p in rich.back.parameters())  # anchors stay frozen


def test_a_stitch_width_out_of_range_is_refused():
    with pytest.raises(ValueError, match="hidden width"):
        Stitch(Port("map", 8, (4, 4)), Port("map", 8, (4, 4)), hidden=-1)


@torch.no_grad()
def test_the_protocols_stitch_vectors():
    """docs/protocol.md §5.1: both test vectors, as a device in another language checks them."""
    x = torch.tensor([[[[1., 2], [3, 4]], [[-1, 0], [1, 2]]]])
    linear = Stitch(Port("map", 2, (2, 2)), Port("tokens", 3, (1, 1), 1))
    linear.load_state_dict({
        "pos_bias": torch.tensor([1.5, 1.0, -0.25]).reshape(3, 1, 1),
        "prefix_bias": torch.tensor([[0.75, -0.25, 0.75]]),
        "proj.weight": torch.tensor([0, 0.5, 0, 0, 1.25, 0.5]).reshape(3, 2, 1, 1),
        "proj.bias": torch.tensor([-2.0, 2.0, 1.25])})
    assert torch.allclose(linear(x), torch.tensor([[[1.0, -0.25, 4.125], [-0.25, 3.0, 4.375]]]))
    rich = Stitch(Port("map", 2, (2, 2)), Port("map", 2, (2, 2)), hidden=1)
    rich.load_state_dict({
        "proj.weight": torch.eye(2).reshape(2, 2, 1, 1), "proj.bias": torch.zeros(2),
        "down.weight": torch.tensor([1., -1]).reshape(1, 2, 1, 1), "down.bias": torch.zeros(1),
        "spatial.weight": torch.tensor([0, 0, 0, 0, 1, 0.5, 0, 0, 0]).reshape(1, 1, 3, 3),
        "spatial.bias": torch.tensor([-1.5]),
        "up.weight": torch.tensor([1., -2]).reshape(2, 1, 1, 1), "up.bias": torch.tensor([0.25, 0])})
    want = torch.tensor([[[[2.6498, 2.5957], [4.6498, 4.5957]],
                          [[-3.7996, -0.6915], [-1.7996, 1.3085]]]])
    assert torch.allclose(rich(x), want, atol=1e-4)
