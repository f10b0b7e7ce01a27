"""The anchor zoo: timm models named in a small spec, loaded from a local checkpoint or trained
on the dataset, and cached by content hash so the next run reuses them.

Every anchor trains under one budget rule (the zoo's `train:` — epochs, images, batch size,
augmentation — shared by all; an anchor may set only its own optimiser settings). With
`stitch_aware:` the anchors train together with stitches in the loop (`cotrain`), from scratch
or from a user's checkpoints, and new anchor weights are written; without it, each trains
apart, or a checkpoint is used frozen as given (pure ReStNet). The catalog records which."""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import timm
import torch
from rich.progress import Progress
from safetensors.torch import load as st_load
from safetensors.torch import load_file
from safetensors.torch import save as st_save
from torch import nn

from .assemble import from_recipe
from .cotrain import Layout, Point, StitchAware, cotrain, make_stitches, plan_points
from .data import DataSplits
from .files import atomic_write
from .segments import Segment, split_model
from .stitch import Stitch
from .train import TrainConfig, evaluate, train_anchor

BUDGET_KEYS = ("epochs", "n_train", "batch_size", "steps", "augment", "seed")
# how an anchor's initial weights are drawn, part of its cache key: from `train.seed` (before
# this, from the process's unseeded RNG, so the first anchor of a build retrained to different
# weights under one key)
INIT = "seeded"
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
    n_calib: int | None = None  # None: sized from the data (see data.split_sizes)
    n_val: int | None = None
    n_test: int | None = None
    seed: int = 0
    train: TrainConfig | None = None  # the budget every anchor trains under
    stitch_aware: StitchAware | None = None  # train the anchors with stitches in the loop

    @classmethod
    def from_dict(cls, d: dict[str, Any], base: Path | None = None) -> "ZooSpec":
        """Validate a parsed zoo file; errors name the offending key. A relative `dataset`
        path is taken from `base` (the zoo file's folder)."""
        if not isinstance(d, dict) or not d.get("anchors"):
            raise ValueError("a zoo spec needs a non-empty 'anchors' list")
        d = dict(d)
        budget = _from_dict(TrainConfig, d["train"], "train") if d.get("train") else None
        anchors = []
        for k, a in enumerate(d["anchors"]):
            if not isinstance(a, dict):
                raise ValueError(f"anchors[{k}] must be a mapping with 'name' and 'model'")
            a, own = dict(a), dict(a.get("train") or {})
            if budget is not None:
                shared = sorted(set(own) & set(BUDGET_KEYS))
                if shared:
                    raise ValueError(f"anchors[{k}].train: {shared} belong to the zoo's `train:` "
                                     "(one budget for every anchor); an anchor may set only "
                                     "lr, weight_decay, patience and distill")
                _from_dict(TrainConfig, own, f"anchors[{k}].train")  # names the bad key
                a["train"] = replace(budget, **own)
            else:
                a["train"] = _from_dict(TrainConfig, own, f"anchors[{k}].train")
            anchors.append(_from_dict(AnchorSpec, a, f"anchors[{k}]"))
        if len({a.name for a in anchors}) != len(anchors):
            raise ValueError("anchor names must be unique")
        sa = d.get("stitch_aware")
        if sa is True:
            sa = {}
        if sa not in (None, False):
            if budget is None:
                raise ValueError("stitch_aware trains every anchor in one loop, so the zoo needs "
                                 "one budget: add `train: {epochs: 3, n_train: 40000}` at the "
                                 "top level of the zoo file")
            d["stitch_aware"] = _from_dict(StitchAware, sa, "stitch_aware")
        else:
            d["stitch_aware"] = None
        source = d.get("dataset", "fashion-mnist")
        if base is not None and source != "fashion-mnist" and not Path(source).is_absolute():
            d["dataset"] = str((base / source).resolve())
        return _from_dict(cls, {**d, "anchors": tuple(anchors), "train": budget}, "zoo")


@dataclass
class Anchor:
    """A ready anchor: the model (eval mode), its segments and its measured accuracy."""

    spec: AnchorSpec
    model: nn.Module
    segments: list[Segment]
    val_acc: float
    train_seconds: float
    recipe: dict[str, Any]  # how to create the model skeleton: see `recipe`
    training: str = "apart"  # "apart", "checkpoint" (frozen as given) or "stitch-aware"


@dataclass
class Zoo:
    """The ready anchors, plus the stitches trained with them (none when trained apart)."""

    anchors: list[Anchor]
    stitches: dict[Point, Stitch] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)  # what the training measured


def recipe(spec: AnchorSpec, splits: DataSplits) -> dict[str, Any]:
    """Everything `timm.create_model` needs to rebuild the anchor's architecture."""
    return {"model": spec.model, "kwargs": dict(spec.kwargs),
            "num_classes": splits.num_classes, "in_chans": splits.in_chans}


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
    with torch.random.fork_rng(devices=[]):  # initial weights from the anchor's seed alone
        torch.manual_seed(spec.train.seed)
        return from_recipe(recipe(spec, splits)).train()


def _provenance(specs: list[AnchorSpec], device: torch.device | str = "cpu") -> dict[str, Any]:
    """What else decides trained weights: library versions, CPU threads (they change the
    order of float sums), the content of every checkpoint started from, how initial
    weights are drawn (`INIT`), and the device unless it is the CPU (a GPU's kernels sum in
    another order; CPU keys stay as they were before devices)."""
    ckpts = {s.name: hashlib.sha256(Path(s.checkpoint).read_bytes()).hexdigest()
             for s in specs if s.checkpoint}
    prov = {"timm": timm.__version__, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "checkpoints": ckpts, "init": INIT}
    kind = torch.device(device).type
    if kind != "cpu":
        prov["device"] = f"{kind}:{torch.cuda.get_device_name(device)}" if kind == "cuda" else kind
    return prov


def cache_key(spec: AnchorSpec, splits: DataSplits, device: torch.device | str = "cpu") -> str:
    """Content hash of everything that determines a trained anchor's weights."""
    blob = json.dumps({"spec": asdict(spec), "data": splits.fingerprint,
                       **_provenance([spec], device)}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _state(model: nn.Module) -> bytes:
    return st_save({k: v.contiguous() for k, v in model.state_dict().items()})


def load_anchor(spec: AnchorSpec, splits: DataSplits, cache_dir: Path,
                progress: Progress | None = None, device: torch.device | str = "cpu") -> Anchor:
    """The anchor trained apart: from its checkpoint (frozen as given), from the cache, or
    trained now on `device` and cached."""
    model = create(spec, splits)
    if spec.checkpoint:
        r = recipe(spec, splits)
        return Anchor(spec, model.eval(), split_model(model, r), evaluate(model, splits.val),
                      0.0, r, "checkpoint")
    cache_dir.mkdir(parents=True, exist_ok=True)
    stem = cache_dir / f"{spec.name}-{cache_key(spec, splits, device)}"
    weights, meta = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    if weights.is_file() and meta.is_file():
        model.load_state_dict(load_file(weights))
        info = json.loads(meta.read_text())
        log.info("anchor %s: reused %s", spec.name, weights)
    else:
        result = train_anchor(model, splits, spec.train, progress, label=spec.name,
                              device=device)
        blob = _state(model)
        atomic_write(weights, blob)
        info = {"val_acc": result.val_acc, "train_seconds": result.seconds,
                "history": result.history, "weights_sha256": hashlib.sha256(blob).hexdigest()}
        atomic_write(meta, json.dumps(info, indent=1).encode())
    model.eval()
    r = recipe(spec, splits)
    return Anchor(spec, model, split_model(model, r), info["val_acc"], info["train_seconds"], r)


def _stitch_aware(zoo: ZooSpec, splits: DataSplits, cache_dir: Path,
                  progress: Progress | None, device: torch.device | str) -> Zoo:
    """Every anchor trained together with stitches (see `cotrain`), or reused from the cache
    when the same zoo was trained on the same data before."""
    specs = list(zoo.anchors)
    models = {s.name: create(s, splits).eval() for s in specs}  # cotrain sets train mode
    segments = {s.name: split_model(models[s.name], recipe(s, splits)) for s in specs}
    points = plan_points({n: Layout.of(segs, splits.calib.x) for n, segs in segments.items()})
    blob = json.dumps({"zoo": asdict(zoo), "data": splits.fingerprint,
                       **_provenance(specs, device)}, sort_keys=True, default=str)
    root = cache_dir / f"stitch-aware-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"
    meta = root / "meta.json"
    if meta.is_file():
        info = json.loads(meta.read_text())
        for n, m in models.items():
            m.load_state_dict(load_file(root / f"{n}.safetensors"))
        stitches = make_stitches(segments, points, splits.calib.x)
        saved = st_load((root / "stitches.safetensors").read_bytes())
        for p, st in stitches.items():
            st.load_state_dict({k.split("/", 1)[1]: v for k, v in saved.items()
                                if k.split("/", 1)[0] == p.key})
        log.info("stitch-aware zoo: reused %s", root)
    else:
        res = cotrain(segments, splits, {s.name: s.train for s in specs}, zoo.stitch_aware,
                      points, progress, device)
        stitches = res.stitches
        sums = {}
        for n, m in models.items():
            data = _state(m)
            atomic_write(root / f"{n}.safetensors", data)
            sums[n] = hashlib.sha256(data).hexdigest()
        atomic_write(root / "stitches.safetensors", st_save(
            {f"{p.key}/{k}": v.contiguous() for p, st in stitches.items()
             for k, v in st.state_dict().items()}))
        info = {"val_acc": res.val_acc, "seconds": res.seconds, "history": res.history,
                "stitch_val_acc": {p.key: a for p, a in res.stitch_val_acc.items()},
                "weights_sha256": sums, "provenance": _provenance(specs, device)}
        atomic_write(meta, json.dumps(info, indent=1).encode())
    anchors = [Anchor(s, models[s.name].eval(), segments[s.name], info["val_acc"][s.name],
                      info["seconds"], recipe(s, splits), "stitch-aware") for s in specs]
    return Zoo(anchors, stitches, info)


def build_zoo(zoo: ZooSpec, splits: DataSplits, cache_dir: Path,
              progress: Progress | None = None, device: torch.device | str = "cpu") -> Zoo:
    """Every anchor of the zoo, ready, on the CPU and in eval mode, with its co-trained
    stitches; anchors not in the cache train on `device`."""
    if zoo.stitch_aware is not None:
        return _stitch_aware(zoo, splits, cache_dir, progress, device)
    return Zoo([load_anchor(a, splits, cache_dir, progress, device) for a in zoo.anchors])
