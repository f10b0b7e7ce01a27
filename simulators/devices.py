"""Simulated device classes and their changing resources.

A `SimResources` plugs into the real agent where `PsutilResources` would on a board: it
reports battery, memory, heat and CPU from a small physical model, and a model's latency from
its measured FLOPs and the device's compute speed (slowed by heat and load), so hundreds of
devices fit on two cores while running the real agent code.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from device_agent.runtime import Loaded
from fleet_protocol.messages import Capabilities


@dataclass(frozen=True)
class DeviceClass:
    name: str
    gflops: float  # effective compute speed on these models
    mem_mb: float
    battery_powered: bool
    drain_per_s: float  # battery fraction drained per second at full load
    link_ms: float  # one-way latency added to every message the device receives
    link_kbps: float  # downlink bandwidth
    link_loss: float = 0.0  # fraction of QoS 0 messages lost


CLASSES = {c.name: c for c in (
    DeviceClass("mcu", gflops=0.4, mem_mb=96, battery_powered=True, drain_per_s=4e-4,
                link_ms=80, link_kbps=250, link_loss=0.02),
    DeviceClass("rpi3", gflops=3.0, mem_mb=1024, battery_powered=True, drain_per_s=2e-4,
                link_ms=30, link_kbps=2_000),
    DeviceClass("rpi4", gflops=8.0, mem_mb=4096, battery_powered=True, drain_per_s=1.5e-4,
                link_ms=15, link_kbps=10_000),
    DeviceClass("jetson", gflops=60.0, mem_mb=8192, battery_powered=False, drain_per_s=0.0,
                link_ms=5, link_kbps=50_000),
)}


@dataclass
class SimState:
    """The mutable physical state of one simulated device (scenarios change it)."""

    battery: float = 1.0
    charging: bool = False
    temp_c: float = 40.0
    ambient_c: float = 30.0
    mem_taken_mb: float = 0.0  # taken by other processes
    cpu_other: float = 0.1  # CPU load from other processes
    link_factor: float = 1.0  # >1: a degraded link (latency × factor)
    extra_loss: float = 0.0
    disk_free_mb: float = 4096.0  # free space for the segment cache


@dataclass
class SimResources:
    """Resources of one simulated device, advanced in time by `sample`."""

    cls: DeviceClass
    state: SimState = field(default_factory=SimState)
    rng: random.Random = field(default_factory=random.Random)
    _last: float | None = None
    _load: float = 0.0  # CPU fraction the model takes (from its latency and the rate)

    def capabilities(self) -> Capabilities:
        return Capabilities(device_class=self.cls.name, mem_mb=self.cls.mem_mb,
                            gflops=self.cls.gflops, battery_powered=self.cls.battery_powered)

    def throttle(self) -> float:
        """Speed factor: full speed below 70 °C, half speed at 90 °C and above."""
        return 1.0 - 0.5 * min(1.0, max(0.0, (self.state.temp_c - 70.0) / 20.0))

    def sample(self, now: float) -> dict:
        s = self.state
        dt = 0.0 if self._last is None else max(0.0, now - self._last)
        self._last = now
        load = min(1.0, s.cpu_other + self._load)
        if self.cls.battery_powered:
            delta = (-self.cls.drain_per_s * (0.3 + load) if not s.charging else 2e-3) * dt
            s.battery = min(1.0, max(0.0, s.battery + delta))
        target = s.ambient_c + 45.0 * load  # heats towards a load-dependent equilibrium
        s.temp_c += (target - s.temp_c) * min(1.0, dt / 30.0)
        return {"cpu": load, "mem_free_mb": max(0.0, self.cls.mem_mb - s.mem_taken_mb),
                "battery": s.battery if self.cls.battery_powered else None,
                "charging": s.charging, "temp_c": s.temp_c}

    def disk_free_bytes(self, path: Path) -> int:
        return int(self.state.disk_free_mb * 2**20)

    def latency_ms(self, loaded: Loaded, probe: torch.Tensor) -> float:
        speed = self.cls.gflops * 1e9 * self.throttle() * (1.0 - 0.5 * self.state.cpu_other)
        ms = loaded.flops / speed * 1e3 * self.rng.uniform(0.95, 1.1)
        self._load = min(1.0, ms / 100.0)  # an inference every 100 ms
        return ms


def make_fleet(n: int, mix: dict[str, float] | None = None, seed: int = 0
               ) -> list[tuple[str, SimResources]]:
    """`n` devices named `<class>-NNN`, classes drawn by `mix` (default: equal shares)."""
    mix = mix or {name: 1.0 for name in CLASSES}
    unknown = set(mix) - set(CLASSES)
    if unknown:
        raise ValueError(f"unknown device classes {sorted(unknown)}; known: {sorted(CLASSES)}")
    rng = random.Random(seed)
    names = sorted(mix)
    counts = {c: int(n * mix[c] / sum(mix.values())) for c in names}
    for c in names[: n - sum(counts.values())]:
        counts[c] += 1
    fleet = []
    for c in names:
        for k in range(counts[c]):
            state = SimState(battery=rng.uniform(0.6, 1.0), temp_c=rng.uniform(35, 50))
            fleet.append((f"{c}-{k:03d}", SimResources(CLASSES[c], state,
                                                       random.Random(rng.random()))))
    return fleet


def with_changes(state: SimState, changes: dict) -> SimState:
    """A copy of `state` with scenario `changes` applied (unknown fields are an error)."""
    bad = set(changes) - set(SimState.__dataclass_fields__)
    if bad:
        raise ValueError(f"unknown device fields {sorted(bad)}; known: "
                         f"{sorted(SimState.__dataclass_fields__)}")
    return replace(state, **changes)
