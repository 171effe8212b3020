"""Per-channel intensity normalisation: z-score (MRI and most modalities) or a CT Hounsfield window.

Kept apart from geometry because the choice depends on the modality, not on the grid.
"""

from __future__ import annotations

import numpy as np

from mnseg.errors import ConfigError

NORMALIZATIONS = ("auto", "zscore", "ct", "none")
STD_FLOOR = 1e-8


def resolve_normalization(normalization: str, modality: str) -> str:
    """"auto" becomes "ct" for CT channels (fixed HU scale) and "zscore" for everything else."""
    if normalization not in NORMALIZATIONS:
        raise ConfigError(f"normalization must be one of {', '.join(NORMALIZATIONS)}, got {normalization!r}")
    if normalization != "auto":
        return normalization
    return "ct" if str(modality).strip().upper() == "CT" else "zscore"


def zscore(x: np.ndarray) -> np.ndarray:
    """(x - mean) / std over the whole volume; a constant volume becomes all zeros, not NaN."""
    x = x.astype(np.float32, copy=False)
    mean = float(x.mean(dtype=np.float64))
    std = float(x.std(dtype=np.float64))
    return ((x - mean) / max(std, STD_FLOOR)).astype(np.float32)


def ct_window(x: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """Clip to the HU window, then scale it to [0, 1]."""
    lo, hi = float(window[0]), float(window[1])
    return ((np.clip(x, lo, hi) - lo) / (hi - lo)).astype(np.float32)


def rescale01(x: np.ndarray) -> np.ndarray:
    """Min-max rescale to [0, 1] (a constant volume becomes zeros)."""
    lo, hi = float(x.min()), float(x.max())
    if hi - lo <= 0:
        return np.zeros_like(x, dtype=np.float32)
    return ((x - lo) / (hi - lo)).astype(np.float32)


def clahe(x01: np.ndarray) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation of a [0, 1] volume (skimage, works in 3D)."""
    from skimage.exposure import equalize_adapthist

    return equalize_adapthist(np.clip(x01, 0.0, 1.0)).astype(np.float32)


def normalize_channel(
    x: np.ndarray, method: str, window: tuple[float, float] = (-175.0, 250.0), use_clahe: bool = False
) -> np.ndarray:
    """Normalise one channel with a resolved method ("zscore", "ct" or "none"), CLAHE first if asked."""
    if method == "ct":
        out = ct_window(x, window)
        return clahe(out) if use_clahe else out
    if use_clahe:
        x = clahe(rescale01(x))
    if method == "zscore":
        return zscore(x)
    if method == "none":
        return x.astype(np.float32, copy=False)
    raise ConfigError(f"normalization must be one of zscore, ct, none after resolving 'auto', got {method!r}")
