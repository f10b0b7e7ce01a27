"""Segment IDs: a sha256 any device can recompute from a segment artifact alone
(docs/protocol.md §5.3), independent of torch, timm and their versions.

    preimage   = UTF-8(header) + b"\\n" + bytes(t_1) + … + bytes(t_n)
    header     = JCS({"index": k, "recipe": R, "scheme": 2,
                      "tensors": [[name_1, dtype_1, shape_1], …, [name_n, dtype_n, shape_n]]})
    segment ID = lowercase hex sha256(preimage)

JCS is the JSON Canonicalization Scheme (RFC 8785): keys sorted, no whitespace, minimal
string escapes, numbers as ECMAScript writes them. R is the anchor's architecture recipe
({"model", "num_classes", "in_chans", "kwargs"}), k the segment's index in the anchor's segment
list, t_1 … t_n the segment's tensors sorted by name (code point order), each with its
safetensors dtype name (F16, F32, I64), its shape and its raw little-endian row-major bytes.
This module needs numpy only: torch tensors are accepted and read as numpy arrays.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

import numpy as np

SCHEME = 2  # scheme 1 hashed torch's repr of the segment's module (retired: not rebuildable)
DTYPE_NAMES = {np.dtype(np.float16): "F16", np.dtype(np.float32): "F32",
               np.dtype(np.int64): "I64"}  # every dtype a segment here holds (§5)
RECIPE_KEYS = {"model": str, "num_classes": int, "in_chans": int, "kwargs": dict}
_MAX_SAFE_INT = 2 ** 53  # JCS numbers are IEEE doubles: larger integers are not exact


def _number(x: float) -> str:
    """A finite float as ECMAScript's Number::toString writes it (RFC 8785 §3.2.2.3)."""
    if not math.isfinite(x):
        raise ValueError(f"{x} has no JSON form; use a finite number")
    if x == 0:
        return "0"
    if x < 0:
        return "-" + _number(-x)
    _, digits, exp = Decimal(repr(x)).normalize().as_tuple()  # repr: the shortest round trip
    d = "".join(map(str, digits))
    k, n = len(d), exp + len(d)  # x = 0.d × 10^n
    if k <= n <= 21:
        return d + "0" * (n - k)
    if 0 < n <= 21:
        return f"{d[:n]}.{d[n:]}"
    if -6 < n <= 0:
        return f"0.{'0' * -n}{d}"
    e = n - 1
    return f"{d[0]}{'.' + d[1:] if k > 1 else ''}e{'+' if e >= 0 else '-'}{abs(e)}"


def canonical_json(obj: Any) -> str:
    """`obj` as RFC 8785 (JCS) canonical JSON text: objects with string keys sorted by UTF-16
    code units, no whitespace, strings escaped as JSON.stringify does (non-ASCII kept as is),
    integers in decimal (|n| ≤ 2^53), other numbers as ECMAScript writes them. For the ASCII,
    integer-valued objects of this project it equals Python's
    `json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)`."""
    if obj is None or isinstance(obj, bool):
        return json.dumps(obj)
    if isinstance(obj, int):
        if abs(obj) > _MAX_SAFE_INT:
            raise ValueError(f"integer {obj} is beyond 2^53, which JSON numbers hold exactly; "
                             "pass it as a string")
        return str(obj)
    if isinstance(obj, float):
        return _number(obj)
    if isinstance(obj, str):
        return json.dumps(obj, ensure_ascii=False)
    if isinstance(obj, (list, tuple)):
        return "[" + ",".join(canonical_json(v) for v in obj) + "]"
    if isinstance(obj, Mapping):
        if not all(isinstance(k, str) for k in obj):
            raise ValueError(f"object keys must be strings, not {sorted(map(repr, obj))}")
        keys = sorted(obj, key=lambda k: k.encode("utf-16-be"))
        return "{" + ",".join(f"{json.dumps(k, ensure_ascii=False)}:{canonical_json(obj[k])}"
                              for k in keys) + "}"
    raise ValueError(f"{type(obj).__name__} {obj!r} has no JSON form; use strings, numbers, "
                     "booleans, null, lists and mappings")


def check_recipe(recipe: Any) -> dict[str, Any]:
    """`recipe` if it is an architecture recipe ({"model", "num_classes", "in_chans",
    "kwargs"}, JSON values only); ValueError naming what is wrong otherwise."""
    if not isinstance(recipe, Mapping) or set(recipe) != set(RECIPE_KEYS):
        got = sorted(recipe) if isinstance(recipe, Mapping) else type(recipe).__name__
        raise ValueError(f"a recipe has exactly the keys {sorted(RECIPE_KEYS)}, got {got}; "
                         "take it from the catalog entry or stitch_lib.zoo.recipe")
    for key, kind in RECIPE_KEYS.items():
        if not isinstance(recipe[key], kind) or isinstance(recipe[key], bool):
            raise ValueError(f"recipe[{key!r}] must be of type {kind.__name__}, got "
                             f"{recipe[key]!r}")
    canonical_json(recipe)  # JSON values only
    return copy.deepcopy(dict(recipe))


def _array(t: Any) -> np.ndarray:
    """A numpy array of `t` (a numpy array, or a torch tensor on any device)."""
    if isinstance(t, np.ndarray):
        return t
    try:
        return t.detach().cpu().numpy()
    except (AttributeError, TypeError) as exc:
        raise ValueError(f"cannot read {type(t).__name__} as a numpy array: {exc}") from None


def tensor_spec(t: Any) -> tuple[str, tuple[int, ...]]:
    """(safetensors dtype name, shape) of a numpy array or torch tensor."""
    a = _array(t)
    if a.dtype not in DTYPE_NAMES:
        raise ValueError(f"dtype {a.dtype} is not one segments are shipped in "
                         f"({', '.join(DTYPE_NAMES.values())}); convert the tensor first")
    return DTYPE_NAMES[a.dtype], tuple(int(n) for n in a.shape)


def segment_id_header(recipe: Mapping[str, Any], index: int, tensors: Mapping[str, Any]) -> str:
    """The canonical JSON header a segment ID hashes (see the module docstring)."""
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"segment index must be an integer ≥ 0, got {index!r}")
    specs = [[name, *tensor_spec(tensors[name])] for name in sorted(tensors)]
    return canonical_json({"scheme": SCHEME, "recipe": check_recipe(recipe), "index": index,
                           "tensors": [[n, dtype, list(shape)] for n, dtype, shape in specs]})


def segment_id(recipe: Mapping[str, Any], index: int, tensors: Mapping[str, Any]) -> str:
    """The ID of segment `index` of the anchor built from `recipe`, holding `tensors` (name →
    numpy array or torch tensor): docs/protocol.md §5.3, the same from a live segment, a
    catalog build or an artifact's bytes."""
    arrays = {name: _array(t) for name, t in tensors.items()}
    h = hashlib.sha256(segment_id_header(recipe, index, arrays).encode() + b"\n")
    for name in sorted(arrays):
        a = arrays[name]
        h.update(np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")).tobytes())
    return h.hexdigest()
