"""Which ranking predicts a stitch's fine-tuned accuracy? Measured on a built catalog.

    python bench/rank_bench.py [--home .restnet] [--zoo zoo.yaml] [--steps 150,300]

For every ordered anchor pair, the catalog build's CKA screen is re-run (the same `screen`
points); each point is fitted by least squares and then fine-tuned, stitch only, for each of
`--steps` steps from that start (the build's fine-tuning settings, its own cosine schedule).
Against the final test accuracy of the catalog's fine-tuned hybrids, the Spearman of: CKA, the
least-squares validation accuracy, the validation accuracy and cross-entropy after each short
fine-tuning, and the accuracy extrapolated from the two longest to the build's length (a line
in log steps); also of the final validation accuracy (the ceiling any validation-split ranking
can reach here). `--rows FILE` keeps every screened point's figures; `--from-rows FILE`
reports them again without measuring, against the final figures the catalog holds now.
`--ranked HOME` reports a catalog built with `--rank-steps K` instead: its own signal (the
first K steps of each point's fine-tuning, which the kept points resume) and each validation
of the kept runs, against their final test accuracy.
The seconds the short fine-tunings of every screened point took are the ranking's price, beside
what the build spent fine-tuning. Writes its block into docs/results.md (target: Spearman ≥ 0.9).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchlib import ROOT, command_line, write_block  # noqa: E402
from restnet.stitch_cmd import load_zoo  # noqa: E402
from stitch_lib.build import BuildConfig, spearman  # noqa: E402
from stitch_lib.catalog import Catalog, Entry  # noqa: E402
from stitch_lib.cka import cka_matrix  # noqa: E402
from stitch_lib.data import make_splits  # noqa: E402
from stitch_lib.stitch import build_hybrid, feasible_points  # noqa: E402
from stitch_lib.train import (FrontCache, TrainConfig, evaluate,  # noqa: E402
                               finetune_stitch, validation_interval)
from stitch_lib.zoo import build_zoo  # noqa: E402

log = logging.getLogger("rank_bench")


def finals(cat: Catalog) -> dict[tuple, Entry]:
    """The catalog's fine-tuned hybrids by (front, back, i, j)."""
    return {(e.front, e.back, e.i, e.j): e for e in cat.hybrids if e.stitch_state == "finetuned"}


def final_of(e: Entry | None) -> dict:
    """A row's final figures: those of the catalog's hybrid at its point, if it was kept."""
    return dict(final_test=e.test_acc if e else None, final_val=e.val_acc if e else None,
                ft_seconds=e.finetune_seconds if e else None)


def measure(home: Path, zoo_path: Path, steps: list[int]) -> tuple[list[dict], Catalog, dict]:
    """One row per screened point: CKA, LS val acc, val acc after each short fine-tuning,
    seconds, and the catalog's final accuracies where the point was fine-tuned."""
    spec = load_zoo(zoo_path)
    splits = make_splits(source=spec.dataset, image_size=spec.image_size, n_calib=spec.n_calib,
                         n_val=spec.n_val, n_test=spec.n_test, seed=spec.seed)
    zoo = build_zoo(spec, splits, home / "anchors", None)
    cat = Catalog.load(home / "catalog")
    build = cat.meta.get("build", {})
    screen, hidden = build.get("screen", 6), build.get("stitch_hidden", 64)
    ft = BuildConfig().ft  # the build's (and the CLI's) fine-tuning settings
    final = finals(cat)
    names = {e.front for e in cat.hybrids} | {e.back for e in cat.hybrids}
    rows = []
    for a in zoo.anchors:
        for b in zoo.anchors:
            if a is b or a.spec.name not in names or b.spec.name not in names:
                continue
            m = cka_matrix(a.segments, b.segments, splits.calib.x)
            pts = sorted(feasible_points(a.segments, b.segments, splits.calib.x),
                         key=lambda p: -float(m[p]))[:screen]
            cache = FrontCache()
            for i, j in pts:
                row = dict(pair=f"{a.spec.name}→{b.spec.name}", i=i, j=j, cka=float(m[i, j]))
                for s in steps:
                    h, _ = build_hybrid(a.segments, i, b.segments, j, splits.calib.x,
                                        hidden=hidden, front_name=a.spec.name,
                                        back_name=b.spec.name)
                    row["ls_val"] = evaluate(h, splits.val)
                    t0 = time.perf_counter()
                    row[s] = finetune_stitch(h, splits, dataclasses.replace(ft, steps=s),
                                             cache=cache).val_acc
                    row[f"s{s}"] = time.perf_counter() - t0
                    row[f"nll{s}"] = val_nll(h, splits.val)
                row.update(final_of(final.get((a.spec.name, b.spec.name, i, j))))
                log.info("%s (%d, %d): %s", row["pair"], i, j, row)
                rows.append(row)
    return rows, cat, build


@torch.no_grad()
def val_nll(model: torch.nn.Module, split) -> float:
    """Mean cross-entropy of `model` on `split`: a finer-grained signal than accuracy."""
    model.eval()
    return sum(float(F.cross_entropy(model(x), y, reduction="sum"))
               for x, y in split.batches(512)) / len(split)


def extrapolate(a: float, b: float, s_a: int, s_b: int, s_to: int) -> float:
    """Validation accuracy at `s_to` steps from `a` at `s_a` and `b` at `s_b`, on a line in
    log(steps): a learning curve's simplest extrapolation."""
    return b + (b - a) * math.log(s_to / s_b) / math.log(s_b / s_a)


def loo_range(a: list[float], b: list[float]) -> str:
    """The Spearman's range over every leave-one-point-out subset: how much one point moves it."""
    rhos = [spearman(a[:k] + a[k + 1:], b[:k] + b[k + 1:]) for k in range(len(a))]
    return f"{min(rhos):.2f} – {max(rhos):.2f}"


def report(rows: list[dict], steps: list[int], build: dict) -> list[str]:
    tuned = [r for r in rows if r["final_test"] is not None]
    y = [r["final_test"] for r in tuned]

    def rho(x: list[float]) -> str:
        return f"{spearman(x, y):.2f} | {loo_range(x, y)}"
    ranked_by = "least-squares start" if not build.get("rank_steps") else \
        f"{build['rank_steps']} fine-tuning steps"
    out = [f"`{command_line()}`", "",
           f"Catalog ranked by its {ranked_by}; {len(rows)} screened points, {len(tuned)} of "
           "them fine-tuned into the catalog (the Spearman is over those).", "",
           "| ranking signal | Spearman vs final test acc | leaving one point out | price (s, "
           "every screened point) |",
           "|---|---|---|---|",
           f"| CKA | {rho([r['cka'] for r in tuned])} | — |",
           f"| least-squares val acc (`--rank-steps 0`) | {rho([r['ls_val'] for r in tuned])} "
           "| — |"]
    for s in steps:
        price = f"{sum(r[f's{s}'] for r in rows):.0f}"
        out.append(f"| val acc after {s} fine-tuning steps | {rho([r[s] for r in tuned])} | "
                   f"{price} |")
        out.append(f"| val cross-entropy after {s} steps (lower ranks higher) | "
                   f"{rho([-r[f'nll{s}'] for r in tuned])} | {price} |")
    if len(steps) >= 2:  # the two longest, extrapolated to the build's length
        s_a, s_b, s_to = steps[-2], steps[-1], BuildConfig().ft.steps
        price = f"{sum(r[f's{s_a}'] + r[f's{s_b}'] for r in rows):.0f}"
        curve = [extrapolate(r[s_a], r[s_b], s_a, s_b, s_to) for r in tuned]
        out.append(f"| val acc after {s_a} and {s_b} steps, extrapolated to {s_to} "
                   f"(log-linear) | {rho(curve)} | {price} |")
    out.append(f"| final val acc (the ceiling, not a ranking) | "
               f"{rho([r['final_val'] for r in tuned])} | — |")
    ft = sum(r["ft_seconds"] or 0.0 for r in tuned)
    out += ["", f"The build's fine-tuning of the {len(tuned)} kept points took {ft:.0f} s."]
    top_k, longest = build.get("top_k", 2), steps[-1]
    pairs = sorted({r["pair"] for r in rows})

    def kept(pair: str, key) -> set[tuple[int, int]]:
        return {(r["i"], r["j"]) for r in sorted((r for r in rows if r["pair"] == pair),
                                                  key=lambda r: -r[key])[:top_k]}
    moved = sum(kept(p, longest) != kept(p, "ls_val") for p in pairs)
    out.append(f"Ranked by val acc after {longest} steps instead of the least-squares start, the "
               f"build would keep a different top {top_k} in {moved} of the {len(pairs)} "
               "anchor pairs (points this run did not fine-tune).")
    return out


def report_ranked(cat: Catalog) -> list[str]:
    """A catalog built with `--rank-steps K`: how well its own ranking signal — each point's
    validation accuracy after the first K steps of its fine-tuning, which the kept points then
    resume — and every validation of the kept points' runs predict their final test accuracy."""
    build, cands = cat.meta["build"], cat.meta["candidates"]
    # the build's own fine-tuning settings (catalogs built before they were recorded: today's)
    ft = TrainConfig(**build["ft"]) if "ft" in build else BuildConfig().ft
    k = build["rank_steps"]
    tuned = [e for e in cat.hybrids if e.stitch_state == "finetuned" and e.finetune_curve]
    if not k or len(tuned) < 3:
        raise SystemExit("rank_bench: --ranked needs a catalog built with --rank-steps K and "
                         "at least 3 fine-tuned hybrids")
    y, y_val = [e.test_acc for e in tuned], [e.val_acc for e in tuned]

    def rho(x: list[float]) -> str:
        return f"{spearman(x, y):.2f} | {loo_range(x, y)} | {spearman(x, y_val):.2f}"
    every = validation_interval(ft, ft.n_train)  # n_train: fewer than the training split
    kept = {(e.front, e.back, e.i, e.j) for e in cat.hybrids}
    dropped = [c for c in cands if (c["front"], c["back"], c["i"], c["j"]) not in kept]
    price = sum(c.get("rank_seconds", 0.0) for c in dropped)
    out = [f"`{command_line()}`", "",
           f"Catalog ranked by validation accuracy after the first {k} of each point's "
           f"{ft.steps} fine-tuning steps; {len(cands)} screened points, {len(tuned)} kept and "
           "fine-tuned on from there (the Spearman is over those).", "",
           "| ranking signal | Spearman vs final test acc | leaving one point out | vs final "
           "val acc (what chooses K) |",
           "|---|---|---|---|",
           f"| CKA | {rho([e.cka for e in tuned])} |",
           f"| least-squares val acc (the ranking of `--rank-steps 0`) | "
           f"{rho([e.ls_val_acc for e in tuned])} |",
           f"| **val acc after the first {k} steps (this catalog's ranking)** | "
           f"{rho([e.rank_val_acc for e in tuned])} |"]
    for n in range(len(tuned[0].finetune_curve)):
        step = min((n + 1) * every, ft.steps)
        out.append(f"| val acc at the run's validation after {step} steps | "
                   f"{rho([e.finetune_curve[n] for e in tuned])} |")
    out.append(f"| final val acc (the ceiling, not a ranking) | {rho([e.val_acc for e in tuned])} |")
    secs = sum(e.finetune_seconds or 0.0 for e in tuned)
    out += ["", f"The ranking's price, the first {k} steps of the {len(dropped)} points not "
            f"kept: {price:.0f} s; the kept points' fine-tuning, their first {k} steps included: "
            f"{secs:.0f} s."]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--home", type=Path, default=ROOT / ".restnet")
    p.add_argument("--zoo", type=Path, default=ROOT / "zoo.yaml")
    p.add_argument("--steps", default="150,300", help="short fine-tuning lengths, comma-separated")
    p.add_argument("--no-write", dest="write", action="store_false")
    p.add_argument("--rows", type=Path, help="also write every screened point's figures here "
                   "(JSON)")
    p.add_argument("--from-rows", type=Path, help="measure nothing: report the figures an "
                   "earlier run wrote with --rows (the same --steps) against the catalog's "
                   "final figures")
    p.add_argument("--ranked", type=Path, help="measure nothing: report the home of a catalog "
                   "built with `restnet catalog build --rank-steps K` (its own ranking)")
    args = p.parse_args(argv)
    if args.ranked:
        lines = report_ranked(Catalog.load(args.ranked / "catalog"))
        print("\n".join(lines))
        if args.write:
            write_block("<!-- rank-bench-ranked -->", "<!-- /rank-bench-ranked -->", lines,
                        "### A catalog ranked by the first steps of its own fine-tuning "
                        "(`--rank-steps`)", before="## Serving")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    steps = sorted({int(s) for s in args.steps.split(",")})
    if not steps or steps[0] < 1:
        raise SystemExit("rank_bench: --steps must be positive integers, e.g. 150,300")
    if not (args.home / "catalog" / "catalog.json").exists():
        raise SystemExit(f"rank_bench: no catalog under {args.home}; "
                         "run `restnet catalog build` first")
    if args.from_rows:  # report what an earlier run measured (its --rows file)
        cat = Catalog.load(args.home / "catalog")
        final = finals(cat)
        rows = [{(int(k) if k.isdigit() else k): v for k, v in r.items()}
                for r in json.loads(args.from_rows.read_text())]
        for r in rows:  # the final figures are the catalog's own, as it is now
            front, back = r["pair"].split("→")
            r.update(final_of(final.get((front, back, r["i"], r["j"]))))
        build = cat.meta.get("build", {})
    else:
        rows, _, build = measure(args.home, args.zoo, steps)
    if args.rows:
        args.rows.write_text(json.dumps(rows, indent=1, default=str))
    lines = report(rows, steps, build)
    print("\n".join(lines))
    if args.write:
        write_block("<!-- rank-bench -->", "<!-- /rank-bench -->", lines,
                    "## Ranking: what predicts a stitch's fine-tuned accuracy",
                    before="## Serving")
    return 0


if __name__ == "__main__":
    sys.exit(main())
