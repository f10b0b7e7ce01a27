"""The pure planner: which catalog model one device should run, given its twin and its rule.

Rules, in order:
1. Mode. Not charging and battery below a battery mode's `below` → that mode (the lowest
   threshold that applies) replaces the objective and `min_accuracy`. Temperature above
   `max_temp_c` → "hot": only models with fewer FLOPs than the running one are allowed (with
   no known running model, the objective becomes min_energy instead). A model swapped in less
   than `min_dwell_s` ago is exempt from that cap, so a hot device steps down one model per
   dwell period, giving each step time to cool, instead of falling to the cheapest at once.
2. Feasible: predicted p95 latency ≤ `latency_p95_ms`; accuracy ≥ `min_accuracy`;
   model_bytes + act_peak_bytes ≤ `max_mem_fraction` × free memory (mem_free_mb, else mem_mb,
   unchecked when neither is known; the running model's own footprint counts as free for
   itself, since it already sits in the used memory); with `finetune_on_demand` off, only
   anchors and fine-tuned stitches.
   Predicted p95 = catalog latency × speed × tail, where speed is the learned device/catalog
   ratio (`learn_speed`, fed with p50s; `initial_speed` until learned) and tail the running
   model's measured p95/p50 (1 until measured, clamped to [1, 10]).
3. Objective: max_accuracy (ties → fewer FLOPs), min_latency (predicted latency, ties → more
   accurate), min_energy (FLOPs, ties → more accurate); then by ID, so plans are deterministic.
4. Nothing feasible → the cheapest model by FLOPs, with the reason naming what it misses.
5. Hysteresis: a feasible running model is kept while it has run less than `min_dwell_s`, or
   when the best gains less than `min_gain` (accuracy points for max_accuracy, relative cost
   for min_latency / min_energy: 0.1 = 10% cheaper). An infeasible running model (or one no
   longer in the catalog) is replaced at once. A decision never targets the running model.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from fleet_controller.policy import ResolvedRule

SPEED_MIN, SPEED_MAX = 0.01, 1000.0
TAIL_MAX = 10.0
MB = 1 << 20


@dataclass(frozen=True)
class Candidate:
    """One catalog entry, reduced to what planning needs."""

    id: str
    name: str
    kind: str
    accuracy: float
    latency_ms: float
    flops: int
    model_bytes: int
    act_peak_bytes: int
    delta_bytes: int | None
    segments: tuple[str, ...]
    stitch_state: str | None

    @classmethod
    def from_entry(cls, e: Any) -> Candidate:
        """From a stitch_lib.catalog.Entry, or one entry dict of catalog.json (duck-typed)."""
        get: Callable[[str], Any] = e.get if isinstance(e, Mapping) else (
            lambda k: getattr(e, k, None))
        return cls(id=get("id"), name=get("name"), kind=get("kind"),
                   accuracy=float(get("test_acc")), latency_ms=float(get("latency_ms")),
                   flops=int(get("flops")), model_bytes=int(get("model_bytes")),
                   act_peak_bytes=int(get("act_peak_bytes")), delta_bytes=get("delta_bytes"),
                   segments=tuple(get("segments")), stitch_state=get("stitch_state"))

    @property
    def mem_bytes(self) -> int:
        return self.model_bytes + self.act_peak_bytes


@dataclass
class Twin:
    """The controller's view of one device."""

    device_id: str
    device_class: str = "unknown"
    tags: dict[str, str] = field(default_factory=dict)
    online: bool = False
    mem_mb: float | None = None
    gflops: float | None = None
    battery: float | None = None
    charging: bool = False
    temp_c: float | None = None
    mem_free_mb: float | None = None
    lat_p50_ms: float | None = None
    lat_p95_ms: float | None = None
    running: str | None = None  # catalog ID running
    since: float = 0.0  # when it started
    speed: float | None = None  # learned device latency / catalog latency
    cached: frozenset[str] = frozenset()  # segment IDs the device holds
    keys_seq: int = 0  # the newest key set the device accepted (see `restnet keys retire`)


@dataclass(frozen=True)
class Decision:
    target: str | None  # catalog ID to deploy; None = keep what runs
    reason: str
    predicted_latency_ms: float | None = None
    mode: str = "normal"  # normal / battery<0.15 / hot / battery<0.15+hot / offline / empty
    rule: ResolvedRule | None = None  # the rule as the mode bent it: health-check thresholds


def plan_inputs(twin: Twin) -> tuple:
    """What `plan` reads from a twin, quantised (battery and memory to 1%, temperature to
    1 °C, learned speed and latencies to 2 significant digits). Equal inputs give an equal
    decision at the same time; only time (dwell) can change it, which the periodic
    reconcile covers — so telemetry with unchanged inputs need not be planned again."""
    def q(x: float | None) -> str:
        return "" if x is None else f"{x:.2g}"

    mem = None if twin.mem_free_mb is None or not twin.mem_mb else \
        round(twin.mem_free_mb / twin.mem_mb, 2)
    return (twin.running, twin.online, None if twin.battery is None else round(twin.battery, 2),
            twin.charging, None if twin.temp_c is None else round(twin.temp_c), mem,
            q(twin.speed), q(twin.lat_p50_ms), q(twin.lat_p95_ms), twin.device_class,
            tuple(sorted(twin.tags.items())))


def _clamp(x: float, lo: float, hi: float) -> float:
    return min(max(x, lo), hi)


def initial_speed(twin: Twin, reference_gflops: float = 100.0) -> float:
    """First guess of device/catalog latency: the catalog machine's GFLOPS over the device's."""
    if not twin.gflops or twin.gflops <= 0:
        return 1.0
    return _clamp(reference_gflops / twin.gflops, SPEED_MIN, SPEED_MAX)


def learn_speed(prev: float | None, reported_p50_ms: float, catalog_latency_ms: float,
                alpha: float = 0.3) -> float:
    """EMA of the measured/catalog latency ratio, clamped to [0.01, 1000]."""
    if catalog_latency_ms <= 0 or reported_p50_ms < 0:
        raise ValueError(f"latencies must be positive (reported {reported_p50_ms} ms, "
                         f"catalog {catalog_latency_ms} ms)")
    ratio = reported_p50_ms / catalog_latency_ms
    value = ratio if prev is None else prev + alpha * (ratio - prev)
    return _clamp(value, SPEED_MIN, SPEED_MAX)


@dataclass(frozen=True)
class _Situation:
    """The rule as the device's state bends it, plus what predicting latency needs."""

    rule: ResolvedRule
    mode: str
    prefix: str  # reason prefix, e.g. "battery 0.12 < 0.15: "
    flops_cap: int | None  # hot: models must have fewer FLOPs than this
    cooling: bool  # hot, but the running model is new: it is exempt from the cap
    factor: float  # speed × tail
    running: Candidate | None

    def latency(self, c: Candidate) -> float:
        return c.latency_ms * self.factor

    def key(self, c: Candidate) -> tuple[Any, ...]:
        obj = self.rule.objective
        if obj == "min_latency":
            return (self.latency(c), -c.accuracy, c.id)
        if obj == "min_energy":
            return (c.flops, -c.accuracy, c.id)
        return (-c.accuracy, c.flops, c.id)


def _situation(twin: Twin, rule: ResolvedRule, candidates: Sequence[Candidate],
               now: float) -> _Situation:
    running = next((c for c in candidates if c.id == twin.running), None)
    modes, prefix, cap = [], "", None
    if twin.battery is not None and not twin.charging:
        bm = next((m for m in sorted(rule.battery_modes, key=lambda m: m.below)
                   if twin.battery < m.below), None)
        if bm is not None:
            rule = replace(rule, objective=bm.objective or rule.objective,
                           min_accuracy=rule.min_accuracy if bm.min_accuracy is None
                           else bm.min_accuracy)
            modes.append(f"battery<{bm.below:g}")
            prefix += f"battery {twin.battery:.2f} < {bm.below:.2f}: "
    if twin.temp_c is not None and twin.temp_c > rule.max_temp_c:
        modes.append("hot")
        prefix += f"temp {twin.temp_c:.0f}°C > {rule.max_temp_c:g}°C: "
        if running is not None:
            cap = running.flops
        else:
            rule = replace(rule, objective="min_energy")
    speed = twin.speed if twin.speed is not None else initial_speed(twin)
    tail = 1.0
    if twin.lat_p50_ms and twin.lat_p95_ms and running is not None:
        tail = _clamp(twin.lat_p95_ms / twin.lat_p50_ms, 1.0, TAIL_MAX)
    cooling = cap is not None and now - twin.since < rule.min_dwell_s
    return _Situation(rule, "+".join(modes) or "normal", prefix, cap, cooling, speed * tail,
                      running)


def _violations(c: Candidate, twin: Twin, s: _Situation) -> list[str]:
    r, out = s.rule, []
    if s.latency(c) > r.latency_p95_ms:
        out.append(f"p95 {s.latency(c):.1f} ms > {r.latency_p95_ms:g} ms budget")
    if c.accuracy < r.min_accuracy:
        out.append(f"accuracy {c.accuracy:.3f} < {r.min_accuracy:g}")
    free_mb = twin.mem_free_mb if twin.mem_free_mb is not None else twin.mem_mb
    if free_mb is not None:
        avail = free_mb * MB + (c.mem_bytes if c is s.running else 0)
        if c.mem_bytes > r.max_mem_fraction * avail:
            out.append(f"memory {c.mem_bytes / MB:.1f} MB > {r.max_mem_fraction:g} × "
                       f"{avail / MB:.0f} MB free")
    if not r.finetune_on_demand and c.stitch_state not in (None, "finetuned"):
        out.append(f"stitch is {c.stitch_state!r}, not fine-tuned (finetune_on_demand off)")
    exempt = s.cooling and c is s.running
    if s.flops_cap is not None and c.flops >= s.flops_cap and not exempt:
        out.append(f"hot: {c.flops / 1e6:.1f} MFLOPs not below the running "
                   f"{s.flops_cap / 1e6:.1f}")
    return out


def explain(twin: Twin, candidates: Sequence[Candidate], rule: ResolvedRule,
            now: float) -> dict[str, list[str]]:
    """Why each candidate is infeasible for this twin at `now` (an empty list: feasible)."""
    s = _situation(twin, rule, candidates, now)
    return {c.id: _violations(c, twin, s) for c in candidates}


def _metric(s: _Situation, c: Candidate) -> str:
    if s.rule.objective == "min_latency":
        return f"{s.latency(c):.1f} ms"
    if s.rule.objective == "min_energy":
        return f"{c.flops / 1e6:.1f} MFLOPs"
    return f"acc {c.accuracy:.3f}"


def _gain(s: _Situation, old: Candidate, new: Candidate) -> float:
    if s.rule.objective == "max_accuracy":
        return new.accuracy - old.accuracy
    a, b = (s.latency(old), s.latency(new)) if s.rule.objective == "min_latency" \
        else (old.flops, new.flops)
    return (a - b) / a if a > 0 else 0.0


def plan(twin: Twin, candidates: Sequence[Candidate], rule: ResolvedRule, now: float) -> Decision:
    """Decide what `twin` should run (see the module docstring for the rules)."""
    if not twin.online:
        return Decision(None, "offline: nothing to plan until it is back", mode="offline")
    if not candidates:
        return Decision(None, "the catalog is empty: nothing to deploy", mode="empty")
    s = _situation(twin, rule, candidates, now)
    run, obj = s.running, s.rule.objective
    why = {c.id: _violations(c, twin, s) for c in candidates}
    feasible = [c for c in candidates if not why[c.id]]

    def keep(text: str) -> Decision:
        return Decision(None, s.prefix + text, s.latency(run) if run else None, s.mode, s.rule)

    def go(c: Candidate, text: str) -> Decision:
        return Decision(c.id, s.prefix + text, s.latency(c), s.mode, s.rule)

    if not feasible:
        low = min(candidates, key=lambda c: (c.flops, -c.accuracy, c.id))
        text = f"no model meets every constraint (cheapest {low.name}: {'; '.join(why[low.id])})"
        if low is run:
            return keep(f"{text}; keep {low.name}, already the cheapest")
        return go(low, f"{text} → cheapest {low.name} ({low.flops / 1e6:.1f} MFLOPs)")
    best = min(feasible, key=s.key)
    if run is None:
        was = f"{twin.running} is not in the catalog" if twin.running else "nothing running"
        return go(best, f"{was}; {obj} → {best.name} ({_metric(s, best)})")
    if why[run.id]:
        return go(best, f"{run.name} no longer fits ({'; '.join(why[run.id])}) → {best.name} "
                        f"({_metric(s, run)}→{_metric(s, best)})")
    if best is run:
        return keep(f"{obj}: {run.name} is still the best ({_metric(s, run)})")
    if now - twin.since < s.rule.min_dwell_s:
        return keep(f"keep {run.name}: running {now - twin.since:.0f} s < "
                    f"{s.rule.min_dwell_s:g} s dwell (best would be {best.name})")
    gain = _gain(s, run, best)
    if gain < s.rule.min_gain:
        return keep(f"keep {run.name}: {best.name} gains {gain:.4f} < {s.rule.min_gain:g} "
                    f"on {obj}")
    return go(best, f"{obj} → {best.name} ({_metric(s, run)}→{_metric(s, best)})")
