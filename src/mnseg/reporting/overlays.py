"""Overlay pictures of label maps on image slices, for reports and TensorBoard.

Only numpy is needed for ``overlay_rgb`` and ``error_rgb`` (cheap enough for training-time logging); the
figures use matplotlib's object API (``Figure`` + Agg canvas), never pyplot, so an interactive session's
backend is left alone. Volumes are shown in RAS orientation, axial slices, R on the right (neurological).
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mnseg.utils.atomic import atomic_path

NOT_DRAWN = ("background", "ignore")

# matplotlib's "tab10" colours: distinct and readable on grey-scale images.
_PALETTE = np.array(
    [
        (31, 119, 180),
        (255, 127, 14),
        (44, 160, 44),
        (214, 39, 40),
        (148, 103, 189),
        (140, 86, 75),
        (227, 119, 194),
        (127, 127, 127),
        (188, 189, 34),
        (23, 190, 207),
    ],
    dtype=np.float64,
)


def overlay_rgb(
    image2d: np.ndarray,
    label2d: np.ndarray | None,
    num_classes: int,
    alpha: float | dict[int, float] = 0.45,
    intensity_range: tuple[float, float] | None = None,
) -> np.ndarray:
    """Grey-scale slice with labels ``1 .. num_classes-1`` as translucent colours; ``(H, W, 3)`` uint8.

    ``num_classes`` counts the background; larger labels (e.g. ``ignore``) are left uncoloured. ``alpha`` is
    one opacity or one per class. Intensities are scaled to the 1st-99th percentile of the slice unless
    ``intensity_range`` is given.
    """
    image2d = np.asarray(image2d, dtype=np.float64)
    if image2d.ndim != 2:
        raise ValueError(f"overlay_rgb needs a 2D image, got shape {image2d.shape}")
    low, high = intensity_range if intensity_range is not None else _intensity_range(image2d)
    grey = np.clip((image2d - low) / (high - low), 0.0, 1.0) if high > low else np.zeros_like(image2d)
    rgb = np.repeat(grey[..., None] * 255.0, 3, axis=-1)
    if label2d is not None:
        label2d = np.asarray(label2d)
        if label2d.shape != image2d.shape:
            raise ValueError(f"label slice shape {label2d.shape} differs from image slice {image2d.shape}")
        for cls in range(1, num_classes):
            mask = label2d == cls
            if mask.any():
                a = alpha.get(cls, 0.45) if isinstance(alpha, dict) else alpha
                rgb[mask] = (1.0 - a) * rgb[mask] + a * class_colour(cls)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


# error-map colours: clearly apart from the class palette's blue, orange and green
ERROR_COLOURS = {
    "false positive": np.array((255.0, 0.0, 255.0)),  # predicted foreground, reference background
    "false negative": np.array((0.0, 230.0, 255.0)),  # reference foreground, predicted background
    "wrong class": np.array((255.0, 230.0, 0.0)),  # both foreground, different classes
}


def error_rgb(
    image2d: np.ndarray,
    prediction2d: np.ndarray,
    reference2d: np.ndarray,
    num_classes: int,
    intensity_range: tuple[float, float] | None = None,
) -> np.ndarray:
    """The slice dimmed, with false positives, false negatives and wrong-class voxels in ``ERROR_COLOURS``."""
    rgb = overlay_rgb(image2d, None, num_classes, intensity_range=intensity_range).astype(np.float64) * 0.6
    pred, ref = np.asarray(prediction2d), np.asarray(reference2d)
    pred_fg = (pred > 0) & (pred < num_classes)
    ref_fg = (ref > 0) & (ref < num_classes)  # labels >= num_classes (ignore) are not errors
    masks = {
        "false positive": pred_fg & (ref == 0),
        "false negative": ref_fg & ~pred_fg,
        "wrong class": pred_fg & ref_fg & (pred != ref),
    }
    for name, mask in masks.items():
        rgb[mask] = ERROR_COLOURS[name]
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def class_colour(cls: int) -> np.ndarray:
    """RGB (0-255 floats) for a class index >= 1; colours repeat, lighter, after ten classes."""
    base = _PALETTE[(cls - 1) % len(_PALETTE)]
    lighten = min(((cls - 1) // len(_PALETTE)) * 0.35, 0.7)
    return base + (255.0 - base) * lighten


def overlay_figure(
    image3d: np.ndarray,
    label3d_list: Sequence[np.ndarray | None],
    titles: Sequence[str],
    class_names: dict[int, str],
    out_png: Path,
    slice_indices: Sequence[int] | None = None,
    spacing: Sequence[float] | None = None,
    errors_against: int | None = None,
) -> Path:
    """One PNG: columns ``image | label volume 1 | label volume 2 | ...``, rows = axial slices (last axis).

    ``titles`` name the label columns (the first column is always "image"); a ``None`` label volume
    shows the image alone. Without ``slice_indices``, three slices through the foreground of the first
    label volume are shown. Arrays must already be in RAS display orientation (``to_ras``): the image
    column carries R/L/A/P marks. ``spacing`` (voxel size per axis) keeps anisotropic pixels in
    proportion. ``errors_against`` (index of the reference volume) adds an error-map column for every
    other volume. Classes smaller than a tenth of the largest are drawn almost opaque, so they show.
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    image3d = np.asarray(image3d)
    if image3d.ndim != 3:
        raise ValueError(f"overlay_figure needs a 3D image, got shape {image3d.shape}")
    if len(titles) != len(label3d_list):
        raise ValueError(f"{len(titles)} titles given for {len(label3d_list)} label volumes")
    for title, label in zip(titles, label3d_list):
        if label is not None and np.shape(label) != image3d.shape:
            raise ValueError(f"label volume {title!r} has shape {np.shape(label)}, image has {image3d.shape}")
    drawn = {int(k): v for k, v in class_names.items() if int(k) > 0 and v not in NOT_DRAWN}
    num_classes = max(drawn, default=0) + 1
    reference = next((lab for lab in label3d_list if lab is not None), None)
    if slice_indices is None:
        slice_indices = pick_foreground_slices(reference, image3d.shape[2], set(drawn))
    alphas = class_opacity(reference, drawn)
    low_high = _intensity_range(image3d)
    panels = [("image", None, None), *((t, lab, None) for t, lab in zip(titles, label3d_list))]
    if errors_against is not None:
        truth = label3d_list[errors_against]
        panels += [(f"errors: {t}", lab, truth) for i, (t, lab) in enumerate(zip(titles, label3d_list))
                   if i != errors_against and lab is not None and truth is not None]

    rows, cols = len(slice_indices), len(panels)
    pixel_aspect = 1.0 if spacing is None else float(spacing[1]) / float(spacing[0])
    aspect = image3d.shape[1] * pixel_aspect / max(image3d.shape[0], 1)
    fig = Figure(figsize=(2.4 * cols, 2.4 * rows * aspect + 1.0), dpi=100)
    axes = fig.subplots(rows, cols, squeeze=False)
    for r, z in enumerate(slice_indices):
        for c, (title, label, truth) in enumerate(panels):
            ax = axes[r][c]
            if truth is not None:
                rgb = error_rgb(image3d[:, :, z], label[:, :, z], truth[:, :, z], num_classes, low_high)
            else:
                label_slice = None if label is None else label[:, :, z]
                rgb = overlay_rgb(image3d[:, :, z], label_slice, num_classes, alphas, intensity_range=low_high)
            ax.imshow(rgb.transpose(1, 0, 2), origin="lower", interpolation="nearest", aspect=pixel_aspect)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(textwrap.fill(title, 26), fontsize=9)
            if c == 0:
                _orientation_marks(ax)
        axes[r][0].set_ylabel(f"axial slice {z + 1} of {image3d.shape[2]} (I→S)", fontsize=8)
    handles = [Patch(color=class_colour(k) / 255.0, label=name) for k, name in sorted(drawn.items())]
    if errors_against is not None and cols > 1 + len(label3d_list):
        handles += [Patch(color=colour / 255.0, label=name) for name, colour in ERROR_COLOURS.items()]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.07 if handles else 0, 1, 1))
    return save_figure(fig, out_png)


def class_opacity(reference: np.ndarray | None, classes: dict[int, str]) -> dict[int, float]:
    """0.45 for each class, 0.9 for one under a tenth of the largest class's voxels (a lesion beside tissue)."""
    if reference is None:
        return {k: 0.45 for k in classes}
    counts = {k: int(np.count_nonzero(np.asarray(reference) == k)) for k in classes}
    largest = max(counts.values(), default=0)
    return {k: 0.9 if 0 < n < largest / 10 else 0.45 for k, n in counts.items()}


def _orientation_marks(ax) -> None:
    """R/L and A/P at the panel's edges (RAS display: x to the patient's right, y anterior, up)."""
    style = {"transform": ax.transAxes, "fontsize": 7, "color": "yellow", "fontweight": "bold"}
    ax.text(0.02, 0.5, "L", ha="left", va="center", **style)
    ax.text(0.98, 0.5, "R", ha="right", va="center", **style)
    ax.text(0.5, 0.98, "A", ha="center", va="top", **style)
    ax.text(0.5, 0.02, "P", ha="center", va="bottom", **style)


def pick_foreground_slices(
    label3d: np.ndarray | None, depth: int, classes: set[int], count: int = 3
) -> list[int]:
    """``count`` axial slices spread through the labelled foreground; evenly through the volume if none."""
    if label3d is not None:
        has_foreground = np.isin(np.asarray(label3d), list(classes)).any(axis=(0, 1))
        with_foreground = np.flatnonzero(has_foreground)
        if with_foreground.size:
            size = with_foreground.size
            positions = set(np.rint(np.linspace(0, size - 1, count + 2)[1:-1]).astype(int))
            if len(positions) < min(count, size):  # few foreground slices: include the outer ones
                positions = set(np.rint(np.linspace(0, size - 1, min(count, size))).astype(int))
            return sorted(int(with_foreground[p]) for p in positions)
    return sorted({int(round((i + 1) * (depth - 1) / (count + 1))) for i in range(count)})


def to_ras(data: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Reorder/flip axes so that the last axis runs inferior to superior (axial slices) and x, y are R, A."""
    import nibabel.orientations as nio

    transform = nio.ornt_transform(nio.io_orientation(affine), nio.axcodes2ornt("RAS"))
    return nio.apply_orientation(data, transform)


def ras_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel sizes in the axis order ``to_ras`` produces."""
    import nibabel.orientations as nio

    from mnseg.data.io import voxel_spacing

    spacing = [0.0, 0.0, 0.0]
    for in_axis, (out_axis, _) in enumerate(nio.io_orientation(affine)):
        spacing[int(out_axis)] = voxel_spacing(affine)[in_axis]
    return tuple(spacing)


def _intensity_range(image: np.ndarray) -> tuple[float, float]:
    finite = np.asarray(image, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return 0.0, 1.0
    low, high = np.percentile(finite, [1.0, 99.0])
    return float(low), float(high)


def save_figure(fig, out_png: Path) -> Path:
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png")
    return out_png
