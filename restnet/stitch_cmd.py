"""The command-line shell of stitch_lib: `restnet catalog build|show` and `restnet cka`.
Parses arguments and the zoo file, shows progress, prints, plots."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from stitch_lib.build import FINETUNE_MODES, BuildConfig, build_catalog
from stitch_lib.catalog import Catalog
from stitch_lib.cka import cka_matrix
from stitch_lib.data import make_splits
from stitch_lib.train import DEVICES, resolve_device
from stitch_lib.report import catalog_table, plot_cka, plot_pareto, usefulness_text
from stitch_lib.zoo import ZooSpec, build_zoo

# Output that is not a terminal (a log, a pipe) is not cut to 80 columns.
console = Console(width=None if sys.stdout.isatty() else 200)
DEFAULT_HOME = Path(".restnet")


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--zoo", type=Path, default=Path("zoo.yaml"), help="anchor zoo file (YAML)")
    p.add_argument("--home", type=Path, default=DEFAULT_HOME,
                   help="where trained anchors and the catalog live (default .restnet)")
    p.add_argument("--device", choices=DEVICES, default="cpu",
                   help="where anchors train and stitches fine-tune (auto: CUDA when there "
                        "is a GPU; default cpu); costs and accuracy are measured on the CPU")
    p.add_argument("-v", "--verbose", action="store_true")


def _device(name: str):
    """The torch device for --device; exits with what to pass instead when it is not here."""
    try:
        return resolve_device(name)
    except ValueError as exc:
        raise SystemExit(f"restnet: --device: {exc}") from exc


def load_zoo(path: Path) -> ZooSpec:
    """Read and validate a zoo YAML file (a relative `dataset` is taken from its folder);
    ValueError naming the file and the key otherwise."""
    try:
        return ZooSpec.from_dict(yaml.safe_load(Path(path).read_text()), Path(path).parent)
    except (OSError, yaml.YAMLError, ValueError, TypeError) as exc:
        raise ValueError(f"bad zoo file {path}: {exc}") from exc


def _anchors(args: argparse.Namespace):
    """The zoo's anchors (trained or reused) and its data splits; errors name the zoo key."""
    try:
        spec = load_zoo(args.zoo)
        data = dict(source=spec.dataset, image_size=spec.image_size, n_calib=spec.n_calib,
                    n_val=spec.n_val, n_test=spec.n_test, seed=spec.seed)
        splits = make_splits(**data)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"restnet: zoo {args.zoo}: {exc}") from exc
    with _progress() as progress:
        zoo = build_zoo(spec, splits, args.home / "anchors", progress, args.device)
    return zoo, splits, data


def _build(args: argparse.Namespace) -> Catalog:
    from fleet_protocol.codec import pack_delta  # the wire's own encoder sizes each delta

    cfg = BuildConfig(top_k=args.top_k, screen=args.screen, finetune=args.finetune,
                      directions=args.directions, stitch_hidden=args.stitch_hidden,
                      rank_steps=args.rank_steps,
                      ft=dataclasses.replace(BuildConfig().ft, steps=args.ft_steps,
                                             n_train=args.ft_n_train, distill=args.ft_distill))
    zoo, splits, data = _anchors(args)
    with _progress() as progress:
        cat = build_catalog(zoo, splits, Catalog(args.home / "catalog"), cfg, progress, data,
                            delta_size=lambda t: len(pack_delta(
                                {k: v.detach().cpu().numpy() for k, v in t.items()})),
                            device=args.device)
    console.print(f"catalog written to {cat.root / 'catalog.json'}")
    return cat


def _show(cat: Catalog) -> None:
    console.print(catalog_table(cat))
    console.print(usefulness_text(cat))
    console.print(f"Pareto plot: {plot_pareto(cat, cat.root / 'pareto.png')}")


def catalog_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="restnet catalog")
    sub = p.add_subparsers(dest="action", required=True)
    b = sub.add_parser("build", help="rank, build, fine-tune and measure hybrids")
    _common(b)
    b.add_argument("--finetune", choices=FINETUNE_MODES, default="all",
                   help="which stitches to fine-tune; the others keep their start, marked 'ls'")
    b.add_argument("--top-k", type=int, default=2, help="hybrids kept per ordered anchor pair")
    b.add_argument("--screen", type=int, default=6, help="candidates kept by CKA per pair")
    b.add_argument("--directions", choices=("restnet", "both"), default="both")
    b.add_argument("--ft-steps", type=int, default=600,
                   help="optimiser steps per stitch fine-tuning, whatever the data size")
    b.add_argument("--ft-n-train", type=int, default=10000,
                   help="training images the fine-tuning draws from (at most)")
    b.add_argument("--ft-distill", type=float, default=0.0,
                   help="weight of distillation from the front anchor (0-1)")
    b.add_argument("--stitch-hidden", type=int, default=BuildConfig.stitch_hidden,
                   help="width of each stitch's residual branch (0: linear stitches only)")
    b.add_argument("--rank-steps", type=int, default=BuildConfig.rank_steps,
                   help="rank candidate points by validation accuracy after the first this "
                        "many steps of their stitch fine-tuning, which the kept points resume "
                        "(0: by the least-squares start, free but a poor predictor; a run "
                        "of fewer --ft-steps is ranked at its end)")
    s = sub.add_parser("show", help="print the catalog and write its Pareto plot")
    s.add_argument("--home", type=Path, default=DEFAULT_HOME)
    s.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.action == "build":
        args.device = _device(args.device)
    # A long build logs its progress when its output is not a terminal.
    logging.basicConfig(level=logging.INFO if args.verbose or not sys.stdout.isatty()
                        else logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    try:
        cat = _build(args) if args.action == "build" else Catalog.load(args.home / "catalog")
    except (FileNotFoundError, ValueError) as exc:  # no catalog, or one to rebuild
        raise SystemExit(f"restnet: {exc}") from exc
    _show(cat)
    return 0


def cka_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="restnet cka", description="CKA heat map of two anchors")
    p.add_argument("front")
    p.add_argument("back")
    p.add_argument("--out", type=Path, help="PNG to write (default cka-FRONT-BACK.png)")
    _common(p)
    args = p.parse_args(argv)
    args.device = _device(args.device)
    zoo, splits, _ = _anchors(args)
    by_name = {a.spec.name: a for a in zoo.anchors}
    missing = [n for n in (args.front, args.back) if n not in by_name]
    if missing:
        raise SystemExit(f"restnet: no anchor {missing} in {args.zoo}; have {sorted(by_name)}")
    a, b = by_name[args.front], by_name[args.back]
    m = cka_matrix(a.segments, b.segments, splits.calib.x)
    out = args.out or Path(f"cka-{args.front}-{args.back}.png")
    plot_cka(m.tolist(), [s.name for s in a.segments[:-1]], [s.name for s in b.segments[:-1]],
             f"CKA {args.front} (rows) vs {args.back} (columns)", out)
    console.print(f"CKA heat map: {out}")
    return 0
