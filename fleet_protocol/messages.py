"""Every message on the wire, as pydantic models (JSON, UTF-8).

Each carries a schema version `v` and a `kind` tag. Unknown fields are ignored, so an older
agent reads a newer controller's messages (and the other way round). `decode` turns bytes
into a message or raises `ProtocolError` with a short reason that callers count and log.

Every integer, string, list and float on the wire is bounded (docs/protocol.md §2.7): a value
a sender may choose must fit what a receiver stores (SQLite's int64) with room to grow, and no
field can make a receiver allocate more than the message itself.
"""
from __future__ import annotations

from typing import Annotated, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

SCHEMA_VERSION = 1
MAX_MESSAGE_BYTES = 256 * 1024  # larger payloads are refused before parsing
MAX_GENERATION = 2**53  # fits SQLite's int64 (and a JSON double) with room for 2**10 times more
MAX_COUNTER = 2**63 - 1  # sessions (Unix ns), sequence numbers: int64
MAX_CHUNKS = 2**20  # chunks of one artifact: 1 TiB at the largest chunk size
MAX_ARTIFACT_BYTES = 2**40
MAX_CHUNK_SIZE = 128 * 1024
MAX_STITCH_HIDDEN = 1024  # a stitch's residual branch width (stitch_lib.stitch.MAX_HIDDEN)

Id = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[^+#/\x00]+$")]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
SegmentId = Sha256  # a segment's ID is the sha256 of its architecture and weights
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
Name = Annotated[str, Field(max_length=128)]  # catalog IDs, device classes, names
Text = Annotated[str, Field(max_length=1024)]  # reasons: free text for people
Generation = Annotated[int, Field(ge=0, le=MAX_GENERATION)]
Counter = Annotated[int, Field(ge=0, le=MAX_COUNTER)]
Megabytes = Annotated[float, Field(ge=0, le=2**40)]
Millis = Annotated[float, Field(ge=0, le=1e9)]


class ProtocolError(ValueError):
    """A payload that is not a valid message of the expected kind."""


class Wire(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, allow_inf_nan=False)
    v: int = Field(SCHEMA_VERSION, ge=0, le=2**31)


class Capabilities(Wire):
    """What a device is, sent once in its birth."""

    device_class: Name
    mem_mb: float = Field(gt=0, le=2**40)
    gflops: float = Field(gt=0, le=2**40)  # nominal compute speed, for the planner's first guess
    # nominal speed per operator kind where it differs from `gflops` (a datasheet's figure:
    # an MCU without an attention unit runs attention slower), the planner's first guess there
    kind_gflops: dict[Name, Annotated[float, Field(gt=0, le=2**40)]] = Field({}, max_length=16)
    battery_powered: bool = True
    # operator labels, matched by fleet.yaml groups
    tags: dict[Name, Text] = Field({}, max_length=64)


class State(Wire):
    """Birth (online) and death (offline, the last will) on the retained state topic."""

    kind: Literal["state"] = "state"
    device_id: Id
    online: bool
    session: Counter  # grows with every agent start; an older death is ignored
    ts: float
    capabilities: Capabilities | None = None
    segments: list[SegmentId] = Field([], max_length=4096)  # cached segment IDs
    hybrid: Name | None = None  # catalog ID of the running model
    generation: Generation = 0  # last desired generation applied
    keys_seq: Counter = 0  # the newest signed key set the device accepted


class Telemetry(Wire):
    kind: Literal["telemetry"] = "telemetry"
    seq: Counter
    ts: float
    cpu: Fraction
    mem_free_mb: Megabytes
    battery: Fraction | None = None  # None on mains power
    charging: bool = False
    temp_c: float = Field(ge=-273.15, le=1000.0)
    lat_p50_ms: Millis | None = None  # measured on the running model
    lat_p95_ms: Millis | None = None
    inferences: Counter = 0  # latency samples (requests and probes) since the previous telemetry
    # application requests since the previous telemetry: served, failed for the device's
    # reasons (no model, queue full, model error), per second; and those waiting right now
    requests: Counter = 0
    req_errors: Counter = 0
    req_rate: float = Field(0.0, ge=0, le=1e9)
    queue_depth: Counter = 0
    hybrid: Name | None = None
    generation: Generation = 0


class PortSpec(Wire):
    """The form of an activation at a stitch's input or output (see stitch_lib.segments)."""

    form: Literal["map", "tokens"]
    channels: int = Field(gt=0, le=2**16)
    grid: tuple[Annotated[int, Field(ge=1, le=2**16)], Annotated[int, Field(ge=1, le=2**16)]]
    num_prefix: int = Field(0, ge=0, le=2**10)


class StitchDelta(Wire):
    """The stitch tensors: safetensors (fp16), zlib-compressed, base64 in JSON."""

    src: PortSpec
    dst: PortSpec
    hidden: int = Field(0, ge=0, le=MAX_STITCH_HIDDEN)  # residual branch width, 0 = linear
    encoding: Literal["safetensors+zlib"] = "safetensors+zlib"
    size: int = Field(gt=0, le=MAX_MESSAGE_BYTES)  # compressed bytes
    sha256: Sha256  # of the compressed bytes
    data: str = Field(max_length=MAX_MESSAGE_BYTES)  # base64 of the compressed bytes


class Desired(Wire):
    """What a device should run. Level-triggered: applied only if `generation` is newer.
    Always travels signed (`fleet_protocol.signing`): devices refuse it otherwise."""

    kind: Literal["desired"] = "desired"
    device_id: Id  # signed with the rest: a desired state cannot be replayed to another device
    generation: int = Field(ge=1, le=MAX_GENERATION)
    deployment_id: Id
    hybrid: Name  # catalog ID
    name: Name = ""
    # the segments run before the stitch (all of them, for an anchor)
    front: list[SegmentId] = Field(min_length=1, max_length=256)
    back: list[SegmentId] = Field([], max_length=256)  # run after the stitch
    stitch: StitchDelta | None = None  # None for an anchor
    expected_latency_ms: Millis | None = None  # the planner's prediction for this device
    latency_budget_ms: Millis | None = None  # health check: p95 must stay within
    min_accuracy: Fraction | None = None  # health check on the device's labelled probes
    ts: float
    reason: Text = ""


AckStatus = Literal["RECEIVED", "FETCHING", "VERIFIED", "SWAPPED", "HEALTHY", "FAILED",
                    "ROLLED_BACK"]
TERMINAL = ("HEALTHY", "FAILED", "ROLLED_BACK")


class Ack(Wire):
    kind: Literal["ack"] = "ack"
    device_id: Id
    deployment_id: Id
    generation: int = Field(ge=1, le=MAX_GENERATION)
    status: AckStatus
    ts: float
    reason: Text | None = None
    done: int | None = Field(None, ge=0, le=512)  # FETCHING: n of N segments are in the cache
    total: int | None = Field(None, ge=0, le=512)  # (a Desired has at most 2 x 256 segments)
    swap_ms: Millis | None = None
    # HEALTHY, FAILED and ROLLED_BACK after a health check: accuracy on the labelled probes
    probe_acc: Fraction | None = None
    # ... and the new model's latency p50 / p95 over the health check's samples
    lat_p50_ms: Millis | None = None
    lat_p95_ms: Millis | None = None


class ArtifactRequest(Wire):
    """Ask for chunks of a segment artifact (resumable: only the missing ones)."""

    kind: Literal["art_req"] = "art_req"
    artifact: SegmentId
    # None: all of them (each is sent once however listed)
    chunks: list[Annotated[int, Field(ge=0, lt=MAX_CHUNKS)]] | None = Field(
        None, max_length=MAX_CHUNKS)
    chunk_size: int = Field(64 * 1024, ge=1024, le=MAX_CHUNK_SIZE)


class ArtifactChunk(Wire):
    kind: Literal["art_data"] = "art_data"
    artifact: SegmentId
    index: int = Field(ge=0, lt=MAX_CHUNKS)
    total: int = Field(ge=1, le=MAX_CHUNKS)
    size: int = Field(ge=1, le=MAX_ARTIFACT_BYTES)  # bytes of the whole artifact
    artifact_sha256: Sha256  # of the whole artifact
    sha256: Sha256  # of this chunk
    data: str = Field("", max_length=MAX_MESSAGE_BYTES)  # base64; empty with `error`
    error: Text | None = None  # e.g. "unknown artifact"


class ControllerState(Wire):
    kind: Literal["ctl_state"] = "ctl_state"
    online: bool
    session: Counter
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
