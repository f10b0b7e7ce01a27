"""The canary window: after a swap that passed the health check, the new model's figures on
real traffic are compared with the previous model's from before the swap, and a regression
sends the device back to the previous model (docs/protocol.md §6.9).

`ServedFigures` keeps, per model generation it tracks (the running model and, during a
window, the one it replaced), bounded samples of what that model served: the latency of each
answered request, which requests raised, the top softmax probability of each answered image,
and whether each image an application labelled afterwards (`POST /v1/feedback`) was answered
right. It also remembers the newest answers (request ID → generation, classes) so that a
label sent later finds the answer it is about. `canary_verdict` is the pure judgement.
"""
from __future__ import annotations

import math
import secrets
import statistics
import threading
from collections import OrderedDict, deque
from dataclasses import dataclass

from .runtime import percentile

SAMPLES = 1000  # per figure and generation: the newest are kept
ANSWERS = 2048  # answers that feedback may still label: the newest are kept
Z = 3.0  # a difference within Z standard errors is taken for noise, whatever the threshold


@dataclass(frozen=True)
class CanaryConfig:
    """How long a canary window runs and what counts as a regression. The window ends when
    the new model has served `requests` requests or `seconds` have passed since the swap,
    whichever comes first (0: no limit of that kind; both 0: no canary window)."""

    requests: int = 1000
    seconds: float = 600.0
    min_samples: int = 30  # a figure is judged only with this many samples of each model
    max_error_rise: float = 0.05  # error rate above the previous model's by more: regression
    max_confidence_drop: float = 0.15  # mean top softmax probability below the previous's
    max_accuracy_drop: float = 0.10  # accuracy on labelled feedback below the previous's

    def __post_init__(self) -> None:
        if self.requests < 0 or not 0 <= self.seconds < math.inf:
            raise ValueError("canary: requests and seconds must be ≥ 0 (0: no limit)")
        if self.min_samples < 1:
            raise ValueError("canary: min_samples must be ≥ 1")
        for name in ("max_error_rise", "max_confidence_drop", "max_accuracy_drop"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"canary: {name} must lie in [0, 1]")

    @property
    def enabled(self) -> bool:
        return self.requests > 0 or self.seconds > 0

    def ended(self, requests: int, elapsed_s: float) -> bool:
        """Whether a window in which the new model served `requests` requests over
        `elapsed_s` seconds is over."""
        return ((self.requests > 0 and requests >= self.requests)
                or (self.seconds > 0 and elapsed_s >= self.seconds))


@dataclass(frozen=True)
class Summary:
    """One model's served figures over its newest samples (`total`: requests ever)."""

    total: int = 0
    requests: int = 0  # that reached the model: answered or raised
    errors: int = 0
    answered: int = 0
    p95_ms: float | None = None  # of the answered requests
    images: int = 0  # answered images: confidence samples
    confidence: float = 0.0  # mean top softmax probability
    confidence_var: float = 0.0
    labelled: int = 0  # answered images an application labelled
    correct: int = 0

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @property
    def accuracy(self) -> float:
        return self.correct / self.labelled if self.labelled else 0.0


def _share_se(k: int, n: int, j: int, m: int) -> float:
    """Standard error of the difference of two shares k/n and j/m if both were one share
    (pooled, as a two-proportion z-test has it)."""
    p = (k + j) / (n + m)
    return math.sqrt(p * (1 - p) * (1 / n + 1 / m))


def canary_verdict(new: Summary, old: Summary, budget_ms: float | None,
                   cfg: CanaryConfig) -> str | None:
    """None while the new model serves as well as the old one did, else why not: a reason
    starting "canary:" naming the figure with both values. A figure counts only with
    `min_samples` samples on each side, and a difference only beyond its threshold and
    beyond Z standard errors."""
    n = cfg.min_samples
    if budget_ms is not None and new.answered >= n and new.p95_ms > budget_ms:
        return (f"canary: served latency p95 {new.p95_ms:.2f} ms > budget {budget_ms:.2f} ms "
                f"({new.answered} requests)")
    if new.requests >= n and old.requests >= n:
        rise = new.error_rate - old.error_rate
        se = _share_se(new.errors, new.requests, old.errors, old.requests)
        if rise > max(cfg.max_error_rise, Z * se):
            return (f"canary: error rate {new.error_rate:.3f} > previous {old.error_rate:.3f} "
                    f"+ {cfg.max_error_rise:g} ({new.errors}/{new.requests} vs "
                    f"{old.errors}/{old.requests} requests)")
    if new.labelled >= n and old.labelled >= n:
        drop = old.accuracy - new.accuracy
        se = _share_se(new.correct, new.labelled, old.correct, old.labelled)
        if drop > max(cfg.max_accuracy_drop, Z * se):
            return (f"canary: accuracy on feedback {new.accuracy:.3f} < previous "
                    f"{old.accuracy:.3f} - {cfg.max_accuracy_drop:g} ({new.correct}/"
                    f"{new.labelled} vs {old.correct}/{old.labelled} labelled)")
    if new.images >= n and old.images >= n:
        drop = old.confidence - new.confidence
        se = math.sqrt(new.confidence_var / new.images + old.confidence_var / old.images)
        if drop > max(cfg.max_confidence_drop, Z * se):
            return (f"canary: mean confidence {new.confidence:.3f} < previous "
                    f"{old.confidence:.3f} - {cfg.max_confidence_drop:g} ({new.images} vs "
                    f"{old.images} images)")
    return None


class _Figures:
    """One generation's newest samples."""

    __slots__ = ("total", "raised", "latency", "confidence", "hits")

    def __init__(self) -> None:
        self.total = 0
        self.raised: deque[bool] = deque(maxlen=SAMPLES)  # per request
        self.latency: deque[float] = deque(maxlen=SAMPLES)  # per answered request
        self.confidence: deque[float] = deque(maxlen=SAMPLES)  # per answered image
        self.hits: deque[bool] = deque(maxlen=SAMPLES)  # per labelled image


class ServedFigures:
    """What each tracked generation served, and the answers feedback may still label.
    Thread-safe; memory is bounded by SAMPLES per figure and tracked generation and by
    ANSWERS remembered answers."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tracked: frozenset[int] = frozenset()
        self._figs: dict[int, _Figures] = {}  # tracked generations that served something
        self._answers: OrderedDict[str, tuple[int, tuple[int, ...], int]] = OrderedDict()
        self._prefix = secrets.token_hex(4)  # request IDs differ across agent restarts
        self._count = 0

    @property
    def tracked(self) -> frozenset[int]:
        return self._tracked

    def track(self, *generations: int) -> None:
        """Keep figures for exactly these generations from now on (the others' are
        dropped; a new one starts empty)."""
        with self._lock:
            self._tracked = frozenset(generations)
            self._figs = {g: f for g, f in self._figs.items() if g in self._tracked}

    def _of(self, generation: int) -> _Figures | None:
        if generation not in self._tracked:
            return None
        return self._figs.setdefault(generation, _Figures())

    def answered(self, generation: int, ms: float, classes: list[int], top: list[float],
                 num_classes: int) -> str:
        """Record an answered request; returns its request ID, for feedback."""
        with self._lock:
            self._count += 1
            request_id = f"{self._prefix}-{self._count}"
            self._answers[request_id] = (generation, tuple(classes), num_classes)
            if len(self._answers) > ANSWERS:
                self._answers.popitem(last=False)
            f = self._of(generation)
            if f is not None:
                f.total += 1
                f.raised.append(False)
                f.latency.append(ms)
                f.confidence.extend(top)
        return request_id

    def failed(self, generation: int) -> None:
        """Record a request the model of `generation` raised on."""
        with self._lock:
            f = self._of(generation)
            if f is not None:
                f.total += 1
                f.raised.append(True)

    def label(self, request_id: str, labels: list[int | None]) -> tuple[int, int, int]:
        """Record the true classes of an earlier answer's images (None: not known for that
        image); once per answer. Returns (generation, images labelled, answered right).
        Raises LookupError when the answer is not (or no longer) held, ValueError when the
        labels do not fit it."""
        with self._lock:
            answer = self._answers.get(request_id)
            if answer is None:
                raise LookupError(request_id)
            generation, classes, num_classes = answer
            if len(labels) != len(classes):
                raise ValueError(f"{len(labels)} labels for an answer of {len(classes)} "
                                 "images (one per image, null where unknown)")
            wrong = next((y for y in labels if y is not None and y >= num_classes), None)
            if wrong is not None:
                raise ValueError(f"label {wrong} is not a class of the model that answered "
                                 f"(0–{num_classes - 1})")
            del self._answers[request_id]
            hits = [y == c for y, c in zip(labels, classes) if y is not None]
            f = self._of(generation)
            if f is not None:
                f.hits.extend(hits)
        return generation, len(hits), sum(hits)

    def summary(self, generation: int) -> Summary:
        """The figures of `generation` (empty when untracked or idle)."""
        with self._lock:
            f = self._figs.get(generation)
            if f is None:
                return Summary()
            total, raised, latency = f.total, list(f.raised), list(f.latency)
            confidence, hits = list(f.confidence), list(f.hits)
        return Summary(
            total=total, requests=len(raised), errors=sum(raised), answered=len(latency),
            p95_ms=percentile(latency, 95), images=len(confidence),
            confidence=statistics.fmean(confidence) if confidence else 0.0,
            confidence_var=statistics.pvariance(confidence) if len(confidence) > 1 else 0.0,
            labelled=len(hits), correct=sum(hits))
