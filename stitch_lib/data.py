"""Offline image data: Fashion-MNIST (Debian package), ``.npz`` files and image folders."""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .inputs import InputSpec

log = logging.getLogger(__name__)

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
NPZ_FORM = "expected x: N×H×W[×C] uint8 (C in 1, 3) and y: N integer labels in 0..K-1"
FOLDER_LAYOUT = "expected the layout root/<class>/*.png (also .jpg, .jpeg, .bmp), one subfolder per class"
SOURCE_FORMS = "'fashion-mnist', a .npz file (x, y[, classes]) or an image folder root/<class>/*.png"
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "F"}


@dataclass(frozen=True, eq=False)
class ImageSet:
    """A labelled image collection: ``x`` uint8 N×C×H×W, ``y`` int64 N."""

    x: torch.Tensor
    y: torch.Tensor
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.x.dtype != torch.uint8 or self.x.ndim != 4:
            raise ValueError(f"ImageSet.x must be uint8 N×C×H×W, got {self.x.dtype} {tuple(self.x.shape)}")
        if self.y.dtype != torch.int64 or self.y.shape != (self.x.shape[0],):
            raise ValueError(f"ImageSet.y must be int64 of length {self.x.shape[0]}, "
                             f"got {self.y.dtype} {tuple(self.y.shape)}")


@dataclass(frozen=True, eq=False)
class Split:
    """One ready-to-use split: normalised float32 images and int64 labels."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                drop_last: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(x, y)`` batches covering each example once; the order is fixed by ``seed``."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        n = len(self)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(n)
        stop = n - n % batch_size if drop_last else n
        for start in range(0, stop, batch_size):
            idx = order[start:start + batch_size]
            yield self.x[idx], self.y[idx]


@dataclass(frozen=True, eq=False)
class DataSplits:
    """Train/calibration/validation/test splits of one source, with a reproducibility fingerprint."""

    train: Split
    calib: Split
    val: Split
    test: Split
    classes: tuple[str, ...]
    in_chans: int
    image_size: int
    fingerprint: str

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (gzipped or plain) into a numpy array."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError) as exc:
        raise ValueError(f"{path}: cannot read IDX file ({exc})") from exc
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number {raw[:4].hex()})")
    ndim, dtype = raw[3], np.dtype(_IDX_DTYPES[raw[2]])
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, 4))
    if len(raw) - header != int(np.prod(shape)) * dtype.itemsize:
        raise ValueError(f"{path}: IDX payload is {len(raw) - header} bytes, shape {shape} needs "
                         f"{int(np.prod(shape)) * dtype.itemsize}")
    return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def load_fashion_mnist(root: Path = FASHION_MNIST_DIR) -> tuple[ImageSet, ImageSet]:
    """Load Fashion-MNIST as ``(train, test)`` from the Debian package's IDX files."""
    root = Path(root)
    sets = []
    for prefix in ("train", "t10k"):
        images, labels = root / f"{prefix}-images-idx3-ubyte.gz", root / f"{prefix}-labels-idx1-ubyte.gz"
        for f in (images, labels):
            if not f.is_file():
                raise FileNotFoundError(f"Fashion-MNIST file {f.name} not found in {root}; on Debian/Ubuntu "
                                        "run `sudo apt-get install dataset-fashion-mnist`")
        x, y = read_idx(images), read_idx(labels)
        if x.ndim != 3 or x.dtype != np.uint8 or y.shape != (x.shape[0],):
            raise ValueError(f"{images}: expected N×28×28 uint8 images matching {labels.name}, "
                             f"got {x.shape} {x.dtype} and {y.shape}")
        sets.append(ImageSet(torch.from_numpy(x).unsqueeze(1), torch.from_numpy(y).long(), FASHION_MNIST_CLASSES))
    return sets[0], sets[1]


def load_npz(path: Path) -> ImageSet:
    """Load an ``.npz`` with ``x`` (N×H×W[×C] uint8), ``y`` (N labels) and optional ``classes``."""
    with np.load(Path(path), allow_pickle=False) as data:
        for key in ("x", "y"):
            if key not in data:
                raise ValueError(f"{path}: missing key {key!r}; {NPZ_FORM}")
        x, y = data["x"], data["y"]
        classes = tuple(str(c) for c in data["classes"].reshape(-1)) if "classes" in data else None
    if x.dtype != np.uint8:
        raise ValueError(f"{path}: key 'x' has dtype {x.dtype}; {NPZ_FORM}")
    if x.ndim not in (3, 4) or x.shape[0] == 0 or (x.ndim == 4 and x.shape[3] not in (1, 3)):
        raise ValueError(f"{path}: key 'x' has shape {x.shape}; {NPZ_FORM}")
    if not np.issubdtype(y.dtype, np.integer) or y.shape != (x.shape[0],):
        raise ValueError(f"{path}: key 'y' has dtype {y.dtype} shape {y.shape}, x has {x.shape[0]} images; {NPZ_FORM}")
    k = len(classes) if classes is not None else int(y.max()) + 1
    if y.min() < 0 or y.max() >= k:
        raise ValueError(f"{path}: key 'y' has labels in {y.min()}..{y.max()}, expected 0..{k - 1} "
                         f"({'len(classes)' if classes is not None else 'non-negative'}); {NPZ_FORM}")
    xt = torch.from_numpy(x).unsqueeze(1) if x.ndim == 3 else torch.from_numpy(x).permute(0, 3, 1, 2)
    return ImageSet(xt.contiguous(), torch.from_numpy(y.astype(np.int64)), classes or tuple(map(str, range(k))))


def load_image_folder(root: Path) -> ImageSet:
    """Load ``root/<class>/*.png|jpg|jpeg|bmp``; classes are the sorted subfolder names."""
    root = Path(root)
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.is_dir() else []
    if not class_dirs:
        raise ValueError(f"{root}: no class subfolders; {FOLDER_LAYOUT}")
    files, labels = [], []
    for label, d in enumerate(class_dirs):
        found = sorted(f for f in d.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise ValueError(f"{d}: class folder has no images; {FOLDER_LAYOUT}")
        files += found
        labels += [label] * len(found)
    images = []
    for f in files:
        try:
            with Image.open(f) as im:
                im.load()
                images.append(im)
        except (UnidentifiedImageError, OSError) as exc:
            raise ValueError(f"{f}: cannot read image ({exc})") from exc
    mode = "L" if all(im.mode in _GRAY_MODES for im in images) else "RGB"
    size = images[0].size
    arrays = []
    for f, im in zip(files, images):
        if im.size != size:
            raise ValueError(f"{f}: image is {im.size[0]}×{im.size[1]} but {files[0]} is {size[0]}×{size[1]}; "
                             f"resize all images to one size (e.g. {size[0]}×{size[1]})")
        arrays.append(np.asarray(im.convert(mode), dtype=np.uint8))
    x = torch.from_numpy(np.stack(arrays))
    x = x.unsqueeze(1) if mode == "L" else x.permute(0, 3, 1, 2).contiguous()
    return ImageSet(x, torch.tensor(labels, dtype=torch.int64), tuple(d.name for d in class_dirs))


def load_source(source: str | Path) -> tuple[ImageSet, ImageSet | None]:
    """Resolve a source to ``(train_or_all, test_or_None)``."""
    if isinstance(source, str) and source.lower() == "fashion-mnist":
        return load_fashion_mnist()
    path = Path(source)
    if path.is_dir():
        return load_image_folder(path), None
    if path.is_file() and path.suffix.lower() == ".npz":
        return load_npz(path), None
    raise ValueError(f"unknown data source {str(source)!r} (not an existing .npz file or folder); "
                     f"accepted: {SOURCE_FORMS}")


def _digest(s: ImageSet) -> bytes:
    """sha256 of an ImageSet's shape, classes, pixels and labels."""
    h = hashlib.sha256(json.dumps([list(s.x.shape), list(s.classes)]).encode())
    h.update(memoryview(s.x.contiguous().numpy()).cast("B"))
    h.update(memoryview(s.y.contiguous().numpy()).cast("B"))
    return h.digest()


def _subset(n: int, k: int | None, what: str, generator: torch.Generator) -> torch.Tensor:
    """Seeded random subset of ``range(n)`` of size ``k`` (all of it, shuffled, when ``k`` is None)."""
    if k is not None and not 1 <= k <= n:
        raise ValueError(f"{what}={k} is invalid: must be between 1 and the {n} available")
    return torch.randperm(n, generator=generator)[:k]


def _prepare(s: ImageSet, idx: torch.Tensor, image_size: int) -> Split:
    spec = InputSpec(int(s.x.shape[1]), (image_size, image_size))  # what the agent serves with
    return Split(spec.prepare(s.x[idx]), s.y[idx].clone())


def split_sizes(n: int) -> tuple[int, int]:
    """Default calibration and validation sizes for ``n`` labelled training images: a tenth and
    a seventh of them, at most 1,000 and 2,000 (1,500 images leave about 1,000 to train on)."""
    return min(1000, max(1, n // 10)), min(2000, max(1, n // 7))


def make_splits(source: str | Path = "fashion-mnist", *, image_size: int = 32, n_train: int | None = None,
                n_calib: int | None = None, n_val: int | None = None, n_test: int | None = None,
                test_fraction: float = 0.15, seed: int = 0) -> DataSplits:
    """Build deterministic train/calib/val/test splits of ``source`` resized to ``image_size``;
    calibration and validation sizes left as None scale with the data (`split_sizes`)."""
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    data, test_set = load_source(source)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(data.y), generator=g)
    if test_set is None:
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
        n_hold = round(test_fraction * len(perm))
        if not 1 <= n_hold < len(perm):
            raise ValueError(f"test_fraction={test_fraction} of {len(perm)} examples leaves an empty split")
        test_idx, perm = perm[:n_hold], perm[n_hold:]
        test_idx = test_idx[_subset(len(test_idx), n_test, "n_test", g)]
        test_set = data
    else:
        test_idx = _subset(len(test_set.y), n_test, "n_test", g)
    auto_calib, auto_val = split_sizes(len(perm))
    n_calib = auto_calib if n_calib is None else n_calib
    n_val = auto_val if n_val is None else n_val
    for name, k in (("n_calib", n_calib), ("n_val", n_val)):
        if k < 1:
            raise ValueError(f"{name} must be >= 1, got {k}")
    if n_calib + n_val >= len(perm):
        raise ValueError(f"n_calib + n_val = {n_calib + n_val} leaves no training data: "
                         f"only {len(perm)} examples available; lower them or leave them out "
                         "of the zoo file to size them from the data")
    calib_idx, val_idx, rest = perm[:n_calib], perm[n_calib:n_calib + n_val], perm[n_calib + n_val:]
    train_idx = rest[_subset(len(rest), n_train, "n_train", g)]
    h = hashlib.sha256(_digest(data) + (b"held-out" if test_set is data else _digest(test_set)))
    h.update(json.dumps([image_size, n_train, n_calib, n_val, n_test, test_fraction, seed]).encode())
    splits = DataSplits(train=_prepare(data, train_idx, image_size), calib=_prepare(data, calib_idx, image_size),
                        val=_prepare(data, val_idx, image_size), test=_prepare(test_set, test_idx, image_size),
                        classes=data.classes, in_chans=int(data.x.shape[1]), image_size=image_size,
                        fingerprint=h.hexdigest()[:16])
    log.info("data %s: train %s, calib %s, val %s, test %s at %spx (fingerprint %s)", source, len(splits.train),
             len(splits.calib), len(splits.val), len(splits.test), image_size, splits.fingerprint)
    return splits
