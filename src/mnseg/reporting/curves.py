"""Learning curves of a report that compare like with like, from each method's ``history.csv``.

Panels, one line per method (the legend names methods only):

- **labelled loss of the predicting model**: the supervised loss on labelled crops. For a two-model method whose
  history has ``loss_3d`` (M&N), the 3D model's own losses, on the epochs the 3D model trained: stage 1 (phase
  ``supervised``, column ``loss_3d``) and its co-training epochs (phase ``cotrain-3d``, column ``loss_l``). The
  2D model's epochs are left out, so the alternation does not zig-zag and the sum of both models' losses is never
  set beside a single model's.
- **loss_u** (only when a history has it): the loss on unlabelled crops, on the same epochs.
- **validation Dice** (``val_dice``) against epoch; validated epochs only, joined.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from mnseg.errors import InputFileError
from mnseg.reporting.overlays import class_colour, save_figure

LOSS_U_CAPTION = ("loss_u: the loss on unlabelled crops (for M&N the 3D model against the 2D model's pseudo-masks, "
                  "KL + Dice), weighted in training by the share of unlabelled crops in the batch.")
NO_VALIDATION = "no validation cases held out\n(data.num_val / --num-val)"


def learning_curves(results: list, out_png: Path, notes: list[str]) -> Path | None:
    """The panels above for the report's ``MethodResult``s; notes a history without rows in ``notes``."""
    histories = {}
    for result in results:
        if result.history_csv is None:
            continue
        history, phases = read_history_and_phases(Path(result.history_csv))
        if history:
            histories[result.name] = (history, phases)
        else:
            notes.append(f"{result.name}: training history {result.history_csv} has no rows.")
    if not histories:
        return None
    curves = {name: model_curves(h, p) for name, (h, p) in histories.items()}
    return save_figure(curves_figure(curves), out_png)


def curves_figure(curves: dict[str, dict]):
    """The figure of ``model_curves`` per method name: one line per method and panel, labelled by the name."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    has_u = any(np.isfinite(c["loss_u"]).any() for c in curves.values())
    panels = [("labelled", "labelled loss of the predicting model", "loss")]
    if has_u:
        panels.append(("loss_u", "loss_u (unlabelled crops)", "loss"))
    panels.append(("val_dice", "validation Dice", "Dice"))
    fig = Figure(figsize=(4.6 * len(panels), 4.4), dpi=100)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for m, (name, c) in enumerate(curves.items()):
        colour = class_colour(m + 1) / 255.0
        for ax, (key, _, _) in zip(axes, panels, strict=True):
            _plot_series(ax, c["epoch"], c[key], name, colour)
    for ax, (key, title, ylabel) in zip(axes, panels, strict=True):
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(ylabel)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        elif key == "val_dice":
            ax.text(0.5, 0.5, NO_VALIDATION, ha="center", va="center", transform=ax.transAxes, fontsize=9)
    caption = curves_caption(curves, has_u)
    if caption:
        fig.text(0.01, 0.01, "\n".join(caption), fontsize=8, va="bottom", wrap=True)
    fig.tight_layout(rect=(0, 0.05 * len(caption), 1, 1))
    return fig


def curves_caption(curves: dict[str, dict], has_u: bool) -> list[str]:
    """What the panels show, in words (the figure's caption)."""
    lines = []
    two_model = [name for name, c in curves.items() if c["two_model"]]
    if two_model:
        lines.append(f"{', '.join(two_model)}: the 3D model's own losses, on the epochs it trained (stage 1 and "
                     "every other co-training epoch); the 2D model's are left out.")
    if has_u:
        lines.append(LOSS_U_CAPTION)
    return lines


def model_curves(history: dict[str, np.ndarray], phases: np.ndarray) -> dict:
    """Per epoch (1-based): the predicting model's labelled loss, its ``loss_u`` and ``val_dice`` (NaN where
    absent). A history with ``loss_3d`` is a two-model one (M&N): only the 3D model's epochs count."""
    n = len(history["epoch"])
    nan = np.full(n, np.nan)
    loss_l = history.get("loss_l", history.get("loss", nan))
    loss_u = history.get("loss_u", nan)
    two_model = "loss_3d" in history
    if two_model:
        stage1 = phases == "supervised"
        trained_3d = np.char.endswith(phases.astype(str), "-3d")
        labelled = np.where(stage1, history["loss_3d"], np.where(trained_3d, loss_l, np.nan))
        loss_u = np.where(trained_3d, loss_u, np.nan)
    else:
        labelled = loss_l
    return {"epoch": history["epoch"] + 1, "labelled": labelled, "loss_u": loss_u,
            "val_dice": history.get("val_dice", nan), "two_model": two_model}


def _plot_series(ax, x: np.ndarray, y: np.ndarray, label: str, colour) -> None:
    keep = np.isfinite(x) & np.isfinite(y)  # validation runs only every few epochs; join its points
    if keep.any():
        ax.plot(x[keep], y[keep], "-", color=colour, label=label, marker="." if keep.sum() < 30 else None)


def read_history(path: Path) -> dict[str, np.ndarray]:
    """Numeric columns of a history CSV (empty or non-numeric cells become NaN); ``epoch`` always present."""
    return read_history_and_phases(path)[0]


def read_history_and_phases(path: Path) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """``read_history``'s columns and the ``phase`` text of every row ("" where the history has none)."""
    if not path.is_file():
        raise InputFileError(f"{path}: training history file not found")
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputFileError(f"{path}: cannot read as CSV ({exc})") from None
    if not rows:
        return {}, np.array([], dtype=str)
    columns = {}
    for name in rows[0]:
        if name is None or name == "phase":
            continue
        values = np.array([_to_float(row.get(name)) for row in rows])
        if np.isfinite(values).any():
            columns[name] = values
    if "epoch" not in columns:
        columns["epoch"] = np.arange(len(rows), dtype=np.float64)
    phases = np.array([str(row.get("phase") or "") for row in rows], dtype=str)
    return columns, phases


def _to_float(text: str | None) -> float:
    try:
        return float(text) if text not in (None, "") else float("nan")
    except ValueError:
        return float("nan")
