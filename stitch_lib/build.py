"""From a zoo of anchors to a measured catalog of hybrids.

Where the anchors were trained stitch-aware (`cotrain`), the catalog offers exactly the points
they were trained at: each hybrid starts from its co-trained stitch or from a least-squares
fit, whichever is more accurate on the validation split. Otherwise, for every ordered pair of
anchors (the ReStNet direction — larger in front — or both):
1. CKA between every pair of body boundaries on calibration images;
2. screen: keep the `screen` shape-feasible points with the highest CKA;
3. rank: initialise each survivor by least squares (under a second), fine-tune its stitch for
   the first `rank_steps` steps of its own run and keep the `top_k` with the best validation
   accuracy there (successive halving: a kept point later goes on from there, so only the
   dropped points' steps are the ranking's price). With `rank_steps=0` the least-squares
   start ranks them: free, but it predicts fine-tuned accuracy poorly (docs/results.md,
   "Ranking").
Each stitch is linear plus a zero-initialised residual branch of width `stitch_hidden` (see
`stitch`): the ranking sees exactly the least-squares fit, fine-tuning trains both.
A point that costs more FLOPs than its pair's dearer anchor is dropped (before ranking, for
anchors trained apart, so it never takes a kept place). Then fine-tune the stitches
(`all`, only those on the validation `frontier`, or `none`: left at their start and marked
so, for the controller to fine-tune on demand); measure accuracy (test split) and cost of
everything; record which hybrids are useful and the coverage (`catalog.usefulness`).
"""
from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from rich.progress import Progress

from .assemble import load_anchor_model, segment_payloads  # noqa: F401  (re-exported)
from .catalog import Catalog, Entry, pareto, usefulness
from .cka import cka_matrix
from .cost import (catalog_segment_costs, compressed_size, flops, fp16_bytes, latencies_ms,
                   machine, model_fp16_bytes, param_count, peak_activation_bytes)
from .cotrain import Point
from .data import DataSplits
from .segments import Port, Segment, is_transformer, split_model
from .stitch import MAX_HIDDEN, Hybrid, Stitch, build_hybrid, feasible_points
from .train import FineTune, FrontCache, TrainConfig, evaluate, finetune_stitch
from .zoo import Anchor, Zoo

log = logging.getLogger(__name__)
FINETUNE_MODES = ("all", "frontier", "none")


@dataclass(frozen=True)
class BuildConfig:
    top_k: int = 2  # hybrids kept per ordered anchor pair (anchors trained apart)
    screen: int = 6  # candidates kept by CKA before least-squares ranking
    finetune: str = "all"
    directions: str = "both"  # "restnet" (larger model in front only) or "both"
    # lr 0.01 over 0.003: +1.0 point of validation accuracy (median) on all 11 hybrids of the
    # default catalog, same steps (docs/results.md, "fine-tuning settings"). Every step runs:
    # stopping after 3 validations without gain cut short a good start that the schedule's
    # later steps lift (+0.15 / +1.0 point of validation accuracy, one hybrid in each of two
    # builds; docs/results.md, "Stitch-aware anchors between strong anchors")
    ft: TrainConfig = field(default_factory=lambda: TrainConfig(
        lr=1e-2, steps=600, n_train=10000, patience=None))
    latency_rounds: int = 30
    stitch_hidden: int = 64  # width of each stitch's residual branch; 0 = linear stitches
    # Rank by val acc after this many of each point's `ft` steps (0: by the least-squares
    # start). 158 steps, the run's second validation: the first whose order agreed with the
    # final validation accuracy (Spearman 0.91; 0.50 after 79) in a build ranked at 300 steps
    # (docs/results.md, "A catalog ranked by the first steps of its own fine-tuning")
    rank_steps: int = 158

    def __post_init__(self) -> None:
        if self.finetune not in FINETUNE_MODES:
            raise ValueError(f"finetune must be one of {FINETUNE_MODES}, got {self.finetune!r}")
        if self.rank_steps < 0:
            raise ValueError(f"rank_steps must be >= 0 (0: rank by the least-squares start), "
                             f"got {self.rank_steps}")
        if self.directions not in ("restnet", "both"):
            raise ValueError(f"directions must be 'restnet' or 'both', got {self.directions!r}")
        if self.top_k < 1 or self.screen < self.top_k:
            raise ValueError("need 1 <= top_k <= screen")
        if not 0 <= self.stitch_hidden <= MAX_HIDDEN:
            raise ValueError(f"stitch_hidden must be in [0, {MAX_HIDDEN}] (0: linear "
                             f"stitches), got {self.stitch_hidden}")


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


def load_hybrid(entry: Entry, segments: dict[str, list[Segment]], catalog: Catalog) -> Hybrid:
    """Rebuild a catalog hybrid from its anchors' segments (by anchor name) and its
    (hash-checked) stitch artifact."""
    stitch = Stitch(Port(**entry.ports["src"]), Port(**entry.ports["dst"]), entry.stitch_hidden)
    stitch.load_state_dict(catalog.load_artifact(entry.artifact))
    h = Hybrid(segments[entry.front], entry.i, stitch, segments[entry.back], entry.j,
               entry.front, entry.back)
    h.freeze_anchors()
    return h.eval()


def _cost(model: torch.nn.Module, x1: torch.Tensor) -> dict:
    return dict(params=param_count(model), flops=flops(model, x1),
                act_peak_bytes=peak_activation_bytes(model, x1),
                model_bytes=model_fp16_bytes(model))


def _wire_size(tensors: dict[str, torch.Tensor]) -> int:
    return compressed_size(fp16_bytes(tensors))


def _affordable(h: Hybrid, max_flops: int, x1: torch.Tensor) -> bool:
    """Whether `h` costs no more FLOPs than its pair's dearer anchor (else logged, dropped)."""
    if (n := flops(h, x1)) <= max_flops:
        return True
    log.info("dropped %s: %d FLOPs, more than its dearer anchor", h.name, n)
    return False


def _ranked_points(a: Anchor, b: Anchor, splits: DataSplits, cfg: BuildConfig,
                   m: torch.Tensor, candidates: list[dict], teacher: torch.nn.Module | None,
                   max_flops: int, device: torch.device | str) -> list[tuple[Hybrid, dict]]:
    """Anchors trained apart: CKA screen, then the top-k by least-squares validation accuracy,
    or by validation accuracy after the first `cfg.rank_steps` steps of each point's own
    stitch fine-tuning (`cfg.ft`), which a kept point later resumes (its `info["run"]`).
    A point dearer than `max_flops` (the pair's dearer anchor) is never ranked."""
    calib = splits.calib.x
    pts = sorted(feasible_points(a.segments, b.segments, calib),
                 key=lambda p: -float(m[p]))[: cfg.screen]
    ranked, cache = [], FrontCache()  # this pair's fronts, for the short fine-tunings
    for i, j in pts:
        h, fit = build_hybrid(a.segments, i, b.segments, j, calib, hidden=cfg.stitch_hidden,
                              front_name=a.spec.name, back_name=b.spec.name)
        if not _affordable(h, max_flops, calib[:1]):  # it would take a kept place, then go
            continue
        info = dict(cka=float(m[i, j]), ls_val_acc=evaluate(h, splits.val), **fit)
        info.update(init="ls", init_val_acc=info["ls_val_acc"], rank_val_acc=info["ls_val_acc"])
        if cfg.rank_steps:  # the first steps of the point's own fine-tuning, paused
            start = copy.deepcopy(h.stitch.state_dict())
            run = FineTune(h, splits, cfg.ft, cache=cache, teacher=teacher, device=device)
            info.update(rank_val_acc=run.advance(cfg.rank_steps), rank_seconds=run.seconds)
        candidates.append(dict(front=a.spec.name, back=b.spec.name, i=i, j=j, **info))
        if cfg.rank_steps:  # a kept point's fine-tuning goes on from here, if it is chosen
            info["run"] = run.pause(start)
        ranked.append((h, info))
    ranked.sort(key=lambda r: -r[1]["rank_val_acc"])
    return ranked[: cfg.top_k]


def _cotrained_point(a: Anchor, b: Anchor, p: Point, stitch: Stitch, splits: DataSplits,
                     cfg: BuildConfig, m: torch.Tensor,
                     candidates: list[dict]) -> tuple[Hybrid, dict]:
    """A co-trained point: its co-trained stitch or a least-squares fit, whichever is more
    accurate on the validation split. Either gets the build's zero-initialised residual branch
    (`cfg.stitch_hidden`, unless the co-trained stitch has one), which changes nothing until
    fine-tuning trains it."""
    hidden = stitch.hidden or cfg.stitch_hidden
    h, fit = build_hybrid(a.segments, p.i, b.segments, p.j, splits.calib.x,
                          hidden=hidden, front_name=a.spec.name, back_name=b.spec.name)
    ls_acc = evaluate(h, splits.val)
    ls_state = copy.deepcopy(h.stitch.state_dict())
    h.stitch.load_state_dict(ls_state | stitch.state_dict())  # the branch stays at zero
    co_acc = evaluate(h, splits.val)
    if ls_acc > co_acc:
        h.stitch.load_state_dict(ls_state)
    info = dict(cka=float(m[p.i, p.j]), ls_val_acc=ls_acc, cotrained_val_acc=co_acc,
                init="ls" if ls_acc > co_acc else "co-trained", init_val_acc=max(ls_acc, co_acc),
                rank_val_acc=max(ls_acc, co_acc),
                **fit)
    candidates.append(dict(front=p.front, back=p.back, i=p.i, j=p.j, **info))
    return h, info


def build_catalog(zoo: Zoo | list[Anchor], splits: DataSplits, catalog: Catalog,
                  cfg: BuildConfig = BuildConfig(), progress: Progress | None = None,
                  data: dict | None = None,
                  delta_size: Callable[[dict[str, torch.Tensor]], int] = _wire_size,
                  device: torch.device | str = "cpu") -> Catalog:
    """Rank, build, fine-tune and measure hybrids of the zoo's anchors into `catalog` (saved).
    `data` (the `make_splits` arguments) is kept so stitches can be fine-tuned later;
    `delta_size` measures a stitch as the wire ships it. Stitches fine-tune on `device`;
    CKA, least-squares fits, accuracy and costs are measured on the CPU."""
    zoo = zoo if isinstance(zoo, Zoo) else Zoo(list(zoo))
    anchors = zoo.anchors
    torch.manual_seed(cfg.ft.seed)
    calib, x1 = splits.calib.x, splits.calib.x[:1]
    costs = {a.spec.name: _cost(a.model, x1) for a in anchors}
    by_name = {a.spec.name: a for a in anchors}
    if zoo.stitches:
        pairs = sorted({(p.front, p.back) for p in zoo.stitches})
    else:
        pairs = [(a.spec.name, b.spec.name) for a in anchors for b in anchors if a is not b and (
            cfg.directions == "both" or costs[a.spec.name]["flops"] > costs[b.spec.name]["flops"])]
    teacher = max(anchors, key=lambda a: a.val_acc).model if cfg.ft.distill > 0 else None
    task = progress.add_task("rank stitch points", total=len(pairs)) if progress else None
    hybrids: list[tuple[Hybrid, dict]] = []
    candidates, cka_maps = [], {}
    for fa, fb in pairs:
        a, b = by_name[fa], by_name[fb]
        m = cka_matrix(a.segments, b.segments, calib)
        cka_maps[f"{fa}→{fb}"] = m.tolist()
        max_flops = max(costs[fa]["flops"], costs[fb]["flops"])
        if zoo.stitches:
            kept = [_cotrained_point(a, b, p, st, splits, cfg, m, candidates)
                    for p, st in sorted(zoo.stitches.items()) if (p.front, p.back) == (fa, fb)]
            kept = [(h, info) for h, info in kept if _affordable(h, max_flops, x1)]
        else:
            kept = _ranked_points(a, b, splits, cfg, m, candidates, teacher, max_flops, device)
        for h, info in kept:
            big = costs[fa]["flops"] >= costs[fb]["flops"]
            info.update(joint=f"{_kind(a.segments)}→{_kind(b.segments)}",
                        direction="large→small" if big else "small→large")
            info.update(_cost(h, x1))
            hybrids.append((h, info))
        log.info("ranked %s→%s: kept %d points", fa, fb, len(kept))
        if progress:
            progress.advance(task)

    models = {a.spec.name: a.model for a in anchors} | {h.name: h for h, _ in hybrids}
    lat = latencies_ms(models, x1, rounds=cfg.latency_rounds)
    entries = [Entry(id=a.spec.name, name=a.spec.name, kind="anchor",
                     test_acc=evaluate(a.model, splits.test), val_acc=a.val_acc,
                     latency_ms=lat[a.spec.name], joint=_kind(a.segments),
                     segments=[s.segment_id() for s in a.segments], recipe=a.recipe,
                     training=a.training,
                     artifact=catalog.put_artifact(a.model.state_dict()), **costs[a.spec.name])
               for a in anchors]
    cost_keys = ("params", "flops", "act_peak_bytes", "model_bytes")
    for h, info in hybrids:
        entries.append(Entry(
            id="", name=h.name, kind="hybrid", test_acc=evaluate(h, splits.test),
            latency_ms=lat[h.name], segments=h.segment_ids(), front=h.front_name,
            back=h.back_name, i=h.i, j=h.j, joint=info["joint"], direction=info["direction"],
            cka=info["cka"], ls_val_acc=info["ls_val_acc"], val_acc=info["init_val_acc"],
            rank_val_acc=info["rank_val_acc"],
            init=info["init"], init_val_acc=info["init_val_acc"], stitch_state="ls",
            ports={"src": vars(h.stitch.src), "dst": vars(h.stitch.dst)},
            stitch_hidden=h.stitch.hidden,
            **{k: info[k] for k in cost_keys}))
        entries[-1].ls_test_acc = entries[-1].test_acc

    if cfg.finetune != "none":
        chosen = to_finetune(entries, cfg.finetune)
        cache = FrontCache()
        for (h, info), e in zip(hybrids, entries[len(anchors):]):
            if e.name not in chosen:
                continue
            res = info["run"].result() if "run" in info else finetune_stitch(
                h, splits, cfg.ft, cache=cache, teacher=teacher, progress=progress,
                device=device)
            e.val_acc, e.stitch_state, e.finetune_seconds = res.val_acc, "finetuned", res.seconds
            e.finetune_curve = res.history
            log.info("fine-tuned %s: val %.4f -> %.4f in %.1f s", e.name, e.init_val_acc,
                     res.val_acc, res.seconds)

    for (h, _), e in zip(hybrids, entries[len(anchors):]):
        h.stitch.round_to_wire()  # measured, stored and sized as a deployment carries it
        e.test_acc = evaluate(h, splits.test)
        tensors = _stitch_tensors(h)
        e.artifact = catalog.put_artifact(tensors)
        e.delta_bytes = delta_size(tensors)
        e.id = f"h-{e.artifact[:12]}"
    seg_costs = catalog_segment_costs({a.spec.name: a.segments for a in anchors},
                                      [h for h, _ in hybrids], x1, rounds=cfg.latency_rounds)
    for e in entries:
        e.segment_costs = seg_costs[e.name]
    catalog.entries = entries
    tuned = [e for e in entries if e.stitch_state == "finetuned"]
    catalog.meta = {
        "data": splits.fingerprint, "dataset": data,
        "build": {"top_k": cfg.top_k, "screen": cfg.screen, "finetune": cfg.finetune,
                  "stitch_hidden": cfg.stitch_hidden, "rank_steps": cfg.rank_steps,
                  "ft": dataclasses.asdict(cfg.ft),
                  "anchors": "stitch-aware" if zoo.stitches else "apart",
                  "device": torch.device(device).type},
        "anchor_training": zoo.info,
        "candidates": candidates, "cka": cka_maps,
        "spearman_cka_vs_ls_acc": spearman([c["cka"] for c in candidates],
                                           [c["ls_val_acc"] for c in candidates]),
        "spearman_init_val_vs_test": spearman([e.init_val_acc for e in tuned],
                                              [e.test_acc for e in tuned]),
        "spearman_rank_val_vs_test": spearman([e.rank_val_acc for e in tuned],
                                              [e.test_acc for e in tuned]),
        "usefulness": usefulness(entries),
        "machine": machine(),
    }
    catalog.save()
    return catalog
