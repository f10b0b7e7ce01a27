"""How small can a stitch travel? Each delta encoding, measured on a built catalog.

    python bench/delta_bench.py [--home .restnet] [--zoo zoo.yaml]

For every hybrid of the catalog, the bytes of its stitch under three encodings, as a share of
the hybrid's fp16 weights (the catalog's "delta %"):
- **the wire's** (docs/protocol.md §5.1): fp16 safetensors, zlib level 9 — what devices get;
- the same safetensors under xz (lzma, preset 9e): lossless, another codec on both sides;
- int8: each weight tensor quantised per output channel (symmetric, fp16 scales), biases and
  other 1-D tensors fp16, zlib level 9: lossy, so each hybrid's test accuracy with the
  dequantised stitch is measured beside the catalog's (the shipped fp16 stitch).
The median is over the useful hybrids (on FLOPs), as the target (≤ 1%) reads. Writes its block
into docs/results.md.
"""
from __future__ import annotations

import argparse
import lzma
import statistics
import sys
import zlib
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save as st_save

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchlib import ROOT, command_line, write_block  # noqa: E402
from fleet_protocol.codec import pack_delta  # noqa: E402
from restnet.stitch_cmd import load_zoo  # noqa: E402
from stitch_lib.assemble import anchor_segments  # noqa: E402
from stitch_lib.build import load_hybrid  # noqa: E402
from stitch_lib.catalog import Catalog, useful  # noqa: E402
from stitch_lib.data import make_splits  # noqa: E402
from stitch_lib.train import evaluate  # noqa: E402


def xz_size(tensors: dict[str, np.ndarray]) -> int:
    """The wire's fp16 safetensors, compressed by xz instead of zlib."""
    half = {k: np.ascontiguousarray(v, dtype=np.float16) for k, v in tensors.items()}
    return len(lzma.compress(st_save(half), preset=9 | lzma.PRESET_EXTREME))


def int8(tensors: dict[str, np.ndarray]) -> tuple[int, dict[str, np.ndarray]]:
    """(zlib size of the int8 encoding, the tensors a receiver would dequantise from it)."""
    packed, restored = {}, {}
    for k, v in tensors.items():
        if v.ndim < 2:
            packed[k] = v.astype(np.float16)
            restored[k] = packed[k].astype(np.float32)
            continue
        rows = v.reshape(v.shape[0], -1)
        scale = (np.abs(rows).max(axis=1) / 127).astype(np.float16)
        safe = np.where(scale > 0, scale, 1).astype(np.float32)[:, None]
        packed[k] = np.clip(np.round(rows / safe), -127, 127).astype(np.int8)
        packed[k + ".scale"] = scale
        restored[k] = (packed[k].astype(np.float32) * safe).reshape(v.shape)
    return len(zlib.compress(st_save(packed), 9)), restored


def measure(home: Path, zoo_path: Path) -> list[dict]:
    spec = load_zoo(zoo_path)
    splits = make_splits(source=spec.dataset, image_size=spec.image_size, n_calib=spec.n_calib,
                         n_val=spec.n_val, n_test=spec.n_test, seed=spec.seed)
    cat = Catalog.load(home / "catalog")
    segments = {a.name: anchor_segments(a, cat) for a in cat.anchors}
    kept = {e.name for e in useful(cat.entries, "flops")}
    rows = []
    for e in sorted(cat.hybrids, key=lambda e: e.flops):
        tensors = {k: v.numpy() for k, v in cat.load_artifact(e.artifact).items()}
        n8, restored = int8(tensors)
        h = load_hybrid(e, segments, cat)
        h.stitch.load_state_dict({k: torch.from_numpy(v) for k, v in restored.items()})
        rows.append(dict(name=e.name, useful=e.name in kept, hybrid=e.model_bytes,
                         wire=len(pack_delta(tensors)), xz=xz_size(tensors), int8=n8,
                         acc=e.test_acc, acc8=evaluate(h, splits.test)))
        print(f"{e.name}: {rows[-1]}", flush=True)
    return rows


def report(rows: list[dict]) -> list[str]:
    lines = [f"Command: `{command_line()}`", "",
             "| hybrid | useful | wire (fp16, zlib) | xz | int8 | acc (as shipped) | acc, int8 "
             "(Δ points) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        pct = {k: f"{r[k]:,} B, {r[k] / r['hybrid']:.2%}" for k in ("wire", "xz", "int8")}
        lines.append(f"| {r['name']} | {'✓' if r['useful'] else ''} | {pct['wire']} | "
                     f"{pct['xz']} | {pct['int8']} | {r['acc']:.2%} | {r['acc8']:.2%} "
                     f"({100 * (r['acc8'] - r['acc']):+.2f}) |")
    used = [r for r in rows if r["useful"]] or rows
    med = {k: statistics.median(r[k] / r["hybrid"] for r in used) for k in ("wire", "xz", "int8")}
    moved = [100 * (r["acc8"] - r["acc"]) for r in used]
    lines += ["", f"Median delta over the {len(used)} useful hybrids: wire {med['wire']:.2%}, "
              f"xz {med['xz']:.2%}, int8 {med['int8']:.2%} (target ≤ 1%); int8 moves their test "
              f"accuracy by {min(moved):+.2f} to {max(moved):+.2f} points."]
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--home", type=Path, default=ROOT / ".restnet")
    p.add_argument("--zoo", type=Path, default=ROOT / "zoo.yaml")
    p.add_argument("--no-write", dest="write", action="store_false")
    args = p.parse_args(argv)
    if not (args.home / "catalog" / "catalog.json").exists():
        raise SystemExit(f"delta_bench: no catalog under {args.home}; "
                         "run `restnet catalog build` first")
    lines = report(measure(args.home, args.zoo))
    print("\n".join(lines))
    if args.write:
        write_block("<!-- delta-bench -->", "<!-- /delta-bench -->", lines,
                    "## Deltas: how small a stitch can travel", before="## Ranking")
    return 0


if __name__ == "__main__":
    sys.exit(main())
