"""Artifact codec: tensors ↔ bytes, hashes and chunks. numpy only — no torch on this side.

Weights travel only as safetensors (never pickle). A stitch delta is fp16 safetensors,
zlib-compressed; a segment artifact is fp32 safetensors with string metadata saying how to
rebuild the segment (timm model name and arguments, segment index). Both are checked before
anything is loaded: sizes first, then sha256, then every tensor's name, shape and dtype.
"""
from __future__ import annotations

import base64
import hashlib
import json
import math
import zlib

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

MAX_DELTA_BYTES = 128 * 1024  # compressed stitch tensors, inline in a desired message
MAX_ARTIFACT_BYTES = 256 * 1024 * 1024
MAX_HEADER_BYTES = 1024 * 1024  # a safetensors header (JSON) larger than this is refused
CHUNK_SIZE = 64 * 1024
DTYPES = {"F16": np.float16, "F32": np.float32, "I64": np.int64}  # all a model here holds


class ArtifactError(ValueError):
    """Bytes that are not the artifact they claim to be (size, hash, format or shapes)."""


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: str, limit: int) -> bytes:
    """Decode base64, refusing anything that would decode to more than `limit` bytes."""
    if len(text) > (limit + 2) // 3 * 4:
        raise ArtifactError(f"encoded payload exceeds {limit} bytes")
    try:
        data = base64.b64decode(text, validate=True)
    except ValueError as exc:
        raise ArtifactError(f"bad base64: {exc}") from None
    if len(data) > limit:
        raise ArtifactError(f"encoded payload exceeds {limit} bytes")
    return data


def pack_delta(tensors: dict[str, np.ndarray]) -> bytes:
    """Stitch tensors → fp16 safetensors → zlib."""
    half = {k: np.ascontiguousarray(v, dtype=np.float16) for k, v in tensors.items()}
    return zlib.compress(st_save(half), 9)


def unpack_delta(blob: bytes, sha256: str, expected: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Check and open a stitch delta: hash, bounded decompression, exact names and shapes."""
    if len(blob) > MAX_DELTA_BYTES:
        raise ArtifactError(f"delta of {len(blob)} bytes exceeds {MAX_DELTA_BYTES}")
    if sha256_hex(blob) != sha256:
        raise ArtifactError("delta sha256 mismatch (tampered or corrupt)")
    limit = 64 * MAX_DELTA_BYTES
    d = zlib.decompressobj()
    try:
        raw = d.decompress(blob, limit)
    except zlib.error as exc:
        raise ArtifactError(f"delta is not zlib data: {exc}") from None
    if d.unconsumed_tail:
        raise ArtifactError(f"delta decompresses to more than {limit} bytes")
    check_specs(read_header(raw), {k: ("F16", tuple(v)) for k, v in expected.items()})
    return _load(raw)


def pack_segment(tensors: dict[str, np.ndarray], meta: dict) -> bytes:
    """A segment artifact: fp32 safetensors, `meta` (JSON-able) in the header."""
    return st_save({k: np.asarray(v, order="C") for k, v in tensors.items()},  # keeps 0-d
                   metadata={"restnet": json.dumps(meta, sort_keys=True)})


def unpack_segment(blob: bytes, sha256: str) -> tuple[dict[str, np.ndarray], dict]:
    """Check a segment artifact's size and hash, then open it: (tensors, meta)."""
    if len(blob) > MAX_ARTIFACT_BYTES:
        raise ArtifactError(f"artifact of {len(blob)} bytes exceeds {MAX_ARTIFACT_BYTES}")
    if sha256_hex(blob) != sha256:
        raise ArtifactError("artifact sha256 mismatch (tampered or corrupt)")
    read_header(blob)
    try:
        header = json.loads(blob[8:8 + int.from_bytes(blob[:8], "little")])
        meta = json.loads(header["__metadata__"]["restnet"])
    except (KeyError, ValueError, TypeError) as exc:
        raise ArtifactError(f"artifact has no restnet metadata: {exc}") from None
    return _load(blob), meta


def read_header(raw: bytes) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Check a safetensors file's header against its bytes before any tensor is read:
    a bounded header, known dtypes, and tensors that exactly tile the data. name → (dtype,
    shape)."""
    n = int.from_bytes(raw[:8], "little")
    if len(raw) < 8 or n > MAX_HEADER_BYTES or 8 + n > len(raw):
        raise ArtifactError(f"not a safetensors file: header of {n} bytes in {len(raw)}")
    try:
        header = json.loads(raw[8:8 + n])
    except ValueError as exc:
        raise ArtifactError(f"safetensors header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ArtifactError("safetensors header is not a JSON object")
    specs, spans = {}, []
    for name, t in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = t["dtype"], tuple(t["shape"]), t["data_offsets"]
            ok = (dtype in DTYPES and all(type(d) is int and d >= 0 for d in shape)
                  and type(start) is int and type(end) is int
                  and end - start == math.prod(shape) * np.dtype(DTYPES[dtype]).itemsize)
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise ArtifactError(f"safetensors header: bad entry for tensor {name!r}")
        specs[name] = (dtype, shape)
        spans.append((start, end))
    end = 0
    for start, stop in sorted(spans):
        if start != end:
            raise ArtifactError("safetensors header: tensors overlap or leave gaps")
        end = stop
    if 8 + n + end != len(raw):
        raise ArtifactError(f"safetensors data is {len(raw) - 8 - n} bytes, header says {end}")
    return specs


def _load(raw: bytes) -> dict[str, np.ndarray]:
    try:
        return st_load(raw)
    except (SafetensorError, ValueError, OverflowError) as exc:
        raise ArtifactError(f"not a safetensors file: {exc}") from None


def check_specs(found: dict[str, tuple[str, tuple[int, ...]]],
                expected: dict[str, tuple[str, tuple[int, ...]]]) -> None:
    """Refuse tensors whose names, dtypes or shapes differ from what the receiver expects."""
    if set(found) != set(expected):
        raise ArtifactError(f"tensor names {sorted(found)[:8]} differ from the expected "
                            f"{sorted(expected)[:8]}")
    for k, (dtype, shape) in expected.items():
        if found[k] != (dtype, tuple(shape)):
            raise ArtifactError(f"tensor {k}: {found[k][0]}{found[k][1]}, expected "
                                f"{dtype}{tuple(shape)}")


def chunks(blob: bytes, size: int = CHUNK_SIZE) -> list[bytes]:
    """Split an artifact into chunks of `size` bytes (the last may be shorter)."""
    return [blob[k:k + size] for k in range(0, len(blob), size)] or [b""]
