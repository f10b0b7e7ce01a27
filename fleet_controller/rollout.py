"""Pure wave logic of a staged rollout: who gets the deployment next, or why nobody does.

Waves are cumulative percents of the device list (`[10, 50, 100]`: the first 10%, then up to
50%, then everyone), rounded up so every wave has at least one device, and paced by
`wave_interval_s`. The rollout aborts once at least one device has finished and the failed
share (FAILED + ROLLED_BACK among the finished) exceeds `max_failure_percent`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from fleet_controller.policy import Rollout

PENDING, SENT = "pending", "sent"
FINISHED = ("HEALTHY", "FAILED", "ROLLED_BACK")
FAILURES = ("FAILED", "ROLLED_BACK")


@dataclass(frozen=True)
class WaveState:
    """One deployment's devices in rollout order, when each was sent, and its status
    (pending / sent / HEALTHY / FAILED / ROLLED_BACK; a device missing from `status` is
    pending)."""

    devices: tuple[str, ...]
    started: dict[str, float]
    status: dict[str, str]


def next_wave(state: WaveState, rollout: Rollout, now: float,
              last_wave_at: float | None) -> tuple[list[str], str]:
    """Devices to send now and why; `last_wave_at` is None before the first wave."""
    status = [state.status.get(d, PENDING) for d in state.devices]
    finished = sum(s in FINISHED for s in status)
    failed = sum(s in FAILURES for s in status)
    if finished and 100 * failed / finished > rollout.max_failure_percent:
        return [], (f"aborted: {failed} of {finished} finished devices failed "
                    f"({100 * failed / finished:.0f}% > {rollout.max_failure_percent:g}%)")
    pending = [d for d, s in zip(state.devices, status) if s == PENDING]
    if not pending:
        return [], "done"
    sent = len(state.devices) - len(pending)
    n = len(state.devices)
    wave, target = next((i, math.ceil(p * n / 100)) for i, p in enumerate(rollout.waves)
                        if math.ceil(p * n / 100) > sent)
    if last_wave_at is not None and now - last_wave_at < rollout.wave_interval_s:
        wait = rollout.wave_interval_s - (now - last_wave_at)
        return [], f"waiting {wait:.1f} s before wave {wave + 1}/{len(rollout.waves)}"
    batch = pending[:target - sent]
    return batch, (f"wave {wave + 1}/{len(rollout.waves)}: {rollout.waves[wave]}% "
                   f"→ {len(batch)} devices ({sent + len(batch)} of {n})")
