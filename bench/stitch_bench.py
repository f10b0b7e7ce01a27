"""stitch_lib measured on the default zoo — every figure side by side in one run.

    python bench/stitch_bench.py [--zoo zoo.yaml] [--home .restnet] [--random 3]

Prints markdown tables and writes them into docs/results.md (between the stitch-bench
markers). Targets (from the issue; figures, not assertions): CKA matrix ≤ 2× its forward
passes; stitch-only fine-tuning ≥ 10× cheaper than full fine-tuning and within 1.5 points;
CKA-chosen points beat random ones; median delta < 2% of the hybrid; ≥ 8 hybrids over ≥ 3
anchors with a CNN↔ViT one, and frontier hybrids strictly between the anchors' costs.
"""
from __future__ import annotations

import argparse
import copy
import random
import re
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

from stitch_lib.build import BuildConfig, build_catalog, spearman
from stitch_lib.catalog import Catalog
from stitch_lib.cka import cka_matrix
from stitch_lib.cost import flops
from stitch_lib.data import make_splits
from stitch_lib.stitch import boundary_outputs, build_hybrid, feasible_points
from stitch_lib.train import FrontCache, TrainConfig, evaluate, finetune_full, finetune_stitch
from stitch_lib.zoo import ZooSpec, build_zoo

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


def pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--zoo", type=Path, default=ROOT / "zoo.yaml")
    p.add_argument("--home", type=Path, default=ROOT / ".restnet")
    p.add_argument("--random", type=int, default=3, help="random points per anchor pair")
    p.add_argument("--ft-n-train", type=int, default=10000)
    p.add_argument("--ft-epochs", type=int, default=2)
    args = p.parse_args()
    torch.manual_seed(0)
    spec = ZooSpec.from_dict(yaml.safe_load(args.zoo.read_text()))
    splits = make_splits(spec.dataset, image_size=spec.image_size, n_calib=spec.n_calib,
                         n_val=spec.n_val, n_test=spec.n_test, seed=spec.seed)
    anchors = build_zoo(spec, splits, args.home / "anchors")
    by_name = {a.spec.name: a for a in anchors}
    ft = TrainConfig(epochs=args.ft_epochs, lr=1e-3, n_train=args.ft_n_train, patience=1)
    emit(f"Command: `python bench/stitch_bench.py --random {args.random} --ft-n-train "
         f"{args.ft_n_train} --ft-epochs {args.ft_epochs}` (zoo `{args.zoo.name}`, "
         f"{torch.get_num_threads()} threads, data {splits.fingerprint}).")
    emit()

    # 1. CKA matrix against the forward passes that feed it
    emit("### CKA matrix cost")
    rows = []
    calib = splits.calib.x
    for a, b in [(anchors[0], anchors[1]), (anchors[0], anchors[2])]:
        t0 = time.perf_counter()
        for k in range(0, len(calib) - 63, 64):
            boundary_outputs(a.segments, calib[k:k + 64])
            boundary_outputs(b.segments, calib[k:k + 64])
        t_fwd = time.perf_counter() - t0
        t0 = time.perf_counter()
        cka_matrix(a.segments, b.segments, calib)
        t_cka = time.perf_counter() - t0
        rows.append([f"{a.spec.name} × {b.spec.name}", len(calib), f"{t_fwd:.2f}",
                     f"{t_cka:.2f}", f"{t_cka / t_fwd:.2f}×"])
    table(["pair", "images", "forward passes s", "CKA matrix s (incl. forwards)", "ratio"], rows)

    # 2. the catalog, every stitch fine-tuned
    cat = build_catalog(anchors, splits, Catalog(args.home / "bench-catalog"),
                        BuildConfig(top_k=3, screen=6, finetune="all", ft=ft))
    emit("### Anchors")
    table(["anchor", "test acc", "MFLOPs", "params", "latency ms", "train s"],
          [[e.name, pct(e.test_acc), f"{e.flops / 1e6:.1f}", f"{e.params / 1e6:.2f}M",
            f"{e.latency_ms:.2f}", f"{by_name[e.name].train_seconds:.0f}"] for e in cat.anchors])
    anc = {e.name: e for e in cat.anchors}
    front = {e.name for e in cat.frontier()}
    emit("### Hybrids (test accuracy; cost as a fraction of the front / back anchor's)")
    table(["hybrid", "joint", "direction", "CKA", "acc LS", "acc fine-tuned", "front acc",
           "back acc", "MFLOPs", "FLOPs vs front/back", "latency vs front/back", "delta B",
           "delta / hybrid", "frontier"],
          [[e.name, e.joint, e.direction, f"{e.cka:.2f}", pct(e.ls_test_acc), pct(e.test_acc),
            pct(anc[e.front].test_acc), pct(anc[e.back].test_acc), f"{e.flops / 1e6:.1f}",
            f"{e.flops / anc[e.front].flops:.2f} / {e.flops / anc[e.back].flops:.2f}",
            f"{e.latency_ms / anc[e.front].latency_ms:.2f} / "
            f"{e.latency_ms / anc[e.back].latency_ms:.2f}",
            f"{e.delta_bytes:,}", pct(e.delta_ratio), "★" if e.name in front else ""]
           for e in sorted(cat.hybrids, key=lambda e: e.flops)])
    hy = cat.hybrids
    cands = cat.meta["candidates"]
    lo = min(e.latency_ms for e in cat.anchors)
    hi = max(e.latency_ms for e in cat.anchors)
    between = [e for e in cat.frontier() if e.kind == "hybrid" and lo < e.latency_ms < hi]
    emit("### Catalog summary")
    table(["figure", "value"], [
        ["anchors / hybrids", f"{len(cat.anchors)} / {len(hy)}"],
        ["CNN↔ViT hybrids", sum(e.joint in ("CNN→ViT", "ViT→CNN") for e in hy)],
        ["frontier hybrids strictly between the anchors' latencies", len(between)],
        ["fine-tuning gain over LS init (mean, points)",
         f"{100 * statistics.mean(e.test_acc - e.ls_test_acc for e in hy):+.2f}"],
        ["median delta / whole hybrid", pct(statistics.median(e.delta_ratio for e in hy))],
        ["Spearman: CKA vs LS-init val acc (all screened candidates)",
         f"{spearman([c['cka'] for c in cands], [c['ls_val_acc'] for c in cands]):.2f}"],
        ["Spearman: CKA vs fine-tuned test acc (kept hybrids)",
         f"{spearman([e.cka for e in hy], [e.test_acc for e in hy]):.2f}"],
        ["Spearman: LS-init val acc vs fine-tuned test acc (kept hybrids)",
         f"{spearman([e.ls_val_acc for e in hy], [e.test_acc for e in hy]):.2f}"],
    ])

    # 3. stitch-only against full fine-tuning, same hybrid, same data and epochs
    emit("### Stitch-only against full fine-tuning (same start, data and epochs)")
    rows = []
    picks = [max(hy, key=lambda e: e.test_acc), min(hy, key=lambda e: e.flops)]
    for e in picks:
        h, _ = build_hybrid(by_name[e.front].segments, e.i, by_name[e.back].segments, e.j, calib,
                            front_name=e.front, back_name=e.back)
        full_h = copy.deepcopy(h)
        t0 = time.perf_counter()
        finetune_stitch(h, splits, ft)  # includes computing the front cache once
        t_s = time.perf_counter() - t0
        r_f = finetune_full(full_h, splits, TrainConfig(epochs=ft.epochs, lr=3e-4,
                                                        n_train=ft.n_train, patience=ft.patience))
        a_s, a_f = evaluate(h, splits.test), evaluate(full_h, splits.test)
        rows.append([e.name, f"{t_s:.1f}", f"{r_f.seconds:.1f}", f"{r_f.seconds / t_s:.1f}×",
                     pct(a_s), pct(a_f), f"{100 * (a_s - a_f):+.2f}"])
    table(["hybrid", "stitch-only s", "full s", "speed-up", "stitch-only acc", "full acc",
           "difference (points)"], rows)

    # 4. CKA-chosen points against random feasible points of similar cost
    emit("### CKA-chosen stitch points against random feasible points of similar cost")
    rng = random.Random(0)
    rows, diffs = [], []
    cache = FrontCache()
    for a in anchors:
        for b in anchors:
            if a is b:
                continue
            m = torch.tensor(cat.meta["cka"][f"{a.spec.name}→{b.spec.name}"])
            pts = feasible_points(a.segments, b.segments, calib)
            best = max(pts, key=lambda q: float(m[q]))

            def tuned(q):
                h, _ = build_hybrid(a.segments, q[0], b.segments, q[1], calib,
                                    front_name=a.spec.name, back_name=b.spec.name)
                finetune_stitch(h, splits, ft, cache=cache)
                return evaluate(h, splits.test), flops(h, calib[:1])

            acc_best, f_best = tuned(best)
            others = [q for q in pts if q != best]
            cost = {q: flops(build_hybrid(a.segments, q[0], b.segments, q[1], calib[:50],
                                          front_name="f", back_name="b")[0], calib[:1])
                    for q in others}
            similar = [q for q in others if 0.67 <= cost[q] / f_best <= 1.5] or sorted(
                others, key=lambda q: abs(cost[q] - f_best))[: args.random]
            chosen = rng.sample(similar, min(args.random, len(similar)))
            accs = [tuned(q)[0] for q in chosen]
            if accs:
                diffs.append(acc_best - statistics.mean(accs))
                rows.append([f"{a.spec.name}→{b.spec.name}", f"{best} ({float(m[best]):.2f})",
                             pct(acc_best), ", ".join(str(q) for q in chosen),
                             pct(statistics.mean(accs)),
                             f"{100 * (acc_best - statistics.mean(accs)):+.2f}"])
    table(["pair", "CKA point (CKA)", "acc", "random points", "mean acc", "CKA − random"], rows)
    emit(f"Mean CKA − random over {len(diffs)} pairs: "
         f"{100 * statistics.mean(diffs):+.2f} points.")
    emit()

    text = (ROOT / "docs" / "results.md").read_text() if (ROOT / "docs" / "results.md").exists() \
        else "# Results\n"
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
