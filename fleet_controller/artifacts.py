"""What the controller ships: segment artifacts (served in chunks on request) and stitch deltas
(inline in desired state), both made from the catalog and kept in memory."""
from __future__ import annotations

import logging
import threading

from fleet_protocol import codec
from fleet_protocol.messages import ArtifactChunk, PortSpec, StitchDelta
from stitch_lib.build import segment_payloads
from stitch_lib.catalog import Catalog, Entry

log = logging.getLogger(__name__)


class Artifacts:
    """Segment blobs by segment ID and stitch deltas by catalog ID, built lazily."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self._lock = threading.Lock()
        self._segments: dict[str, bytes] = {}
        self._deltas: dict[str, StitchDelta] = {}
        self._anchor_done: set[str] = set()

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

    def chunk(self, seg_id: str, index: int, size: int) -> ArtifactChunk:
        blob = self.segment(seg_id)
        if blob is None:
            zero = "0" * 64
            return ArtifactChunk(artifact=seg_id, index=0, total=1, size=1, artifact_sha256=zero,
                                 sha256=zero, error="unknown artifact")
        parts = codec.chunks(blob, size)
        if not 0 <= index < len(parts):
            raise ValueError(f"chunk {index} out of range (artifact has {len(parts)})")
        return ArtifactChunk(artifact=seg_id, index=index, total=len(parts), size=len(blob),
                             artifact_sha256=codec.sha256_hex(blob),
                             sha256=codec.sha256_hex(parts[index]), data=codec.b64(parts[index]))

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
                    size=len(blob), sha256=codec.sha256_hex(blob), data=codec.b64(blob))
            return self._deltas[entry.artifact]

    def split(self, entry: Entry) -> tuple[list[str], list[str]]:
        """(front, back) segment IDs of an entry, in execution order."""
        if entry.kind != "hybrid":
            return list(entry.segments), []
        n_front = entry.i + 1
        return list(entry.segments[:n_front]), list(entry.segments[n_front:])
