"""The device agent: telemetry out, desired state in, hybrids assembled from cached segments,
verified, hot-swapped, health-checked and rolled back by the device itself — and the running
model served to the board's applications (`Agent.infer`, or the local HTTP API of
`device_agent.localapi`).

The agent never owns an event loop: a `ClientHost` drives its MQTT client and timers, so a
real board runs one agent on one host and a simulator runs a thousand agents on one host in one
thread. The MQTT callbacks only parse and hand over: the work (signatures, chunk writes,
assembly, verification, swaps, health probes, telemetry) runs on the agent's `Worker` — a
thread on a board, inline in the simulator's loop. Every job catches its errors: a bad message
is logged, counted and dropped.

A deployment goes RECEIVED → (FETCHING n/N) → VERIFIED → SWAPPED → HEALTHY, or ends FAILED
(the old model never stopped serving) or FAILED + ROLLED_BACK (the new one was unhealthy).
After HEALTHY a canary window compares what the new model serves with what the previous one
served before the swap; a regression rolls it back then, with a ROLLED_BACK ack whose reason
starts "canary:" (device_agent.canary).

At start the agent restores the models it ran (applied.json); with none, it serves the boot
model the board was provisioned with (boot.json, generation 0: device_agent.cache.BootModel),
so a board serves from the moment it starts. Every deployment is newer and replaces it.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import random
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import paho.mqtt.client as mqtt
import torch
from pydantic import Field, TypeAdapter, ValidationError

from fleet_protocol import codec
from fleet_protocol.messages import (Ack, ArtifactChunk, ArtifactRequest, Capabilities, Desired,
                                     ProtocolError, Rebirth, State, Telemetry, decode, encode)
from fleet_runtime.mqtt import ClientHost, make_client
from fleet_protocol.signing import Keyring, SignatureError, unverified
from fleet_protocol.topics import Topics
from stitch_lib.cost import flops
from stitch_lib.files import atomic_write
from stitch_lib.inputs import InputSpec

from .cache import BootModel, SegmentCache, SegmentRegistry, read_boot
from .canary import CanaryConfig, canary_verdict
from .prom import AgentMetrics
from .resources import Resources
from .runtime import LatencyWindow, Loaded, ModelSlot, assemble, build_stitch, health_verdict, verify
from .serving import Prediction, Serving
from .worker import ThreadWorker, Worker

log = logging.getLogger(__name__)
REFETCH_AFTER_S = 10.0  # re-request missing chunks after this long without progress
# telemetry's latency figures cover at most this many telemetry periods: an idle device probes
# once a period, so its p50 moves within about three periods when its speed changes
LATENCY_WINDOW_PERIODS = 5
_TAGS_FIELD = Capabilities.model_fields["tags"]
_TAGS = TypeAdapter(Annotated[_TAGS_FIELD.annotation, *_TAGS_FIELD.metadata])  # as on the wire
# an entry of applied.json: a deployment, or the boot model (a deployment rolled back to it)
_RUNNING = TypeAdapter(Annotated[Desired | BootModel, Field(discriminator="kind")])
CRASH_ENV = "RESTNET_CRASH_AT"  # fault injection for the crash tests: "chunk:N" or "swap"


def _crash_point(name: str) -> None:
    """Die right here, as a power cut would, if the crash tests asked for it."""
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def _checked_tags(tags: dict[str, str]) -> dict[str, str]:
    """`tags` if the wire accepts them (fleet_protocol.messages.Tags), else ValueError."""
    try:
        return dict(_TAGS.validate_python(tags))
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err.get("loc", ()))[:40]
        raise ValueError(f"bad tags: {where + ': ' if where else ''}{err['msg']} (see "
                         "Capabilities.tags in docs/protocol.md)") from None


def _disk(exc: Exception) -> str:
    """The reason prefix an operator greps for when the cache's file system is full."""
    return "disk full: " if isinstance(exc, OSError) and exc.errno == errno.ENOSPC else ""


def _content(d: Desired) -> tuple:
    """What makes an assembled model what it is: its segments and its stitch tensors."""
    return (tuple(d.front), tuple(d.back),
            _digest(d.stitch.model_dump_json()) if d.stitch is not None else None)


def _digest(x: torch.Tensor | str) -> str:
    """sha256 of a tensor's bytes (with its shape and dtype) or of a string."""
    if isinstance(x, str):
        return hashlib.sha256(x.encode()).hexdigest()
    x = x.detach().cpu().contiguous()
    h = hashlib.sha256(f"{x.dtype}{tuple(x.shape)}".encode())
    h.update(x.numpy().tobytes())
    return h.hexdigest()


@dataclass
class AgentConfig:
    device_id: str
    cache_dir: Path
    topics: Topics = field(default_factory=Topics)
    telemetry_period: float = 5.0
    health_samples: int = 8  # latency samples taken by the health check
    # labelled probe images (x as the model's input, already prepared; y); without them the
    # checks run on zeros of the model's input shape (from its stem segment's artifact)
    probe: tuple[torch.Tensor, torch.Tensor] | None = None
    num_classes: int | None = None
    chunk_size: int = 64 * 1024  # segment download chunks
    tags: dict[str, str] = field(default_factory=dict)  # operator labels, sent in the birth
    max_queue: int = 16  # inference requests that may wait for the model; more are refused
    username: str | None = None
    password: str | None = None
    tls_ca: Path | None = None  # TLS to the broker, checked against this CA
    trust: tuple = ()  # the controller's Ed25519 public keys, until a signed key set replaces them
    canary: CanaryConfig = field(default_factory=CanaryConfig)  # the window after HEALTHY


@dataclass
class _Fetch:
    total: int | None = None
    held: set[int] = field(default_factory=set)
    last_progress: float = 0.0


@dataclass(frozen=True)
class _Canary:
    """A canary window in progress: `new` serves, `old` is kept to go back to."""

    new: Loaded
    old: Loaded
    since: float


class Agent:
    """One device. `start()` registers it with a ClientHost; everything else is callbacks."""

    def __init__(self, cfg: AgentConfig, resources: Resources, host: ClientHost,
                 registry: SegmentRegistry | None = None, clock=time.time,
                 worker: Worker | None = None, monotonic=time.monotonic) -> None:
        """`worker` runs the deployment work: by default a thread of its own (a board); the
        simulator passes an `InlineWorker` to keep a thousand agents on one thread. `clock`
        stamps messages (wall time, as the controller reads it); `monotonic` times everything
        the board measures itself (latency window, request rate, fetch retries, canary window),
        so a wall clock that jumps — a board without a real-time clock, set by NTP after boot —
        changes none of them."""
        cfg.tags = _checked_tags(cfg.tags)
        self.cfg, self.resources, self.host, self.clock = cfg, resources, host, clock
        self.monotonic = monotonic
        self.t = cfg.topics
        self.cache = SegmentCache(cfg.cache_dir)
        self.registry = registry or SegmentRegistry()
        self.slot = ModelSlot()
        self.latency = LatencyWindow(
            max_age_s=LATENCY_WINDOW_PERIODS * cfg.telemetry_period, clock=monotonic)
        self.prom = AgentMetrics(self._tallies)
        self.serving = Serving(self.slot, self.latency, cfg.max_queue,
                               observe=self.prom.latency_ms.observe)
        self.worker = worker or ThreadWorker(name=f"agent-{cfg.device_id}")
        self.stats: Counter[str] = Counter()
        self.session = time.time_ns()
        self.seq = 0
        self._reported = 0  # latency samples already reported
        self._served = (0, 0, monotonic())  # (requests, errors, when) at the last telemetry
        self.applied = 0  # generation running (or last refused): older desired states are ignored
        self.pending: Desired | None = None
        self.fetching: dict[str, _Fetch] = {}
        self.canary: _Canary | None = None
        self.keyring = Keyring(list(cfg.trust))
        self.client: mqtt.Client | None = None
        self._restore()

    # --- the board's applications ---------------------------------------------------------
    def infer(self, images) -> Prediction:
        """Classify `images` with the running model: an array or tensor, N×C×H×W, N×H×W×C or
        N×H×W, uint8 pixels (0–255) or floats (0–1); resized and normalised as the model's
        training data were. Thread-safe; a swap never interrupts a call, and the answer names
        the generation that produced it. Raises serving.BadInput or serving.Unavailable."""
        return self.serving.infer(images)

    def feedback(self, request_id: str, labels: list[int | None]) -> dict:
        """Tell the agent the true class of each image of an earlier answer (None where not
        known), by the answer's `request_id`; the canary window judges models on these.
        Returns {"request_id", "generation", "labelled", "correct"}. Thread-safe. Raises
        serving.BadInput or serving.UnknownRequest."""
        return self.serving.feedback({"request_id": request_id, "labels": labels})

    def _tallies(self) -> dict[str, int]:
        """What the Prometheus collector reads at scrape time (from its own thread)."""
        stats = dict(self.stats)  # one C-level copy: safe across threads
        return {"requests": self.serving.requests, "errors": self.serving.errors,
                "swaps": stats.get("SWAPPED", 0), "rollbacks": stats.get("ROLLED_BACK", 0),
                "refusals": stats.get("refused", 0) + stats.get("replayed", 0)}

    def set_tags(self, tags: dict[str, str]) -> None:
        """Replace the device's tags and announce them in a new birth."""
        self.cfg.tags = _checked_tags(tags)
        self._submit(self._birth, key="birth")

    # --- lifecycle ----------------------------------------------------------------------
    def start(self, broker_host: str, port: int) -> None:
        will = State(device_id=self.cfg.device_id, online=False, session=self.session,
                     ts=self.clock())
        self.client = make_client(self.cfg.device_id, will=(self.t.state(self.cfg.device_id),
                                                             encode(will)),
                                  username=self.cfg.username, password=self.cfg.password,
                                  tls_ca=self.cfg.tls_ca)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.host.add(self.client, broker_host, port)
        self.host.every(self.cfg.telemetry_period, lambda: self._submit(self._tick, key="tick"),
                        jitter=1.0)

    def stop(self) -> None:
        """Go offline cleanly: finish the job in progress, publish the death state, then
        disconnect."""
        self.worker.stop()
        if self.client is not None:
            self._publish(self.t.state(self.cfg.device_id),
                          State(device_id=self.cfg.device_id, online=False,
                                session=self.session, ts=self.clock()), retain=True)
            self.host.remove(self.client)

    # --- shell: MQTT callbacks hand their work to the worker -------------------------------
    def _submit(self, fn, *args, key: str | None = None, topic: str | None = None) -> None:
        """Run `fn(*args)` on the worker; a bad message is counted and dropped, any other
        error logged with its traceback — a job never raises."""
        def job() -> None:
            try:
                fn(*args)
            except (ProtocolError, codec.ArtifactError) as exc:
                self.stats["dropped"] += 1
                log.warning("%s: dropped message on %s: %s", self.cfg.device_id,
                            topic or fn.__name__, exc)
            except Exception:
                self.stats["errors"] += 1
                log.exception("%s: error in %s", self.cfg.device_id, fn.__name__)

        if not self.worker.submit(job, key):
            self.stats["overloaded"] += 1  # a chunk comes again when its download stalls
            if self.stats["overloaded"] % 100 == 1:
                log.warning("%s: work queue full, dropped %s (%d so far)", self.cfg.device_id,
                            fn.__name__, self.stats["overloaded"])

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.warning("%s: connect refused: %s", self.cfg.device_id, reason_code)
            return
        d = self.cfg.device_id
        # the key set first: Mosquitto sends retained messages in subscription order
        client.subscribe([(self.t.ctl_keys, 1), (self.t.desired(d), 1), (self.t.art_data(d), 1),
                          (self.t.rebirth, 1)])
        self._submit(self._rebirth, key="birth")  # also resumes downloads cut by the disconnect

    def _on_message(self, client, userdata, msg) -> None:
        """Parse, then queue the work: nothing slow runs in the MQTT client's thread."""
        try:
            if msg.topic == self.t.desired(self.cfg.device_id):  # the newest waiting wins
                self._submit(self._on_signed_desired, msg.payload, key="desired",
                             topic=msg.topic)
            elif msg.topic == self.t.art_data(self.cfg.device_id):
                self._submit(self._on_chunk, decode(ArtifactChunk, msg.payload), topic=msg.topic)
            elif msg.topic == self.t.ctl_keys:
                self._submit(self._on_keys, msg.payload, topic=msg.topic)
            elif msg.topic == self.t.rebirth:
                decode(Rebirth, msg.payload)  # a controller (re)started: tell it all again
                self.host.call_later(random.uniform(0, 2),
                                     lambda: self._submit(self._rebirth, key="birth"))
        except ProtocolError as exc:
            self.stats["dropped"] += 1
            log.warning("%s: dropped message on %s: %s", self.cfg.device_id, msg.topic, exc)
        except Exception:
            self.stats["errors"] += 1
            log.exception("%s: error handling %s", self.cfg.device_id, msg.topic)

    def _publish(self, topic: str, msg, qos: int = 1, retain: bool = False) -> None:
        if self.client is not None:
            self.client.publish(topic, encode(msg), qos=qos, retain=retain)

    def _rebirth(self) -> None:
        self._birth()
        for seg_id in self.fetching:  # its chunks in flight were lost with it
            self._request(seg_id)

    def _birth(self) -> None:
        cur = self.slot.get()
        caps = self.resources.capabilities().model_copy(update={"tags": dict(self.cfg.tags)})
        self._publish(self.t.state(self.cfg.device_id), State(
            device_id=self.cfg.device_id, online=True, session=self.session, ts=self.clock(),
            capabilities=caps, segments=self.cache.ids(),
            hybrid=cur.hybrid if cur else None, generation=self.applied,
            keys_seq=self.keyring.seq), retain=True)

    def _ack(self, d: Desired, status: str, **kw) -> None:
        self.stats[status] += 1
        self._publish(self.t.ack(self.cfg.device_id), Ack(
            device_id=self.cfg.device_id, deployment_id=d.deployment_id,
            generation=d.generation, status=status, ts=self.clock(), **kw))

    def _probe(self, spec: InputSpec) -> torch.Tensor:
        """Two model inputs for checks and latency probes: the labelled probes, else zeros."""
        probe = self.cfg.probe[0] if self.cfg.probe is not None else torch.zeros(2, *spec.shape)
        if tuple(probe.shape[1:]) != spec.shape:
            raise ValueError(f"the probe images are {tuple(probe.shape[1:])}, the model takes "
                             f"{spec.shape}")
        return probe

    def _tick(self) -> None:
        now = self.monotonic()
        self._judge_canary(now)
        cur = self.slot.get()
        requests, errors = self.serving.requests, self.serving.errors
        n_req, n_err = requests - self._served[0], errors - self._served[1]
        since = now - self._served[2]
        self._served = (requests, errors, now)
        if cur is not None and n_req == 0:  # idle: probe, so the latency stays known
            self.latency.add(self.resources.latency_ms(cur, self._probe(cur.input)), cur)
        r = self.resources.sample(now)
        self.seq += 1
        samples, self._reported = self.latency.count - self._reported, self.latency.count
        self._publish(self.t.telemetry(self.cfg.device_id), Telemetry(
            seq=self.seq, ts=self.clock(), lat_p50_ms=self.latency.percentile(50),
            lat_p95_ms=self.latency.percentile(95), inferences=samples, requests=n_req,
            req_errors=n_err, req_rate=n_req / since if since > 0 else 0.0,
            queue_depth=self.serving.queue_depth,
            hybrid=cur.hybrid if cur else None, generation=self.applied, **r), qos=0)
        for seg_id, f in self.fetching.items():
            if now - f.last_progress > REFETCH_AFTER_S:
                self._request(seg_id)

    # --- trust: nothing unsigned, foreign or old gets past here --------------------------
    def _on_keys(self, payload: bytes) -> None:
        if not self.keyring.accept(payload):
            return  # the keys already in force (a re-delivery, or a controller restart)
        atomic_write(self.cfg.cache_dir / "trust.json", self.keyring.to_json())
        log.info("%s: now trusting keys %s", self.cfg.device_id, sorted(self.keyring.keys))
        self._birth()

    def _on_signed_desired(self, payload: bytes) -> None:
        """Verify before anything else; refuse with a FAILED ack naming the reason."""
        env, d = unverified(Desired, payload)
        newest = max(self.applied, self.pending.generation if self.pending else 0)
        if d.generation in (self.applied, self.pending.generation if self.pending else -1):
            self.stats["stale"] += 1  # a retained re-delivery: already handled
            return
        try:
            self.keyring.verify(env)
        except SignatureError as exc:
            self._refuse(d, "refused", f"signature: {exc}")
        else:
            if d.device_id != self.cfg.device_id:
                self._refuse(d, "refused", f"addressed to device {d.device_id}")
            elif d.generation < newest:
                self._refuse(d, "replayed", f"replayed: generation {d.generation} is older "
                             f"than {newest}")
            else:
                self._on_desired(d)

    def _refuse(self, d: Desired, counter: str, reason: str) -> None:
        """Refuse a desired state that was not verified: the running model and the applied
        generation stay exactly as they were."""
        self.stats[counter] += 1
        log.warning("%s: refused desired %s: %s", self.cfg.device_id, d.deployment_id, reason)
        self._ack(d, "FAILED", reason=reason)

    # --- the deployment pipeline ------------------------------------------------------
    def _on_desired(self, d: Desired) -> None:
        self.pending = d
        self._ack(d, "RECEIVED")
        missing = [s for s in dict.fromkeys(d.front + d.back) if not self.cache.has(s)]
        complete = []  # every chunk arrived before a crash: only the assembly is left
        for seg_id in missing:
            if seg_id not in self.fetching:  # resume what an earlier run began
                total, held = (self.cache.in_progress(seg_id, self.cfg.chunk_size)
                               or (None, set()))
                self.fetching[seg_id] = _Fetch(total, held, self.monotonic())
            f = self.fetching[seg_id]
            if f.total is not None and len(f.held) >= f.total:
                complete.append(seg_id)
            else:
                self._request(seg_id)
        if not missing:
            self._apply(d)
            return
        self._ack(d, "FETCHING", done=0, total=len(missing))
        for seg_id in complete:
            self._downloaded(seg_id)

    def _request(self, seg_id: str) -> None:
        f = self.fetching[seg_id]
        f.last_progress = self.monotonic()
        chunks = None if f.total is None else sorted(set(range(f.total)) - f.held)
        self._publish(self.t.art_req(self.cfg.device_id),
                      ArtifactRequest(artifact=seg_id, chunks=chunks,
                                      chunk_size=self.cfg.chunk_size))

    def _on_chunk(self, c: ArtifactChunk) -> None:
        f = self.fetching.get(c.artifact)
        if f is None:
            return  # a late duplicate
        if c.error:
            self.fetching.pop(c.artifact)
            if self.pending and c.artifact in self.pending.front + self.pending.back:
                self._fail_pending(f"segment {c.artifact[:12]} unavailable: {c.error}")
            return
        if c.index >= c.total or (f.total is not None and c.total != f.total):
            raise codec.ArtifactError(f"chunk {c.index}/{c.total} of {c.artifact[:12]} does "
                                      "not fit the download")
        if f.total is None:
            free = self.resources.disk_free_bytes(self.cfg.cache_dir)
            if c.size > free:  # refuse up front: the old model keeps serving
                self.fetching.pop(c.artifact)
                self._fail_pending(f"disk full: segment {c.artifact[:12]} needs {c.size} bytes, "
                                   f"{free} free in the cache")
                return
            f.total, f.held = c.total, self.cache.partial(c.artifact, c.artifact_sha256, c.size,
                                                          c.total)
        data = codec.unb64(c.data, 256 * 1024)
        if codec.sha256_hex(data) != c.sha256:
            raise codec.ArtifactError(f"chunk {c.index} of {c.artifact[:12]} fails its sha256")
        if c.index not in f.held:
            try:
                self.cache.put_chunk(c.artifact, c.index, data)
            except OSError as exc:  # e.g. a full disk: the old model keeps serving
                self.fetching.pop(c.artifact)
                self._fail_pending(f"{_disk(exc)}cache write failed: {exc.strerror or exc}")
                return
            f.held.add(c.index)
            _crash_point(f"chunk:{len(f.held)}")
        f.last_progress = self.monotonic()
        if len(f.held) == f.total:
            self._downloaded(c.artifact)

    def _downloaded(self, seg_id: str) -> None:
        """Every chunk of `seg_id` is in: assemble and verify it, then apply the pending
        deployment once it has all its segments."""
        self.fetching.pop(seg_id)
        try:
            self.cache.assemble(seg_id)
        except (codec.ArtifactError, OSError) as exc:
            self._fail_pending(f"{_disk(exc)}segment {seg_id[:12]}: {exc}")
            return
        d = self.pending
        if d is None:
            return
        need = [s for s in dict.fromkeys(d.front + d.back) if not self.cache.has(s)]
        self._ack(d, "FETCHING", done=len(set(d.front + d.back)) - len(need),
                  total=len(set(d.front + d.back)))
        if not need:
            self._apply(d)

    def _fail_pending(self, reason: str) -> None:
        if self.pending is not None:
            d, self.pending = self.pending, None
            self.applied = max(self.applied, d.generation)  # do not retry a refused generation
            self._ack(d, "FAILED", reason=reason)
            self._save()

    def _segment(self, seg_id: str):
        try:
            return self.registry.get(seg_id, lambda: self.cache.read(seg_id))
        except codec.ArtifactError:
            self.cache.discard(seg_id)  # a bad artifact is fetched afresh next time
            raise

    def _load(self, d: Desired) -> Loaded:
        """Assemble and verify the model `d` describes, from the cache (no network)."""
        front = [self._segment(s) for s in d.front]
        back = [self._segment(s) for s in d.back]
        stitch = build_stitch(d.stitch) if d.stitch is not None else None
        if (stitch is None) != (not d.back):
            raise ValueError("a hybrid needs a stitch and back segments; an anchor neither")
        spec = self.registry.input_spec(d.front[0])
        if spec is None:
            raise ValueError(f"segment {d.front[0][:12]} does not say what images the model "
                             "takes (not a stem, or an artifact from before input formats): "
                             "provision the cache afresh (`restnet agent provision`)")
        probe = self._probe(spec)
        module = assemble(front, stitch, back)
        arch = (tuple(d.front), tuple(d.back),
                d.stitch.model_dump_json(include={"src", "dst"}) if d.stitch else None)
        self.registry.once(("verify", *_content(d), _digest(probe), self.cfg.num_classes),
                           lambda: verify(module, probe, self.cfg.num_classes))
        return Loaded(module, d, self.registry.once(("flops", *arch),
                                                    lambda: flops(module, probe[:1])),
                      spec)

    def _apply(self, d: Desired) -> None:
        self.pending = None
        try:
            new = self._load(d)
        except Exception as exc:  # whatever it is, refuse it and keep the old model
            self.applied = max(self.applied, d.generation)
            self._ack(d, "FAILED", reason=f"verification: {exc}")
            self._save()
            return
        self._ack(d, "VERIFIED")
        self.canary = None  # a window in progress ends with its model's reign
        old = self.slot.get()
        self.serving.figures.track(new.generation, *([old.generation] if old else []))
        swap_ms = self.slot.swap(new)
        self.latency.reset(new)
        _crash_point("swap")  # swapped in memory, not yet recorded on disk
        self.applied = d.generation
        self._ack(d, "SWAPPED", swap_ms=swap_ms)
        problem, acc = self._health(new)
        # what the check measured, before a rollback clears it: the controller learns from it
        seen = dict(probe_acc=acc, lat_p50_ms=self.latency.percentile(50, math.inf),
                    lat_p95_ms=self.latency.percentile(95, math.inf))
        if problem is None:
            self._ack(d, "HEALTHY", **seen)
            if old is not None and self.cfg.canary.enabled:
                self.canary = _Canary(new, old, self.monotonic())
            else:
                self.serving.figures.track(new.generation)
        elif old is None:  # nothing to go back to: better than no model
            self._ack(d, "FAILED", reason=f"{problem}; no previous model, it keeps serving",
                      **seen)
        else:
            self._rollback()
            self._ack(d, "FAILED", reason=problem, **seen)
            self._ack(d, "ROLLED_BACK", reason=problem, **seen)
        self._save()
        self._birth()

    def _rollback(self) -> None:
        """Back to the previous model: requests in flight finish on the one they started on."""
        restored = self.slot.rollback()
        self.latency.reset(restored)
        self.serving.figures.track(restored.generation)

    def _judge_canary(self, now: float) -> None:
        """Compare the new model's served figures with the previous model's: a regression
        rolls it back (ROLLED_BACK, "canary: …"); the window's end keeps it and drops the
        previous model's figures."""
        c = self.canary
        if c is None:
            return
        figures = self.serving.figures
        new = figures.summary(c.new.generation)
        why = canary_verdict(new, figures.summary(c.old.generation),
                             c.new.desired.latency_budget_ms, self.cfg.canary)
        if why is not None:
            self.canary = None
            log.warning("%s: rolling %s back: %s", self.cfg.device_id,
                        c.new.desired.deployment_id, why)
            self._rollback()
            self._ack(c.new.desired, "ROLLED_BACK", reason=why)
            self._save()
            self._birth()
        elif self.cfg.canary.ended(new.total, now - c.since):
            self.canary = None
            self.stats["canary_passed"] += 1
            figures.track(c.new.generation)

    @torch.no_grad()
    def _health(self, new: Loaded) -> tuple[str | None, float | None]:
        """(None when healthy, else why; the accuracy on the labelled probes, if any)."""
        for _ in range(self.cfg.health_samples):
            self.latency.add(self.resources.latency_ms(new, self._probe(new.input)), new)
        acc = None
        if self.cfg.probe is not None:
            x, y = self.cfg.probe

            def probe_acc() -> float:
                out = new.module(x)
                if not torch.isfinite(out).all():
                    raise ValueError("outputs on the probe samples are not finite")
                return float((out.argmax(1) == y).float().mean())
            try:
                acc = self.registry.once(("probe_acc", *_content(new.desired), _digest(x),
                                          _digest(y)), probe_acc)
            except ValueError as exc:
                return str(exc), None
        # every sample since the swap, however slow the model: the window's age limit is for
        # telemetry, and would drop the first probes of a model slower than max_age_s / 8
        return health_verdict(self.latency.percentile(95, math.inf),
                              new.desired.latency_budget_ms, acc, new.desired.min_accuracy), acc

    # --- persistence: the running model survives a restart ------------------------------
    def _save(self) -> None:
        cur, prev = self.slot.get(), self.slot.previous
        doc = {"applied": self.applied,
               "current": cur.desired.model_dump(mode="json") if cur else None,
               "previous": prev.desired.model_dump(mode="json") if prev else None}
        atomic_write(self.cfg.cache_dir / "applied.json", json.dumps(doc).encode())

    def _restore(self) -> None:
        trust = self.cfg.cache_dir / "trust.json"
        if trust.is_file():  # a key set accepted earlier replaces the provisioned keys
            try:
                self.keyring = Keyring.from_json(trust.read_bytes())
            except (ValueError, KeyError, TypeError) as exc:
                log.error("%s: %s is damaged (%s); trusting the provisioned keys",
                          self.cfg.device_id, trust, exc)
        path = self.cfg.cache_dir / "applied.json"
        if path.is_file():
            doc = json.loads(path.read_text())
            self.applied = int(doc.get("applied", 0))
            for key in ("previous", "current"):
                if doc.get(key):
                    try:
                        self.slot.swap(self._load(_RUNNING.validate_python(doc[key])))
                    except Exception as exc:  # a damaged cache must not stop the agent
                        log.warning("%s: cannot restore the %s model: %s", self.cfg.device_id,
                                    key, exc)
        if self.slot.get() is None:
            self._boot()
        cur = self.slot.get()
        self.latency.reset(cur)
        if cur is not None:
            self.serving.figures.track(cur.generation)

    def _boot(self) -> None:
        """Serve the model the board was provisioned with (boot.json), if any, as it starts
        with nothing deployed: assembled and verified from the cache, no network. A damaged
        record or a missing segment leaves it without a model, as with none."""
        try:
            boot = read_boot(self.cfg.cache_dir)
            if boot is None:
                return
            self.slot.swap(self._load(boot))
        except Exception as exc:  # whatever it is, the agent starts and waits for a deployment
            log.warning("%s: cannot serve the boot model of %s: %s; no model until the "
                        "controller deploys one", self.cfg.device_id, self.cfg.cache_dir, exc)
            return
        log.info("%s: serving the boot model %s (generation 0)", self.cfg.device_id, boot.name)
