"""Patch sampling: where to crop a training patch, and the crop itself.

Plain numpy so it runs in data-loader workers. Foreground coordinates are computed once per case
(``foreground_coords``) and reused for every patch drawn from it; ``sample_window`` then centres a
patch on a foreground voxel often enough that small structures and rare classes are seen, and
``extract`` crops with padding so patches larger than the volume work.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Window", "foreground_coords", "sample_window", "extract"]


@dataclass(frozen=True)
class Window:
    """A box in voxel coordinates; ``start`` may be negative and the box may reach past the volume."""

    start: tuple[int, ...]
    size: tuple[int, ...]

    @property
    def stop(self) -> tuple[int, ...]:
        return tuple(s + n for s, n in zip(self.start, self.size))


def foreground_coords(
    label: np.ndarray,
    ignore_index: int | None = None,
    max_per_class: int = 20000,
    rng: np.random.Generator | None = None,
) -> dict[int, np.ndarray]:
    """Voxel coordinates (N, 3) of each foreground class (> 0 and != ignore_index).

    Large classes are randomly subsampled to ``max_per_class`` coordinates to bound memory; ``rng``
    defaults to a fixed seed so a cached result is reproducible. Classes absent from ``label`` are absent
    from the result.
    """
    label = np.asarray(label)
    if label.ndim != 3:
        raise ValueError(f"label must be a 3D array (X, Y, Z), got shape {label.shape}")
    if max_per_class < 1:
        raise ValueError(f"max_per_class must be >= 1, got {max_per_class}")
    rng = np.random.default_rng(0) if rng is None else rng
    flat = label.reshape(-1)
    is_fg = flat > 0
    if ignore_index is not None:
        is_fg &= flat != ignore_index
    indices = np.flatnonzero(is_fg)
    values = flat[indices]
    order = np.argsort(values, kind="stable")
    indices, values = indices[order], values[order]
    classes, first = np.unique(values, return_index=True)
    bounds = [*first[1:], len(values)]
    result: dict[int, np.ndarray] = {}
    for cls, lo, hi in zip(classes, first, bounds):
        chosen = indices[lo:hi]
        if len(chosen) > max_per_class:
            chosen = np.sort(rng.choice(chosen, size=max_per_class, replace=False))
        result[int(cls)] = np.stack(np.unravel_index(chosen, label.shape), axis=1).astype(np.int64)
    return result


def _start_bounds(shape: int, patch: int) -> tuple[int, int]:
    """Allowed start range: inside the volume when it is larger, covering it whole when it is smaller."""
    return min(0, shape - patch), max(0, shape - patch)


def sample_window(
    spatial_shape: tuple[int, ...],
    patch_size: tuple[int, ...],
    rng: np.random.Generator,
    fg_coords: dict[int, np.ndarray] | None = None,
    fg_prob: float = 0.5,
    class_balanced: bool = True,
) -> Window:
    """Choose a patch window: foreground-centred with probability ``fg_prob``, else uniformly placed.

    When foreground-centred, the class is drawn uniformly among the present classes if ``class_balanced``
    (rare lesions are seen as often as large organs), otherwise a voxel is drawn uniformly among all
    foreground voxels. The window is shifted to lie inside the volume whenever the volume is larger
    than the patch along an axis, and always contains the chosen voxel.
    """
    spatial_shape = tuple(int(s) for s in spatial_shape)
    patch_size = tuple(int(p) for p in patch_size)
    if len(spatial_shape) != len(patch_size):
        raise ValueError(f"patch_size {patch_size} and spatial_shape {spatial_shape} differ in length")
    if any(p < 1 for p in patch_size):
        raise ValueError(f"patch_size must be positive, got {patch_size}")
    bounds = [_start_bounds(s, p) for s, p in zip(spatial_shape, patch_size)]

    present = [c for c, coords in sorted((fg_coords or {}).items()) if len(coords) > 0]
    if present and rng.random() < fg_prob:
        if class_balanced:
            coords = fg_coords[present[int(rng.integers(len(present)))]]
        else:
            coords = np.concatenate([fg_coords[c] for c in present], axis=0)
        voxel = coords[int(rng.integers(len(coords)))]
        start = tuple(
            int(np.clip(int(v) - p // 2, lo, hi)) for v, p, (lo, hi) in zip(voxel, patch_size, bounds)
        )
    else:
        start = tuple(int(rng.integers(lo, hi + 1)) for lo, hi in bounds)
    return Window(start=start, size=patch_size)


def extract(array: np.ndarray, window: Window, pad_value=0) -> np.ndarray:
    """Crop the trailing ``len(window.size)`` axes of ``array`` to ``window``, padding outside the volume.

    ``pad_value`` is a scalar or an array matching the leading axes (e.g. a per-channel minimum of shape
    (C,) for a (C, X, Y, Z) image). Always returns a new contiguous array.
    """
    n = len(window.size)
    if array.ndim < n:
        raise ValueError(f"array of shape {array.shape} has fewer than {n} spatial axes")
    lead, spatial = array.shape[:-n], array.shape[-n:]
    src, dst = [], []
    for dim, start, size in zip(spatial, window.start, window.size):
        lo, hi = max(start, 0), min(start + size, dim)
        if hi <= lo:  # window entirely outside along this axis: nothing to copy
            lo = hi = 0
        src.append(slice(lo, hi))
        dst.append(slice(lo - start, hi - start) if hi > lo else slice(0, 0))
    out = np.empty((*lead, *window.size), dtype=array.dtype)
    pad = np.asarray(pad_value, dtype=array.dtype)
    if pad.ndim > 0:
        if pad.shape != tuple(lead):
            raise ValueError(f"pad_value of shape {pad.shape} does not match leading axes {tuple(lead)}")
        pad = pad.reshape(*lead, *([1] * n))
    out[...] = pad
    out[(..., *dst)] = array[(..., *src)]
    return out
