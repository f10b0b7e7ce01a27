"""Serving segment chunks off the MQTT thread, fairly and within per-device limits.

A request is admitted on the MQTT thread (`ArtifactServer.submit`: cheap, bounded) and served
by one worker thread, one chunk at a time, round-robin over the devices that are waiting, so a
device asking for much does not delay the others. Per device: a request rate (token bucket),
a few queued requests, a cap on the bytes one request may produce, and a byte rate. For the
whole server: a window of bytes handed to the broker and not yet acknowledged (PUBACK).
"""
from __future__ import annotations

import logging
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from fleet_protocol.messages import ArtifactRequest, encode

from .artifacts import Artifacts, ChunkIndex, unknown_artifact
from .ratelog import SampledLog

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeLimits:
    """How much one device may ask of the artifact server (docs/protocol.md §5.4)."""

    request_burst: int = 16  # requests a device may send at once ...
    requests_per_s: float = 2.0  # ... and on average after that
    queued_requests: int = 8  # a device's requests waiting to be served
    request_bytes: int = 16 * 1024 * 1024  # raw bytes one request may produce; more: ask again
    bytes_per_s: float = 8 * 1024 * 1024  # a device's sustained share of the output
    window_bytes: int = 4 * 1024 * 1024  # all devices: published, not yet PUBACKed ...
    window_chunks: int = 32  # ... in bytes and in messages (each costs the MQTT thread)


@dataclass
class Bucket:
    """A token bucket: `take` succeeds while any token is left (a take may leave a debt that
    later refills repay, so the average stays `rate`); tokens refill at `rate` up to `burst`."""

    rate: float
    burst: float
    tokens: float
    t: float

    def refill(self, now: float) -> None:
        self.tokens = min(self.burst, self.tokens + max(0.0, now - self.t) * self.rate)
        self.t = max(self.t, now)

    def take(self, now: float, n: float = 1.0) -> bool:
        """Take `n` tokens if there are any left."""
        self.refill(now)
        if self.tokens <= 0:
            return False
        self.tokens -= n
        return True

    def ready_in(self, now: float) -> float:
        """Seconds until a `take` can succeed."""
        self.refill(now)
        return 0.0 if self.tokens > 0 else (-self.tokens + 1e-9) / self.rate


@dataclass
class _Device:
    requests: Bucket
    output: Bucket
    queue: deque[ArtifactRequest] = field(default_factory=deque)
    index: ChunkIndex | None = None  # the request being served ...
    chunks: deque[int] = field(default_factory=deque)  # ... and its chunks left to send


class ArtifactServer:
    """A bounded queue of artifact requests and the worker that serves them.

    `publish(device, payload, nbytes)` hands one encoded chunk to the MQTT thread; the caller
    reports the broker's acknowledgement with `acked(nbytes)` (and `reset_window()` when the
    connection was lost, as unacknowledged messages then will never be acknowledged).
    """

    def __init__(self, artifacts: Artifacts, publish: Callable[[str, bytes, int], None],
                 limits: ServeLimits = ServeLimits(), clock: Callable[[], float] = time.monotonic,
                 max_devices: int = 100_000) -> None:
        self.artifacts, self.publish, self.limits, self.clock = artifacts, publish, limits, clock
        self.max_devices = max_devices
        self.stats: Counter[str] = Counter()
        self._badlog = SampledLog(log)
        self._cond = threading.Condition()
        self._devices: OrderedDict[str, _Device] = OrderedDict()  # round-robin order
        self._inflight = 0  # bytes
        self._inflight_chunks = 0
        self._stopped = False
        self._thread: threading.Thread | None = None

    # --- the MQTT thread ------------------------------------------------------------------
    def submit(self, device: str, r: ArtifactRequest, needed: bool = True) -> str:
        """Admit a request: "queued", or why not ("throttled": over the request rate,
        "not_needed": the caller says the device may not have it, "busy": too many waiting).
        Never blocks."""
        with self._cond:
            now = self.clock()
            d = self._devices.get(device)
            if d is None:
                if len(self._devices) >= self.max_devices:
                    self._forget_idle()
                lim = self.limits
                d = _Device(Bucket(lim.requests_per_s, lim.request_burst, lim.request_burst, now),
                            Bucket(lim.bytes_per_s, lim.request_bytes, lim.request_bytes, now))
                self._devices[device] = d
            if not d.requests.take(now):
                outcome = "throttled"
            elif not needed:
                outcome = "not_needed"
            elif len(d.queue) >= self.limits.queued_requests:
                outcome = "busy"
            else:
                d.queue.append(r)
                outcome = "queued"
                self._cond.notify()
            self.stats[f"req_{outcome}"] += 1
            return outcome

    def acked(self, nbytes: int) -> None:
        """The broker acknowledged a chunk of `nbytes` encoded bytes."""
        with self._cond:
            self._inflight = max(0, self._inflight - nbytes)
            self._inflight_chunks = max(0, self._inflight_chunks - 1)
            self._cond.notify()

    def reset_window(self) -> None:
        """The connection was lost: nothing in flight will be acknowledged."""
        with self._cond:
            self._inflight = self._inflight_chunks = 0
            self._cond.notify()

    # --- the worker -----------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="artifact-server", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(5.0)

    def pending(self, device: str) -> int:
        """Requests and chunks waiting for `device`."""
        with self._cond:
            d = self._devices.get(device)
            return 0 if d is None else len(d.queue) + len(d.chunks)

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._stopped:
                    return
                wait = self._wait_s()
                if wait > 0:
                    self._cond.wait(None if wait == float("inf") else wait)
                    continue
            try:
                self.serve_once()
            except Exception:
                self._count("errors")
                log.exception("artifact server: error serving a chunk")

    def _wait_s(self) -> float:
        """Seconds until there may be work (inf: none waiting); called under the lock."""
        if self._window_full():
            return float("inf")  # `acked` wakes us
        now = self.clock()
        waits = [d.output.ready_in(now) for d in self._devices.values() if d.queue or d.chunks]
        return min(waits, default=float("inf"))

    def serve_once(self) -> bool:
        """Serve one step for the next device in turn: start its next request, or send one
        chunk. False if no device could be served now."""
        with self._cond:
            if self._window_full():
                return False
            now = self.clock()
            ready = [k for k, d in self._devices.items()
                     if (d.queue or d.chunks) and d.output.ready_in(now) == 0.0]
            if not ready:
                return False
            device, d = ready[0], self._devices[ready[0]]
            self._devices.move_to_end(device)  # the next turn is someone else's
            if not d.chunks:
                request, d.index = d.queue.popleft(), None
            else:
                request, idx, k = None, d.index, d.chunks.popleft()
        if request is not None:  # outside the lock: may build the segment and hash it once
            self._start(device, d, request)
            return True
        payload = encode(idx.chunk(k))
        with self._cond:
            d.output.take(self.clock(), idx.nbytes(k))
            self._inflight += len(payload)
            self._inflight_chunks += 1
            self.stats["chunks"] += 1
        self.publish(device, payload, len(payload))
        return True

    def _start(self, device: str, d: _Device, r: ArtifactRequest) -> None:
        """Turn request `r` into the chunks to send (each once, within `request_bytes`)."""
        idx = self.artifacts.index(r.artifact, r.chunk_size)
        if idx is None:
            self._count("unknown")
            self.publish(device, encode(unknown_artifact(r.artifact)), 0)
            return
        wanted = sorted(set(r.chunks)) if r.chunks is not None else range(idx.total)
        bad = [k for k in wanted if k >= idx.total]
        if bad:
            self._count("bad_chunks")
            self._badlog.warning(device, self.clock(), "artifact server: %s asked for chunks %s "
                                 "of %s, which has %d", device, bad[:5], r.artifact[:12],
                                 idx.total)
            return
        chunks, budget = deque(), self.limits.request_bytes
        for k in wanted:
            budget -= idx.nbytes(k)
            if budget < 0 and chunks:
                self._count("truncated")  # the device asks again for the rest
                break
            chunks.append(k)
        with self._cond:
            d.index, d.chunks = idx, chunks

    def _window_full(self) -> bool:
        return (self._inflight >= self.limits.window_bytes
                or self._inflight_chunks >= self.limits.window_chunks)

    def _count(self, what: str) -> None:
        with self._cond:
            self.stats[what] += 1

    def _forget_idle(self) -> None:
        """Drop the state of devices with nothing waiting (called under the lock)."""
        for device in [k for k, d in self._devices.items() if not d.queue and not d.chunks]:
            del self._devices[device]
