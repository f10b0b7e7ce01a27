"""Stitch-aware anchor training: every anchor of a zoo trained in one loop, each step also
through one sampled stitch between two of them (SN-Net's joint recipe), so that the anchors
learn representations that stitch. Afterwards the anchors are frozen and every hybrid, built
now or fine-tuned on demand, is stitch-only (ReStNet's recipe): a deployment still carries only
stitch tensors plus segment IDs.

Why: anchors trained apart from scratch did not stitch well enough for a stitch-only fix to
beat them (DESIGN §3, research/stitch-aware-trial.md). Three details matter:
- every anchor sees the same batches for the same number of steps: one budget rule;
- the back anchor's BatchNorm runs in eval mode on the hybrid path, so its running statistics
  stay its own (statistics shared with hybrids collapsed the small anchor in the trial);
- the points trained are the points the catalog offers (`plan_points` picks them before
  training), since cuts never seen in training stitch worse.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from rich.progress import Progress
from torch import nn

from .cost import flops
from .data import DataSplits
from .segments import Port, Segment
from .stitch import Hybrid, Stitch, boundary_outputs, can_stitch
from .train import TrainConfig, _cosine, _step, _subset, augment, distill_loss, evaluate

log = logging.getLogger(__name__)


@dataclass(frozen=True, order=True)
class Point:
    """A stitch point: front boundary `i` of anchor `front` into back boundary `j` of `back`."""

    front: str
    i: int
    back: str
    j: int

    @property
    def key(self) -> str:
        """A name usable as a module or tensor-name prefix."""
        return f"{self.front}@{self.i}>{self.back}@{self.j}"

    @classmethod
    def parse(cls, key: str) -> "Point":
        (front, i), (back, j) = (part.rsplit("@", 1) for part in key.split(">", 1))
        return cls(front, int(i), back, int(j))


@dataclass(frozen=True)
class Layout:
    """What `plan_points` needs of an anchor: the port and the cumulative FLOPs at each
    segment boundary (the last boundary is the logits, so `flops[-1]` is the whole model's)."""

    ports: tuple[Port, ...]
    flops: tuple[int, ...]

    @classmethod
    def of(cls, segments: list[Segment], x1: torch.Tensor) -> "Layout":
        outs = boundary_outputs(segments, x1[:2])
        cum = tuple(flops(nn.Sequential(*segments[: k + 1]), x1[:1]) for k in range(len(segments)))
        return cls(tuple(s.port(o) for s, o in zip(segments, outs)), cum)

    def depth(self, k: int) -> float:
        """How far into the body boundary `k` lies, from 1/body to 1."""
        return (k + 1) / (len(self.ports) - 1)


def hybrid_flops(front: Layout, i: int, back: Layout, j: int) -> int:
    """The FLOPs of front[:i+1] + back[j+1:], the stitch left out (it is tiny)."""
    return front.flops[i] + back.flops[-1] - back.flops[j]


def plan_points(layouts: dict[str, Layout]) -> list[Point]:
    """The stitch points to train and offer: for every ordered pair whose front anchor costs
    more (ReStNet's direction) and every front body boundary, the back boundary whose grid is
    closest to the front's (ties: the closest relative depth), kept when the hybrid costs less
    than its front anchor. Pure: a function of the architectures only."""
    points = []
    for a, la in layouts.items():
        for b, lb in layouts.items():
            if a == b or la.flops[-1] <= lb.flops[-1]:
                continue
            for i in range(len(la.ports) - 1):
                js = [j for j in range(len(lb.ports) - 2) if can_stitch(la.ports[i], lb.ports[j])]
                if not js:
                    continue

                def mismatch(j: int) -> tuple[float, float]:
                    (h1, w1), (h2, w2) = la.ports[i].grid, lb.ports[j].grid
                    return abs(math.log(h1 * w1 / (h2 * w2))), abs(la.depth(i) - lb.depth(j))

                j = min(js, key=mismatch)
                if hybrid_flops(la, i, lb, j) < la.flops[-1]:
                    points.append(Point(a, i, b, j))
    return sorted(points)


@dataclass(frozen=True)
class StitchAware:
    """How the anchors are trained with stitches in the loop (the zoo's `stitch_aware`)."""

    weight: float = 0.5  # the hybrid's loss against each anchor's own (which weighs 1)
    distill: float = 0.5  # the share of the hybrid's loss that is distillation from the teacher
    temperature: float = 4.0
    teacher: str | None = None  # default: the anchor with the most FLOPs
    hybrids_per_step: int = 1
    back_learns: bool = True  # False: the hybrid's loss trains the front and the stitch only

    def __post_init__(self) -> None:
        if not 0 < self.weight <= 4 or not 0 <= self.distill <= 1 or self.temperature <= 0:
            raise ValueError("stitch_aware needs 0 < weight <= 4, 0 <= distill <= 1 and "
                             "temperature > 0")
        if self.hybrids_per_step < 1:
            raise ValueError("stitch_aware.hybrids_per_step must be >= 1")


@dataclass
class CoTrained:
    """The result: anchors trained in place, plus the stitches trained with them."""

    stitches: dict[Point, Stitch]
    val_acc: dict[str, float]  # each anchor's, after training
    stitch_val_acc: dict[Point, float]  # each co-trained hybrid's, after training
    seconds: float
    history: dict[str, list[float]] = field(default_factory=dict)


def make_stitches(segments: dict[str, list[Segment]], points: list[Point],
                  example: torch.Tensor) -> dict[Point, Stitch]:
    """A freshly initialised stitch for every point (ports read from an example batch)."""
    with torch.no_grad():
        outs = {n: boundary_outputs(segs, example[:2]) for n, segs in segments.items()}
    return {p: Stitch(segments[p.front][p.i].port(outs[p.front][p.i]),
                      segments[p.back][p.j].port(outs[p.back][p.j])) for p in points}


def _tail(segments: list[Segment], j: int, x: torch.Tensor, learns: bool = True) -> torch.Tensor:
    """The back anchor's rest on a hybrid's activation, its normalisation statistics left
    untouched (eval mode); gradients flow to `x`, and into the back's weights when `learns`."""
    modes = [s.training for s in segments]
    for s in segments[j + 1:]:
        s.eval()
    try:
        for s in segments[j + 1:]:
            if learns:
                x = s(x)
            else:
                frozen = {k: v.detach() for k, v in s.state_dict(keep_vars=True).items()}
                x = torch.func.functional_call(s, frozen, (x,))
    finally:
        for s, m in zip(segments, modes):
            s.train(m)
    return x


def cotrain(segments: dict[str, list[Segment]], splits: DataSplits, cfgs: dict[str, TrainConfig],
            sa: StitchAware, points: list[Point], progress: Progress | None = None,
            device: torch.device | str = "cpu") -> CoTrained:
    """Train every anchor (given as its segments) from its current weights in one loop:
    each step, every anchor's cross-entropy on the same augmented batch, plus `sa.weight`
    times the loss of `sa.hybrids_per_step` sampled stitched hybrids (cross-entropy mixed with
    distillation from the teacher anchor). `cfgs` holds each anchor's optimiser settings;
    they share one budget (epochs, n_train, batch size, augmentation, seed). Trains on
    `device`; anchors and stitches are back on the CPU when it returns."""
    if not points:
        raise ValueError("stitch-aware training needs at least one stitch point; the zoo's "
                         "anchors offer none (are their grids more than 2x apart?)")
    names = list(segments)
    budget = cfgs[names[0]]
    teacher = sa.teacher or max(names, key=lambda n: flops(nn.Sequential(*segments[n]),
                                                            splits.calib.x[:1]))
    if teacher not in segments:
        raise ValueError(f"stitch_aware.teacher {teacher!r} is not an anchor; have {names}")
    torch.manual_seed(budget.seed)
    stitches = nn.ModuleDict({p.key: s for p, s in
                              make_stitches(segments, points, splits.calib.x).items()})
    models = {n: nn.Sequential(*segments[n]).to(device) for n in names}
    stitches.to(device)
    groups = [{"params": list(models[n].parameters()), "lr": cfgs[n].lr,
               "weight_decay": cfgs[n].weight_decay} for n in names]
    groups.append({"params": list(stitches.parameters()), "lr": budget.lr, "weight_decay": 0.0})
    for m in models.values():
        m.requires_grad_(True)
    opt = torch.optim.AdamW(groups)
    train = _subset(splits.train, budget.n_train, budget.seed)
    steps = budget.epochs * math.ceil(len(train) / budget.batch_size)
    sched = _cosine(opt, steps, warmup=max(1, steps // 20))
    g = torch.Generator().manual_seed(budget.seed)
    task = progress.add_task(f"train {len(names)} anchors + {len(points)} stitches together",
                             total=steps) if progress else None
    t0, history = time.perf_counter(), {n: [] for n in names}
    try:
        for epoch in range(budget.epochs):
            for m in (*models.values(), stitches):
                m.train()
            for x, y in train.batches(budget.batch_size, shuffle=True, seed=budget.seed + epoch):
                xa, y = augment(x, g, budget.augment).to(device), y.to(device)
                bounds, loss = {}, torch.zeros((), device=device)
                for n in names:
                    h, bounds[n] = xa, []
                    for s in segments[n]:
                        h = s(h)
                        bounds[n].append(h)
                    loss = loss + F.cross_entropy(h, y, label_smoothing=0.1)
                target = bounds[teacher][-1].detach()
                for k in torch.randint(len(points), (sa.hybrids_per_step,), generator=g).tolist():
                    p = points[k]
                    logits = _tail(segments[p.back], p.j, stitches[p.key](bounds[p.front][p.i]),
                                   sa.back_learns)
                    hybrid_loss = ((1 - sa.distill) * F.cross_entropy(logits, y)
                                   + sa.distill * distill_loss(logits, target, sa.temperature))
                    loss = loss + sa.weight * hybrid_loss / sa.hybrids_per_step
                _step(loss, opt, sched, progress, task)
            for n in names:
                history[n].append(evaluate(models[n], splits.val))
            log.info("stitch-aware epoch %d: %s", epoch + 1,
                     ", ".join(f"{n} {history[n][-1]:.4f}" for n in names))
        for m in (*models.values(), stitches):
            m.eval()
            m.requires_grad_(False)
        stitch_map = {p: stitches[p.key] for p in points}
        stitch_acc = {p: evaluate(Hybrid(segments[p.front], p.i, s, segments[p.back], p.j),
                                  splits.val) for p, s in stitch_map.items()}
    finally:  # on the CPU again, even when training fails
        for m in (*models.values(), stitches):
            m.to("cpu")
    return CoTrained(stitch_map, {n: history[n][-1] for n in names}, stitch_acc,
                     time.perf_counter() - t0, history)
