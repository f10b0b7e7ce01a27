"""Where an agent's resource readings and model latencies come from.

`PsutilResources` reads a real board; the simulators provide their own implementation of the
same protocol, so the agent's code is the same in both cases.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Protocol

import psutil
import torch

from fleet_protocol.messages import Capabilities

from .runtime import Loaded


class Resources(Protocol):
    def capabilities(self) -> Capabilities: ...

    def sample(self, now: float) -> dict:
        """cpu (0-1), mem_free_mb, battery (0-1 or None), charging, temp_c; `now` is a
        monotonic reading (seconds), for resources that change with time."""

    def latency_ms(self, loaded: Loaded, probe: torch.Tensor) -> float:
        """The latency of one batch-1 inference of `loaded` on this device."""

    def disk_free_bytes(self, path: Path) -> int:
        """Free bytes on the file system that holds `path` (the segment cache)."""


class PsutilResources:
    """A real board, read with psutil; latency is measured by running the model."""

    def __init__(self, device_class: str = "board",
                 kind_gflops: dict[str, float] | None = None) -> None:
        self.device_class = device_class
        self.kind_gflops = dict(kind_gflops or {})  # the board's datasheet, per operator kind

    def capabilities(self) -> Capabilities:
        battery = psutil.sensors_battery()
        return Capabilities(device_class=self.device_class,
                            mem_mb=psutil.virtual_memory().total / 2**20,
                            gflops=max(1.0, 5.0 * (psutil.cpu_count() or 1)),
                            kind_gflops=self.kind_gflops,
                            battery_powered=battery is not None)

    def sample(self, now: float) -> dict:
        battery = psutil.sensors_battery()
        temps = getattr(psutil, "sensors_temperatures", lambda: {})() or {}
        readings = [t.current for ts in temps.values() for t in ts if t.current]
        return {"cpu": psutil.cpu_percent(interval=None) / 100,
                "mem_free_mb": psutil.virtual_memory().available / 2**20,
                "battery": None if battery is None else battery.percent / 100,
                "charging": bool(battery and battery.power_plugged),
                "temp_c": max(readings) if readings else 0.0}

    def disk_free_bytes(self, path: Path) -> int:
        return shutil.disk_usage(path).free

    @torch.no_grad()
    def latency_ms(self, loaded: Loaded, probe: torch.Tensor) -> float:
        t0 = time.perf_counter()
        loaded.module(probe[:1])
        return (time.perf_counter() - t0) * 1e3
