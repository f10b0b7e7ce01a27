"""Do hybrids pay? The default zoo measured side by side in one run.

    python bench/stitch_bench.py [--zoo zoo.yaml] [--home .restnet]
                                 [--rows all|quick|apart|default] [--reuse DIR] [--same-cost N]

Every row uses the same zoo, data, seed and fine-tuning budget; anchors trained apart use the
same budget rule as the stitch-aware ones (the zoo's `train:`). Points are chosen on the
validation split, accuracies reported on the test split. Prints markdown and writes it into
docs/results.md between the stitch-bench markers. Targets (from the issue, figures, not
assertions): ≥ 6 useful hybrids and coverage ≥ 50% on FLOPs with the CLI defaults; the frontier
nowhere below the line between adjacent anchors; coverage ≥ 30% on a second task; stitch-only
fine-tuning ≥ 10× cheaper than full and within 1.5 points; Spearman ≥ 0.9 between the ranking
and final accuracy; the hybrid wins ≥ half the same-cost comparisons; median delta of the
useful hybrids ≤ 1% of the hybrid's bytes.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import timm
import torch
import yaml

from stitch_lib.build import BuildConfig, build_catalog, spearman
from stitch_lib.catalog import Catalog, usefulness
from stitch_lib.cost import flops
from stitch_lib.cotrain import StitchAware, make_stitches
from stitch_lib.data import load_fashion_mnist, make_splits
from stitch_lib.stitch import build_hybrid
from stitch_lib.train import FrontCache, TrainConfig, evaluate, finetune_full, finetune_stitch
from stitch_lib.train import train_anchor
from restnet.stitch_cmd import load_zoo
from stitch_lib.zoo import Zoo, build_zoo

ROOT = Path(__file__).resolve().parents[1]
out_lines: list[str] = []


def emit(line: str = "") -> None:
    print(line, flush=True)
    out_lines.append(line)


def table(header: list[str], rows: list[list]) -> None:
    emit("| " + " | ".join(header) + " |")
    emit("|" + "---|" * len(header))
    for r in rows:
        emit("| " + " | ".join(str(c) for c in r) + " |")
    emit()


def pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.2f}%"


def splits_of(spec: ZooSpec):
    data = dict(source=spec.dataset, image_size=spec.image_size, n_calib=spec.n_calib,
                n_val=spec.n_val, n_test=spec.n_test, seed=spec.seed)
    return make_splits(**data), data


def summary(name: str, cat: Catalog, seconds: float | None) -> list:
    u = usefulness(cat.entries)["flops"]
    margin = u["chord_margin_min"]
    return [name, " / ".join(f"{a.name} {pct(a.test_acc)}" for a in cat.anchors),
            len(cat.hybrids), len(u["useful"]), f"{u['coverage']:.0%}",
            "—" if margin is None else f"{100 * margin:+.2f}",
            "—" if seconds is None else f"{seconds:.0f}"]


def against_apart(cat: Catalog, apart: Catalog) -> list:
    """The stricter reading: the hybrids of `cat` against the anchors trained apart (same
    budget) in place of their own, co-trained anchors."""
    mixed = cat.hybrids + apart.anchors
    u = usefulness(mixed)["flops"]
    margin = u["chord_margin_min"]
    return [len(u["useful"]), f"{u['coverage']:.0%}",
            "—" if margin is None else f"{100 * margin:+.2f}"]


def timed_build(zoo: Zoo, splits, root: Path, cfg: BuildConfig, data,
                reuse: Path | None = None) -> tuple[Catalog, float | None]:
    """Build a row's catalog, or load the one an earlier run of this bench left in `reuse`."""
    if reuse is not None and Catalog.is_current(reuse / root.name):
        seconds = reuse / root.name / "build_seconds"
        return (Catalog.load(reuse / root.name),
                float(seconds.read_text()) if seconds.is_file() else None)
    t0 = time.perf_counter()
    cat = build_catalog(zoo, splits, Catalog(root), cfg, data=data)
    seconds = time.perf_counter() - t0
    (root / "build_seconds").write_text(f"{seconds:.1f}")
    return cat, seconds


def fresh(zoo: Zoo, splits) -> Zoo:
    """The same anchors and points with untrained stitches: every start is least squares."""
    segs = {a.spec.name: a.segments for a in zoo.anchors}
    return Zoo(zoo.anchors, make_stitches(segs, list(zoo.stitches), splits.calib.x), zoo.info)


def same_cost_model(target_flops: int, in_chans: int, classes: int, x1: torch.Tensor):
    """A ResNet-18 of scaled width whose FLOPs are within 10% of `target_flops` (or the
    closest one)."""
    best = None
    for w in range(4, 97):
        m = timm.create_model("resnet18", num_classes=classes, in_chans=in_chans, stem_width=w,
                              channels=(w, 2 * w, 4 * w, 8 * w)).eval()
        f = flops(m, x1)
        if best is None or abs(f - target_flops) < abs(best[1] - target_flops):
            best = (m, f, w)
        if f > 1.1 * target_flops:
            break
    return best


def train_for(model, splits, seconds: float, lr: float, augment: str) -> tuple[float, float]:
    """Train `model` from scratch for about `seconds`: the steps are sized from a probe of
    50 steps, timed after 3 warm-up steps (the first steps of a model on the CPU are several
    times slower, and timing them would starve the baseline). Returns (test accuracy,
    seconds the training took)."""
    probe = copy.deepcopy(model).train()
    opt = torch.optim.AdamW(probe.parameters(), lr=lr)
    x, y = splits.train.x[:128], splits.train.y[:128]
    for k in range(53):
        if k == 3:
            t0 = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(probe(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    per_step = (time.perf_counter() - t0) / 50
    images = max(1, int(seconds / per_step)) * 128
    # every image the time allows: more than one pass when it allows that, in whole passes
    # over an equal seeded subset (rounding to whole passes over all the data cut 1.2 passes'
    # time to 1, starving the baseline)
    epochs = math.ceil(images / len(splits.train))
    cfg = TrainConfig(epochs=epochs, n_train=images // epochs, lr=lr, augment=augment)
    res = train_anchor(model, splits, cfg)
    return evaluate(model, splits.test), res.seconds


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--zoo", type=Path, default=ROOT / "zoo.yaml")
    p.add_argument("--home", type=Path, default=ROOT / ".restnet")
    p.add_argument("--rows", choices=("all", "quick", "apart", "default"), default="all",
                   help="quick: the default recipe against stitch-aware anchors; apart: the "
                        "anchors trained apart only, residual against linear stitches (no "
                        "stitch-aware training); default: the CLI defaults' row alone (with "
                        "--reuse, the catalog `restnet catalog build` made); all: every row")
    p.add_argument("--reuse", type=Path,
                   help="a work folder of an earlier run: reuse the row catalogs it holds "
                        "(row0, row1, ...; row0 may be a link to .restnet/catalog) and the "
                        "second task's (anchors2, second)")
    p.add_argument("--same-cost", type=int, default=0,
                   help="compare only this many useful hybrids, spread over cost (0: all)")
    args = p.parse_args()
    torch.manual_seed(0)
    spec = load_zoo(args.zoo)
    if spec.train is None:
        raise SystemExit("the bench compares anchors trained apart with stitch-aware ones under "
                         "one budget: give the zoo a top-level `train:`")
    apart_spec = dataclasses.replace(spec, stitch_aware=None)
    sa_spec = dataclasses.replace(spec, stitch_aware=spec.stitch_aware or StitchAware())
    splits, data = splits_of(spec)
    cfg = BuildConfig()  # the CLI defaults
    emit(f"Command: `python bench/stitch_bench.py --rows {args.rows} --same-cost "
         f"{args.same_cost}{' --reuse DIR' if args.reuse else ''}` (zoo `{args.zoo.name}`, "
         f"{torch.get_num_threads()} threads, data {splits.fingerprint}; fine-tuning "
         f"{cfg.ft.steps} steps of {cfg.ft.batch_size}, lr {cfg.ft.lr}).")
    emit()
    with_sa = args.rows not in ("apart", "default") or spec.stitch_aware is not None
    t0 = time.perf_counter()
    sa = build_zoo(sa_spec, splits, args.home / "anchors") if with_sa else None
    t_sa = time.perf_counter() - t0
    t0 = time.perf_counter()
    apart = build_zoo(apart_spec, splits, args.home / "anchors")
    t_apart = time.perf_counter() - t0
    work = Path(tempfile.mkdtemp(prefix="stitch-bench-"))

    # 1. the ablation: one row per recipe, the zoo's own (the CLI defaults) first
    rows, cats = [], {}
    stitch = f"residual stitch ({cfg.stitch_hidden} wide)"
    rank = f"{cfg.rank_steps}-step rank" if cfg.rank_steps else "LS rank"
    apart_row = (f"anchors apart, CKA screen + {rank} (both directions), {stitch} fine-tuned",
                 apart, cfg)
    linear_row = (f"anchors apart, CKA screen + {rank} (both directions), linear stitch "
                  "fine-tuned", apart, dataclasses.replace(cfg, stitch_hidden=0))
    sa_row = (f"stitch-aware anchors, co-trained or LS start, {stitch} fine-tuned", sa, cfg)
    if args.rows == "apart":
        recipes = [apart_row, linear_row]
    elif args.rows == "default":  # a stitch-aware zoo's row is read against anchors apart
        recipes = [sa_row, apart_row] if spec.stitch_aware else [apart_row]
    else:
        recipes = [sa_row, apart_row] if spec.stitch_aware else [apart_row, sa_row]
    default = sa if spec.stitch_aware else apart
    if args.rows == "all":
        recipes += [
            linear_row,
            ("anchors apart, the stitch-aware points, LS start, stitch fine-tuned",
             Zoo(apart.anchors, fresh(sa, splits).stitches), cfg),
            ("stitch-aware anchors, co-trained or LS start, not fine-tuned", sa,
             dataclasses.replace(cfg, finetune="none")),
        ]
    for k, (name, zoo, c) in enumerate(recipes):
        cat, secs = timed_build(zoo, splits, work / f"row{k}", c, data, args.reuse)
        cats[name] = cat
        rows.append(summary(name, cat, secs))
    apart_cat = cats[apart_row[0]]
    rows = [r + (against_apart(cats[r[0]], apart_cat) if r[0] != apart_row[0] else
                 ["", "", ""]) for r in rows]
    emit("### Ablation: which recipe makes hybrids useful")
    emit((f"Anchor training: stitch-aware {sa.info.get('seconds', t_sa):.0f} s for all three "
          "together; " if sa else "Anchor training: ")
         + f"apart {sum(a.train_seconds for a in apart.anchors):.0f} s in all (this run: "
         + (f"{t_sa:.0f} s and " if sa else "") + f"{t_apart:.0f} s, 0 where the cache had "
         "them).")
    emit()
    table(["recipe", "anchors (test acc)", "hybrids", "useful (FLOPs)", "coverage (FLOPs)",
           "frontier − line, min (points)", "catalog build s", "useful vs anchors apart",
           "coverage vs anchors apart", "frontier − line vs anchors apart"], rows)

    # 2. the default catalog in full
    cat = cats[recipes[0][0]]
    u = usefulness(cat.entries)
    good = [cat.get(n) for n in u["flops"]["useful"]]
    anc = {e.name: e for e in cat.anchors}
    emit(f"### The default catalog (CLI defaults: {recipes[0][0]})")
    table(["hybrid", "start", "acc start", "acc", "MFLOPs", "latency ms", "delta B",
           "delta / hybrid", "useful (FLOPs / latency)", "frontier − line (points)"],
          [[e.name, e.init, pct(e.ls_test_acc), pct(e.test_acc), f"{e.flops / 1e6:.1f}",
            f"{e.latency_ms:.2f}", f"{e.delta_bytes:,}", pct(e.delta_ratio),
            " / ".join("✓" if e.name in u[c]["useful"] else "" for c in ("flops", "latency_ms")),
            f"{100 * u['flops']['chord_margins'][e.name]:+.2f}"
            if e.name in u["flops"]["chord_margins"] else ""]
           for e in sorted(cat.entries, key=lambda e: e.flops) if e.kind == "hybrid"]
          + [[f"**{e.name}** (anchor)", "", "", pct(e.test_acc), f"{e.flops / 1e6:.1f}",
              f"{e.latency_ms:.2f}", "", "", "", ""] for e in anc.values()])
    tuned = [e for e in cat.hybrids if e.stitch_state == "finetuned"]
    table(["figure", "value"], [
        ["useful hybrids on FLOPs / on latency here",
         f"{len(u['flops']['useful'])} / {len(u['latency_ms']['useful'])}"],
        ["coverage of the log-FLOPs / log-latency range between the anchors",
         f"{u['flops']['coverage']:.0%} / {u['latency_ms']['coverage']:.0%}"],
        ["frontier hybrids vs the line between adjacent anchors (min, points, FLOPs)",
         "—" if u["flops"]["chord_margin_min"] is None
         else f"{100 * u['flops']['chord_margin_min']:+.2f}"],
        ["median delta / whole hybrid, useful hybrids",
         pct(statistics.median(e.delta_ratio for e in good)) if good else "—"],
        ["Spearman: the build's ranking signal vs final test acc (every fine-tuned hybrid)",
         f"{spearman([e.rank_val_acc for e in tuned], [e.test_acc for e in tuned]):.2f}"],
        ["Spearman: start val acc vs final test acc",
         f"{spearman([e.init_val_acc for e in tuned], [e.test_acc for e in tuned]):.2f}"],
        ["Spearman: LS-init val acc vs final test acc",
         f"{spearman([e.ls_val_acc for e in tuned], [e.test_acc for e in tuned]):.2f}"],
        ["Spearman: CKA vs final test acc",
         f"{spearman([e.cka for e in tuned], [e.test_acc for e in tuned]):.2f}"],
    ])

    # 3. stitch-only against full fine-tuning of useful hybrids, same start and steps
    by_name = {a.spec.name: a for a in default.anchors}
    emit("### Stitch-only against full fine-tuning (useful hybrids, same start, same steps)")
    rows = []
    for e in sorted(good, key=lambda e: -e.test_acc)[:2]:
        a, b = by_name[e.front], by_name[e.back]
        h, _ = build_hybrid(a.segments, e.i, b.segments, e.j, splits.calib.x,
                            hidden=e.stitch_hidden, front_name=e.front, back_name=e.back)
        if e.init == "co-trained":
            point = next(q for q in default.stitches if (q.front, q.i, q.back, q.j) ==
                         (e.front, e.i, e.back, e.j))
            h.stitch.load_state_dict(default.stitches[point].state_dict())
        full_h = copy.deepcopy(h)
        t0 = time.perf_counter()
        finetune_stitch(h, splits, cfg.ft, cache=FrontCache())  # the front cache included
        t_s = time.perf_counter() - t0
        r_f = finetune_full(full_h, splits, dataclasses.replace(cfg.ft, lr=3e-4))
        a_s, a_f = evaluate(h, splits.test), evaluate(full_h, splits.test)
        rows.append([e.name, f"{t_s:.1f}", f"{r_f.seconds:.1f}", f"{r_f.seconds / t_s:.1f}×",
                     pct(a_s), pct(a_f), f"{100 * (a_s - a_f):+.2f}"])
    table(["hybrid", "stitch-only s", "full s", "speed-up", "stitch-only acc", "full acc",
           "difference (points)"], rows)

    # 4. the same-cost baseline: a model of the hybrid's FLOPs trained from scratch, for the
    # stitch's time (the issue's comparison) and under the anchors' own budget (the strongest)
    emit("### Same-cost baseline: a ResNet-18 of scaled width, FLOPs within 10%, trained from "
         "scratch for the hybrid's stitch fine-tuning time, and under the anchors' budget")
    rows, wins, wins_budget = [], 0, 0
    x1 = splits.calib.x[:1]
    compared = good
    if args.same_cost and len(good) > args.same_cost:
        step = (len(good) - 1) / (args.same_cost - 1) if args.same_cost > 1 else 0
        compared = [good[round(k * step)] for k in range(args.same_cost)]
    for e in compared:
        t_s = e.finetune_seconds
        model, f, w = same_cost_model(e.flops, splits.in_chans, splits.num_classes, x1)
        acc, t_b = train_for(copy.deepcopy(model).train(), splits, t_s, 2e-3,
                             spec.train.augment)
        budget = copy.deepcopy(model).train()
        r_b = train_anchor(budget, splits, spec.train)
        acc_b = evaluate(budget, splits.test)
        wins += e.test_acc > acc
        wins_budget += e.test_acc > acc_b
        rows.append([e.name, f"{e.flops / 1e6:.1f}", pct(e.test_acc), f"{t_s:.0f}",
                     f"width {w}, {f / 1e6:.1f} MFLOPs", f"{t_b:.0f}", pct(acc),
                     "hybrid" if e.test_acc > acc else "baseline", f"{r_b.seconds:.0f}",
                     pct(acc_b), "hybrid" if e.test_acc > acc_b else "baseline"])
    table(["hybrid", "MFLOPs", "hybrid acc", "stitch s", "same-cost model", "its s",
           "acc (same time)", "winner", "anchors' budget s", "acc (anchors' budget)", "winner"], rows)
    emit(f"The hybrid wins {wins} of {len(compared)} same-time comparisons and {wins_budget} of "
         f"{len(compared)} against the same model trained under the anchors' budget "
         f"({spec.train.epochs} epochs of {spec.train.n_train} images; {len(good)} useful "
         "hybrids).")
    emit()

    # 5. a second task: the same defaults on a tenth of Fashion-MNIST's training images
    train_set, _ = load_fashion_mnist()
    idx = torch.randperm(len(train_set.y), generator=torch.Generator().manual_seed(1))[:6000]
    npz = work / "fmnist-tenth.npz"
    np.savez(npz, x=train_set.x[idx, 0].numpy(), y=train_set.y[idx].numpy())
    spec2 = dataclasses.replace(spec, dataset=str(npz), n_calib=None, n_val=None, n_test=None)
    splits2, data2 = splits_of(spec2)
    zoo2 = build_zoo(spec2, splits2, (args.reuse or work) / "anchors2")
    cat2, secs = timed_build(zoo2, splits2, work / "second", cfg, data2, args.reuse)
    emit("### A second task: a tenth of Fashion-MNIST's training images as an .npz, the same "
         f"defaults ({len(splits2.train)} train / {len(splits2.val)} val / "
         f"{len(splits2.test)} test)")
    table(["recipe", "anchors (test acc)", "hybrids", "useful (FLOPs)", "coverage (FLOPs)",
           "frontier − line, min (points)", "catalog build s"],
          [summary(recipes[0][0], cat2, secs)])

    text = (ROOT / "docs" / "results.md").read_text()
    block = "<!-- stitch-bench -->\n" + "\n".join(out_lines) + "\n<!-- /stitch-bench -->"
    if "<!-- stitch-bench -->" in text:
        text = re.sub(r"<!-- stitch-bench -->.*<!-- /stitch-bench -->", lambda _: block, text,
                      flags=re.S)
    else:
        text += "\n## stitch_lib on the default zoo\n\n" + block + "\n"
    (ROOT / "docs" / "results.md").write_text(text)
    print("written to docs/results.md", file=sys.stderr)


if __name__ == "__main__":
    main()
