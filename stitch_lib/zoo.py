"""The anchor zoo: timm models named in a small spec, loaded from a local checkpoint or trained
from scratch on the dataset, and cached by content hash so the next run reuses them."""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import timm
from rich.progress import Progress
from safetensors.torch import load_file
from safetensors.torch import save as st_save
from torch import nn

from .data import DataSplits
from .files import atomic_write
from .segments import Segment, split_model
from .train import TrainConfig, evaluate, train_anchor

log = logging.getLogger(__name__)


def _from_dict(cls, d: dict[str, Any], where: str):
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; allowed keys: {sorted(known)}")
    return cls(**d)


@dataclass(frozen=True)
class AnchorSpec:
    """One anchor: a timm model name and its constructor arguments, plus where its weights
    come from (a local checkpoint file, else training from scratch with `train`)."""

    name: str
    model: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None
    train: TrainConfig = TrainConfig()

    def __post_init__(self) -> None:
        if not self.name or any(c in self.name for c in "/+# "):
            raise ValueError(f"anchor name {self.name!r} must be non-empty, without '/+# '")
        if self.model not in timm.list_models():
            raise ValueError(f"anchor {self.name!r}: {self.model!r} is not a timm model name; "
                             "see timm.list_models()")


@dataclass(frozen=True)
class ZooSpec:
    """The anchors and the data they are trained and measured on."""

    anchors: tuple[AnchorSpec, ...]
    dataset: str = "fashion-mnist"
    image_size: int = 32
    n_calib: int = 1000
    n_val: int = 2000
    n_test: int | None = None
    seed: int = 0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ZooSpec":
        """Validate a parsed zoo file; errors name the offending key."""
        if not isinstance(d, dict) or not d.get("anchors"):
            raise ValueError("a zoo spec needs a non-empty 'anchors' list")
        anchors = []
        for k, a in enumerate(d["anchors"]):
            a = dict(a)
            a["train"] = _from_dict(TrainConfig, a.get("train") or {}, f"anchors[{k}].train")
            anchors.append(_from_dict(AnchorSpec, a, f"anchors[{k}]"))
        if len({a.name for a in anchors}) != len(anchors):
            raise ValueError("anchor names must be unique")
        return _from_dict(cls, {**d, "anchors": tuple(anchors)}, "zoo")


@dataclass
class Anchor:
    """A ready anchor: the model (eval mode), its segments and its measured accuracy."""

    spec: AnchorSpec
    model: nn.Module
    segments: list[Segment]
    val_acc: float
    train_seconds: float
    recipe: dict[str, Any]  # how to create the model skeleton: see `recipe`


def recipe(spec: AnchorSpec, splits: DataSplits) -> dict[str, Any]:
    """Everything `timm.create_model` needs to rebuild the anchor's architecture."""
    return {"model": spec.model, "kwargs": dict(spec.kwargs),
            "num_classes": splits.num_classes, "in_chans": splits.in_chans}


def from_recipe(r: dict[str, Any]) -> nn.Module:
    """An anchor's architecture with untrained weights, in eval mode (load weights next)."""
    return timm.create_model(r["model"], num_classes=r["num_classes"], in_chans=r["in_chans"],
                             **r["kwargs"]).eval()


def create(spec: AnchorSpec, splits: DataSplits) -> nn.Module:
    """Instantiate the anchor's timm model for the dataset (weights from the checkpoint if
    one is given; nothing is ever downloaded)."""
    if spec.checkpoint:
        path = Path(spec.checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"anchor {spec.name!r}: checkpoint {path} does not exist")
        return timm.create_model(
            spec.model, pretrained=True, num_classes=splits.num_classes,
            in_chans=splits.in_chans, **spec.kwargs,
            pretrained_cfg_overlay=dict(file=str(path), num_classes=splits.num_classes)).eval()
    return from_recipe(recipe(spec, splits)).train()


def cache_key(spec: AnchorSpec, splits: DataSplits) -> str:
    """Content hash of everything that determines a trained anchor's weights."""
    blob = json.dumps({"spec": asdict(spec), "data": splits.fingerprint,
                       "timm": timm.__version__}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_anchor(spec: AnchorSpec, splits: DataSplits, cache_dir: Path,
                progress: Progress | None = None) -> Anchor:
    """The anchor from its checkpoint, from the cache, or trained now and cached."""
    model = create(spec, splits)
    if spec.checkpoint:
        return Anchor(spec, model.eval(), split_model(model), evaluate(model, splits.val), 0.0,
                      recipe(spec, splits))
    cache_dir.mkdir(parents=True, exist_ok=True)
    stem = cache_dir / f"{spec.name}-{cache_key(spec, splits)}"
    weights, meta = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    if weights.is_file() and meta.is_file():
        model.load_state_dict(load_file(weights))
        info = json.loads(meta.read_text())
        log.info("anchor %s: reused %s", spec.name, weights)
    else:
        result = train_anchor(model, splits, spec.train, progress, label=spec.name)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        atomic_write(weights, st_save(state))
        info = {"val_acc": result.val_acc, "train_seconds": result.seconds,
                "history": result.history}
        atomic_write(meta, json.dumps(info, indent=1).encode())
    model.eval()
    return Anchor(spec, model, split_model(model), info["val_acc"], info["train_seconds"],
                  recipe(spec, splits))


def build_zoo(zoo: ZooSpec, splits: DataSplits, cache_dir: Path,
              progress: Progress | None = None) -> list[Anchor]:
    """Every anchor of the zoo, ready and in eval mode."""
    return [load_anchor(a, splits, cache_dir, progress) for a in zoo.anchors]
