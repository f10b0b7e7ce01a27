"""How well the cost model predicts: the p95 the planner predicted for the model a device runs
against the p95 the device then measured.

A report is scored once its device has sent `WARMUP_REPORTS` reports with a measured p95 (the
first ones teach the model the device's speed), with the prediction made before the report is
learned from. The scores are kept for every scored report, for those on the first model the
device reported ("first_model": what it learned from), and for the first report on each model
the device had not reported before ("new_model": what the cost model is for — predicting a
model the device never ran). In memory only: a restarted controller scores afresh.
"""
from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

WARMUP_REPORTS = 3  # a device's first reports with a p95 are not scored
KEPT = 100_000  # the newest errors kept per kind
KINDS = ("all", "first_model", "new_model")


def figures(errors: Iterable[float]) -> dict:
    """{median, p90, n} of relative errors (nearest rank; None without any)."""
    v = sorted(errors)

    def rank(q: float) -> float | None:
        return v[max(0, math.ceil(q * len(v)) - 1)] if v else None

    return {"median": rank(0.5), "p90": rank(0.9), "n": len(v)}


@dataclass
class CostErrors:
    """The relative p95 errors |predicted − measured| / measured of a controller's reports."""

    warmup: int = WARMUP_REPORTS
    reports: dict[str, int] = field(default_factory=dict)  # device → reports with a p95
    models: dict[str, list[str]] = field(default_factory=dict)  # device → models, in order
    errors: dict[str, deque[float]] = field(
        default_factory=lambda: {k: deque(maxlen=KEPT) for k in KINDS})

    def observe(self, device: str, model: str, predicted_ms: float,
                measured_ms: float) -> float | None:
        """Count one report of `measured_ms` p95 while `device` ran `model`, for which
        `predicted_ms` was predicted before this report; returns its error if it is scored."""
        seen = self.models.setdefault(device, [])
        new = model not in seen
        if new:
            seen.append(model)
        n = self.reports.get(device, 0)
        self.reports[device] = n + 1
        if n < self.warmup or measured_ms <= 0:
            return None
        error = abs(predicted_ms - measured_ms) / measured_ms
        self.errors["all"].append(error)
        if model == seen[0]:
            self.errors["first_model"].append(error)
        elif new:
            self.errors["new_model"].append(error)
        return error

    def summary(self) -> dict:
        """{median, p90, n} of every scored report, plus the same for first_model and
        new_model (see the module docstring)."""
        return {**figures(self.errors["all"]),
                **{k: figures(self.errors[k]) for k in KINDS[1:]}}
