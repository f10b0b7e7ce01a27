"""The catalog: every anchor and hybrid with its measured accuracy and costs, a JSON index
beside content-addressed safetensors artifacts (the stitch tensors), and the Pareto frontier.

`catalog.json` records the segment ID scheme its entries name segments by
(`segment_id_scheme`, see `segment_ids`); a catalog of another scheme is refused on loading,
with the command that rebuilds it (trained anchors are reused)."""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .files import atomic_write
from .segment_ids import SCHEME

INDEX = "catalog.json"
REBUILD = "restnet catalog build"  # the command that makes a catalog (see README)


@dataclass
class Entry:
    """One model of the catalog: an anchor, or a hybrid front[:i+1] → stitch → back[j+1:]."""

    id: str
    name: str
    kind: str  # "anchor" | "hybrid"
    test_acc: float
    params: int
    flops: int
    act_peak_bytes: int
    latency_ms: float
    model_bytes: int  # all weights the model runs, fp16
    segments: list[str]  # segment IDs, in execution order
    front: str | None = None
    back: str | None = None
    i: int | None = None
    j: int | None = None
    joint: str | None = None  # "CNN→CNN", "CNN→ViT", "ViT→CNN", "ViT→ViT"
    direction: str | None = None  # "large→small" (ReStNet) or "small→large"
    cka: float | None = None
    ls_val_acc: float | None = None
    ls_test_acc: float | None = None
    val_acc: float | None = None
    stitch_state: str | None = None  # "ls" (least-squares init only) | "finetuned"
    artifact: str | None = None  # sha256 of the safetensors file: stitch, or anchor weights
    delta_bytes: int | None = None  # stitch tensors as fp16 safetensors, zlib-compressed
    ports: dict[str, Any] | None = None  # the stitch's src/dst ports
    stitch_hidden: int = 0  # hybrids: the width of the stitch's residual branch (0: linear)
    recipe: dict[str, Any] | None = None  # anchors: how to create the timm model skeleton
    training: str | None = None  # anchors: "apart", "checkpoint" (as given) or "stitch-aware"
    init: str | None = None  # hybrids: the stitch's start, "co-trained" or "ls"
    init_val_acc: float | None = None  # hybrids: validation accuracy at that start
    rank_val_acc: float | None = None  # hybrids: what the ranking ordered them by (val acc)
    finetune_seconds: float | None = None  # hybrids: wall time of the stitch fine-tuning
    finetune_curve: list[float] | None = None  # hybrids: val acc at each of its validations
    # per segment in execution order (a hybrid's stitch included, ID "stitch"):
    # {"segment_id", "flops", "latency_ms", "kind"} (stitch_lib.cost.segment_costs)
    segment_costs: list[dict[str, Any]] | None = None

    @property
    def delta_ratio(self) -> float | None:
        return None if self.delta_bytes is None else self.delta_bytes / self.model_bytes


def pareto(entries: list[Entry], cost: str = "latency_ms") -> list[Entry]:
    """Entries no other entry beats on both accuracy and `cost` (cheapest first)."""
    front = [e for e in entries
             if not any(getattr(o, cost) <= getattr(e, cost) and o.test_acc >= e.test_acc
                        and (getattr(o, cost) < getattr(e, cost) or o.test_acc > e.test_acc)
                        for o in entries)]
    return sorted(front, key=lambda e: getattr(e, cost))


def useful(entries: list[Entry], cost: str = "flops") -> list[Entry]:
    """Hybrids more accurate (test split) than every anchor whose `cost` is no higher — and
    at least one anchor is that cheap, so the claim is never vacuous."""
    anchors = [e for e in entries if e.kind == "anchor"]
    out = []
    for e in entries:
        fits = [a for a in anchors if getattr(a, cost) <= getattr(e, cost)]
        if e.kind == "hybrid" and fits and all(e.test_acc > a.test_acc for a in fits):
            out.append(e)
    return sorted(out, key=lambda e: getattr(e, cost))


def best_within(entries: list[Entry], budget: float, cost: str = "flops") -> Entry | None:
    """The most accurate entry whose `cost` fits `budget` (the cheaper one on a tie)."""
    fits = [e for e in entries if getattr(e, cost) <= budget]
    return max(fits, key=lambda e: (e.test_acc, -getattr(e, cost)), default=None)


def coverage(entries: list[Entry], cost: str = "flops") -> float:
    """The share of the log-cost interval between the cheapest and the dearest anchor in which
    the most accurate model that fits is a useful hybrid (0–1)."""
    anchors = [getattr(e, cost) for e in entries if e.kind == "anchor"]
    lo, hi = min(anchors), max(anchors)
    if hi <= lo:
        return 0.0
    good = {e.name for e in useful(entries, cost)}
    marks = sorted({lo, hi, *(getattr(e, cost) for e in entries if lo < getattr(e, cost) < hi)})
    covered = sum(math.log(b / a) for a, b in zip(marks, marks[1:])
                  if (best := best_within(entries, a, cost)) is not None and best.name in good)
    return covered / math.log(hi / lo)


def chord_margins(entries: list[Entry], cost: str = "flops") -> dict[str, float]:
    """For each hybrid on the Pareto frontier between the cheapest and dearest anchor: its test
    accuracy minus the straight line (in log cost) between the anchors on either side of it.
    All ≥ 0 means the frontier is nowhere below the line between adjacent anchors."""
    anchors = sorted((e for e in entries if e.kind == "anchor"), key=lambda e: getattr(e, cost))
    out = {}
    for e in pareto(entries, cost):
        c = getattr(e, cost)
        below = [a for a in anchors if getattr(a, cost) <= c]
        above = [a for a in anchors if getattr(a, cost) > c]
        if e.kind != "hybrid" or not below or not above:
            continue
        a, b = below[-1], above[0]
        ca, cb = getattr(a, cost), getattr(b, cost)
        t = math.log(c / ca) / math.log(cb / ca)
        out[e.name] = e.test_acc - (a.test_acc + t * (b.test_acc - a.test_acc))
    return out


def usefulness(entries: list[Entry]) -> dict[str, Any]:
    """The catalog's figures of merit, on FLOPs and on this machine's latency."""
    out: dict[str, Any] = {}
    for cost in ("flops", "latency_ms"):
        margins = chord_margins(entries, cost)
        out[cost] = {"useful": [e.name for e in useful(entries, cost)],
                     "coverage": coverage(entries, cost),
                     "chord_margin_min": min(margins.values(), default=None),
                     "chord_margins": margins}
    return out


def _id_scheme(doc: dict[str, Any]) -> Any:
    """The segment ID scheme a parsed catalog.json names segments by."""
    return doc.get("segment_id_scheme", 1)  # catalogs of scheme 1 did not say


@dataclass
class Catalog:
    """Entries plus free-form measurements (`meta`), stored under `root`."""

    root: Path
    entries: list[Entry] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def anchors(self) -> list[Entry]:
        return [e for e in self.entries if e.kind == "anchor"]

    @property
    def hybrids(self) -> list[Entry]:
        return [e for e in self.entries if e.kind == "hybrid"]

    def get(self, name_or_id: str) -> Entry:
        for e in self.entries:
            if name_or_id in (e.id, e.name):
                return e
        raise KeyError(f"no catalog entry named {name_or_id!r}")

    def frontier(self, cost: str = "latency_ms") -> list[Entry]:
        return pareto(self.entries, cost)

    def put_artifact(self, tensors: dict[str, torch.Tensor]) -> str:
        """Store tensors as safetensors under their own sha256; returns the hash."""
        blob = st_save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
        sha = hashlib.sha256(blob).hexdigest()
        path = self.root / "artifacts" / f"{sha}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            atomic_write(path, blob)
        return sha

    def load_artifact(self, sha: str) -> dict[str, torch.Tensor]:
        """The tensors stored under `sha`; refused when the file's hash does not match."""
        path = self.root / "artifacts" / f"{sha}.safetensors"
        blob = path.read_bytes()
        actual = hashlib.sha256(blob).hexdigest()
        if actual != sha:
            raise ValueError(f"artifact {path} is corrupt or tampered: its sha256 is {actual}, "
                             f"the catalog expects {sha}; rebuild the catalog")
        return st_load(blob)

    def save(self) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        doc = {"version": 1, "segment_id_scheme": SCHEME, "meta": self.meta,
               "entries": [asdict(e) for e in self.entries]}
        path = self.root / INDEX
        atomic_write(path, json.dumps(doc, indent=1).encode())
        return path

    @classmethod
    def load(cls, root: Path) -> "Catalog":
        """The catalog saved under `root`; FileNotFoundError if there is none, ValueError
        (saying how to rebuild it) if it names segments by another ID scheme."""
        path = Path(root) / INDEX
        if not path.is_file():
            raise FileNotFoundError(f"no catalog at {path}; build one with `{REBUILD}`")
        doc = json.loads(path.read_text())
        scheme = _id_scheme(doc)
        if scheme != SCHEME:
            home = f" --home {path.parent.parent}" if path.parent.name == "catalog" else ""
            raise ValueError(f"catalog {path} names segments by ID scheme {scheme}, this version "
                             f"by scheme {SCHEME} (docs/protocol.md §5.3): rebuild it with "
                             f"`{REBUILD}{home}` (and its --zoo, if not zoo.yaml; the trained "
                             "anchors are reused)")
        return cls(Path(root), [Entry(**e) for e in doc["entries"]], doc.get("meta", {}))

    @staticmethod
    def is_current(root: Path) -> bool:
        """True when `root` holds a catalog this version loads (a build cache is stale
        otherwise: no catalog, or one of another segment ID scheme)."""
        try:
            doc = json.loads((Path(root) / INDEX).read_text())
        except (OSError, ValueError):
            return False
        return isinstance(doc, dict) and _id_scheme(doc) == SCHEME
