"""Simulated device classes and their changing resources.

A `SimResources` plugs into the real agent where `PsutilResources` would on a board: it
reports battery, memory, heat and CPU from a small physical model, and a model's latency from
the catalog's per-segment FLOPs and operator kinds and the device's compute speed (slowed by
heat and load), so hundreds of devices fit on two cores while running the real agent code.

Each device has a hidden truth (`Hidden`) that no message reveals: its speed against its
class's nominal GFLOPS, how efficiently it runs each operator kind (an MCU runs attention
about 3× slower per FLOP than convolutions) and its active power, drawn per device from a
seeded RNG by `make_fleet`. The controller sees only the class's nominal figures (its
datasheet: nominal GFLOPS, overall and per operator kind) and what the device measures, and
must learn the rest. The battery drains by the energy the device
actually spends: idle power plus active power × the share of time it computes.
"""
from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from device_agent.runtime import Loaded
from fleet_protocol.messages import Capabilities
from stitch_lib.catalog import Catalog

INFER_EVERY_MS = 100.0  # the application asks for an inference this often
NOISE = (0.95, 1.1)  # a measured latency is the true one × uniform(*NOISE)
NOISE_P50, NOISE_P95 = 1.025, 1.0925  # the median and 95th percentile of that factor
Terms = tuple[tuple[str, int], ...]  # (operator kind, FLOPs) per segment of a model


@dataclass(frozen=True)
class DeviceClass:
    name: str
    gflops: float  # nominal compute speed (what the device announces)
    mem_mb: float
    battery_powered: bool
    efficiency: Mapping[str, float]  # true speed per operator kind, × gflops (missing: 1)
    power_w: float  # active power while computing
    idle_w: float
    battery_wh: float  # capacity (0 on mains)
    link_ms: float  # one-way latency added to every message the device receives
    link_kbps: float  # downlink bandwidth
    link_loss: float = 0.0  # fraction of QoS 0 messages lost


CLASSES = {c.name: c for c in (
    DeviceClass("mcu", gflops=0.4, mem_mb=96, battery_powered=True,
                efficiency={"conv": 1.0, "dwconv": 0.6, "attention": 0.33, "mlp": 0.8},
                power_w=0.2, idle_w=0.05, battery_wh=0.13, link_ms=80, link_kbps=250,
                link_loss=0.02),
    DeviceClass("rpi3", gflops=3.0, mem_mb=1024, battery_powered=True,
                efficiency={"conv": 1.0, "dwconv": 0.7, "attention": 0.6, "mlp": 0.9},
                power_w=3.7, idle_w=1.4, battery_wh=5.4, link_ms=30, link_kbps=2_000),
    DeviceClass("rpi4", gflops=8.0, mem_mb=4096, battery_powered=True,
                efficiency={"conv": 1.0, "dwconv": 0.75, "attention": 0.7, "mlp": 1.0},
                power_w=6.4, idle_w=2.7, battery_wh=13.0, link_ms=15, link_kbps=10_000),
    DeviceClass("jetson", gflops=60.0, mem_mb=8192, battery_powered=False,
                efficiency={"conv": 1.0, "dwconv": 0.4, "attention": 0.8, "mlp": 0.7},
                power_w=15.0, idle_w=5.0, battery_wh=0.0, link_ms=5, link_kbps=50_000),
)}


@dataclass(frozen=True)
class Hidden:
    """A device's true compute and power, which the controller never sees."""

    speed: float  # × the class's nominal GFLOPS
    efficiency: Mapping[str, float]  # per operator kind, × speed (missing: 1)
    power_w: float  # active power

    @classmethod
    def nominal(cls, c: DeviceClass) -> Hidden:
        return cls(1.0, dict(c.efficiency), c.power_w)

    @classmethod
    def draw(cls, c: DeviceClass, rng: random.Random, spread: float = 0.25) -> Hidden:
        """One device of class `c`: speed, each kind's efficiency and power each off the
        class's figure by a log-normal factor (`spread` for speed, 60% of it for the rest)."""
        def off(sd: float) -> float:
            return rng.lognormvariate(0.0, sd)

        return cls(off(spread), {k: e * off(0.6 * spread) for k, e in sorted(c.efficiency.items())},
                   c.power_w * off(0.6 * spread))


def cost_table(catalog: Catalog) -> dict[str, Terms]:
    """Catalog ID → (operator kind, FLOPs) per segment; one "model" term for an entry
    without per-segment costs."""
    return {e.id: tuple((c["kind"], int(c["flops"])) for c in e.segment_costs)
            if e.segment_costs else (("model", e.flops),) for e in catalog.entries}


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
    hidden: Hidden | None = None  # None: the class's nominal figures
    costs: Mapping[str, Terms] = field(default_factory=dict)  # `cost_table` of the catalog
    _last: float | None = None
    _load: float = 0.0  # CPU fraction the model takes (from its latency and the rate)

    def __post_init__(self) -> None:
        if self.hidden is None:
            self.hidden = Hidden.nominal(self.cls)

    def capabilities(self) -> Capabilities:
        """The class's nominal figures (its datasheet), never this device's hidden truth."""
        return Capabilities(device_class=self.cls.name, mem_mb=self.cls.mem_mb,
                            gflops=self.cls.gflops, battery_powered=self.cls.battery_powered,
                            kind_gflops={k: self.cls.gflops * e
                                         for k, e in sorted(self.cls.efficiency.items())})

    def throttle(self) -> float:
        """Speed factor: full speed below 70 °C, half speed at 90 °C and above."""
        return 1.0 - 0.5 * min(1.0, max(0.0, (self.state.temp_c - 70.0) / 20.0))

    def sample(self, now: float) -> dict:
        s = self.state
        dt = 0.0 if self._last is None else max(0.0, now - self._last)
        self._last = now
        load = min(1.0, s.cpu_other + self._load)
        if self.cls.battery_powered:
            watts = self.cls.idle_w + self.hidden.power_w * load
            delta = (-watts / (self.cls.battery_wh * 3600.0) if not s.charging else 2e-3) * dt
            s.battery = min(1.0, max(0.0, s.battery + delta))
        target = s.ambient_c + 45.0 * load  # heats towards a load-dependent equilibrium
        s.temp_c += (target - s.temp_c) * min(1.0, dt / 30.0)
        return {"cpu": load, "mem_free_mb": max(0.0, self.cls.mem_mb - s.mem_taken_mb),
                "battery": s.battery if self.cls.battery_powered else None,
                "charging": s.charging, "temp_c": s.temp_c}

    def disk_free_bytes(self, path: Path) -> int:
        return int(self.state.disk_free_mb * 2**20)

    def true_ms(self, terms: Terms) -> float:
        """The true latency of a model of `terms` right now, before measurement noise."""
        h = self.hidden
        flops_per_ms = (self.cls.gflops * 1e6 * h.speed * self.throttle()
                        * (1.0 - 0.5 * self.state.cpu_other))
        return sum(f / (flops_per_ms * h.efficiency.get(kind, 1.0)) for kind, f in terms)

    def terms(self, loaded: Loaded) -> Terms:
        return self.costs.get(loaded.hybrid) or (("model", loaded.flops),)

    def latency_ms(self, loaded: Loaded, probe: torch.Tensor) -> float:
        ms = self.true_ms(self.terms(loaded)) * self.rng.uniform(*NOISE)
        self._load = min(1.0, ms / INFER_EVERY_MS)
        return ms


def make_fleet(n: int, mix: dict[str, float] | None = None, seed: int = 0
               ) -> list[tuple[str, SimResources]]:
    """`n` devices named `<class>-NNN`, classes drawn by `mix` (default: equal shares), each
    with its own hidden truth (`Hidden.draw`)."""
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
            dev_rng = random.Random(rng.random())
            fleet.append((f"{c}-{k:03d}", SimResources(
                CLASSES[c], state, dev_rng, Hidden.draw(CLASSES[c], dev_rng))))
    return fleet


def with_changes(state: SimState, changes: dict) -> SimState:
    """A copy of `state` with scenario `changes` applied (unknown fields are an error)."""
    bad = set(changes) - set(SimState.__dataclass_fields__)
    if bad:
        raise ValueError(f"unknown device fields {sorted(bad)}; known: "
                         f"{sorted(SimState.__dataclass_fields__)}")
    return replace(state, **changes)
