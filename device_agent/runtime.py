"""The running model: assembly from cached segments plus a stitch delta, an atomic slot that
inference reads and deployments swap, latency statistics, and the health verdict.

Inference takes a reference to the current model under a lock and runs outside it, so a swap
never shows a half-built model and requests in flight finish on the model they started with.
"""
from __future__ import annotations

import math
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from fleet_protocol import codec
from fleet_protocol.messages import Desired, StitchDelta
from stitch_lib.inputs import InputSpec
from stitch_lib.segments import Port, Segment
from stitch_lib.stitch import Stitch


@dataclass(frozen=True)
class Loaded:
    """A model ready to serve, and the deployment it came from."""

    module: nn.Module
    desired: Desired
    flops: int
    input: InputSpec  # the images it takes (from its stem segment's artifact)

    @property
    def hybrid(self) -> str:
        return self.desired.hybrid

    @property
    def generation(self) -> int:
        return self.desired.generation


def _port(p) -> Port:
    return Port(p.form, p.channels, tuple(p.grid), p.num_prefix)


def build_stitch(delta: StitchDelta) -> Stitch:
    """A stitch from a delta: shapes known from the ports, bytes checked before loading."""
    stitch = Stitch(_port(delta.src), _port(delta.dst), delta.hidden)
    expected = {k: tuple(v.shape) for k, v in stitch.state_dict().items()}
    blob = codec.unb64(delta.data, codec.MAX_DELTA_BYTES)
    if len(blob) != delta.size:
        raise codec.ArtifactError(f"delta is {len(blob)} bytes, the manifest says {delta.size}")
    tensors = codec.unpack_delta(blob, delta.sha256, expected)
    stitch.load_state_dict({k: torch.from_numpy(v.astype(np.float32)) for k, v in tensors.items()})
    return stitch.eval().requires_grad_(False)


def assemble(front: list[Segment], stitch: Stitch | None, back: list[Segment]) -> nn.Module:
    """front → stitch → back as one module (segments shared, never copied)."""
    parts = [*front, *([stitch] if stitch is not None else []), *back]
    return nn.Sequential(*parts).eval()


@torch.no_grad()
def verify(module: nn.Module, probe: torch.Tensor, num_classes: int | None = None) -> None:
    """Run the new model once on probe inputs before it may serve. Raises ValueError when
    outputs are not finite or have the wrong shape."""
    out = module(probe[:2])
    if out.ndim != 2 or (num_classes is not None and out.shape[1] != num_classes):
        raise ValueError(f"model outputs shape {tuple(out.shape)}, expected (N, {num_classes})")
    if not torch.isfinite(out).all():
        raise ValueError("model outputs are not finite")


class NoModel(RuntimeError):
    """The slot holds no model yet."""


class ModelFailed(RuntimeError):
    """The model raised on a request; `loaded` is the model that did."""

    def __init__(self, loaded: Loaded, exc: Exception) -> None:
        super().__init__(str(exc))
        self.loaded = loaded


class ModelSlot:
    """The current and the previous model; swaps are atomic."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.current: Loaded | None = None
        self.previous: Loaded | None = None

    def get(self) -> Loaded | None:
        with self._lock:
            return self.current

    def swap(self, new: Loaded) -> float:
        """Make `new` current; returns how long the swap held the lock (ms)."""
        t0 = time.perf_counter()
        with self._lock:
            self.previous, self.current = self.current, new
        return (time.perf_counter() - t0) * 1e3

    def rollback(self) -> Loaded | None:
        """Back to the previous model (no network needed); returns it."""
        with self._lock:
            if self.previous is not None:
                self.current, self.previous = self.previous, None
            return self.current

    @torch.no_grad()
    def infer(self, x: Any, prepare: Callable[[Any, InputSpec], torch.Tensor] | None = None
              ) -> tuple[torch.Tensor, Loaded]:
        """Run the current model on `x` (made its input by `prepare`, if given); the model is
        fixed when the call starts, so a swap during the call does not touch it."""
        loaded = self.get()
        if loaded is None:
            raise NoModel("no model loaded yet")
        if prepare is not None:
            x = prepare(x, loaded.input)
        try:
            return loaded.module(x), loaded
        except Exception as exc:
            raise ModelFailed(loaded, exc) from exc


class LatencyWindow:
    """The recent latencies of the running model (served requests and probes), for p50/p95
    in telemetry and the health check: the last `size` samples, none older than `max_age_s`
    (so a device that throttles, or that probes once per telemetry period while idle, reports
    what it does now, not minutes ago). Thread-safe; samples of any model but the one it was
    last `reset` to are ignored, so a request that began before a swap never counts for the
    new model."""

    def __init__(self, size: int = 64, max_age_s: float = math.inf,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if size < 1 or not max_age_s > 0:
            raise ValueError(f"a latency window needs size ≥ 1 and max_age_s > 0, got {size} "
                             f"and {max_age_s}")
        self._lock = threading.Lock()
        self._values: deque[tuple[float, float]] = deque(maxlen=size)  # (when, ms)
        self._owner: Loaded | None = None
        self.max_age_s, self.clock = max_age_s, clock
        self.count = 0  # samples taken, ever

    def reset(self, owner: Loaded | None) -> None:
        """Forget every sample: from now on only `owner`'s count."""
        with self._lock:
            self._values.clear()
            self._owner = owner

    def add(self, ms: float, owner: Loaded | None) -> None:
        with self._lock:
            if owner is self._owner:
                self._values.append((self.clock(), ms))
                self.count += 1

    def percentile(self, q: float, max_age_s: float | None = None) -> float | None:
        """The `q`th percentile of the samples no older than `max_age_s` (default: the
        window's; `math.inf`: every sample since the last `reset`, up to `size`); None
        without any."""
        oldest = self.clock() - (self.max_age_s if max_age_s is None else max_age_s)
        with self._lock:
            values = [ms for when, ms in self._values if when >= oldest]
        return percentile(values, q)


def percentile(values: list[float], q: float) -> float | None:
    """The `q`th percentile (1–99) of `values`, linear between order statistics (NumPy's
    default); None without values."""
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q) - 1]


def health_verdict(p95_ms: float | None, budget_ms: float | None, probe_acc: float | None,
                   min_acc: float | None) -> str | None:
    """None when healthy, else the reason: latency over budget or accuracy under the floor
    on the device's labelled probes."""
    if budget_ms is not None and p95_ms is not None and p95_ms > budget_ms:
        return f"latency p95 {p95_ms:.1f} ms > budget {budget_ms:.1f} ms"
    if min_acc is not None and probe_acc is not None and probe_acc < min_acc:
        return f"probe accuracy {probe_acc:.3f} < {min_acc:.3f}"
    return None
