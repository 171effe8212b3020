"""MRI-like artefacts for synthetic subjects: contrast, bias field, blur, thick slices, Rician noise.

Each function takes and returns an image only; labels stay the true anatomy,
as a radiologist's annotation would. Sizes are given in voxels of the output grid.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from mnseg.data.synth_deform import smooth_random_field


def random_gamma(image: np.ndarray, rng: np.random.Generator, gamma_range=(0.75, 1.35)) -> np.ndarray:
    """Non-linear contrast change ``image ** gamma`` (image must be non-negative)."""
    return np.power(np.maximum(image, 0.0), rng.uniform(*gamma_range)).astype(np.float32)


def bias_field(
    rng: np.random.Generator, shape: tuple[int, int, int], spacing: float, strength_range=(0.1, 0.3)
) -> np.ndarray:
    """A smooth multiplicative field ``exp(f)`` around 1, varying over ~ 60 mm like coil inhomogeneity."""
    field = smooth_random_field(rng, shape, 60.0 / spacing, rng.uniform(*strength_range))
    return np.exp(field).astype(np.float32)


def random_blur(image: np.ndarray, rng: np.random.Generator, max_sigma_vox: float = 0.5) -> np.ndarray:
    """Gaussian blur with a random width (point-spread function of a softer acquisition)."""
    sigma = rng.uniform(0.0, max_sigma_vox)
    if sigma < 0.05:
        return image
    return ndimage.gaussian_filter(image, sigma).astype(np.float32)


def thick_slices(image: np.ndarray, factor: int, axis: int = 2) -> np.ndarray:
    """Simulate slices ``factor`` times thicker along ``axis``, then linear upsampling back to the grid.

    Each thick slice is the mean over ``factor`` thin slices (a box slice
    profile); the grid and shape stay those of the labels.
    """
    if factor <= 1:
        return image
    moved = np.moveaxis(image, axis, -1)
    n = moved.shape[-1]
    n_thick = int(np.ceil(n / factor))
    padded = np.concatenate([moved, np.repeat(moved[..., -1:], n_thick * factor - n, axis=-1)], axis=-1)
    thick = padded.reshape(*moved.shape[:-1], n_thick, factor).mean(axis=-1)
    # Centre of thick slice j lies at thin index j * factor + (factor - 1) / 2.
    pos = np.clip((np.arange(n) - (factor - 1) / 2.0) / factor, 0.0, n_thick - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, n_thick - 1)
    w = (pos - lo).astype(np.float32)
    out = thick[..., lo] * (1.0 - w) + thick[..., hi] * w
    return np.moveaxis(out, -1, axis).astype(np.float32)


def rician_noise(image: np.ndarray, rng: np.random.Generator, sigma: float) -> np.ndarray:
    """Magnitude of complex Gaussian noise: MR magnitude-image noise (biased upwards in dark areas)."""
    real = image + rng.normal(0.0, sigma, image.shape).astype(np.float32)
    imag = rng.normal(0.0, sigma, image.shape).astype(np.float32)
    return np.sqrt(real * real + imag * imag).astype(np.float32)
