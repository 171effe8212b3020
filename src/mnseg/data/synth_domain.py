"""The target domain of ``mnseg synth --domain-shift``: the same anatomy seen by another scanner and protocol.

A target subject's anatomy (deformation, lesions) is drawn exactly as a source subject's; only its acquisition
differs, in every way a new site tends to: another contrast curve (a sigmoid centred between grey and white matter
instead of a gamma), a stronger bias field, a coarser acquisition resolution (down- then up-sampled, then blurred),
more Rician noise and other scanner units. Labels stay the true anatomy, on the same grid as the source's, so a
model trained on the source can be scored on ``labelsTarget`` directly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

from mnseg.data.synth_artefacts import bias_field, rician_noise


@dataclass(frozen=True)
class TargetDomain:
    """How the target scanner acquires a subject (ranges drawn per subject; the source's are in ``Variation``)."""

    curve_centre: tuple[float, float] = (0.75, 0.85)  # of the sigmoid contrast curve, white matter ~1
    curve_width: tuple[float, float] = (0.08, 0.14)
    bias_strength: tuple[float, float] = (0.35, 0.5)  # source: 0.1-0.3
    resolution_factor: tuple[float, float] = (1.5, 2.0)  # acquired voxels this many times larger per axis
    blur_vox: tuple[float, float] = (0.6, 1.0)  # source: 0-0.5 (0-0.9 strong)
    noise_sigma: tuple[float, float] = (0.08, 0.12)  # source: 0.02-0.06 (0.03-0.10 strong)
    scanner_units: tuple[float, float] = (2000.0, 4000.0)  # source: 300-1200

    def to_dict(self) -> dict:
        return {k: list(v) for k, v in asdict(self).items()}


TARGET = TargetDomain()


def contrast_curve(image: np.ndarray, centre: float, width: float) -> np.ndarray:
    """s(x) = (sigma((x - c) / w) - sigma(-c / w)) / (1 - sigma(-c / w)): a sigmoid that keeps 0 at 0 (background
    stays dark) and stretches the contrast around c while compressing it far from c."""
    x = np.maximum(image, 0.0).astype(np.float64)
    floor = 1.0 / (1.0 + np.exp(centre / width))
    curve = 1.0 / (1.0 + np.exp(-(x - centre) / width))
    return ((curve - floor) / (1.0 - floor)).astype(np.float32)


def coarser_resolution(image: np.ndarray, factor: float) -> np.ndarray:
    """The image acquired with voxels ``factor`` times larger (linear down-sampling after anti-aliasing), then
    interpolated back to its grid: detail finer than the coarse voxel is gone."""
    smoothed = ndimage.gaussian_filter(image, max((factor - 1.0) / 2.0, 0.0))
    low = ndimage.zoom(smoothed, 1.0 / factor, order=1, grid_mode=True, mode="nearest")
    back = ndimage.zoom(low, np.asarray(image.shape) / np.asarray(low.shape), order=1, grid_mode=True,
                        mode="nearest")
    return back.astype(np.float32)


def target_acquisition(image: np.ndarray, rng: np.random.Generator, spacing: float,
                       domain: TargetDomain = TARGET) -> tuple[np.ndarray, dict]:
    """A target-domain scan of the anatomy ``image`` (white matter ~1), and the facts worth recording."""
    centre, width = rng.uniform(*domain.curve_centre), rng.uniform(*domain.curve_width)
    out = contrast_curve(image, centre, width)
    out = out * bias_field(rng, image.shape, spacing, domain.bias_strength)
    factor = rng.uniform(*domain.resolution_factor)
    out = coarser_resolution(out, factor)
    out = ndimage.gaussian_filter(out, rng.uniform(*domain.blur_vox)).astype(np.float32)
    out = rician_noise(out, rng, sigma=rng.uniform(*domain.noise_sigma))
    out = out * rng.uniform(*domain.scanner_units)
    facts = {"contrast_centre": round(float(centre), 4), "contrast_width": round(float(width), 4),
             "resolution_factor": round(float(factor), 4)}
    return out.astype(np.float32), facts
