"""stitch_lib — the ReStNet core: cut timm models into segments, rank stitch points by CKA,
join a large model's early layers to a small model's later layers with a small stitch layer,
fine-tune only that layer, and measure every hybrid into a catalog with its Pareto frontier.

The names below are imported on first use, so that a board importing only what assembles a
model (`stitch_lib.assemble`, `.segments`, `.stitch`) never loads the training code."""
from __future__ import annotations

import importlib

_WHERE = {"Catalog": "catalog", "Entry": "catalog", "pareto": "catalog",
          "cka_matrix": "cka", "linear_cka": "cka", "minibatch_cka": "cka",
          "Segment": "segments", "split_model": "segments",
          "Hybrid": "stitch", "Stitch": "stitch", "build_hybrid": "stitch",
          "feasible_points": "stitch",
          "TrainConfig": "train", "finetune_stitch": "train"}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'stitch_lib' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
