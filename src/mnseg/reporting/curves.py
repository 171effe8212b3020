"""Learning curves of a report: each method's training history (``history.csv``) against epoch."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from mnseg.errors import InputFileError
from mnseg.reporting.overlays import class_colour, save_figure


def learning_curves(results: list, out_png: Path, notes: list[str]) -> Path | None:
    """Loss columns (``loss``, ``loss_*``) and, where present, ``val_dice`` against epoch, per method
    (``results``: the report's ``MethodResult``s); notes a history without rows in ``notes``."""
    from matplotlib.figure import Figure

    histories = {}
    for result in results:
        if result.history_csv is None:
            continue
        history = read_history(Path(result.history_csv))
        if history:
            histories[result.name] = history
        else:
            notes.append(f"{result.name}: training history {result.history_csv} has no rows.")
    if not histories:
        return None
    has_val = any("val_dice" in h for h in histories.values())
    fig = Figure(figsize=(11 if has_val else 6, 4), dpi=100)
    axes = fig.subplots(1, 2 if has_val else 1, squeeze=False)[0]
    styles = ["-", "--", ":", "-."]
    for m, (name, history) in enumerate(histories.items()):
        colour = class_colour(m + 1) / 255.0
        loss_columns = [c for c in history if c == "loss" or c.startswith("loss_")]
        for s, column in enumerate(loss_columns):
            _plot_series(
                axes[0], history["epoch"], history[column], f"{name} {column}", colour, styles[s % 4]
            )
        if has_val and "val_dice" in history:
            _plot_series(axes[1], history["epoch"], history["val_dice"], name, colour, "-")
    axes[0].set_title("training loss", fontsize=10)
    axes[0].set_ylabel("loss")
    if has_val:
        axes[1].set_title("validation Dice", fontsize=10)
        axes[1].set_ylabel("Dice")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, out_png)


def _plot_series(ax, x: np.ndarray, y: np.ndarray, label: str, colour, style: str) -> None:
    keep = np.isfinite(x) & np.isfinite(y)  # validation runs only every few epochs; join its points
    if keep.any():
        ax.plot(x[keep], y[keep], style, color=colour, label=label, marker="." if keep.sum() < 30 else None)


def read_history(path: Path) -> dict[str, np.ndarray]:
    """Numeric columns of a history CSV (empty or non-numeric cells become NaN); ``epoch`` always present."""
    if not path.is_file():
        raise InputFileError(f"{path}: training history file not found")
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputFileError(f"{path}: cannot read as CSV ({exc})") from None
    if not rows:
        return {}
    columns = {}
    for name in rows[0]:
        if name is None or name == "phase":
            continue
        values = np.array([_to_float(row.get(name)) for row in rows])
        if np.isfinite(values).any():
            columns[name] = values
    if "epoch" not in columns:
        columns["epoch"] = np.arange(len(rows), dtype=np.float64)
    return columns


def _to_float(text: str | None) -> float:
    try:
        return float(text) if text not in (None, "") else float("nan")
    except ValueError:
        return float("nan")
