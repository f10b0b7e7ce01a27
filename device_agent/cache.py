"""The device's segment cache: verified segment artifacts on disk, resumable partial downloads,
and a process-wide registry of rebuilt segment modules shared read-only between agents.

Disk layout under the cache directory (every write is atomic: temp file, rename; all but the
chunks are also fsynced — a chunk is checked again with the whole artifact, which is fsynced
once, when it is assembled):

    segments/<segment-id>.safetensors      complete, verified artifacts
    partial/<segment-id>/meta.json         a download in progress: artifact sha256, size, total
    partial/<segment-id>/<index>.part      the chunks received so far (each sha256-checked)
    applied.json                           the running deployment and the one before it
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from fleet_protocol import codec
from stitch_lib.assemble import from_recipe, segment_payloads
from stitch_lib.catalog import Catalog
from stitch_lib.files import atomic_write
from stitch_lib.inputs import InputSpec
from stitch_lib.segments import Segment, split_model

log = logging.getLogger(__name__)


_SEGMENT_ID = re.compile(r"[0-9a-f]{64}")


class SegmentCache:
    """Segment artifacts on disk, by segment ID."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        (self.root / "segments").mkdir(parents=True, exist_ok=True)
        (self.root / "partial").mkdir(parents=True, exist_ok=True)

    def path(self, seg_id: str) -> Path:
        if not _SEGMENT_ID.fullmatch(seg_id):  # it names files: never a path from the wire
            raise codec.ArtifactError(f"bad segment ID {seg_id[:80]!r}: expected 64 hex digits")
        return self.root / "segments" / f"{seg_id}.safetensors"

    def _partial(self, seg_id: str) -> Path:
        self.path(seg_id)  # checks the ID
        return self.root / "partial" / seg_id

    def ids(self) -> list[str]:
        return sorted(p.stem for p in (self.root / "segments").glob("*.safetensors"))

    def has(self, seg_id: str) -> bool:
        return self.path(seg_id).is_file()

    def read(self, seg_id: str) -> bytes:
        return self.path(seg_id).read_bytes()

    def put(self, seg_id: str, blob: bytes, sha256: str) -> None:
        """Store a complete artifact after checking its hash and format."""
        codec.unpack_segment(blob, sha256)
        atomic_write(self.path(seg_id), blob)
        shutil.rmtree(self._partial(seg_id), ignore_errors=True)

    # --- resumable downloads -------------------------------------------------------------
    def partial(self, seg_id: str, artifact_sha256: str, size: int, total: int) -> set[int]:
        """Start or resume a download; returns the chunk indices already held. A download of
        a different artifact under the same ID is discarded."""
        d = self._partial(seg_id)
        meta = {"artifact_sha256": artifact_sha256, "size": size, "total": total}
        try:
            if json.loads((d / "meta.json").read_text()) == meta:
                return {int(p.stem) for p in d.glob("*.part")}
        except (OSError, ValueError):
            pass
        shutil.rmtree(d, ignore_errors=True)
        atomic_write(d / "meta.json", json.dumps(meta).encode())
        return set()

    def in_progress(self, seg_id: str, chunk_size: int) -> tuple[int, set[int]] | None:
        """(total chunks, chunk indices held) of a download begun earlier, e.g. before a
        crash, in chunks of `chunk_size`; None if there is none (or it used another size)."""
        d = self._partial(seg_id)
        try:
            meta = json.loads((d / "meta.json").read_text())
            total, size = int(meta["total"]), int(meta["size"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if total != max(1, -(-size // chunk_size)):
            return None
        return total, {int(p.stem) for p in d.glob("*.part") if int(p.stem) < total}

    def put_chunk(self, seg_id: str, index: int, data: bytes) -> None:
        """Store one chunk, renamed into place but not fsynced: `assemble` checks the whole
        artifact's hash, so a chunk torn by a power cut only costs a fresh download."""
        path = self._partial(seg_id) / f"{index}.part"
        tmp = path.with_name(f"{index}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)

    def assemble(self, seg_id: str) -> None:
        """Join a complete download, verify it, and move it into the cache; a download that
        fails verification is discarded, so the next try fetches it afresh."""
        d = self._partial(seg_id)
        try:
            meta = json.loads((d / "meta.json").read_text())
            blob = b"".join((d / f"{k}.part").read_bytes() for k in range(meta["total"]))
            self.put(seg_id, blob, meta["artifact_sha256"])
        except (codec.ArtifactError, ValueError, OSError):
            self.discard(seg_id)
            raise

    def discard(self, seg_id: str) -> None:
        """Forget a segment: its artifact and any partial download of it."""
        self.path(seg_id).unlink(missing_ok=True)
        shutil.rmtree(self._partial(seg_id), ignore_errors=True)


_DTYPE_NAMES = {torch.float16: "F16", torch.float32: "F32", torch.int64: "I64",
                np.dtype(np.float16): "F16", np.dtype(np.float32): "F32",
                np.dtype(np.int64): "I64"}


class SegmentRegistry:
    """Segment modules rebuilt from artifacts, shared read-only by every agent of a process.

    A segment is rebuilt by creating its anchor's timm architecture (the artifact's recipe),
    loading the artifact's weights into the right segment, and checking that the result
    hashes to the requested segment ID."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._segments: dict[str, Segment] = {}
        self._inputs: dict[str, InputSpec] = {}  # stems: the images the model takes
        # recipe → architecture instances, each with the segment slots already loaded
        self._skeletons: dict[str, list[tuple[list[Segment], set[int]]]] = {}
        self._flops: dict[tuple, int] = {}  # per architecture of an assembled model

    def get(self, seg_id: str, read: Callable[[], bytes]) -> Segment:
        """The segment `seg_id`, rebuilt the first time from the artifact `read()` returns."""
        with self._lock:
            if seg_id not in self._segments:
                blob = read()
                tensors, meta = codec.unpack_segment(blob, codec.sha256_hex(blob))
                seg = self._load(meta, tensors)
                if seg.segment_id() != seg_id:
                    raise codec.ArtifactError(f"artifact does not rebuild segment {seg_id[:12]}")
                if "input" in meta:
                    try:
                        self._inputs[seg_id] = InputSpec.from_meta(meta["input"])
                    except ValueError as exc:
                        raise codec.ArtifactError(f"segment {seg_id[:12]}: {exc}") from None
                self._segments[seg_id] = seg
            return self._segments[seg_id]

    def input_spec(self, seg_id: str) -> InputSpec | None:
        """The images a model starting with stem `seg_id` takes (None: not a stem, or an
        artifact that does not say); the segment must have been `get` first."""
        with self._lock:
            return self._inputs.get(seg_id)

    def flops(self, key: tuple, count: Callable[[], int]) -> int:
        """FLOPs of an assembled model, counted once per architecture `key` per process."""
        with self._lock:
            if key not in self._flops:
                self._flops[key] = count()
            return self._flops[key]

    def _load(self, meta: dict, tensors: dict[str, np.ndarray]) -> Segment:
        key, index = json.dumps(meta["recipe"], sort_keys=True), int(meta["index"])
        pool = self._skeletons.setdefault(key, [])
        for segs, used in pool:
            if index not in used:
                break
        else:
            segs, used = split_model(from_recipe(meta["recipe"])), set()
            pool.append((segs, used))
        if not 0 <= index < len(segs):
            raise codec.ArtifactError(f"segment index {index} out of range for {meta['recipe']}")
        seg = segs[index]
        expected = {k: (_DTYPE_NAMES[v.dtype], tuple(v.shape))
                    for k, v in seg.body.state_dict().items()}
        codec.check_specs({k: (_DTYPE_NAMES[v.dtype], v.shape) for k, v in tensors.items()},
                          expected)
        try:
            seg.body.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in tensors.items()})
        except RuntimeError as exc:
            raise codec.ArtifactError(f"segment weights do not fit the architecture: {exc}") from None
        used.add(index)
        return seg.eval().requires_grad_(False)


def provision(cache: SegmentCache, catalog: Catalog, anchors: list[str] | None = None) -> list[str]:
    """Put the segments of a catalog's anchors (all, or those named) into `cache` ahead of
    time — what `restnet agent provision` does for a board. Returns the segment IDs added."""
    names = anchors or [e.name for e in catalog.anchors]
    added = []
    for name in names:
        for seg_id, tensors, meta in segment_payloads(catalog.get(name), catalog):
            if not cache.has(seg_id):
                blob = codec.pack_segment(tensors, meta)
                cache.put(seg_id, blob, codec.sha256_hex(blob))
                added.append(seg_id)
    return added
