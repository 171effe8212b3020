"""Random smooth deformations (affine plus elastic) for synthetic pseudo-subjects.

A deformation is one array of source coordinates, one per output voxel, so the
same field warps an image, its tissue probabilities and any label map: they
cannot drift apart. Amplitudes are given in millimetres and converted to voxels,
so a subject looks alike at every output spacing.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def smooth_random_field(
    rng: np.random.Generator, shape: tuple[int, ...], control_spacing_vox: float, std: float
) -> np.ndarray:
    """A smooth random field: Gaussian noise on a coarse control grid, upsampled by cubic splines.

    Drawing on a coarse grid keeps the cost independent of the output resolution
    and the smoothness tied to a physical length (``control_spacing_vox``).
    """
    coarse_shape = tuple(max(2, int(np.ceil(n / control_spacing_vox)) + 1) for n in shape)
    coarse = rng.normal(0.0, std, coarse_shape).astype(np.float32)
    factors = [n / c for n, c in zip(shape, coarse_shape)]
    field = ndimage.zoom(coarse, factors, order=3, mode="nearest", grid_mode=True)
    return field[tuple(slice(0, n) for n in shape)]


def random_affine_matrix(
    rng: np.random.Generator,
    max_rotation_deg: float = 6.0,
    scale_range: tuple[float, float] = (0.94, 1.06),
    max_axis_scale: float = 0.03,
    max_shear: float = 0.03,
) -> np.ndarray:
    """A 3x3 matrix of small rotations, a global plus per-axis scale and a small shear."""
    angles = np.deg2rad(rng.uniform(-max_rotation_deg, max_rotation_deg, 3))
    matrix = np.eye(3)
    for axis, angle in enumerate(angles):
        i, j = [a for a in range(3) if a != axis]
        rot = np.eye(3)
        rot[i, i] = rot[j, j] = np.cos(angle)
        rot[i, j], rot[j, i] = -np.sin(angle), np.sin(angle)
        matrix = rot @ matrix
    scale = rng.uniform(*scale_range) * (1.0 + rng.uniform(-max_axis_scale, max_axis_scale, 3))
    shear = np.eye(3) + np.triu(rng.uniform(-max_shear, max_shear, (3, 3)), k=1)
    return matrix @ shear @ np.diag(scale)


def random_deformation(
    shape: tuple[int, int, int],
    spacing: float,
    rng: np.random.Generator,
    *,
    max_translation_mm: float = 4.0,
    elastic_std_mm: tuple[float, float] = (1.5, 3.5),
    elastic_control_mm: float = 24.0,
    **affine_kwargs,
) -> np.ndarray:
    """Source coordinates (3, *shape) in voxels for a random affine-plus-elastic warp.

    Output voxel ``x`` takes its value from ``c + A (x - c) + t + d(x)`` in the
    source grid, with ``c`` the grid centre, ``A`` a random affine matrix, ``t`` a
    translation and ``d`` a smooth elastic displacement.
    """
    matrix = random_affine_matrix(rng, **affine_kwargs)
    translation = rng.uniform(-max_translation_mm, max_translation_mm, 3) / spacing
    elastic_std = rng.uniform(*elastic_std_mm) / spacing
    control = elastic_control_mm / spacing
    centre = (np.asarray(shape, dtype=np.float64) - 1.0) / 2.0
    axes = [np.arange(n, dtype=np.float32) - np.float32(c) for n, c in zip(shape, centre)]
    coords = np.empty((3, *shape), dtype=np.float32)
    for out_axis in range(3):
        # Affine part, summed axis by axis with broadcasting to avoid a 3x3 matmul over all voxels.
        acc = np.full(shape, centre[out_axis] + translation[out_axis], dtype=np.float32)
        for in_axis in range(3):
            view = [1, 1, 1]
            view[in_axis] = shape[in_axis]
            acc += np.float32(matrix[out_axis, in_axis]) * axes[in_axis].reshape(view)
        acc += smooth_random_field(rng, shape, control, elastic_std)
        coords[out_axis] = acc
    return coords


def warp(volume: np.ndarray, coords: np.ndarray, order: int = 1, cval: float = 0.0) -> np.ndarray:
    """Sample ``volume`` at ``coords`` (from :func:`random_deformation`); outside the grid is ``cval``.

    Use ``order=1`` for intensities and probabilities, ``order=0`` (nearest) for label maps.
    """
    out = ndimage.map_coordinates(volume, coords, order=order, mode="constant", cval=cval, prefilter=False)
    return out.astype(volume.dtype, copy=False)
