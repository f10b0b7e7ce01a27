"""Fine-tuning on demand: a hybrid deployed with a least-squares-initialised stitch gets its
stitch fine-tuned in the background; the result replaces the catalog entry's artifact (same
catalog ID), and the controller pushes the new stitch tensors as a new generation."""
from __future__ import annotations

import logging
import threading

from fleet_protocol.codec import pack_delta
from stitch_lib.assemble import anchor_segments
from stitch_lib.build import BuildConfig, load_hybrid
from stitch_lib.catalog import Catalog, Entry
from stitch_lib.data import DataSplits, make_splits
from stitch_lib.train import TrainConfig, evaluate, finetune_stitch

log = logging.getLogger(__name__)


class Finetuner:
    """Runs stitch-only fine-tuning for catalog entries, one at a time."""

    def __init__(self, catalog: Catalog, cfg: TrainConfig = BuildConfig().ft) -> None:
        self.catalog, self.cfg = catalog, cfg
        self._lock = threading.Lock()
        self._splits: DataSplits | None = None

    def _data(self) -> DataSplits:
        if self._splits is None:
            spec = self.catalog.meta.get("dataset")
            if not spec:
                raise ValueError("the catalog does not record its dataset; rebuild it with "
                                 "`restnet catalog build` to fine-tune on demand")
            self._splits = make_splits(**spec)
        return self._splits

    def run(self, entry_id: str) -> dict:
        """Fine-tune the stitch of `entry_id` and store the new artifact; returns the entry's
        new fields (apply them with `apply`, in the thread that owns the catalog)."""
        with self._lock:
            entry = self.catalog.get(entry_id)
            splits = self._data()
            segments = {name: anchor_segments(self.catalog.get(name), self.catalog)
                        for name in (entry.front, entry.back)}
            hybrid = load_hybrid(entry, segments, self.catalog)
            res = finetune_stitch(hybrid, splits, self.cfg)
            hybrid.stitch.round_to_wire()
            tensors = dict(hybrid.stitch.state_dict())
            return {"artifact": self.catalog.put_artifact(tensors),
                    "delta_bytes": len(pack_delta({k: v.numpy() for k, v in tensors.items()})),
                    "val_acc": res.val_acc, "test_acc": evaluate(hybrid, splits.test),
                    "stitch_state": "finetuned"}

    def apply(self, entry_id: str, update: dict) -> Entry:
        """Write a fine-tuning result into the catalog entry and save the catalog."""
        entry = self.catalog.get(entry_id)
        for k, v in update.items():
            setattr(entry, k, v)
        self.catalog.save()
        log.info("fine-tuned %s: val %.4f, test %.4f", entry.name, entry.val_acc, entry.test_acc)
        return entry
