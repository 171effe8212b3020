"""Batched data augmentation applied on the device inside the training step.

One random spatial transform per sample (zoom, rotation, flips) is applied to the image and to every
target that must stay aligned with it (labels, soft pseudo-labels, masks); intensity transforms
(gamma, Gaussian noise) touch only the image. Built on ``F.affine_grid`` + ``F.grid_sample`` so it
runs batched on CPU or GPU, and draws all randomness from one optional ``torch.Generator`` so a
seeded run is reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor

from mnseg.errors import ConfigError

__all__ = ["AugmentConfig", "Augmenter"]

TARGET_KINDS = ("label", "prob", "mask")


@dataclass
class AugmentConfig:
    """What to randomise and how much; ``None`` or zero disables a transform."""

    scale: tuple[float, float] | None = (0.9, 1.1)  # isotropic zoom factor range (>1 zooms in)
    rotate_deg: float = 0.0  # max |angle|; 3D: about each axis; 2D: in-plane
    flip_axes: tuple[int, ...] = ()  # spatial axes (0-based over spatial dims), each flipped with prob 0.5
    gamma: tuple[float, float] | None = (0.8, 1.2)
    noise_std: float = 0.0  # std of additive Gaussian noise, in (normalised) image units
    p_spatial: float = 1.0  # per-sample probability of zoom + rotation (flips have their own 0.5)
    p_gamma: float = 0.5
    p_noise: float = 0.0

    def __post_init__(self) -> None:
        if self.scale is not None:
            self.scale = _float_range("scale", self.scale)
            if self.scale[0] <= 0:
                raise ConfigError(f"augment scale must be positive, got {self.scale}")
        if self.gamma is not None:
            self.gamma = _float_range("gamma", self.gamma)
            if self.gamma[0] <= 0:
                raise ConfigError(f"augment gamma must be positive, got {self.gamma}")
        self.flip_axes = tuple(int(a) for a in self.flip_axes)
        if any(a < 0 for a in self.flip_axes):
            raise ConfigError(f"augment flip_axes must be >= 0 (spatial axes), got {self.flip_axes}")
        for name in ("rotate_deg", "noise_std"):
            if float(getattr(self, name)) < 0:
                raise ConfigError(f"augment {name} must be >= 0, got {getattr(self, name)}")
            setattr(self, name, float(getattr(self, name)))
        for name in ("p_spatial", "p_gamma", "p_noise"):
            value = float(getattr(self, name))
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"augment {name} must be a probability in [0, 1], got {value}")
            setattr(self, name, value)

    @classmethod
    def conservative_3d(cls) -> AugmentConfig:
        """The M&N paper's 3D augmentation: zoom 0.9-1.1 and gamma 0.8-1.2, nothing else."""
        return cls(scale=(0.9, 1.1), gamma=(0.8, 1.2))

    @classmethod
    def strong_2d(cls) -> AugmentConfig:
        """Strong 2D augmentation of the sparse-to-dense study: zoom, rotation, flips, gamma, noise."""
        return cls(
            scale=(0.7, 1.4),
            rotate_deg=30.0,
            flip_axes=(0, 1),
            gamma=(0.7, 1.5),
            noise_std=0.1,
            p_spatial=1.0,
            p_gamma=0.5,
            p_noise=0.5,
        )

    @classmethod
    def none(cls) -> AugmentConfig:
        """No augmentation at all (inputs come back unchanged)."""
        return cls(scale=None, rotate_deg=0.0, flip_axes=(), gamma=None, noise_std=0.0)

    def to_dict(self) -> dict:
        """Plain dict (lists instead of tuples) for YAML/JSON."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> AugmentConfig:
        """Inverse of ``to_dict``; unknown keys are an error naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown augment option(s) {unknown}; known: {sorted(known)}")
        return cls(**d)

    @property
    def zooms_or_rotates(self) -> bool:
        zooms = self.scale is not None and self.scale != (1.0, 1.0)
        return self.p_spatial > 0 and (zooms or self.rotate_deg > 0)

    @property
    def is_identity(self) -> bool:
        gammas = self.gamma is not None and self.gamma != (1.0, 1.0) and self.p_gamma > 0
        noises = self.noise_std > 0 and self.p_noise > 0
        return not (self.zooms_or_rotates or self.flip_axes or gammas or noises)


def _float_range(name: str, value) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"augment {name} must be a (low, high) pair of numbers, got {value!r}") from None
    if lo > hi:
        raise ConfigError(f"augment {name} range must have low <= high, got {value!r}")
    return lo, hi


def _rotation_matrix(angles: Tensor, spatial_dims: int) -> Tensor:
    """(B, n, n) rotations from angles in radians: (B,) in-plane for 2D, (B, 3) about each axis for 3D."""
    if spatial_dims == 2:
        c, s = torch.cos(angles), torch.sin(angles)
        return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)
    rotation = torch.eye(3, device=angles.device).expand(angles.shape[0], 3, 3)
    for axis in range(3):
        c, s = torch.cos(angles[:, axis]), torch.sin(angles[:, axis])
        j, k = (a for a in range(3) if a != axis)
        about_axis = torch.eye(3, device=angles.device).repeat(angles.shape[0], 1, 1)
        about_axis[:, j, j], about_axis[:, k, k] = c, c
        about_axis[:, j, k], about_axis[:, k, j] = -s, s
        rotation = rotation @ about_axis
    return rotation


class Augmenter:
    """Applies an ``AugmentConfig`` to batches of 2D (B, C, H, W) or 3D (B, C, X, Y, Z) tensors."""

    def __init__(self, config: AugmentConfig, spatial_dims: int):
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        bad = [a for a in config.flip_axes if a >= spatial_dims]
        if bad:
            raise ConfigError(f"augment flip_axes {bad} do not exist for {spatial_dims}D data")
        self.config = config
        self.spatial_dims = spatial_dims

    def __call__(
        self,
        image: Tensor,
        targets: Sequence[Tensor] = (),
        kinds: Sequence[str] = (),
        generator: torch.Generator | None = None,
        *,
        label_pad: int = 0,
    ) -> tuple[Tensor, list[Tensor]]:
        """Augment ``image`` (B, C, *S) and the aligned ``targets``; returns new tensors, inputs untouched.

        ``kinds`` names each target: "label" (int (B, *S); nearest; area outside the source filled with
        ``label_pad``, e.g. the ignore label), "prob" ((B, K, *S); linear; outside counts as background;
        renormalised to sum 1), "mask" (bool (B, *S); nearest; outside is False).
        """
        n = self.spatial_dims
        if image.dim() != n + 2:
            raise ValueError(f"image must have shape (B, C, *{n} spatial dims), got {tuple(image.shape)}")
        targets = list(targets)
        kinds = list(kinds)
        if len(kinds) != len(targets):
            raise ValueError(f"got {len(targets)} targets but {len(kinds)} kinds")
        for kind, target in zip(kinds, targets):
            self._check_target(kind, target, image)
        cfg = self.config
        if cfg.is_identity:
            return image, targets

        batch = image.shape[0]
        gen_device = generator.device if generator is not None else image.device

        def rand(*shape: int) -> Tensor:
            return torch.rand(shape, generator=generator, device=gen_device).to(image.device)

        if cfg.zooms_or_rotates:
            theta, chosen = self._sample_affine(batch, rand, image.shape[2:])
            grid = F.affine_grid(theta, [batch, 1, *image.shape[2:]], align_corners=False)
            image = _resample_image(image, chosen, grid)
            targets = [_resample_target(t, k, chosen, grid, label_pad) for t, k in zip(targets, kinds)]

        for axis in cfg.flip_axes:
            flip = rand(batch) < 0.5
            image = _flip_where(image, flip, axis + 2)
            targets = [_flip_where(t, flip, axis + (2 if k == "prob" else 1)) for t, k in zip(targets, kinds)]

        if cfg.gamma is not None and cfg.gamma != (1.0, 1.0) and cfg.p_gamma > 0:
            apply = rand(batch) < cfg.p_gamma
            gamma = cfg.gamma[0] + (cfg.gamma[1] - cfg.gamma[0]) * rand(batch)
            image = _apply_gamma(image, torch.where(apply, gamma, torch.ones_like(gamma)))

        if cfg.noise_std > 0 and cfg.p_noise > 0:
            apply = (rand(batch) < cfg.p_noise).to(image.dtype)
            noise = torch.randn(image.shape, generator=generator, device=gen_device).to(image.device)
            image = image + noise.to(image.dtype) * (cfg.noise_std * _per_sample(apply, image))
        return image, targets

    def _check_target(self, kind: str, target: Tensor, image: Tensor) -> None:
        if kind not in TARGET_KINDS:
            raise ValueError(f"unknown target kind {kind!r}; expected one of {TARGET_KINDS}")
        spatial = tuple(image.shape[2:])
        expected_dims = self.spatial_dims + (2 if kind == "prob" else 1)
        same_spatial = tuple(target.shape[-self.spatial_dims :]) == spatial
        if target.dim() != expected_dims or target.shape[0] != image.shape[0] or not same_spatial:
            layout = "(B, K, *S)" if kind == "prob" else "(B, *S)"
            raise ValueError(
                f"{kind} target must have shape {layout} matching image {tuple(image.shape)}, "
                f"got {tuple(target.shape)}"
            )

    def _sample_affine(self, batch: int, rand, spatial_shape) -> tuple[Tensor, Tensor]:
        """Per-sample (n, n+1) output->input maps in affine_grid's normalised coordinates, and who gets one.

        Samples not chosen (probability 1 - p_spatial) keep their original values; selecting with
        ``torch.where`` instead of indexing avoids a host sync on the GPU.
        """
        cfg, n = self.config, self.spatial_dims
        chosen = rand(batch) < cfg.p_spatial
        if cfg.scale is not None:
            zoom = cfg.scale[0] + (cfg.scale[1] - cfg.scale[0]) * rand(batch)
        else:
            zoom = torch.ones(batch, device=chosen.device)
        limit = math.radians(cfg.rotate_deg)
        angles = (2 * rand(batch, 1 if n == 2 else 3) - 1) * limit
        rotation = _rotation_matrix(angles[:, 0] if n == 2 else angles, n)
        # affine_grid's coordinates run over the last axis first and are normalised per axis; rotate in voxel
        # units (half-extents) so non-cubic patches are rotated, not sheared.
        half = torch.tensor([s / 2.0 for s in reversed(spatial_shape)], device=chosen.device)
        linear = rotation * half[None, None, :] / half[None, :, None] / zoom[:, None, None]
        theta = torch.cat([linear, torch.zeros(batch, n, 1, device=chosen.device)], dim=2)
        return theta, chosen


def _per_sample(flags: Tensor, like: Tensor) -> Tensor:
    """(B,) flags shaped to broadcast against ``like`` (B, ...)."""
    return flags.view(-1, *[1] * (like.dim() - 1))


def _resample_image(image: Tensor, chosen: Tensor, grid: Tensor) -> Tensor:
    """Linear resampling; outside the source is filled with each sample's per-channel minimum."""
    x = image.float()
    minimum = x.amin(dim=tuple(range(2, x.dim())), keepdim=True)
    warped = F.grid_sample(x - minimum, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return torch.where(_per_sample(chosen, image), (warped + minimum).to(image.dtype), image)


def _resample_target(target: Tensor, kind: str, chosen: Tensor, grid: Tensor, label_pad: int) -> Tensor:
    if kind == "prob":
        x = target.float()
        warped = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        outside = (1.0 - warped.sum(dim=1, keepdim=True)).clamp_min(0.0)
        warped = torch.cat([warped[:, :1] + outside, warped[:, 1:]], dim=1)  # outside counts as background
        warped = warped / warped.sum(dim=1, keepdim=True).clamp_min(1e-8)
        return torch.where(_per_sample(chosen, target), warped.to(target.dtype), target)
    pad = float(label_pad) if kind == "label" else 0.0
    x = target.unsqueeze(1).float() - pad
    warped = F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)[:, 0] + pad
    warped = (warped > 0.5) if kind == "mask" else warped.round().to(target.dtype)
    return torch.where(_per_sample(chosen, target), warped, target)


def _flip_where(x: Tensor, flip: Tensor, dim: int) -> Tensor:
    """Flip along ``dim`` the samples where ``flip`` (B,) is True (exact: no resampling)."""
    return torch.where(_per_sample(flip, x), x.flip(dim), x)


def _apply_gamma(image: Tensor, gamma: Tensor) -> Tensor:
    """Gamma on per-sample, per-channel min-max rescaled intensities, mapped back: min and max are kept."""
    x = image.float()
    dims = tuple(range(2, x.dim()))
    lo = x.amin(dim=dims, keepdim=True)
    span = x.amax(dim=dims, keepdim=True) - lo
    unit = ((x - lo) / span.clamp_min(1e-12)).clamp(0.0, 1.0)
    g = _per_sample(gamma, x)
    return (unit.pow(g) * span + lo).to(image.dtype)
