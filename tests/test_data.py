"""Tests for stitch_lib.data: Fashion-MNIST, npz, image folders and splits."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stitch_lib.data import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    ImageSet,
    Split,
    load_fashion_mnist,
    load_image_folder,
    load_npz,
    load_source,
    make_splits,
    read_idx,
)

needs_fmnist = pytest.mark.skipif(not (FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz").is_file(),
                                  reason="Debian package dataset-fashion-mnist not installed")
SMALL = dict(n_train=500, n_calib=64, n_val=64, n_test=100)


@pytest.fixture(scope="module")
def fmnist() -> tuple[ImageSet, ImageSet]:
    return load_fashion_mnist()


def _row_keys(x: torch.Tensor) -> set[bytes]:
    return {row.numpy().tobytes() for row in x}


@needs_fmnist
def test_read_idx_labels() -> None:
    y = read_idx(FASHION_MNIST_DIR / "train-labels-idx1-ubyte.gz")
    assert y.shape == (60000,) and y.dtype == np.uint8
    assert y.min() == 0 and y.max() == 9 and set(np.unique(y)) == set(range(10))


@needs_fmnist
def test_load_fashion_mnist(fmnist: tuple[ImageSet, ImageSet]) -> None:
    train, test = fmnist
    assert train.x.shape == (60000, 1, 28, 28) and test.x.shape == (10000, 1, 28, 28)
    assert train.x.dtype == torch.uint8 and train.y.dtype == torch.int64
    assert int(train.y.min()) == 0 and int(train.y.max()) == 9
    assert train.classes == FASHION_MNIST_CLASSES and len(FASHION_MNIST_CLASSES) == 10


@needs_fmnist
def test_make_splits_fashion_mnist() -> None:
    a = make_splits("fashion-mnist", **SMALL)
    assert (len(a.train), len(a.calib), len(a.val), len(a.test)) == (500, 64, 64, 100)
    assert a.train.x.shape == (500, 1, 32, 32) and a.train.x.dtype == torch.float32
    assert a.num_classes == 10 and a.in_chans == 1 and a.image_size == 32
    assert -1.0 <= float(a.train.x.min()) and float(a.train.x.max()) <= 1.0
    keys = [_row_keys(s.x) for s in (a.train, a.calib, a.val)]
    assert not (keys[0] & keys[1]) and not (keys[0] & keys[2]) and not (keys[1] & keys[2])
    b = make_splits("fashion-mnist", **SMALL)
    assert a.fingerprint == b.fingerprint
    for name in ("train", "calib", "val", "test"):
        assert torch.equal(getattr(a, name).x, getattr(b, name).x)
        assert torch.equal(getattr(a, name).y, getattr(b, name).y)
    c = make_splits("fashion-mnist", **SMALL, seed=1)
    assert c.fingerprint != a.fingerprint and not torch.equal(c.train.y, a.train.y)


@needs_fmnist
def test_make_splits_sizes_validated() -> None:
    with pytest.raises(ValueError, match="10000 available"):
        make_splits("fashion-mnist", n_test=20000)
    with pytest.raises(ValueError, match="n_calib must be >= 1"):
        make_splits("fashion-mnist", n_calib=0)


def test_missing_fashion_mnist(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist") as info:
        load_fashion_mnist(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_read_idx_malformed(tmp_path: Path) -> None:
    bad = tmp_path / "bad-idx1-ubyte.gz"
    bad.write_bytes(gzip.compress(b"\x01\x02\x03\x04rest"))
    with pytest.raises(ValueError, match="bad-idx1-ubyte.gz.*magic"):
        read_idx(bad)
    short = tmp_path / "short-idx1-ubyte"
    short.write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05\x01\x02")
    with pytest.raises(ValueError, match="short-idx1-ubyte"):
        read_idx(short)
    ok = tmp_path / "ok-idx2-ubyte"
    ok.write_bytes(b"\x00\x00\x08\x02\x00\x00\x00\x02\x00\x00\x00\x03" + bytes(range(6)))
    assert read_idx(ok).tolist() == [[0, 1, 2], [3, 4, 5]]


@pytest.mark.parametrize("shape", [(40, 8, 8), (40, 8, 8, 3)])
def test_npz_round_trip(tmp_path: Path, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, shape, dtype=np.uint8)
    y = np.arange(40) % 4
    path = tmp_path / "d.npz"
    np.savez(path, x=x, y=y, classes=np.array(["a", "b", "c", "d"]))
    s = load_npz(path)
    chans = 1 if len(shape) == 3 else 3
    assert s.x.shape == (40, chans, 8, 8) and s.classes == ("a", "b", "c", "d")
    expected = x[:, None] if chans == 1 else x.transpose(0, 3, 1, 2)
    assert np.array_equal(s.x.numpy(), expected) and s.y.tolist() == y.tolist()
    splits = make_splits(path, image_size=8, n_calib=4, n_val=4, test_fraction=0.25)
    assert (len(splits.test), len(splits.calib), len(splits.val), len(splits.train)) == (10, 4, 4, 22)
    assert splits.in_chans == chans and splits.train.x.shape[1:] == (chans, 8, 8)
    held = [_row_keys(sp.x) for sp in (splits.train, splits.calib, splits.val, splits.test)]
    assert sum(map(len, held)) == len(set().union(*held)) == 40


def test_npz_default_classes(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((3, 4, 4), np.uint8), y=np.array([0, 2, 1]))
    assert load_npz(path).classes == ("0", "1", "2")


@pytest.mark.parametrize(("arrays", "match"), [
    ({"y": np.zeros(3, int)}, "missing key 'x'.*N×H×W"),
    ({"x": np.zeros((3, 4, 4), np.uint8)}, "missing key 'y'"),
    ({"x": np.zeros((3, 4, 4), np.float32), "y": np.zeros(3, int)}, "'x' has dtype float32.*uint8"),
    ({"x": np.zeros((3, 4), np.uint8), "y": np.zeros(3, int)}, "'x' has shape.*N×H×W"),
    ({"x": np.zeros((3, 4, 4), np.uint8), "y": np.zeros(2, int)}, "'y'.*3 images.*N integer labels"),
    ({"x": np.zeros((3, 4, 4), np.uint8), "y": np.zeros(3, np.float32)}, "'y' has dtype float32"),
    ({"x": np.zeros((3, 4, 4), np.uint8), "y": np.array([0, -1, 1])}, "'y' has labels in -1..1"),
    ({"x": np.zeros((3, 4, 4), np.uint8), "y": np.array([0, 1, 2]), "classes": np.array(["a", "b"])},
     "'y' has labels in 0..2, expected 0..1"),
])
def test_npz_malformed(tmp_path: Path, arrays: dict[str, np.ndarray], match: str) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match=match):
        load_npz(path)


def _write_png(path: Path, value: int, size: tuple[int, int] = (6, 5), mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode == "L" else (value, 0, 255 - value)).save(path)


def test_image_folder(tmp_path: Path) -> None:
    for i in range(3):
        _write_png(tmp_path / "cat" / f"{i}.png", 10 * i)
        _write_png(tmp_path / "ant" / f"{i}.png", 100 + i)
    s = load_image_folder(tmp_path)
    assert s.classes == ("ant", "cat") and s.x.shape == (6, 1, 5, 6)
    assert s.y.tolist() == [0, 0, 0, 1, 1, 1] and int(s.x[0, 0, 0, 0]) == 100
    _write_png(tmp_path / "cat" / "rgb.png", 7, mode="RGB")
    s = load_image_folder(tmp_path)
    assert s.x.shape == (7, 3, 5, 6) and s.x[0, :, 0, 0].tolist() == [100, 100, 100]
    assert load_source(tmp_path)[1] is None


def test_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"root/<class>/\*\.png"):
        load_image_folder(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty.*no images.*root/<class>/\*\.png"):
        load_image_folder(tmp_path)
    _write_png(tmp_path / "empty" / "a.png", 1)
    _write_png(tmp_path / "empty" / "b.png", 1, size=(9, 9))
    with pytest.raises(ValueError, match=r"b\.png.*resize"):
        load_image_folder(tmp_path)


def test_unknown_source(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="fashion-mnist.*npz.*image folder"):
        load_source("mnist-digits")
    with pytest.raises(ValueError, match="accepted"):
        load_source(tmp_path / "missing.npz")


@pytest.mark.parametrize("drop_last", [False, True])
def test_split_batches(drop_last: bool) -> None:
    split = Split(torch.arange(10, dtype=torch.float32).view(10, 1, 1, 1), torch.arange(10))
    batches = list(split.batches(4, shuffle=True, seed=3, drop_last=drop_last))
    sizes = [len(yb) for _, yb in batches]
    assert sizes == ([4, 4] if drop_last else [4, 4, 2])
    seen = torch.cat([yb for _, yb in batches])
    assert len(set(seen.tolist())) == len(seen) and (drop_last or sorted(seen.tolist()) == list(range(10)))
    assert all(torch.equal(xb.view(-1).long(), yb) for xb, yb in batches)
    again = torch.cat([yb for _, yb in split.batches(4, shuffle=True, seed=3, drop_last=drop_last)])
    assert torch.equal(seen, again)
    assert [yb.tolist() for _, yb in split.batches(5)] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
