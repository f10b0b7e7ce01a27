"""Training loops: anchors from scratch, stitch-only fine-tuning, full fine-tuning, evaluation.

Stitch-only fine-tuning trains the stitch's parameters and nothing else; the anchors are
frozen AND in eval mode, so their weights and BatchNorm statistics stay bit-identical. Since the
frozen front is deterministic, its outputs on the training data are computed once and reused
across epochs (and across every stitch with the same cut, through `FrontCache`).
Every loop trains on the CPU unless given a `device` (`resolve_device`: "cpu", "cuda" or
"auto"); models go back to the CPU when it ends, and data is moved a batch at a time.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from rich.progress import Progress
from torch import nn

from .data import DataSplits, Split
from .stitch import Hybrid

log = logging.getLogger(__name__)
AUGMENTS = ("shift-flip", "shift", "none")
DEVICES = ("cpu", "cuda", "auto")


def resolve_device(name: str) -> torch.device:
    """The torch device for "cpu", "cuda" or "auto" (CUDA when this torch sees a GPU, else the
    CPU); ValueError, saying what to pass instead, for CUDA without a GPU or another name."""
    if name not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {name!r}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda': this torch sees no CUDA GPU "
                         "(torch.cuda.is_available() is False); use 'cpu' or 'auto'")
    return torch.device(name)


def device_of(module: nn.Module) -> torch.device:
    """Where `module`'s parameters are (the CPU for a module without any)."""
    return next(module.parameters(), torch.empty(0)).device


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings shared by every loop here."""

    epochs: int = 3
    lr: float = 2e-3
    batch_size: int = 128
    weight_decay: float = 0.05
    n_train: int | None = None  # train on a seeded subset of this size
    # fine-tuning: validations without gain before stopping; None: every step runs (the best
    # validation state is kept either way)
    patience: int | None = 1
    distill: float = 0.0  # weight of distillation from a teacher, 0 = off
    steps: int | None = None  # fine-tuning: optimiser steps, whatever the data size (not epochs)
    augment: str = "shift-flip"  # "shift-flip", "shift" (digits, text: no flips) or "none"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("TrainConfig needs epochs >= 1, batch_size >= 1 and lr > 0")
        if not 0 <= self.distill <= 1:
            raise ValueError(f"distill is a loss weight in [0, 1], got {self.distill}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1 (or left out for epochs), got {self.steps}")
        if self.patience is not None and self.patience < 0:
            raise ValueError(f"patience must be >= 0 (or None: never stop early), "
                             f"got {self.patience}")
        if self.augment not in AUGMENTS:
            raise ValueError(f"augment must be one of {AUGMENTS}, got {self.augment!r}")


@dataclass
class TrainResult:
    val_acc: float
    epochs_run: int  # validations run: one per epoch, or per `steps // 4` when steps is set
    seconds: float
    history: list[float] = field(default_factory=list)  # validation accuracy per epoch run


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, batch_size: int = 512) -> float:
    """Top-1 accuracy of `model` on `split` (run where the model is); leaves it in eval mode."""
    model.eval()
    dev = device_of(model)
    correct = sum(int((model(x.to(dev)).argmax(1).cpu() == y.cpu()).sum())
                  for x, y in split.batches(batch_size))
    return correct / len(split)


def _subset(split: Split, n: int | None, seed: int) -> Split:
    if n is None or n >= len(split):
        return split
    idx = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))[:n]
    return Split(split.x[idx], split.y[idx])


def augment(x: torch.Tensor, g: torch.Generator, kind: str = "shift-flip") -> torch.Tensor:
    """Random shift by up to 2 pixels (one per batch) and, for "shift-flip", per-image
    horizontal flips (wrong for digits and text: use "shift" there)."""
    if kind == "none":
        return x
    dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=g))
    x = torch.roll(F.pad(x, (2, 2, 2, 2)), shifts=(dy, dx), dims=(2, 3))[..., 2:-2, 2:-2]
    if kind == "shift":
        return x
    flip = torch.rand(len(x), generator=g) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def distill_loss(logits: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL divergence to a teacher's softened predictions, scaled by T² (Hinton et al.)."""
    t = temperature
    return F.kl_div(F.log_softmax(logits / t, 1), F.softmax(teacher / t, 1),
                    reduction="batchmean") * t * t


def _cosine(opt: torch.optim.Optimizer, total: int, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _step(loss: torch.Tensor, opt: torch.optim.Optimizer, sched, progress: Progress | None,
          task) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
    if progress:
        progress.advance(task)


def train_anchor(model: nn.Module, splits: DataSplits, cfg: TrainConfig,
                 progress: Progress | None = None, label: str = "anchor",
                 device: torch.device | str = "cpu") -> TrainResult:
    """Train a whole model from scratch (cross-entropy, AdamW, cosine schedule) on `device`;
    the model is back on the CPU when it returns."""
    torch.manual_seed(cfg.seed)
    model.to(device)
    try:
        train = _subset(splits.train, cfg.n_train, cfg.seed)
        steps = cfg.epochs * math.ceil(len(train) / cfg.batch_size)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = _cosine(opt, steps, warmup=max(1, steps // 20))
        g = torch.Generator().manual_seed(cfg.seed)
        task = progress.add_task(f"train {label}", total=steps) if progress else None
        t0, history = time.perf_counter(), []
        for epoch in range(cfg.epochs):
            model.train()
            for x, y in train.batches(cfg.batch_size, shuffle=True, seed=cfg.seed + epoch):
                x, y = augment(x, g, cfg.augment).to(device), y.to(device)
                loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
                _step(loss, opt, sched, progress, task)
            history.append(evaluate(model, splits.val))
            log.info("%s epoch %d: val acc %.4f", label, epoch + 1, history[-1])
    finally:  # on the CPU again, even when training fails
        model.to("cpu").eval()
    return TrainResult(history[-1], cfg.epochs, time.perf_counter() - t0, history)


class FrontCache:
    """Outputs of frozen fronts on a split, keyed by (front name, cut, device, split name),
    kept on the device the front ran on."""

    def __init__(self) -> None:
        self._store: dict[tuple, torch.Tensor] = {}

    @torch.no_grad()
    def get(self, hybrid: Hybrid, split: Split, split_key: tuple, batch_size: int = 512) -> torch.Tensor:
        dev = device_of(hybrid.front)
        key = (hybrid.front_name, hybrid.i, str(dev), *split_key)
        if key not in self._store:
            hybrid.front.eval()
            self._store[key] = torch.cat([hybrid.front(x.to(dev))
                                          for x, _ in split.batches(batch_size)])
        return self._store[key]


def validation_interval(cfg: TrainConfig, n_images: int) -> int:
    """Steps between a fine-tuning's validations on `n_images` training images: one pass over
    them or a quarter of `cfg.steps`, whichever is shorter (a pass when `cfg.steps` is unset);
    the last step is validated too."""
    per_epoch = math.ceil(n_images / cfg.batch_size)
    return per_epoch if cfg.steps is None else max(1, min(per_epoch, cfg.steps // 4))


class FineTune:
    """One fine-tuning run that can stop part-way and go on later: `advance(k)` trains to step
    k of the run's own schedule (cosine over `cfg.steps`) and returns the validation accuracy
    there; `result()` trains to the end and returns what `finetune_stitch` does. Validations
    run every `steps // 4` steps or once per pass over the data, whichever comes first (per
    epoch when `cfg.steps` is unset), and at the end; the best state among them (the start
    included) is kept; a reading `advance` takes in between is a measurement only, so a run
    advanced in pieces ends exactly where one uninterrupted run does. Between calls the model
    is on the CPU; stitch-only runs keep their cached front outputs where they ran."""

    def __init__(self, hybrid: Hybrid, splits: DataSplits, cfg: TrainConfig, scope: str = "stitch",
                 *, cache: FrontCache | None = None, teacher: nn.Module | None = None,
                 progress: Progress | None = None, device: torch.device | str = "cpu") -> None:
        self.hybrid, self.cfg, self.teacher, self.progress = hybrid, cfg, teacher, progress
        self.device = torch.device(device)
        torch.manual_seed(cfg.seed)
        self.train = _subset(splits.train, cfg.n_train, cfg.seed)
        self.stitch_only = scope == "stitch"
        with self._on_device():
            if self.stitch_only:
                hybrid.freeze_anchors()
                cache = cache or FrontCache()
                # runs on cached front outputs
                self.head: nn.Module = nn.Sequential(hybrid.stitch, hybrid.back).eval()
                self.train_in = cache.get(hybrid, self.train, ("train", cfg.n_train, cfg.seed))
                val_in = cache.get(hybrid, splits.val, ("val",))
                params = list(hybrid.stitch.parameters())
            else:
                self.head, self.train_in = hybrid, self.train.x.to(self.device)
                val_in = splits.val.x.to(self.device)
                hybrid.freeze_anchors(False)
                params = list(hybrid.parameters())
            self.t_logits = None
            if teacher is not None and cfg.distill > 0:
                teacher.eval()
                with torch.no_grad():
                    self.t_logits = torch.cat([teacher(x.to(self.device))
                                               for x, _ in self.train.batches(512)])
            self.opt = torch.optim.AdamW(params, lr=cfg.lr,
                                         weight_decay=0.0 if self.stitch_only else cfg.weight_decay)
            self.steps = cfg.steps or cfg.epochs * math.ceil(len(self.train) / cfg.batch_size)
            self.eval_every = validation_interval(cfg, len(self.train))
            self.sched = _cosine(self.opt, self.steps, warmup=max(1, self.steps // 50))
            self.val = Split(val_in, splits.val.y)
            self.train_y = self.train.y.to(self.device)
            self.trained = hybrid.stitch if self.stitch_only else hybrid
            self.best = evaluate(self.head, self.val)
            self.best_state = copy.deepcopy(self.trained.state_dict())
        self.task = (progress.add_task(f"fine-tune {scope}: {hybrid.name}", total=self.steps)
                     if progress else None)
        self.history: list[float] = []
        self.patience = math.inf if cfg.patience is None else cfg.patience
        self.step, self.epoch, self.stale, self.seconds = 0, 0, 0, 0.0
        self._order, self._pos = torch.empty(0, dtype=torch.long), 0
        self._paused: dict[str, torch.Tensor] | None = None

    @contextlib.contextmanager
    def _on_device(self):
        """The hybrid (with the anchors' segments it shares) and the teacher on the run's
        device, and back on the CPU afterwards, whatever happens."""
        models = [m for m in (self.hybrid, self.teacher) if m is not None]
        for m in models:
            m.to(self.device)
        try:
            yield
        finally:
            for m in models:
                m.to("cpu")

    def pause(self, state: dict[str, torch.Tensor]) -> FineTune:
        """Put `state` (the start, say) in the model until the run goes on; returns the run."""
        self._paused = copy.deepcopy(self.trained.state_dict())
        self.trained.load_state_dict(state)
        return self

    @property
    def done(self) -> bool:
        return self.step >= self.steps or self.stale > self.patience

    def advance(self, until: int) -> float:
        """Train to step `until` (at most the run's length, less if it stops early) and return
        the validation accuracy of the state reached."""
        t0 = time.perf_counter()
        if self._paused is not None:
            self.trained.load_state_dict(self._paused)
            self._paused = None
        with self._on_device():
            while self.step < min(until, self.steps) and not self.done:
                self._one_step()
            if (self.history and self.step % self.eval_every == 0) or self.done:
                acc = self.history[-1] if self.history else self.best
            else:  # between validations: read the state, without choosing it
                acc = evaluate(self.head, self.val)
        self.seconds += time.perf_counter() - t0
        return acc

    def _one_step(self) -> None:
        if self._pos >= len(self._order):
            self._order = torch.randperm(len(self.train), generator=torch.Generator().manual_seed(
                self.cfg.seed + self.epoch))
            self.epoch, self._pos = self.epoch + 1, 0
        self.head.train(not self.stitch_only)
        idx = self._order[self._pos: self._pos + self.cfg.batch_size].to(self.device)
        self._pos += self.cfg.batch_size
        logits = self.head(self.train_in[idx])
        loss = F.cross_entropy(logits, self.train_y[idx])
        if self.t_logits is not None:
            loss = ((1 - self.cfg.distill) * loss
                    + self.cfg.distill * distill_loss(logits, self.t_logits[idx]))
        _step(loss, self.opt, self.sched, self.progress, self.task)
        self.step += 1
        if self.step % self.eval_every and self.step < self.steps:
            return
        self.history.append(evaluate(self.head, self.val))
        if self.history[-1] > self.best:
            self.best, self.stale = self.history[-1], 0
            self.best_state = copy.deepcopy(self.trained.state_dict())
        else:
            self.stale += 1

    def result(self) -> TrainResult:
        """Train to the end; the model is left in its best validated state, in eval mode."""
        self.advance(self.steps)
        self.trained.load_state_dict(self.best_state)
        self.hybrid.eval()
        if self.progress:
            self.progress.update(self.task, completed=self.steps)
        return TrainResult(self.best, len(self.history), self.seconds, self.history)


def finetune_stitch(hybrid: Hybrid, splits: DataSplits, cfg: TrainConfig = TrainConfig(lr=1e-3),
                    *, cache: FrontCache | None = None, teacher: nn.Module | None = None,
                    progress: Progress | None = None,
                    device: torch.device | str = "cpu") -> TrainResult:
    """Train only the stitch of `hybrid`, keeping the state with the best validation
    accuracy — the starting one included — with early stopping after `cfg.patience`
    validations without gain (never, when it is None). The anchors stay
    frozen and in eval mode; `teacher` (e.g. the front anchor) adds distillation when
    `cfg.distill > 0`. Trains on `device`; everything is back on the CPU afterwards."""
    return FineTune(hybrid, splits, cfg, "stitch", cache=cache, teacher=teacher,
                    progress=progress, device=device).result()


def finetune_full(hybrid: Hybrid, splits: DataSplits, cfg: TrainConfig = TrainConfig(lr=3e-4),
                  *, progress: Progress | None = None,
                  device: torch.device | str = "cpu") -> TrainResult:
    """Fine-tune every parameter of `hybrid` (changes the anchors' shared segments: pass a
    deep copy). The baseline that stitch-only fine-tuning is measured against."""
    return FineTune(hybrid, splits, cfg, "all", progress=progress, device=device).result()
