"""What the controller ships: segment artifacts (served in chunks on request) and stitch deltas
(inline in desired state), both made from the catalog and kept in memory. A segment's chunk
index (its chunks' hashes) is computed once per chunk size and cached."""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass

from fleet_protocol import codec
from fleet_protocol.messages import ArtifactChunk, PortSpec, StitchDelta
from stitch_lib.build import segment_payloads
from stitch_lib.catalog import Catalog, Entry

log = logging.getLogger(__name__)
INDEX_CACHE = 64  # chunk indexes kept (segment × chunk size), least recently used dropped


@dataclass(frozen=True)
class ChunkIndex:
    """A segment artifact cut into chunks of `chunk_size`, with every chunk's sha256."""

    artifact: str
    blob: bytes
    chunk_size: int
    artifact_sha256: str
    hashes: tuple[str, ...]

    @property
    def total(self) -> int:
        return len(self.hashes)

    def nbytes(self, index: int) -> int:
        """Raw bytes of chunk `index` (before base64)."""
        return len(self.blob[index * self.chunk_size:(index + 1) * self.chunk_size])

    def chunk(self, index: int) -> ArtifactChunk:
        """Chunk `index` as a message; ValueError if out of range."""
        if not 0 <= index < self.total:
            raise ValueError(f"chunk {index} out of range (artifact has {self.total})")
        data = self.blob[index * self.chunk_size:(index + 1) * self.chunk_size]
        return ArtifactChunk(artifact=self.artifact, index=index, total=self.total,
                             size=len(self.blob), artifact_sha256=self.artifact_sha256,
                             sha256=self.hashes[index], data=codec.b64(data))


def unknown_artifact(seg_id: str, error: str = "unknown artifact") -> ArtifactChunk:
    """The answer to a request for a segment that will not be served, saying why."""
    zero = "0" * 64
    return ArtifactChunk(artifact=seg_id, index=0, total=1, size=1, artifact_sha256=zero,
                         sha256=zero, error=error)


class Artifacts:
    """Segment blobs by segment ID and stitch deltas by catalog ID, built lazily."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self._lock = threading.Lock()
        self._segments: dict[str, bytes] = {}
        self._deltas: dict[str, StitchDelta] = {}
        self._anchor_done: set[str] = set()
        self._index_lock = threading.Lock()
        self._indexes: OrderedDict[tuple[str, int], ChunkIndex] = OrderedDict()
        self._sha: dict[str, str] = {}

    def _ensure_anchor(self, name: str) -> None:
        if name in self._anchor_done:
            return
        for seg_id, tensors, meta in segment_payloads(self.catalog.get(name), self.catalog):
            self._segments[seg_id] = codec.pack_segment(tensors, meta)
        self._anchor_done.add(name)

    def segment(self, seg_id: str) -> bytes | None:
        """The artifact of segment `seg_id`, or None if no anchor of the catalog has it."""
        with self._lock:
            if seg_id not in self._segments:
                for a in self.catalog.anchors:
                    if seg_id in a.segments:
                        self._ensure_anchor(a.name)
                        break
            return self._segments.get(seg_id)

    def index(self, seg_id: str, chunk_size: int) -> ChunkIndex | None:
        """The chunk index of segment `seg_id` at `chunk_size` (None if no anchor has it),
        computed once and cached (the last `INDEX_CACHE` used)."""
        key = (seg_id, chunk_size)
        with self._index_lock:
            if key in self._indexes:
                self._indexes.move_to_end(key)
                return self._indexes[key]
        blob = self.segment(seg_id)
        if blob is None:
            return None
        sha = self._sha.get(seg_id) or self._sha.setdefault(seg_id, codec.sha256_hex(blob))
        idx = ChunkIndex(seg_id, blob, chunk_size, sha, tuple(
            codec.sha256_hex(part) for part in codec.chunks(blob, chunk_size)))
        with self._index_lock:
            self._indexes[key] = idx
            while len(self._indexes) > INDEX_CACHE:
                self._indexes.popitem(last=False)
        return idx

    def chunk(self, seg_id: str, index: int, size: int) -> ArtifactChunk:
        """Chunk `index` of segment `seg_id` cut at `size` (an error chunk if unknown)."""
        idx = self.index(seg_id, size)
        return unknown_artifact(seg_id) if idx is None else idx.chunk(index)

    def delta(self, entry: Entry) -> StitchDelta | None:
        """The stitch delta of a hybrid (None for an anchor)."""
        if entry.kind != "hybrid":
            return None
        with self._lock:
            if entry.artifact not in self._deltas:
                tensors = {k: v.numpy() for k, v in self.catalog.load_artifact(entry.artifact).items()}
                blob = codec.pack_delta(tensors)
                self._deltas[entry.artifact] = StitchDelta(
                    src=PortSpec(**entry.ports["src"]), dst=PortSpec(**entry.ports["dst"]),
                    hidden=entry.stitch_hidden, size=len(blob), sha256=codec.sha256_hex(blob), data=codec.b64(blob))
            return self._deltas[entry.artifact]

    def split(self, entry: Entry) -> tuple[list[str], list[str]]:
        """(front, back) segment IDs of an entry, in execution order."""
        if entry.kind != "hybrid":
            return list(entry.segments), []
        n_front = entry.i + 1
        return list(entry.segments[:n_front]), list(entry.segments[n_front:])
