"""Every message on the wire, as pydantic models (JSON, UTF-8).

Each carries a schema version `v` and a `kind` tag. Unknown fields are ignored, so an older
agent reads a newer controller's messages (and the other way round). `decode` turns bytes
into a message or raises `ProtocolError` with a short reason that callers count and log.
"""
from __future__ import annotations

from typing import Annotated, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

SCHEMA_VERSION = 1
MAX_MESSAGE_BYTES = 256 * 1024  # larger payloads are refused before parsing

Id = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[^+#/\x00]+$")]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
SegmentId = Sha256  # a segment's ID is the sha256 of its architecture and weights
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


class ProtocolError(ValueError):
    """A payload that is not a valid message of the expected kind."""


class Wire(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    v: int = SCHEMA_VERSION


class Capabilities(Wire):
    """What a device is, sent once in its birth."""

    device_class: str
    mem_mb: float = Field(gt=0)
    gflops: float = Field(gt=0)  # nominal compute speed, for the planner's first guess
    battery_powered: bool = True
    tags: dict[str, str] = {}  # operator labels, matched by fleet.yaml groups


class State(Wire):
    """Birth (online) and death (offline, the last will) on the retained state topic."""

    kind: Literal["state"] = "state"
    device_id: Id
    online: bool
    session: int = Field(ge=0)  # grows with every agent start; an older death is ignored
    ts: float
    capabilities: Capabilities | None = None
    segments: list[SegmentId] = Field([], max_length=4096)  # cached segment IDs
    hybrid: str | None = None  # catalog ID of the running model
    generation: int = Field(0, ge=0)  # last desired generation applied
    keys_seq: int = Field(0, ge=0)  # the newest signed key set the device accepted


class Telemetry(Wire):
    kind: Literal["telemetry"] = "telemetry"
    seq: int = Field(ge=0)
    ts: float
    cpu: Fraction
    mem_free_mb: float = Field(ge=0)
    battery: Fraction | None = None  # None on mains power
    charging: bool = False
    temp_c: float
    lat_p50_ms: float | None = Field(None, ge=0)  # measured on the running model
    lat_p95_ms: float | None = Field(None, ge=0)
    inferences: int = Field(0, ge=0)  # latency samples taken since the previous telemetry
    hybrid: str | None = None
    generation: int = Field(0, ge=0)


class PortSpec(Wire):
    """The form of an activation at a stitch's input or output (see stitch_lib.segments)."""

    form: Literal["map", "tokens"]
    channels: int = Field(gt=0)
    grid: tuple[int, int]
    num_prefix: int = Field(0, ge=0)


class StitchDelta(Wire):
    """The stitch tensors: safetensors (fp16), zlib-compressed, base64 in JSON."""

    src: PortSpec
    dst: PortSpec
    encoding: Literal["safetensors+zlib"] = "safetensors+zlib"
    size: int = Field(gt=0)  # compressed bytes
    sha256: Sha256  # of the compressed bytes
    data: str  # base64 of the compressed bytes


class Desired(Wire):
    """What a device should run. Level-triggered: applied only if `generation` is newer.
    Always travels signed (`fleet_protocol.signing`): devices refuse it otherwise."""

    kind: Literal["desired"] = "desired"
    device_id: Id  # signed with the rest: a desired state cannot be replayed to another device
    generation: int = Field(ge=1)
    deployment_id: Id
    hybrid: str  # catalog ID
    name: str = ""
    # the segments run before the stitch (all of them, for an anchor)
    front: list[SegmentId] = Field(min_length=1, max_length=256)
    back: list[SegmentId] = Field([], max_length=256)  # run after the stitch
    stitch: StitchDelta | None = None  # None for an anchor
    expected_latency_ms: float | None = None  # the planner's prediction for this device
    latency_budget_ms: float | None = None  # health check: p95 must stay within
    min_accuracy: Fraction | None = None  # health check on the device's labelled probes
    ts: float
    reason: str = ""


AckStatus = Literal["RECEIVED", "FETCHING", "VERIFIED", "SWAPPED", "HEALTHY", "FAILED",
                    "ROLLED_BACK"]
TERMINAL = ("HEALTHY", "FAILED", "ROLLED_BACK")


class Ack(Wire):
    kind: Literal["ack"] = "ack"
    device_id: Id
    deployment_id: Id
    generation: int = Field(ge=1)
    status: AckStatus
    ts: float
    reason: str | None = None
    done: int | None = None  # FETCHING: n of the deployment's N segments are in the cache
    total: int | None = None
    swap_ms: float | None = None


class ArtifactRequest(Wire):
    """Ask for chunks of a segment artifact (resumable: only the missing ones)."""

    kind: Literal["art_req"] = "art_req"
    artifact: SegmentId
    chunks: list[int] | None = None  # None: all of them (each is sent once however listed)
    chunk_size: int = Field(64 * 1024, ge=1024, le=128 * 1024)


class ArtifactChunk(Wire):
    kind: Literal["art_data"] = "art_data"
    artifact: SegmentId
    index: int = Field(ge=0)
    total: int = Field(ge=1)
    size: int = Field(ge=1)  # bytes of the whole artifact
    artifact_sha256: Sha256  # of the whole artifact
    sha256: Sha256  # of this chunk
    data: str = ""  # base64; empty with `error`
    error: str | None = None  # e.g. "unknown artifact"


class ControllerState(Wire):
    kind: Literal["ctl_state"] = "ctl_state"
    online: bool
    session: int = Field(ge=0)
    ts: float


class Rebirth(Wire):
    kind: Literal["rebirth"] = "rebirth"
    ts: float


M = TypeVar("M", bound=Wire)


def encode(msg: Wire) -> bytes:
    return msg.model_dump_json(exclude_none=True).encode()


def decode(cls: type[M], payload: bytes) -> M:
    """Parse `payload` as a `cls` message; ProtocolError with a short reason otherwise."""
    if len(payload) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"payload of {len(payload)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        return cls.model_validate_json(payload)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err.get("loc", ())) or "payload"
        raise ProtocolError(f"invalid {cls.__name__}: {where}: {err['msg']}") from None
