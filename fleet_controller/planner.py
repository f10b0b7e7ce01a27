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
   Predicted p95 (`predict_p95`) = predicted p50 × tail (`tail_factor`), the running model's
   measured p95/p50 (1 until measured, clamped to [1, 10]). Predicted p50 (`predict_ms`) = Σ
   over the model's segments of prior time × the device's learned factor for the segment's
   operator kind. The prior is the class's nominal figure, FLOPs ÷ the GFLOPS the device
   announced for that kind (its datasheet's `kind_gflops`, else its overall `gflops`; the
   segment's latency on the catalog machine when it announced none, or the whole model's for
   a catalog without per-segment costs). The factors (`Speeds`) are learned from the p50s
   the device reports for the model it runs and from its health checks (`learn_speed`): an
   overall factor shared by every kind plus a correction per kind, by recursive least
   squares — so what a device shows on one model carries over to models it has never run,
   per kind of operator, not as one scalar. A change in the device's temperature widens the
   overall factor's uncertainty (`Speeds.heated`): a hot chip throttles, and the latency it
   reports describes a window before its temperature reading. How well this predicts is
   scored as reports arrive (fleet_controller.costerror).
   A model other than the running one must fit with a margin: its predicted p50 plus
   `MARGIN_Z` standard deviations of the prediction (`predict_upper_ms`), from the learner's
   covariance — a few percent for the kinds the device has run, wide for kinds it never ran,
   widest before its first report. A deployment is a gamble that fails on the device's health
   check; this keeps the gamble to models the device's own figures vouch for.
3. Objective: max_accuracy (ties → fewer FLOPs), min_latency (predicted latency, ties → more
   accurate), min_energy (predicted energy per inference: power × predicted time, ties → more
   accurate); then by ID, so plans are deterministic. No message carries a device's power yet,
   so it is `NOMINAL_POWER_W` for every device and min_energy orders by predicted time.
4. Nothing feasible → the cheapest model by predicted time (ties → fewer FLOPs), with the
   reason naming what it misses.
5. Hysteresis: a device that has reported no latency yet keeps its running model for up to
   `min_dwell_s` (its first report, one telemetry period later, pins its speed), unless that
   model breaks a rule that does not depend on speed. A feasible running model that a
   deployment chose is kept while it has run less than `min_dwell_s` (a boot model is not:
   keeping it prevents no flapping, it only delays the first choice), or
   when the best gains less than `min_gain` (accuracy points for max_accuracy, relative cost
   for min_latency / min_energy: 0.1 = 10% cheaper). An infeasible running model (or one no
   longer in the catalog) is replaced at once. A decision never targets the running model.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Callable, NamedTuple

from fleet_controller.policy import ResolvedRule

SPEED_MIN, SPEED_MAX = 0.01, 1000.0  # a kind's factor (device time / prior time) stays here
TAIL_MAX = 10.0
MB = 1 << 20
NOMINAL_POWER_W = 1.0  # a device's active power, until a message carries it
# the learner: prior standard deviations of the overall factor and of each kind's correction
# (smaller where the device announced that kind's speed), their drift per report (a device
# heats up, gets loaded), and the p50's relative noise
PRIOR_SD, KIND_SD, KIND_PRIOR_SD, DRIFT, KIND_DRIFT, NOISE = 1.0, 0.5, 0.2, 0.1, 0.03, 0.05
MARGIN_Z = 2.0  # a model not running must fit at its predicted p50 + this many sd
# sd of the overall factor's change per °C the device's temperature moves: chips throttle
# when hot (often to half speed over some 20 °C), so a speed learned at another temperature
# is doubted until the device reports latency at this one (`Speeds.heated`)
TEMP_DRIFT = 0.02


class Term(NamedTuple):
    """What one segment of a model costs: its operator kind, FLOPs, catalog-machine latency."""

    kind: str
    flops: int
    latency_ms: float


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
    terms: tuple[Term, ...] = ()  # per segment; empty: the whole model is one "model" term
    # (kind, FLOPs, catalog latency) summed over the cost terms of each kind: the planner's
    # hot path (`_prior_by_kind`)
    by_kind: tuple[tuple[str, int, float], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        out: dict[str, tuple[int, float]] = {}
        for t in self.cost_terms:
            f, ms = out.get(t.kind, (0, 0.0))
            out[t.kind] = (f + t.flops, ms + t.latency_ms)
        object.__setattr__(self, "by_kind", tuple((k, f, ms) for k, (f, ms) in out.items()))

    @classmethod
    def from_entry(cls, e: Any) -> Candidate:
        """From a stitch_lib.catalog.Entry, or one entry dict of catalog.json (duck-typed)."""
        get: Callable[[str], Any] = e.get if isinstance(e, Mapping) else (
            lambda k: getattr(e, k, None))
        terms = tuple(Term(str(t["kind"]), int(t["flops"]), float(t["latency_ms"]))
                      for t in get("segment_costs") or ())
        return cls(id=get("id"), name=get("name"), kind=get("kind"),
                   accuracy=float(get("test_acc")), latency_ms=float(get("latency_ms")),
                   flops=int(get("flops")), model_bytes=int(get("model_bytes")),
                   act_peak_bytes=int(get("act_peak_bytes")), delta_bytes=get("delta_bytes"),
                   segments=tuple(get("segments")), stitch_state=get("stitch_state"),
                   terms=terms)

    @property
    def mem_bytes(self) -> int:
        return self.model_bytes + self.act_peak_bytes

    @property
    def cost_terms(self) -> tuple[Term, ...]:
        return self.terms or (Term("model", self.flops, self.latency_ms),)


def _clamp(x: float, lo: float, hi: float) -> float:
    return min(max(x, lo), hi)


@dataclass(frozen=True)
class Speeds:
    """What the planner has learned of one device's speed: device time over prior time, as
    an overall factor plus a correction per operator kind seen (`mean[0]`, then one per
    `kinds`), with their covariance. A kind never seen runs at the overall factor."""

    kinds: tuple[str, ...] = ()
    mean: tuple[float, ...] = (1.0,)
    cov: tuple[tuple[float, ...], ...] = ((PRIOR_SD ** 2,),)
    reports: int = 0

    @classmethod
    def from_doc(cls, d: Mapping[str, Any]) -> Speeds:
        """From `dataclasses.asdict` output read back from JSON."""
        return cls(tuple(d["kinds"]), tuple(d["mean"]), tuple(tuple(r) for r in d["cov"]),
                   int(d["reports"]))

    def __post_init__(self) -> None:  # the factors and their sd, once (not fields: not stored)
        object.__setattr__(self, "_overall", _clamp(self.mean[0], SPEED_MIN, SPEED_MAX))
        object.__setattr__(self, "_factors", {
            k: _clamp(self.mean[0] + self.mean[i + 1], SPEED_MIN, SPEED_MAX)
            for i, k in enumerate(self.kinds)})
        c = self.cov  # each factor MARGIN_Z sd high; a kind never learned: by its prior sd
        object.__setattr__(self, "_high", {
            k: self._factors[k] + MARGIN_Z * max(0.0, c[0][0] + 2 * c[0][i + 1]
                                                 + c[i + 1][i + 1]) ** 0.5
            for i, k in enumerate(self.kinds)})
        object.__setattr__(self, "_high_new", {
            announced: self._overall + MARGIN_Z * (c[0][0] + sd ** 2) ** 0.5
            for announced, sd in ((True, KIND_PRIOR_SD), (False, KIND_SD))})

    def heated(self, delta_c: float) -> Speeds:
        """These speeds after the device's temperature moved by `delta_c` °C: the overall
        factor's variance grows by (`TEMP_DRIFT` × `delta_c`)², so models the device has not
        run need a wider margin until a report at the new temperature narrows it again."""
        if not delta_c:
            return self
        cov = [list(r) for r in self.cov]
        cov[0][0] += (TEMP_DRIFT * delta_c) ** 2
        return replace(self, cov=tuple(tuple(r) for r in cov))

    def factor(self, kind: str) -> float:
        return self._factors.get(kind, self._overall)

    def high(self, kind: str, announced: bool) -> float:
        """`factor(kind)` plus `MARGIN_Z` of its standard deviations (`announced`: the device
        announced the kind's speed, which narrows the prior of a kind never learned)."""
        h = self._high.get(kind)
        return self._high_new[announced] if h is None else h

    def variance(self, prior: Mapping[str, float], kind_sd: Callable[[str], float]) -> float:
        """Variance of Σ_kind prior[kind] × factor(kind): the learned covariance, plus
        `kind_sd(kind)`² for each kind never learned (its correction's prior)."""
        h = [sum(prior.values()), *(prior.get(k, 0.0) for k in self.kinds)]
        var = 0.0
        for hi, row in zip(h, self.cov):
            if hi:
                var += hi * sum(c * hj for c, hj in zip(row, h) if hj)
        for k, ms in prior.items():
            if k not in self._factors:
                var += (ms * kind_sd(k)) ** 2
        return var


NO_SPEEDS = Speeds()  # nothing learned yet


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
    booted: bool = False  # it runs the model it booted with (generation 0): no deployment
    # chose it, so no dwell holds it
    speed: Speeds | None = None  # learned from its reports (`learn_speed`)
    last_seen: float = 0.0  # when its last birth or telemetry arrived
    cached: frozenset[str] = frozenset()  # segment IDs the device holds
    kind_gflops: dict[str, float] = field(default_factory=dict)  # announced, per operator kind
    keys_seq: int = 0  # the newest key set the device accepted (see `restnet keys retire`)

    def __post_init__(self) -> None:
        # a twin read back from the store holds the asdict() form; an older store's scalar
        # speed (device/catalog latency) has no per-kind meaning and is learned afresh
        if isinstance(self.speed, Mapping):
            self.speed = Speeds.from_doc(self.speed)
        elif not isinstance(self.speed, Speeds):
            self.speed = None


@dataclass(frozen=True)
class Decision:
    target: str | None  # catalog ID to deploy; None = keep what runs
    reason: str
    predicted_latency_ms: float | None = None
    mode: str = "normal"  # normal / battery<0.15 / hot / battery<0.15+hot / offline / empty
    rule: ResolvedRule | None = None  # the rule as the mode bent it: health-check thresholds


def plan_inputs(twin: Twin) -> tuple:
    """What `plan` reads from a twin, quantised (battery and memory to 1%, temperature to
    1 °C, learned speeds and latencies to 2 significant digits). Equal inputs give an equal
    decision at the same time; only time (dwell) can change it, which the periodic
    reconcile covers — so telemetry with unchanged inputs need not be planned again."""
    def q(x: float | None) -> str:
        return "" if x is None else f"{x:.2g}"

    mem = None if twin.mem_free_mb is None or not twin.mem_mb else \
        round(twin.mem_free_mb / twin.mem_mb, 2)
    return (twin.running, twin.online, None if twin.battery is None else round(twin.battery, 2),
            twin.charging, None if twin.temp_c is None else round(twin.temp_c), mem,
            (twin.speed.kinds, *(q(x) for x in twin.speed.mean), q(twin.speed.cov[0][0]))
            if twin.speed else (), q(twin.lat_p50_ms), q(twin.lat_p95_ms), twin.device_class,
            tuple(sorted(twin.tags.items())), tuple(sorted(twin.kind_gflops.items())))


def silent(twin: Twin, now: float, timeout_s: float) -> bool:
    """An online device that has sent nothing for longer than `timeout_s`: to be treated as
    offline (no deployments) until it speaks again."""
    return twin.online and now - twin.last_seen > timeout_s


def _prior_by_kind(twin: Twin, c: Candidate) -> dict[str, float]:
    """Each kind's time on this device before anything is learned: the class's nominal
    figure (FLOPs ÷ the GFLOPS announced for the kind, else overall), else the catalog
    machine's."""
    if twin.gflops:
        per = twin.kind_gflops
        return {k: f / (per.get(k, twin.gflops) * 1e6) for k, f, _ in c.by_kind}
    return {k: ms for k, _, ms in c.by_kind}


def _sum_by_kind(twin: Twin, c: Candidate, factor: Callable[[str], float]) -> float:
    """Σ over `c`'s kinds of the kind's prior time on this device (`_prior_by_kind`, inlined:
    the planner's hot path) × `factor(kind)`."""
    if twin.gflops:
        g, per = twin.gflops, twin.kind_gflops
        return sum(f / (per.get(kind, g) * 1e6) * factor(kind) for kind, f, _ in c.by_kind)
    return sum(ms * factor(kind) for kind, _, ms in c.by_kind)


def predict_ms(twin: Twin, c: Candidate) -> float:
    """Predicted p50 latency of `c` on this device (see the module docstring): each kind's
    prior time times its learned factor."""
    return _sum_by_kind(twin, c, (twin.speed or NO_SPEEDS).factor)


def _kind_sd(twin: Twin) -> Callable[[str], float]:
    """The prior sd of a kind's correction on this device: smaller where it announced the
    kind's speed."""
    return lambda k: KIND_PRIOR_SD if k in twin.kind_gflops else KIND_SD


def predict_upper_ms(twin: Twin, c: Candidate) -> float:
    """A cautious p50 of `c` on this device: the predicted p50 plus `MARGIN_Z` standard
    deviations of that prediction under what the learner knows (`Speeds.variance`)."""
    speeds, prior = twin.speed or NO_SPEEDS, _prior_by_kind(twin, c)
    mean = sum(ms * speeds.factor(k) for k, ms in prior.items())
    return mean + MARGIN_Z * speeds.variance(prior, _kind_sd(twin)) ** 0.5


def _upper_bound_ms(twin: Twin, c: Candidate) -> float:
    """≥ `predict_upper_ms`, as cheap as `predict_ms` (the planner's hot path): every kind's
    factor `MARGIN_Z` sd high at once, as if the kinds' errors were perfectly correlated."""
    speeds, per = twin.speed or NO_SPEEDS, twin.kind_gflops
    return _sum_by_kind(twin, c, lambda k: speeds.high(k, k in per))


def tail_factor(twin: Twin) -> float:
    """Predicted p95 / p50: the p95/p50 the device last reported, clamped to [1, TAIL_MAX];
    1 until it reports both."""
    if twin.lat_p50_ms and twin.lat_p95_ms:
        return _clamp(twin.lat_p95_ms / twin.lat_p50_ms, 1.0, TAIL_MAX)
    return 1.0


def predict_p95(twin: Twin, c: Candidate) -> float:
    """Predicted p95 latency of `c` on this device, as `plan` predicts it for a device whose
    running model is in the catalog."""
    return predict_ms(twin, c) * tail_factor(twin)


def learn_speed(twin: Twin, c: Candidate, reported_p50_ms: float) -> Speeds:
    """`twin.speed` updated with a p50 the device reported while running `c`: one step of
    recursive least squares on p50 = Σ_kind prior time × (overall + correction[kind]), in
    units relative to the report, after letting the factors drift a little."""
    by_kind = _prior_by_kind(twin, c)
    if reported_p50_ms <= 0 or sum(by_kind.values()) <= 0:
        raise ValueError(f"cannot learn from {c.name}: reported p50 {reported_p50_ms} ms, "
                         f"prior {sum(by_kind.values())} ms; both must be positive")
    s = twin.speed or Speeds()
    kinds = s.kinds + tuple(k for k in sorted(by_kind) if k not in s.kinds)
    n, old = len(kinds) + 1, len(s.mean)
    mean = list(s.mean) + [0.0] * (n - old)
    cov = [list(r) + [0.0] * (n - old) for r in s.cov] + [
        [0.0] * n for _ in range(n - old)]
    kind_sd = _kind_sd(twin)
    for k in range(n):
        cov[k][k] += (DRIFT * PRIOR_SD) ** 2 if k == 0 else (
            kind_sd(kinds[k - 1]) ** 2 if k >= old else (KIND_DRIFT * KIND_SD) ** 2)
    h = [sum(by_kind.values())] + [by_kind.get(k, 0.0) for k in kinds]
    h = [x / reported_p50_ms for x in h]  # the report is 1: the noise is relative
    ph = [sum(cov[i][j] * h[j] for j in range(n)) for i in range(n)]
    gain_den = sum(h[i] * ph[i] for i in range(n)) + NOISE ** 2
    err = 1.0 - sum(h[i] * mean[i] for i in range(n))
    mean = [mean[i] + ph[i] / gain_den * err for i in range(n)]
    cov = [[cov[i][j] - ph[i] * ph[j] / gain_den for j in range(n)] for i in range(n)]
    return Speeds(kinds, tuple(mean), tuple(tuple(r) for r in cov), s.reports + 1)


@dataclass(frozen=True)
class _Situation:
    """The rule as the device's state bends it, plus what predicting latency needs."""

    rule: ResolvedRule
    mode: str
    prefix: str  # reason prefix, e.g. "battery 0.12 < 0.15: "
    flops_cap: int | None  # hot: models must have fewer FLOPs than this
    cooling: bool  # hot, but the running model is new: it is exempt from the cap
    p50: dict[str, float]  # predicted p50 per candidate ID
    tail: float  # predicted p95 / p50
    running: Candidate | None
    twin: Twin | None  # None: an oracle's true p95s, nothing uncertain

    def latency(self, c: Candidate) -> float:
        """Predicted p95."""
        return self.p50[c.id] * self.tail

    def over_budget(self, c: Candidate) -> str | None:
        """Why `c` misses the p95 budget, else None. The running model is judged by its
        predicted p95 (what it measures); any other must fit with `MARGIN_Z` sd of margin."""
        budget, p95 = self.rule.latency_p95_ms, self.latency(c)
        if p95 > budget:
            return f"p95 {p95:.1f} ms > {budget:g} ms budget"
        if c is self.running or self.twin is None \
                or _upper_bound_ms(self.twin, c) * self.tail <= budget:
            return None
        margin = predict_upper_ms(self.twin, c) * self.tail - p95
        if p95 + margin > budget:
            return f"p95 {p95:.1f} ms + {margin:.1f} ms margin > {budget:g} ms budget"
        return None

    def energy_mj(self, c: Candidate) -> float:
        """Predicted energy per inference."""
        return NOMINAL_POWER_W * self.p50[c.id]

    def key(self, c: Candidate) -> tuple[Any, ...]:
        obj = self.rule.objective
        if obj == "min_latency":
            return (self.latency(c), -c.accuracy, c.id)
        if obj == "min_energy":
            return (self.energy_mj(c), -c.accuracy, c.id)
        return (-c.accuracy, c.flops, c.id)


def _situation(twin: Twin, rule: ResolvedRule, candidates: Sequence[Candidate],
               now: float, known_p95: Mapping[str, float] | None = None) -> _Situation:
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
    tail = tail_factor(twin) if running is not None else 1.0
    cooling = cap is not None and now - twin.since < rule.min_dwell_s
    if known_p95 is not None:  # an oracle: the true p95s, no prediction, no tail
        p50, tail = {c.id: known_p95[c.id] for c in candidates}, 1.0
    else:
        p50 = {c.id: predict_ms(twin, c) for c in candidates}
    return _Situation(rule, "+".join(modes) or "normal", prefix, cap, cooling, p50, tail,
                      running, None if known_p95 is not None else twin)


def _violations(c: Candidate, twin: Twin, s: _Situation) -> list[str]:
    r, out = s.rule, []
    late = s.over_budget(c)
    if late:
        out.append(late)
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
            now: float, known_p95: Mapping[str, float] | None = None) -> dict[str, list[str]]:
    """Why each candidate is infeasible for this twin at `now` (an empty list: feasible);
    `known_p95` as in `plan`."""
    s = _situation(twin, rule, candidates, now, known_p95)
    return {c.id: _violations(c, twin, s) for c in candidates}


def best_static(cases: Sequence[tuple[Twin, ResolvedRule, Mapping[str, float]]],
                candidates: Sequence[Candidate]) -> Candidate | None:
    """The best model never switched: the most accurate candidate feasible in every case
    (a device's twin, its rule and the true p95 of every candidate on it); None if none is."""
    ok = {c.id for c in candidates}
    for twin, rule, known in cases:
        why = explain(twin, candidates, rule, 0.0, known)
        ok &= {cid for cid, v in why.items() if not v}
    return max((c for c in candidates if c.id in ok), key=lambda c: (c.accuracy, -c.flops),
               default=None)


def _metric(s: _Situation, c: Candidate) -> str:
    if s.rule.objective == "min_latency":
        return f"{s.latency(c):.1f} ms"
    if s.rule.objective == "min_energy":
        return f"{s.energy_mj(c):.2f} mJ"
    return f"acc {c.accuracy:.3f}"


def _gain(s: _Situation, old: Candidate, new: Candidate) -> float:
    if s.rule.objective == "max_accuracy":
        return new.accuracy - old.accuracy
    a, b = (s.latency(old), s.latency(new)) if s.rule.objective == "min_latency" \
        else (s.energy_mj(old), s.energy_mj(new))
    return (a - b) / a if a > 0 else 0.0


def plan(twin: Twin, candidates: Sequence[Candidate], rule: ResolvedRule, now: float,
         known_p95: Mapping[str, float] | None = None) -> Decision:
    """Decide what `twin` should run (see the module docstring for the rules). `known_p95`
    (candidate ID → p95 ms) replaces the predictions: an oracle that knows the true costs."""
    if not twin.online:
        return Decision(None, "offline: nothing to plan until it is back", mode="offline")
    if not candidates:
        return Decision(None, "the catalog is empty: nothing to deploy", mode="empty")
    s = _situation(twin, rule, candidates, now, known_p95)
    run, obj = s.running, s.rule.objective
    why = {c.id: _violations(c, twin, s) for c in candidates}
    feasible = [c for c in candidates if not why[c.id]]
    if (run is not None and twin.speed is None and s.twin is not None
            and all(w.startswith("p95") for w in why[run.id])
            and now - twin.since < s.rule.min_dwell_s):
        return Decision(None, s.prefix + f"keep {run.name} until the device reports its "
                        "latency: its speed is not learned yet", s.latency(run), s.mode, s.rule)

    def keep(text: str) -> Decision:
        return Decision(None, s.prefix + text, s.latency(run) if run else None, s.mode, s.rule)

    def go(c: Candidate, text: str) -> Decision:
        return Decision(c.id, s.prefix + text, s.latency(c), s.mode, s.rule)

    if not feasible:
        low = min(candidates, key=lambda c: (s.p50[c.id], c.flops, -c.accuracy, c.id))
        text = f"no model meets every constraint (cheapest {low.name}: {'; '.join(why[low.id])})"
        if low is run:
            return keep(f"{text}; keep {low.name}, already the cheapest")
        return go(low, f"{text} → cheapest {low.name} ({s.p50[low.id]:.1f} ms)")
    best = min(feasible, key=s.key)
    if run is None:
        was = f"{twin.running} is not in the catalog" if twin.running else "nothing running"
        return go(best, f"{was}; {obj} → {best.name} ({_metric(s, best)})")
    if why[run.id]:
        return go(best, f"{run.name} no longer fits ({'; '.join(why[run.id])}) → {best.name} "
                        f"({_metric(s, run)}→{_metric(s, best)})")
    if best is run:
        return keep(f"{obj}: {run.name} is still the best ({_metric(s, run)})")
    if not twin.booted and now - twin.since < s.rule.min_dwell_s:
        return keep(f"keep {run.name}: running {now - twin.since:.0f} s < "
                    f"{s.rule.min_dwell_s:g} s dwell (best would be {best.name})")
    gain = _gain(s, run, best)
    if gain < s.rule.min_gain:
        return keep(f"keep {run.name}: {best.name} gains {gain:.4f} < {s.rule.min_gain:g} "
                    f"on {obj}")
    return go(best, f"{obj} → {best.name} ({_metric(s, run)}→{_metric(s, best)})")
