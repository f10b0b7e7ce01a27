"""What a device needs to rebuild models from the catalog, and nothing that trains or draws:
an anchor's architecture from its recipe, its segments with their weights, and the format of
the images the model takes (timm and torch only — no data loaders, progress bars or plots)."""
from __future__ import annotations

from typing import Any

import timm
import torch
from torch import nn

from .catalog import Catalog, Entry
from .inputs import InputSpec
from .segments import Segment, split_model


def from_recipe(r: dict[str, Any]) -> nn.Module:
    """An anchor's architecture with untrained weights, in eval mode (load weights next)."""
    return timm.create_model(r["model"], num_classes=r["num_classes"], in_chans=r["in_chans"],
                             **r["kwargs"]).eval()


def load_anchor_model(entry: Entry, catalog: Catalog) -> torch.nn.Module:
    """An anchor rebuilt from the catalog alone: its recipe plus its hash-checked weights."""
    model = from_recipe(entry.recipe)
    model.load_state_dict(catalog.load_artifact(entry.artifact))
    return model.eval()


def input_spec(entry: Entry, catalog: Catalog) -> InputSpec | None:
    """The images an anchor takes: its recipe's channels at the catalog's image size (the
    dataset it was built on, else the recipe's own `img_size`); None if neither is recorded."""
    size = (catalog.meta.get("dataset") or {}).get("image_size") \
        or entry.recipe["kwargs"].get("img_size")
    return None if size is None else InputSpec(int(entry.recipe["in_chans"]), (int(size),) * 2)


def anchor_segments(entry: Entry, catalog: Catalog) -> list[Segment]:
    """An anchor's segments rebuilt from the catalog alone, knowing their IDs."""
    return split_model(load_anchor_model(entry, catalog), entry.recipe)


def segment_payloads(entry: Entry, catalog: Catalog) -> list[tuple[str, dict, dict]]:
    """An anchor's segments as (segment ID, numpy tensors, metadata) — what a device needs to
    rebuild each one: the recipe, the segment's index, and its weights; the stem (index 0)
    also says what images the model takes (`input`)."""
    spec = input_spec(entry, catalog)
    payloads = []
    for s in anchor_segments(entry, catalog):
        meta = {"recipe": entry.recipe, "index": s.index, "name": s.name, "anchor": entry.name}
        if s.index == 0 and spec is not None:
            meta["input"] = spec.to_meta()
        payloads.append((s.segment_id(),
                         {n: v.detach().cpu().numpy() for n, v in s.body.state_dict().items()},
                         meta))
    return payloads
