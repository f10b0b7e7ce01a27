"""The device's segment cache: verified segment artifacts on disk, resumable partial downloads,
and a process-wide registry of rebuilt segment modules shared read-only between agents.

Disk layout under the cache directory (every write is atomic: temp file, rename; all but the
chunks are also fsynced — a chunk is checked again with the whole artifact, which is fsynced
once, when it is assembled):

    segments/<segment-id>.safetensors      complete, verified artifacts
    partial/<segment-id>/meta.json         a download in progress: artifact sha256, size, total
    partial/<segment-id>/<index>.part      the chunks received so far (each sha256-checked)
    applied.json                           the running deployment and the one before it
    boot.json                              the model served from the start, before any
                                           deployment (`BootModel`; written by `provision`)
    id-scheme                              the segment ID scheme the files are named by (not
                                           fsynced: a lost one only costs a re-check)
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import torch

from pydantic import Field

from fleet_protocol import codec
from fleet_protocol.messages import Desired, Id, SegmentId
from stitch_lib.assemble import from_recipe, segment_payloads
from stitch_lib.catalog import Catalog
from stitch_lib.files import atomic_write
from stitch_lib.inputs import InputSpec
from stitch_lib.segment_ids import SCHEME, segment_id, tensor_spec
from stitch_lib.segments import Segment, split_model

log = logging.getLogger(__name__)
T = TypeVar("T")
ONCE_ENTRIES = 1024  # SegmentRegistry.once: results kept
BOOT_FILE = "boot.json"  # in the cache directory: see BootModel


_SEGMENT_ID = re.compile(r"[0-9a-f]{64}")


class SegmentCache:
    """Segment artifacts on disk, by segment ID."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        (self.root / "segments").mkdir(parents=True, exist_ok=True)
        (self.root / "partial").mkdir(parents=True, exist_ok=True)
        self._migrate()

    def _migrate(self) -> None:
        """Re-key a cache named by an older segment ID scheme (no `id-scheme` file: before
        scheme 2): every artifact is renamed to its ID now, computed from its own bytes, one
        that does not open is dropped, and partial downloads (named by old IDs) are dropped."""
        marker = self.root / "id-scheme"
        try:
            if int(marker.read_text()) == SCHEME:
                return
        except (OSError, ValueError):
            pass  # no marker: an older cache, or a new one
        for seg_id in self.ids():
            blob = self.read(seg_id)
            try:
                new = artifact_segment_id(*codec.unpack_segment(blob, codec.sha256_hex(blob)))
            except codec.ArtifactError as exc:
                log.warning("cache %s: dropped segment %s: %s", self.root, seg_id[:12], exc)
                self.discard(seg_id)
                continue
            if new != seg_id:
                os.replace(self.path(seg_id), self.path(new))
                log.info("cache %s: segment %s is %s under ID scheme %d", self.root,
                         seg_id[:12], new[:12], SCHEME)
        for d in (self.root / "partial").iterdir():
            shutil.rmtree(d, ignore_errors=True)
        marker.write_text(f"{SCHEME}\n")

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


def artifact_segment_id(tensors: dict[str, np.ndarray], meta: dict) -> str:
    """The segment ID (docs/protocol.md §5.3) an unpacked segment artifact hashes to: from its
    own recipe, index and tensors."""
    try:
        return segment_id(meta["recipe"], meta["index"], tensors)
    except (KeyError, TypeError, ValueError) as exc:
        raise codec.ArtifactError(f"artifact has no valid recipe and index: {exc}") from None


class SegmentRegistry:
    """Segment modules rebuilt from artifacts, shared read-only by every agent of a process.

    A segment is rebuilt, once the artifact hashes to the requested segment ID, by creating
    its anchor's timm architecture (the artifact's recipe) and loading the artifact's weights
    into the right segment."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._segments: dict[str, Segment] = {}
        self._inputs: dict[str, InputSpec] = {}  # stems: the images the model takes
        # recipe → architecture instances, each with the segment slots already loaded
        self._skeletons: dict[str, list[tuple[list[Segment], set[int]]]] = {}
        self._once: OrderedDict[tuple, tuple[str, Any]] = OrderedDict()  # see `once`

    def get(self, seg_id: str, read: Callable[[], bytes]) -> Segment:
        """The segment `seg_id`, rebuilt the first time from the artifact `read()` returns."""
        with self._lock:
            if seg_id not in self._segments:
                blob = read()
                tensors, meta = codec.unpack_segment(blob, codec.sha256_hex(blob))
                if artifact_segment_id(tensors, meta) != seg_id:
                    raise codec.ArtifactError(f"artifact does not rebuild segment {seg_id[:12]}")
                seg = self._load(meta, tensors)
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

    def once(self, key: tuple, compute: Callable[[], T]) -> T:
        """`compute()` once per `key` per process, for a pure function of what the key names
        (an assembled model's FLOPs per architecture; its verdict on a probe per content and
        probe): a re-deployed model, or the same model on many simulated devices, is not
        computed again. A ValueError is remembered and raised again. The newest
        `ONCE_ENTRIES` keys are kept."""
        with self._lock:
            if key in self._once:
                self._once.move_to_end(key)
                kind, value = self._once[key]
                if kind == "error":
                    raise ValueError(value)
                return value
        try:
            entry = ("ok", compute())
        except ValueError as exc:
            entry = ("error", str(exc))
        with self._lock:
            self._once[key] = entry
            while len(self._once) > ONCE_ENTRIES:
                self._once.popitem(last=False)
        if entry[0] == "error":
            raise ValueError(entry[1])
        return entry[1]

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
        codec.check_specs({k: tensor_spec(v) for k, v in tensors.items()},
                          {k: tensor_spec(v) for k, v in seg.body.state_dict().items()})
        try:
            seg.body.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in tensors.items()})
        except RuntimeError as exc:
            raise codec.ArtifactError(f"segment weights do not fit the architecture: {exc}") from None
        used.add(index)
        return seg.eval().requires_grad_(False)


class BootModel(Desired):
    """The model a board serves from its start, before any desired state: an anchor whose
    segments its cache holds (`boot.json`, written by `provision`). Shaped as a desired state
    so that the agent assembles and verifies it as any other, but never signed nor sent, and
    of generation 0, which no desired state has: every deployment is newer and replaces it
    (docs/protocol.md §7.2)."""

    kind: Literal["boot"] = "boot"
    generation: Literal[0] = 0
    device_id: Id | None = None  # not addressed: a board may be provisioned before it has an ID
    deployment_id: Id = "boot"
    back: list[SegmentId] = Field([], max_length=0)  # an anchor: no stitch, no back segments
    stitch: None = None


def boot_model(cache: SegmentCache, catalog: Catalog, anchor: str) -> BootModel:
    """The boot record of the catalog's anchor `anchor` (name or ID), whose segments `cache`
    must hold. Raises KeyError (not in the catalog) or ValueError."""
    entry = catalog.get(anchor)
    if entry.kind != "anchor":
        raise ValueError(f"{anchor!r} is a hybrid; a board boots serving an anchor: "
                         f"{', '.join(e.name for e in catalog.anchors)}")
    missing = [s for s in entry.segments if not cache.has(s)]
    if missing:
        raise ValueError(f"the cache {cache.root} lacks {len(missing)} of the "
                         f"{len(entry.segments)} segments of {entry.name}: provision them first")
    return BootModel(hybrid=entry.id, name=entry.name, front=list(entry.segments),
                     ts=time.time(), reason="provisioned")


def write_boot(root: Path, boot: BootModel) -> Path:
    """Make `boot` the boot record of the cache directory `root`; returns its path."""
    path = Path(root) / BOOT_FILE
    atomic_write(path, boot.model_dump_json(exclude_none=True).encode())
    return path


def read_boot(root: Path) -> BootModel | None:
    """The boot record of the cache directory `root`; None when it has none. Raises OSError
    or ValueError (a pydantic ValidationError) when it cannot be read or is damaged."""
    path = Path(root) / BOOT_FILE
    if not path.is_file():
        return None
    return BootModel.model_validate_json(path.read_bytes())


def provision(cache: SegmentCache, catalog: Catalog, anchors: list[str] | None = None,
              boot: str | None = None) -> list[str]:
    """Put the segments of a catalog's anchors (all, or those named) into `cache` ahead of
    time — what `restnet agent provision` does for a board — and, with `boot`, make that
    anchor (one of them) the model the board serves from its start (`boot.json`; without it,
    a boot record written before stays). Returns the segment IDs added."""
    entries = [catalog.get(name) for name in anchors] if anchors else catalog.anchors
    if boot is not None and not any(e is catalog.get(boot) for e in entries):
        raise ValueError(f"boot model {boot!r} is not among the anchors provisioned: "
                         f"{', '.join(e.name for e in entries)}")
    added = []
    for entry in entries:
        for seg_id, tensors, meta in segment_payloads(entry, catalog):
            if not cache.has(seg_id):
                blob = codec.pack_segment(tensors, meta)
                cache.put(seg_id, blob, codec.sha256_hex(blob))
                added.append(seg_id)
    if boot is not None:
        write_boot(cache.root, boot_model(cache, catalog, boot))
    return added
