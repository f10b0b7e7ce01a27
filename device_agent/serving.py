"""Inference for the board's applications: images in; class, scores, model and generation out.

Images arrive as arrays (N×C×H×W, N×H×W or N×H×W×C; uint8 pixels 0–255 or floats 0–1) and
are made the running model's input exactly as its training data were (`InputSpec.prepare`):
channels matched, resized, normalised. A request runs entirely on the model that was current
when it started, and its answer names that model's generation; a swap never waits for it.
Every answer carries a request ID, by which the application may later send the true classes
(`Serving.feedback`): the canary window (device_agent.canary) judges models on them.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from stitch_lib.inputs import InputSpec

from .canary import ANSWERS, ServedFigures
from .runtime import LatencyWindow, ModelFailed, ModelSlot, NoModel

MAX_BATCH = 256
MAX_PIXELS = 64 * 2**20  # values in one request, all images together
_LUMA = torch.tensor([0.299, 0.587, 0.114])  # RGB → grey, as PIL's "L" mode


class BadInput(ValueError):
    """The request's images cannot be read (the caller's fault; HTTP 400)."""


class Unavailable(RuntimeError):
    """No model is loaded yet, or the queue is full: try again shortly (HTTP 503)."""


class UnknownRequest(LookupError):
    """Feedback names no answer the agent still holds (HTTP 404)."""


@dataclass(frozen=True)
class Prediction:
    """One answer: per image the class index and the softmax scores, which model (catalog
    ID and name, deployment generation) produced all of them, and the request's ID (for
    feedback)."""

    classes: list[int]
    scores: list[list[float]]
    model: str
    name: str
    generation: int
    latency_ms: float
    request_id: str

    def to_json(self) -> dict[str, Any]:
        """The fields as a dict, sharing their lists (`dataclasses.asdict` copies every
        nested list: 1.6 ms for a batch of 256)."""
        return dict(vars(self))


def _layout(x: torch.Tensor, channels: int) -> torch.Tensor:
    """N×C×H×W from N×C×H×W, N×H×W×C, N×H×W or one H×W image."""
    if x.ndim == 2:
        return x[None, None]
    if x.ndim == 3:
        return x[:, None]
    if x.ndim != 4:
        raise BadInput(f"images must be N×C×H×W, N×H×W×C, N×H×W or H×W; got shape "
                       f"{tuple(x.shape)}")
    first, last = x.shape[1] in (1, 3, 4), x.shape[3] in (1, 3, 4)
    if first and (not last or x.shape[1] == channels):
        return x
    if last:
        return x.permute(0, 3, 1, 2)
    raise BadInput(f"images of shape {tuple(x.shape)} have no channel axis of 1, 3 or 4 "
                   "(expected N×C×H×W or N×H×W×C)")


def _channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Grey ↔ RGB as needed; an alpha channel is dropped."""
    if x.shape[1] == 4:
        x = x[:, :3]
    if x.shape[1] == channels:
        return x
    if x.shape[1] == 1:
        return x.expand(-1, channels, -1, -1)
    if channels == 1:
        return (x * _LUMA.view(1, 3, 1, 1)).sum(1, keepdim=True)
    raise BadInput(f"images have {x.shape[1]} channels, the model takes {channels}")


def to_input(images: Any, spec: InputSpec) -> torch.Tensor:
    """`images` (array-like or tensor) as the input of a model taking `spec`. Raises BadInput
    saying what is wrong with them."""
    try:
        x = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.asarray(images))
    except (ValueError, TypeError) as exc:  # ragged nested lists, strings, objects
        raise BadInput(f"images are not a numeric array: {exc}") from None
    if x.numel() == 0 or x.numel() > MAX_PIXELS:
        raise BadInput(f"images hold {x.numel()} values; expected 1 to {MAX_PIXELS}")
    if x.dtype == torch.bool or x.is_complex():
        raise BadInput(f"images must be uint8 (0–255) or float (0–1), not {x.dtype}")
    if x.is_floating_point():
        if not bool(torch.isfinite(x).all()) or x.min() < 0 or x.max() > 1:
            raise BadInput("float pixel values must lie in [0, 1] (send uint8 for 0–255)")
        x = x.float() * 255
    elif x.min() < 0 or x.max() > 255:
        raise BadInput("integer pixel values must lie in [0, 255]")
    x = _layout(x, spec.channels)
    if x.shape[0] > MAX_BATCH:
        raise BadInput(f"batch of {x.shape[0]} images; at most {MAX_BATCH} per request")
    return spec.prepare(_channels(x.float(), spec.channels))


class Feedback(BaseModel):
    """The body of `POST /v1/feedback`: the true class of each image of an earlier answer."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    request_id: str = Field(min_length=1, max_length=64, strict=True)
    labels: list[Annotated[int, Field(strict=True, ge=0)] | None] = Field(
        min_length=1, max_length=MAX_BATCH)


class Serving:
    """The board's inference service over the agent's model slot. Requests run one at a time
    (a board's cores are shared by one forward pass); at most `max_queue` wait, more are
    refused with Unavailable. What each model served is kept in `figures`. Thread-safe."""

    def __init__(self, slot: ModelSlot, latency: LatencyWindow, max_queue: int = 16,
                 observe: Callable[[float], None] | None = None) -> None:
        """`observe(ms)` is told each served request's latency (the metrics histogram)."""
        self.slot, self.latency, self.max_queue = slot, latency, max_queue
        self.observe = observe
        self._lock = threading.Lock()  # the counters
        self._run = threading.Lock()  # one forward pass at a time
        self._pending = 0  # admitted, not finished (waiting or running)
        self._running = 0
        self.requests = 0  # served, ever
        self.errors = 0  # failed for the device's reasons: no model, queue full, model error
        self.bad = 0  # refused as unreadable (the caller's fault)
        self.figures = ServedFigures()

    @property
    def queue_depth(self) -> int:
        """Requests waiting for the model now."""
        with self._lock:
            return self._pending - self._running

    def infer(self, images: Any) -> Prediction:
        """Classify `images` with the current model (see the module docstring for forms)."""
        with self._lock:
            if self._pending >= self.max_queue + 1:
                self.errors += 1
                raise Unavailable(f"busy: {self._pending - 1} requests already queued; retry")
            self._pending += 1
        try:
            with self._run:
                with self._lock:
                    self._running = 1
                try:
                    t0 = time.perf_counter()
                    out, loaded = self.slot.infer(images, to_input)
                    probs = torch.softmax(out.float(), dim=1)
                    ms = (time.perf_counter() - t0) * 1e3
                except BadInput:
                    with self._lock:
                        self.bad += 1
                    raise
                except NoModel as exc:
                    with self._lock:
                        self.errors += 1
                    raise Unavailable(f"{exc}: the device waits for its first deployment") \
                        from None
                except Exception as exc:
                    with self._lock:
                        self.errors += 1
                    if isinstance(exc, ModelFailed):
                        self.figures.failed(exc.loaded.generation)
                    raise RuntimeError(f"inference failed: {exc}") from exc
                finally:
                    with self._lock:
                        self._running = 0
        finally:
            with self._lock:
                self._pending -= 1
        self.latency.add(ms, loaded)
        if self.observe is not None:
            self.observe(ms)
        with self._lock:
            self.requests += 1
        top, classes = probs.max(1)
        classes = classes.tolist()
        request_id = self.figures.answered(loaded.generation, ms, classes, top.tolist(),
                                           probs.shape[1])
        return Prediction(classes, probs.tolist(), loaded.hybrid, loaded.desired.name,
                          loaded.generation, ms, request_id)

    def feedback(self, body: Any) -> dict[str, Any]:
        """Record the true classes of an earlier answer's images: `body` is
        {"request_id": the answer's, "labels": [class or None per image]}, once per answer.
        Returns {"request_id", "generation", "labelled", "correct"}. Raises BadInput
        (malformed, or not fitting the answer) or UnknownRequest."""
        try:
            fb = Feedback.model_validate(body)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            raise BadInput(f"feedback: {where + ': ' if where else ''}{err['msg']} (send "
                           '{"request_id": "<from the answer>", "labels": [class or null '
                           "per image]})") from None
        try:
            generation, labelled, correct = self.figures.label(fb.request_id, fb.labels)
        except LookupError:
            raise UnknownRequest(f"no answer {fb.request_id!r} to label: unknown, labelled "
                                 f"already, or older than the last {ANSWERS} answers") from None
        except ValueError as exc:
            raise BadInput(f"feedback: {exc}") from None
        return {"request_id": fb.request_id, "generation": generation, "labelled": labelled,
                "correct": correct}
