"""Voxel-grid geometry: reorientation to RAS+ and resampling to a target spacing, forth and back.

Every case is brought to one canonical frame (RAS+, so array axis 2 runs
inferior -> superior and 2D models can slice along it) and, optionally, one
voxel size. Predictions are mapped back with the exact inverse so outputs land
on the user's original grid voxel for voxel.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mnseg.data.io import voxel_spacing
from mnseg.errors import ConfigError

# Spacings closer than this (mm) count as equal: the data then passes through untouched.
SPACING_TOLERANCE = 1e-3

Spacing = tuple[float, float, float]


def check_spacing(spacing: Sequence[float], what: str = "spacing") -> Spacing:
    """Three finite positive voxel sizes (mm) as floats; a ConfigError naming ``what`` otherwise."""
    try:
        values = tuple(float(s) for s in spacing)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be three positive numbers (mm), got {spacing!r}") from None
    if len(values) != 3 or not all(np.isfinite(v) and v > 0 for v in values):
        raise ConfigError(f"{what} must be three positive numbers (mm), got {spacing!r}")
    return values


def ras_orientation(affine: np.ndarray) -> np.ndarray:
    """The orientation transform (nibabel ``ornt``) taking this affine's array axes to RAS+."""
    from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

    return ornt_transform(io_orientation(np.asarray(affine)), axcodes2ornt("RAS"))


def reorient(data: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    """Apply ``ornt`` to the last three axes of ``data`` (a 3D volume or a (C, X, Y, Z) stack)."""
    from nibabel.orientations import apply_orientation

    if data.ndim == 3:
        return np.ascontiguousarray(apply_orientation(data, ornt))
    moved = np.moveaxis(data, 0, -1)  # apply_orientation acts on the leading axes
    return np.ascontiguousarray(np.moveaxis(apply_orientation(moved, ornt), -1, 0))


def inverse_orientation(ornt: np.ndarray) -> np.ndarray:
    """The transform undoing ``ornt``: if input axis i went to axis j (maybe flipped), j goes back to i."""
    ornt = np.asarray(ornt, dtype=np.float64)
    inverse = np.empty_like(ornt)
    for src_axis, (dst_axis, flip) in enumerate(ornt):
        inverse[int(dst_axis)] = (src_axis, flip)
    return inverse


def canonical_affine(affine: np.ndarray, ornt: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """The affine of the reoriented array (world coordinates of every voxel unchanged)."""
    from nibabel.orientations import inv_ornt_aff

    return np.asarray(affine, dtype=np.float64) @ inv_ornt_aff(ornt, tuple(shape))


def canonical_spacing_of(affine: np.ndarray) -> Spacing:
    """Voxel size along the RAS-ordered array axes, read from an affine without touching voxel data."""
    spacing = voxel_spacing(affine)
    ornt = ras_orientation(affine)
    out = [0.0, 0.0, 0.0]
    for src_axis, (dst_axis, _flip) in enumerate(ornt):
        out[int(dst_axis)] = spacing[src_axis]
    return tuple(out)


def resampled_shape(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float] | None) -> tuple:
    """round(shape * spacing / target) per axis, at least 1; axes already at the target keep their size."""
    if target is None:
        return tuple(int(s) for s in shape)
    out = []
    for size, have, want in zip(shape, spacing, target):
        if abs(have - want) <= SPACING_TOLERANCE:
            out.append(int(size))
        else:
            out.append(max(1, int(round(size * have / want))))
    return tuple(out)


def resample(data: np.ndarray, new_shape: Sequence[int], order: int) -> np.ndarray:
    """Resample the last three axes of ``data`` onto ``new_shape`` covering the same field of view.

    ``grid_mode=True`` aligns the outer voxel edges (not the corner voxel
    centres), so the physical extent is kept and resampling to a grid and back
    lands on the original voxel centres. Unchanged shape returns the input as is.
    """
    from scipy.ndimage import zoom

    new_shape = tuple(int(s) for s in new_shape)
    if tuple(data.shape[-3:]) == new_shape:
        return data
    factors = [n / o for n, o in zip(new_shape, data.shape[-3:])]
    if data.ndim == 3:
        return zoom(data, factors, order=order, mode="nearest", grid_mode=True)
    return np.stack([zoom(c, factors, order=order, mode="nearest", grid_mode=True) for c in data])


def resampled_affine(affine: np.ndarray, old_shape: Sequence[int], new_shape: Sequence[int]) -> np.ndarray:
    """The affine of a grid produced by ``resample`` (same field of view, new voxel size)."""
    scale = np.array([o / n for o, n in zip(old_shape, new_shape)], dtype=np.float64)
    voxel_map = np.eye(4)
    voxel_map[:3, :3] = np.diag(scale)
    voxel_map[:3, 3] = 0.5 * scale - 0.5  # new voxel 0 centre, in old voxel coordinates
    return np.asarray(affine, dtype=np.float64) @ voxel_map


def resample_labels(labels: np.ndarray, new_shape: Sequence[int]) -> np.ndarray:
    """Resample a label map by linear interpolation of each label's indicator, then a per-voxel argmax.

    Smoother than nearest neighbour where a coarse grid goes back to a fine one
    (nnU-Net restores segmentations this way); only label values present are
    used, so no new value appears. Memory: two arrays of the output size.
    """
    new_shape = tuple(int(s) for s in new_shape)
    if tuple(labels.shape) == new_shape:
        return labels
    values = np.unique(labels)
    out = np.full(new_shape, values[0], dtype=labels.dtype)
    if len(values) == 1:
        return out
    best = resample((labels == values[0]).astype(np.float32), new_shape, order=1)
    for value in values[1:]:
        score = resample((labels == value).astype(np.float32), new_shape, order=1)
        better = score > best
        best[better] = score[better]
        out[better] = value
    return out
