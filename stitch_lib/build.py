"""From a zoo of anchors to a measured catalog of hybrids.

For every ordered pair of anchors (the ReStNet direction — larger in front — or both):
1. CKA between every pair of body boundaries on calibration images;
2. screen: keep the `screen` shape-feasible points with the highest CKA;
3. rank: initialise each survivor by least squares (under a second) and keep the `top_k` with
   the best validation accuracy — measured here to predict fine-tuned accuracy far better than
   CKA does (DESIGN §3);
4. fine-tune the stitches (`all`, only those on the `frontier`, or `none`: left
   least-squares-initialised and marked so, for the controller to fine-tune on demand);
5. measure accuracy and cost of everything and write the catalog.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from rich.progress import Progress

from .catalog import Catalog, Entry, pareto
from .cka import cka_matrix
from .cost import (compressed_size, flops, fp16_bytes, latencies_ms, model_fp16_bytes,
                   param_count, peak_activation_bytes)
from .data import DataSplits
from .segments import Port, Segment, is_transformer, split_model
from .stitch import Hybrid, Stitch, build_hybrid, feasible_points
from .train import FrontCache, TrainConfig, evaluate, finetune_stitch
from .zoo import Anchor, from_recipe

log = logging.getLogger(__name__)
FINETUNE_MODES = ("all", "frontier", "none")


@dataclass(frozen=True)
class BuildConfig:
    top_k: int = 3  # hybrids kept per ordered anchor pair
    screen: int = 6  # candidates kept by CKA before least-squares ranking
    finetune: str = "frontier"
    directions: str = "both"  # "restnet" (larger model in front only) or "both"
    ft: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=2, lr=1e-3, n_train=10000))
    latency_rounds: int = 30

    def __post_init__(self) -> None:
        if self.finetune not in FINETUNE_MODES:
            raise ValueError(f"finetune must be one of {FINETUNE_MODES}, got {self.finetune!r}")
        if self.directions not in ("restnet", "both"):
            raise ValueError(f"directions must be 'restnet' or 'both', got {self.directions!r}")
        if self.top_k < 1 or self.screen < self.top_k:
            raise ValueError("need 1 <= top_k <= screen")


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman rank correlation (average ranks for ties); nan for fewer than 3 points."""
    if len(a) < 3:
        return float("nan")

    def ranks(v: list[float]) -> torch.Tensor:
        t = torch.tensor(v, dtype=torch.float64)
        return (t[:, None] > t[None]).sum(1) + ((t[:, None] == t[None]).sum(1) - 1) / 2.0

    ra, rb = ranks(a), ranks(b)
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def to_finetune(entries: list[Entry], mode: str) -> set[str]:
    """Names of the hybrids whose stitch `mode` fine-tunes: all of them, none, or those on the
    Pareto frontier of validation accuracy (after LS init) against latency — decided before
    the test split is used."""
    hybrids = [e for e in entries if e.kind == "hybrid"]
    if mode == "none":
        return set()
    if mode == "all":
        return {e.name for e in hybrids}
    by_val = [Entry(**{**vars(e), "test_acc": e.val_acc}) for e in entries]
    return {e.name for e in pareto(by_val) if e.kind == "hybrid"}


def _kind(segments: list[Segment]) -> str:
    return "ViT" if is_transformer(segments) else "CNN"


def _stitch_tensors(h: Hybrid) -> dict[str, torch.Tensor]:
    return {k: v for k, v in h.stitch.state_dict().items()}


def load_anchor_model(entry: Entry, catalog: Catalog) -> torch.nn.Module:
    """An anchor rebuilt from the catalog alone: its recipe plus its hash-checked weights."""
    model = from_recipe(entry.recipe)
    model.load_state_dict(catalog.load_artifact(entry.artifact))
    return model.eval()


def segment_payloads(entry: Entry, catalog: Catalog) -> list[tuple[str, dict, dict]]:
    """An anchor's segments as (segment ID, numpy tensors, metadata) — what a device needs to
    rebuild each one: the recipe, the segment's index, and its weights."""
    segments = split_model(load_anchor_model(entry, catalog))
    return [(s.segment_id(), {k: v.detach().cpu().numpy() for k, v in s.body.state_dict().items()},
             {"recipe": entry.recipe, "index": k, "name": s.name, "anchor": entry.name})
            for k, s in enumerate(segments)]


def load_hybrid(entry: Entry, segments: dict[str, list[Segment]], catalog: Catalog) -> Hybrid:
    """Rebuild a catalog hybrid from its anchors' segments (by anchor name) and its
    (hash-checked) stitch artifact."""
    stitch = Stitch(Port(**entry.ports["src"]), Port(**entry.ports["dst"]))
    stitch.load_state_dict(catalog.load_artifact(entry.artifact))
    h = Hybrid(segments[entry.front], entry.i, stitch, segments[entry.back], entry.j,
               entry.front, entry.back)
    h.freeze_anchors()
    return h.eval()


def _cost(model: torch.nn.Module, x1: torch.Tensor) -> dict:
    return dict(params=param_count(model), flops=flops(model, x1),
                act_peak_bytes=peak_activation_bytes(model, x1),
                model_bytes=model_fp16_bytes(model))


def build_catalog(anchors: list[Anchor], splits: DataSplits, catalog: Catalog,
                  cfg: BuildConfig = BuildConfig(), progress: Progress | None = None,
                  data: dict | None = None) -> Catalog:
    """Rank, build, fine-tune and measure hybrids of `anchors` into `catalog` (saved).
    `data` (the `make_splits` arguments) is kept so stitches can be fine-tuned later."""
    torch.manual_seed(cfg.ft.seed)
    calib, x1 = splits.calib.x, splits.calib.x[:1]
    costs = {a.spec.name: _cost(a.model, x1) for a in anchors}
    pairs = [(a, b) for a in anchors for b in anchors if a is not b and (
        cfg.directions == "both" or costs[a.spec.name]["flops"] > costs[b.spec.name]["flops"])]
    task = progress.add_task("rank stitch points", total=len(pairs)) if progress else None
    hybrids: list[tuple[Hybrid, dict]] = []
    candidates, cka_maps = [], {}
    for a, b in pairs:
        m = cka_matrix(a.segments, b.segments, calib)
        cka_maps[f"{a.spec.name}→{b.spec.name}"] = m.tolist()
        pts = sorted(feasible_points(a.segments, b.segments, calib),
                     key=lambda p: -float(m[p]))[: cfg.screen]
        ranked = []
        for i, j in pts:
            h, fit = build_hybrid(a.segments, i, b.segments, j, calib,
                                  front_name=a.spec.name, back_name=b.spec.name)
            info = dict(cka=float(m[i, j]), ls_val_acc=evaluate(h, splits.val), **fit)
            candidates.append(dict(front=a.spec.name, back=b.spec.name, i=i, j=j, **info))
            ranked.append((h, info))
        ranked.sort(key=lambda r: -r[1]["ls_val_acc"])
        for h, info in ranked[: cfg.top_k]:
            big = costs[a.spec.name]["flops"] >= costs[b.spec.name]["flops"]
            info.update(joint=f"{_kind(a.segments)}→{_kind(b.segments)}",
                        direction="large→small" if big else "small→large")
            hybrids.append((h, info))
        if progress:
            progress.advance(task)

    models = {a.spec.name: a.model for a in anchors} | {h.name: h for h, _ in hybrids}
    lat = latencies_ms(models, x1, rounds=cfg.latency_rounds)
    entries = [Entry(id=a.spec.name, name=a.spec.name, kind="anchor",
                     test_acc=evaluate(a.model, splits.test), val_acc=a.val_acc,
                     latency_ms=lat[a.spec.name], joint=_kind(a.segments),
                     segments=[s.segment_id() for s in a.segments], recipe=a.recipe,
                     artifact=catalog.put_artifact(a.model.state_dict()), **costs[a.spec.name])
                for a in anchors]
    for h, info in hybrids:
        entries.append(Entry(
            id="", name=h.name, kind="hybrid", test_acc=evaluate(h, splits.test),
            latency_ms=lat[h.name], segments=h.segment_ids(), front=h.front_name,
            back=h.back_name, i=h.i, j=h.j, joint=info["joint"], direction=info["direction"],
            cka=info["cka"], ls_val_acc=info["ls_val_acc"], val_acc=info["ls_val_acc"],
            stitch_state="ls", ports={"src": vars(h.stitch.src), "dst": vars(h.stitch.dst)},
            **_cost(h, x1)))
        entries[-1].ls_test_acc = entries[-1].test_acc

    if cfg.finetune != "none":
        chosen = to_finetune(entries, cfg.finetune)
        cache = FrontCache()
        for (h, _), e in zip(hybrids, entries[len(anchors):]):
            if e.name not in chosen:
                continue
            res = finetune_stitch(h, splits, cfg.ft, cache=cache, progress=progress)
            e.val_acc, e.test_acc, e.stitch_state = res.val_acc, evaluate(h, splits.test), "finetuned"

    for (h, _), e in zip(hybrids, entries[len(anchors):]):
        tensors = _stitch_tensors(h)
        e.artifact = catalog.put_artifact(tensors)
        e.delta_bytes = compressed_size(fp16_bytes(tensors))
        e.id = f"h-{e.artifact[:12]}"
    catalog.entries = entries
    catalog.meta = {
        "data": splits.fingerprint, "dataset": data,
        "build": {"top_k": cfg.top_k, "screen": cfg.screen,
                                              "finetune": cfg.finetune},
        "candidates": candidates, "cka": cka_maps,
        "spearman_cka_vs_ls_acc": spearman([c["cka"] for c in candidates],
                                           [c["ls_val_acc"] for c in candidates]),
    }
    catalog.save()
    return catalog
