"""Showing a catalog: a rich table, the Pareto plot and CKA heat maps."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402
from rich.table import Table  # noqa: E402

from .catalog import Catalog, usefulness  # noqa: E402


def catalog_table(cat: Catalog, cost: str = "flops") -> Table:
    """Every entry, cheapest first: ★ on the Pareto frontier, ✓ a useful hybrid (more
    accurate than every anchor that costs no more)."""
    on_front = {e.name for e in cat.frontier(cost)}
    good = set(usefulness(cat.entries)[cost]["useful"])
    t = Table(title=f"catalog {cat.root} — ★ Pareto frontier, ✓ useful (accuracy vs {cost})")
    for col in ("", "model", "joint", "stitch", "CKA", "acc start", "acc", "MFLOPs", "params",
                "latency ms", "act KiB", "delta B", "delta %"):
        t.add_column(col, justify="left" if col in ("model", "joint", "stitch") else "right")
    for e in sorted(cat.entries, key=lambda e: getattr(e, cost)):
        state = (f"{e.stitch_state} ({e.init})" if e.init else e.stitch_state) if e.kind == \
            "hybrid" else f"anchor ({e.training or 'apart'})"
        t.add_row(
            ("★" if e.name in on_front else "") + ("✓" if e.name in good else ""), e.name,
            e.joint or "", state,
            f"{e.cka:.2f}" if e.cka is not None else "",
            f"{e.ls_test_acc:.2%}" if e.ls_test_acc is not None else "",
            f"{e.test_acc:.2%}", f"{e.flops / 1e6:.1f}", f"{e.params / 1e6:.2f}M",
            f"{e.latency_ms:.2f}", f"{e.act_peak_bytes / 1024:.0f}",
            f"{e.delta_bytes:,}" if e.delta_bytes else "",
            f"{e.delta_ratio:.2%}" if e.delta_ratio is not None else "")
    return t


def usefulness_text(cat: Catalog) -> str:
    """The catalog's figures of merit in a few lines."""
    lines = []
    for cost, label in (("flops", "FLOPs"), ("latency_ms", "latency on this machine")):
        u = usefulness(cat.entries)[cost]
        margin = u["chord_margin_min"]
        lines.append(f"on {label}: {len(u['useful'])} useful hybrids, coverage "
                     f"{u['coverage']:.0%}, frontier vs the line between adjacent anchors: "
                     + ("no frontier hybrid between anchors" if margin is None
                        else f"min {100 * margin:+.2f} points"))
    return "\n".join(lines)


def plot_pareto(cat: Catalog, path: Path) -> Path:
    """Accuracy against latency and against FLOPs; anchors, LS-only and fine-tuned hybrids
    marked apart, the frontier drawn as a step line."""
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, cost, scale, label in ((axes[0], "latency_ms", 1, "latency at batch 1 (ms, CPU)"),
                                   (axes[1], "flops", 1e6, "MFLOPs")):
        groups = (("anchor", "s", "black", [e for e in cat.anchors]),
                  ("hybrid, not fine-tuned", "o", "tab:orange",
                   [e for e in cat.hybrids if e.stitch_state == "ls"]),
                  ("hybrid, fine-tuned", "^", "tab:blue",
                   [e for e in cat.hybrids if e.stitch_state == "finetuned"]))
        for name, marker, color, es in groups:
            ax.scatter([getattr(e, cost) / scale for e in es], [e.test_acc * 100 for e in es],
                       marker=marker, color=color, label=name, s=60 if name == "anchor" else 30)
        for e in cat.anchors:
            ax.annotate(e.name, (getattr(e, cost) / scale, e.test_acc * 100),
                        textcoords="offset points", xytext=(5, 5), fontsize=9)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(FuncFormatter(
            lambda v, _: f"{v:g}" if f"{v:g}"[0] in "25" else ""))
        good = [cat.get(n) for n in usefulness(cat.entries)[cost]["useful"]]
        ax.scatter([getattr(e, cost) / scale for e in good], [e.test_acc * 100 for e in good],
                   marker="o", s=140, facecolors="none", edgecolors="tab:red",
                   label="useful hybrid")
        anchors = sorted(cat.anchors, key=lambda e: getattr(e, cost))
        ax.plot([getattr(e, cost) / scale for e in anchors], [e.test_acc * 100 for e in anchors],
                ls=":", color="grey", label="line between anchors")
        front = cat.frontier(cost)
        ax.step([getattr(e, cost) / scale for e in front], [e.test_acc * 100 for e in front],
                where="post", color="tab:green", alpha=0.6, label="Pareto frontier")
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(loc="lower right")
    fig.suptitle("ReStNet catalog: accuracy against cost")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_cka(matrix: list[list[float]], rows: list[str], cols: list[str], title: str,
             path: Path) -> Path:
    """A heat map of a CKA matrix (front boundaries × back boundaries)."""
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * len(cols), 1.0 + 0.55 * len(rows)))
    im = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8,
                    color="white" if v < 0.6 else "black")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="linear CKA")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
