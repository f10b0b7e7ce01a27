"""Pure wave logic of a staged rollout: who gets the deployment next, or why nobody does.

Waves are cumulative percents of the device list (`[10, 50, 100]`: the first 10%, then up to
50%, then everyone), rounded up so every wave has at least one device, and paced by
`wave_interval_s`. A released device that reported HEALTHY is then judged on what it serves
(`kpi_breach`: probe accuracy against the catalog's, request error rate, latency p95 against
its budget); the next wave, and the end, wait until each such device has been watched
`kpi_window_s` (a device still deploying does not hold them up).
The rollout aborts once at least one device has finished and the failed share (FAILED,
ROLLED_BACK, or a KPI breach, among the finished) exceeds `max_failure_percent`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from fleet_controller.policy import Rollout

PENDING, SENT, KPI = "pending", "sent", "KPI"
FINISHED = ("HEALTHY", "FAILED", "ROLLED_BACK", KPI)
FAILURES = ("FAILED", "ROLLED_BACK", KPI)
MIN_REQUESTS = 20  # requests served before an error rate is judged


@dataclass(frozen=True)
class Served:
    """What a released device served after its swap: the HEALTHY ack (when, probe accuracy)
    and the telemetry since (requests, errors, the latest p95)."""

    since: float
    expected_acc: float  # the catalog's test accuracy of the model it swapped to
    budget_ms: float | None = None  # its rule's latency p95 budget
    probe_acc: float | None = None
    lat_p95_ms: float | None = None
    requests: int = 0
    errors: int = 0


def kpi_breach(s: Served, rollout: Rollout) -> str | None:
    """None while the served figures are acceptable, else why not."""
    if s.probe_acc is not None and s.probe_acc < s.expected_acc - rollout.max_accuracy_drop:
        return (f"probe accuracy {s.probe_acc:.3f} < {s.expected_acc:.3f} expected "
                f"- {rollout.max_accuracy_drop:g}")
    if s.requests >= MIN_REQUESTS and s.errors / s.requests > rollout.max_error_rate:
        return (f"error rate {s.errors}/{s.requests} = {s.errors / s.requests:.1%} "
                f"> {rollout.max_error_rate:.1%}")
    if s.budget_ms is not None and s.lat_p95_ms is not None and s.lat_p95_ms > s.budget_ms:
        return f"served latency p95 {s.lat_p95_ms:.1f} ms > budget {s.budget_ms:.1f} ms"
    return None


@dataclass(frozen=True)
class WaveState:
    """One deployment's devices in rollout order, when each was sent, its status (pending /
    sent / HEALTHY / FAILED / ROLLED_BACK / KPI; a device missing from `status` is pending),
    what each HEALTHY one served since (`served`) and why a device failed (`reasons`)."""

    devices: tuple[str, ...]
    started: dict[str, float]
    status: dict[str, str]
    served: dict[str, Served] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)


def judge(state: WaveState, rollout: Rollout) -> WaveState:
    """`state` with every HEALTHY device whose served figures breach a KPI marked KPI."""
    status, reasons = dict(state.status), dict(state.reasons)
    for d, s in state.served.items():
        why = kpi_breach(s, rollout) if status.get(d) == "HEALTHY" else None
        if why is not None:
            status[d], reasons[d] = KPI, why
    return WaveState(state.devices, state.started, status, state.served, reasons)


def next_wave(state: WaveState, rollout: Rollout, now: float,
              last_wave_at: float | None) -> tuple[list[str], str]:
    """Devices to send now and why; `last_wave_at` is None before the first wave."""
    state = judge(state, rollout)
    status = [state.status.get(d, PENDING) for d in state.devices]
    finished = sum(s in FINISHED for s in status)
    failed = [d for d, s in zip(state.devices, status) if s in FAILURES]
    if finished and 100 * len(failed) / finished > rollout.max_failure_percent:
        why = "; ".join(f"{d}: {state.reasons[d]}" for d in failed if d in state.reasons)
        return [], (f"aborted: {len(failed)} of {finished} finished devices failed "
                    f"({100 * len(failed) / finished:.0f}% > {rollout.max_failure_percent:g}%)"
                    + (f" — {why}" if why else ""))
    watched = max((s.since + rollout.kpi_window_s - now for d, s in state.served.items()
                   if state.status.get(d) == "HEALTHY"), default=0.0)
    pending = [d for d, s in zip(state.devices, status) if s == PENDING]
    if not pending:
        return [], "done" if watched <= 0 else f"watching the last wave for {watched:.1f} s"
    sent = len(state.devices) - len(pending)
    n = len(state.devices)
    wave, target = next((i, math.ceil(p * n / 100)) for i, p in enumerate(rollout.waves)
                        if math.ceil(p * n / 100) > sent)
    wait = watched
    if last_wave_at is not None:
        wait = max(wait, rollout.wave_interval_s - (now - last_wave_at))
    if wait > 0:
        return [], f"waiting {wait:.1f} s before wave {wave + 1}/{len(rollout.waves)}"
    batch = pending[:target - sent]
    return batch, (f"wave {wave + 1}/{len(rollout.waves)}: {rollout.waves[wave]}% "
                   f"→ {len(batch)} devices ({sent + len(batch)} of {n})")
