"""What a stitch's fine-tuning settings buy: chosen catalog hybrids re-fine-tuned from their
least-squares start under other settings, side by side with the catalog's own.

    python bench/finetune_bench.py --hybrids "A→B,C→D" --settings "steps=300;lr=0.01;distill=0.5"

Each setting overrides fields of the build's fine-tuning `TrainConfig` (`BuildConfig().ft`:
steps, lr, n_train, distill, batch_size, ...; `distill` takes the most accurate anchor as
teacher). Reports validation accuracy (what a build would choose on), test accuracy and
seconds, each against the catalog's fine-tuning of the same point (same anchors, same start).
Prints a Markdown table; nothing is written.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchlib import ROOT, command_line  # noqa: E402
from restnet.stitch_cmd import load_zoo  # noqa: E402
from stitch_lib.build import BuildConfig  # noqa: E402
from stitch_lib.catalog import Catalog  # noqa: E402
from stitch_lib.data import make_splits  # noqa: E402
from stitch_lib.stitch import build_hybrid  # noqa: E402
from stitch_lib.train import FrontCache, TrainConfig, evaluate, finetune_stitch  # noqa: E402
from stitch_lib.zoo import build_zoo  # noqa: E402


def parse_settings(text: str) -> list[dict]:
    """"steps=300;lr=0.01,distill=0.5" → [{"steps": 300}, {"lr": 0.01, "distill": 0.5}]."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    out = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        setting = {}
        for item in part.split(","):
            key, sep, value = item.partition("=")
            key = key.strip()
            if not sep or key not in fields:
                raise SystemExit(f"finetune_bench: {item!r} is not FIELD=VALUE with a field of "
                                 f"TrainConfig ({', '.join(sorted(fields))})")
            kind = str if key == "augment" else int if key in (
                "steps", "n_train", "batch_size", "epochs", "patience", "seed") else float
            try:
                setting[key] = kind(value.strip())
            except ValueError:
                raise SystemExit(f"finetune_bench: {item!r}: {key} takes "
                                 f"{'an integer' if kind is int else 'a number'}") from None
        out.append(setting)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--home", type=Path, default=ROOT / ".restnet")
    p.add_argument("--zoo", type=Path, default=ROOT / "zoo.yaml")
    p.add_argument("--hybrids", required=True, help="catalog hybrid names, comma-separated")
    p.add_argument("--settings", required=True,
                   help="settings separated by ';', each FIELD=VALUE[,FIELD=VALUE]")
    args = p.parse_args(argv)
    settings = parse_settings(args.settings)
    spec = load_zoo(args.zoo)
    splits = make_splits(source=spec.dataset, image_size=spec.image_size, n_calib=spec.n_calib,
                         n_val=spec.n_val, n_test=spec.n_test, seed=spec.seed)
    zoo = build_zoo(spec, splits, args.home / "anchors", None)
    anchors = {a.spec.name: a for a in zoo.anchors}
    teacher = max(zoo.anchors, key=lambda a: a.val_acc).model
    cat = Catalog.load(args.home / "catalog")
    ft = BuildConfig().ft
    caches: dict[str, FrontCache] = {}
    print(f"`{command_line()}`\n")
    print(f"Against each hybrid's catalog fine-tuning ({ft.steps} steps of {ft.batch_size} from "
          f"{ft.n_train} images, lr {ft.lr}); Δ in points.\n")
    print("| hybrid | setting | val acc (Δ) | test acc (Δ) | seconds (× catalog's) |")
    print("|---|---|---|---|---|")
    for name in filter(None, (n.strip() for n in args.hybrids.split(","))):
        e = next((h for h in cat.hybrids if name in (h.name, h.id)), None)
        if e is None:
            raise SystemExit(f"finetune_bench: no hybrid {name!r} in {cat.root}; its hybrids: "
                             f"{', '.join(h.name for h in cat.hybrids)}")
        print(f"| {name} | catalog | {e.val_acc:.2%} | {e.test_acc:.2%} | "
              f"{e.finetune_seconds or 0:.0f} |")
        a, b = anchors[e.front], anchors[e.back]
        for s in settings:
            h, _ = build_hybrid(a.segments, e.i, b.segments, e.j, splits.calib.x,
                                hidden=e.stitch_hidden, front_name=e.front, back_name=e.back)
            t0 = time.perf_counter()
            r = finetune_stitch(h, splits, dataclasses.replace(ft, **s),
                                cache=caches.setdefault(e.front, FrontCache()),
                                teacher=teacher if s.get("distill") else None)
            secs, test = time.perf_counter() - t0, evaluate(h, splits.test)
            label = ", ".join(f"{k}={v}" for k, v in s.items())
            print(f"| {name} | {label} | {r.val_acc:.2%} ({100 * (r.val_acc - e.val_acc):+.2f}) "
                  f"| {test:.2%} ({100 * (test - e.test_acc):+.2f}) | {secs:.0f} "
                  f"({secs / (e.finetune_seconds or secs):.2f}×) |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
