"""Benchmark figures: Dice against labelled count per method, and per-class Dice bars.

Both are drawn from ``benchmark_stats.aggregate`` rows with matplotlib's object API (no pyplot state,
no display needed) and saved atomically.
"""

from __future__ import annotations

import math
from pathlib import Path

from mnseg.reporting.benchmark_stats import FOREGROUND
from mnseg.utils.atomic import atomic_path


def _save(fig, out_png: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png")
    return Path(out_png)


def plot_dice_vs_labeled(agg: list[dict], out_png: str | Path, upper_label: str | None = None) -> Path:
    """Foreground-mean Dice (± std over seeds) against labelled count, one line per method; the
    all-labels reference (``upper_label``) as a dashed horizontal line."""
    from matplotlib.figure import Figure

    fg = [r for r in agg if r["class"] == FOREGROUND and not math.isnan(r["dice_mean"])]
    fig = Figure(figsize=(6.4, 4.4), dpi=110)
    ax = fig.add_subplot()
    methods = list(dict.fromkeys(r["method"] for r in fg if r["method"] != upper_label))
    counts = sorted({r["num_labeled"] for r in fg if r["method"] != upper_label})
    dodge = 0.02 * ((counts[-1] - counts[0]) if len(counts) > 1 else 10)  # keep equal points' error bars apart
    for j, method in enumerate(methods):
        rows = sorted((r for r in fg if r["method"] == method), key=lambda r: r["num_labeled"])
        shift = (j - (len(methods) - 1) / 2) * dodge
        ax.errorbar([r["num_labeled"] + shift for r in rows], [r["dice_mean"] for r in rows],
                    yerr=[r["dice_std"] for r in rows], marker="o", capsize=3, label=method)
    for r in (r for r in fg if r["method"] == upper_label):
        ax.axhline(r["dice_mean"], color="grey", linestyle="--", label=f"{upper_label} (n={r['num_labeled']})")
    if counts:
        ax.set_xticks(counts)
        if len(counts) == 1:
            ax.set_xlim(counts[0] - 1.5, counts[0] + 1.5)
    ax.set_xlabel("labelled training cases")
    ax.set_ylabel("test Dice (foreground mean)")
    ax.set_title("Label efficiency (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    if fg:
        ax.legend(fontsize="small")
    fig.tight_layout()
    return _save(fig, Path(out_png))


def plot_class_bars(agg: list[dict], out_png: str | Path) -> Path:
    """Per-class Dice bars (± std over seeds): one panel per labelled count, one bar group per class."""
    from matplotlib.figure import Figure

    rows = [r for r in agg if r["class"] != FOREGROUND]
    counts = sorted({r["num_labeled"] for r in rows}) or [0]
    classes = list(dict.fromkeys(r["class"] for r in rows))
    most = max((len({r["method"] for r in rows if r["num_labeled"] == n}) for n in counts), default=1)
    fig = Figure(figsize=(max(4.8, 1.2 + 0.6 * len(classes) * most) * min(len(counts), 3),
                          4.2 * math.ceil(len(counts) / 3)), dpi=110)
    colours = {m: f"C{i % 10}" for i, m in enumerate(dict.fromkeys(r["method"] for r in rows))}
    for i, n in enumerate(counts):
        ax = fig.add_subplot(math.ceil(len(counts) / 3), min(len(counts), 3), i + 1)
        methods = list(dict.fromkeys(r["method"] for r in rows if r["num_labeled"] == n))
        width = 0.8 / max(len(methods), 1)
        for j, method in enumerate(methods):
            by_class = {r["class"]: r for r in rows if r["num_labeled"] == n and r["method"] == method}
            present = [k for k, c in enumerate(classes) if c in by_class]
            ax.bar([k + (j - (len(methods) - 1) / 2) * width for k in present],
                   [by_class[classes[k]]["dice_mean"] for k in present], width,
                   yerr=[by_class[classes[k]]["dice_std"] for k in present], capsize=2, label=method,
                   color=colours[method])
        ax.set_xticks(range(len(classes)))
        ax.set_xticklabels(classes)
        ax.set_xlim(-0.6, len(classes) - 0.4)
        ax.set_ylim(0, 1)
        ax.set_ylabel("test Dice")
        ax.set_title(f"{n} labelled")
        ax.grid(axis="y", alpha=0.3)
        if methods:
            ax.legend(fontsize="small")
    fig.tight_layout()
    return _save(fig, Path(out_png))
