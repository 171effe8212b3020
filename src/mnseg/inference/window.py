"""Sliding-window inference: softmax probabilities for whole volumes from a patch-trained model.

Why our own window loop instead of ``monai.inferers.sliding_window_inference``: predictions must be
softmax probabilities averaged over windows (the M&N paper; nnU-Net's Gaussian weighting as an
option), optionally averaged over mirrored inputs, and the loop must be fast on a GPU. Here all
windows (of all batch items) are batched, probabilities are accumulated on the device, the
normalising weight map is built once per volume (not per window batch), and the loop has no
host synchronisation, so the GPU stays busy. Window placement follows nnU-Net: windows are spread
evenly so that the first starts at 0 and the last ends at the border (no window reaches outside the
volume). MONAI still provides the Gaussian importance map.

The same code serves 3D models and slice-wise-wrapped 2D models: both take ``(b, C, *patch)`` and
return ``(b, K, *patch)`` logits.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mnseg.errors import ConfigError
from mnseg.utils.precision import bf16_autocast

BLEND_MODES = ("constant", "gaussian")
_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}  # by window batch rank (2D / 3D patches)


@dataclass(frozen=True)
class WindowSettings:
    """All the sliding window takes from a run's config; ``from_config`` is the one place that reads them."""

    patch_size: tuple[int, ...]  # data.patch_size: the window is the training patch
    overlap: float  # infer.overlap
    blend: str  # infer.blend
    mirror_tta: bool  # infer.mirror_tta: mirror over every spatial axis
    sw_batch_size: int  # infer.sw_batch_size
    amp: bool  # train.amp (bf16 autocast on CUDA)
    channels_last: bool  # train.channels_last
    cpu_amp: bool = False  # train.cpu_amp (bf16 also on a CPU with native bf16)

    @classmethod
    def from_config(cls, cfg) -> WindowSettings:
        """The settings of ``cfg`` (a ``Config``) as they are now (``predict`` may have changed infer.*)."""
        return cls(
            patch_size=tuple(cfg.data.patch_size),
            overlap=cfg.infer.overlap,
            blend=cfg.infer.blend,
            mirror_tta=cfg.infer.mirror_tta,
            sw_batch_size=cfg.infer.sw_batch_size,
            amp=cfg.train.amp,
            cpu_amp=cfg.train.cpu_amp,
            channels_last=cfg.train.channels_last,
        )


@torch.no_grad()
def sliding_window_probabilities(
    model: nn.Module,
    image: Tensor,
    patch_size: Sequence[int],
    overlap: float = 0.5,
    blend: str = "constant",
    mirror_tta: bool = False,
    sw_batch_size: int = 4,
    amp: bool = False,
    cpu_amp: bool = False,
    device: torch.device | str | None = None,
    num_classes: int | None = None,
    channels_last: bool = False,
) -> Tensor:
    """Softmax probabilities of ``model`` over a whole volume, averaged over overlapping windows.

    ``image`` is ``(C, *spatial)`` or ``(B, C, *spatial)``; the result is ``(K, *spatial)`` or
    ``(B, K, *spatial)`` float32 on ``device``. Volumes smaller than the patch are zero-padded and the
    result cropped back. ``mirror_tta`` also averages over flips of every subset of spatial axes
    (8 passes for 3D). ``amp`` runs the model under bf16 autocast on CUDA, on a CPU only
    with ``cpu_amp`` and native bf16 (``mnseg.utils.precision``).
    ``device`` defaults to the model's device (the image's if the model has no parameters).
    The model is put in eval mode for the call and restored afterwards. ``channels_last`` hands the model its
    window batches in channels-last(-3d) memory format (for a model whose weights are, see
    ``mnseg.engine.build.to_channels_last``); the probabilities are the same.
    """
    patch = _check_arguments(image, patch_size, overlap, blend, sw_batch_size)
    unbatched = image.ndim == len(patch) + 1
    device = _resolve_device(model, image, device)
    volume = (image.unsqueeze(0) if unbatched else image).to(device=device, dtype=torch.float32)
    spatial = tuple(volume.shape[2:])
    volume, crop = pad_to_at_least(volume, patch)
    padded = tuple(volume.shape[2:])

    windows = window_slices(padded, patch, overlap)
    importance = _importance_map(patch, blend, device)
    weigh = blend != "constant"  # constant weights are ones: multiplying each window by them changes nothing
    normaliser = torch.zeros(padded, device=device, dtype=torch.float32)
    for window in windows:
        normaliser[window] += importance

    batch_size = volume.shape[0]
    jobs = [(b, window) for b in range(batch_size) for window in windows]
    accumulator = None
    if num_classes is not None:
        accumulator = torch.zeros((batch_size, num_classes, *padded), device=device, dtype=torch.float32)

    was_training = model.training
    model.eval()
    try:
        for first in range(0, len(jobs), sw_batch_size):
            chunk = jobs[first : first + sw_batch_size]
            inputs = torch.stack([volume[(b, slice(None)) + window] for b, window in chunk])
            if channels_last and inputs.ndim in _CHANNELS_LAST:
                inputs = inputs.contiguous(memory_format=_CHANNELS_LAST[inputs.ndim])
            probabilities = _window_probabilities(model, inputs, mirror_tta, amp, cpu_amp, device)
            _check_output(probabilities, inputs, num_classes)
            if accumulator is None:
                accumulator = torch.zeros(
                    (batch_size, probabilities.shape[1], *padded), device=device, dtype=torch.float32
                )
            weighted = probabilities * importance if weigh else probabilities
            for i, (b, window) in enumerate(chunk):
                accumulator[(b, slice(None)) + window] += weighted[i]
    finally:
        model.train(was_training)

    accumulator /= normaliser
    result = accumulator[(slice(None), slice(None)) + crop]
    if tuple(result.shape[2:]) != spatial:  # pragma: no cover - guards the padding arithmetic
        raise RuntimeError(f"internal error: cropped {tuple(result.shape[2:])} != input {spatial}")
    return result[0] if unbatched else result


def average_probabilities(probabilities: Sequence[Tensor], weights: Sequence[float] | None = None) -> Tensor:
    """Weighted mean of probability maps of equal shape (ensembling, e.g. M&N's 2D and 3D models).

    Weights are normalised to sum to one; the result is float32 and still sums to one over classes.
    """
    if len(probabilities) == 0:
        raise ValueError("average_probabilities needs at least one probability tensor")
    shape = tuple(probabilities[0].shape)
    for i, p in enumerate(probabilities):
        if tuple(p.shape) != shape:
            raise ValueError(f"probability tensor {i} has shape {tuple(p.shape)}, tensor 0 has {shape}")
    if weights is None:
        weights = [1.0] * len(probabilities)
    if len(weights) != len(probabilities):
        raise ValueError(f"{len(weights)} weights given for {len(probabilities)} probability tensors")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {list(weights)}")
    total = float(sum(weights))
    result = torch.zeros(shape, dtype=torch.float32, device=probabilities[0].device)
    for p, w in zip(probabilities, weights):
        result += p.to(device=result.device, dtype=torch.float32) * (float(w) / total)
    return result


def _check_arguments(
    image: Tensor, patch_size: Sequence[int], overlap: float, blend: str, sw_batch_size: int
) -> tuple[int, ...]:
    patch = tuple(int(p) for p in patch_size)
    if not patch or any(p < 1 for p in patch):
        raise ConfigError(f"patch size must be positive integers, got {tuple(patch_size)}")
    if image.ndim not in (len(patch) + 1, len(patch) + 2):
        raise ValueError(
            f"image of shape {tuple(image.shape)} does not fit a {len(patch)}D patch {patch}: expected "
            f"(C, *spatial) or (B, C, *spatial)"
        )
    if not 0.0 <= overlap < 1.0:
        raise ConfigError(f"sliding-window overlap must be in [0, 1), got {overlap}")
    if blend not in BLEND_MODES:
        raise ConfigError(f"unknown blending mode {blend!r}; choose one of {', '.join(BLEND_MODES)}")
    if sw_batch_size < 1:
        raise ConfigError(f"sliding-window batch size must be at least 1, got {sw_batch_size}")
    return patch


def _resolve_device(model: nn.Module, image: Tensor, device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return image.device


def pad_to_at_least(volume: Tensor, patch: tuple[int, ...]) -> tuple[Tensor, tuple[slice, ...]]:
    """Zero-pad spatial axes shorter than the patch (centred); return the crop that undoes it."""
    spatial = volume.shape[2:]
    before = [max(p - s, 0) // 2 for s, p in zip(spatial, patch)]
    after = [max(p - s, 0) - b for s, p, b in zip(spatial, patch, before)]
    crop = tuple(slice(b, b + s) for b, s in zip(before, spatial))
    if not any(before) and not any(after):
        return volume, crop
    pad = []
    for b, a in zip(reversed(before), reversed(after)):  # F.pad lists the last axis first
        pad += [b, a]
    return torch.nn.functional.pad(volume, pad, mode="constant", value=0.0), crop


def window_slices(spatial: Sequence[int], patch: Sequence[int], overlap: float) -> list[tuple[slice, ...]]:
    """The windows (one slice per spatial axis) that tile a volume of ``spatial`` size, which is at least the
    patch on every axis (``pad_to_at_least``): nnU-Net's placement, the first at 0, the last ending at the border."""
    return [
        tuple(slice(start, start + p) for start, p in zip(starts, patch))
        for starts in itertools.product(*(_window_starts(s, p, overlap) for s, p in zip(spatial, patch)))
    ]


def _window_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Evenly spread window starts from 0 to ``size - patch`` with at most ``(1 - overlap) * patch`` apart."""
    if size <= patch:
        return [0]
    target_step = max(patch * (1.0 - overlap), 1.0)
    num_steps = math.ceil((size - patch) / target_step) + 1
    actual_step = (size - patch) / (num_steps - 1)
    return [int(round(actual_step * i)) for i in range(num_steps)]


def _importance_map(patch: tuple[int, ...], blend: str, device: torch.device) -> Tensor:
    if blend == "constant":
        return torch.ones(patch, device=device, dtype=torch.float32)
    from monai.data.utils import compute_importance_map

    # sigma = patch / 8 as in nnU-Net; MONAI clamps the tails to a positive minimum.
    return compute_importance_map(
        patch, mode="gaussian", sigma_scale=0.125, device=device, dtype=torch.float32
    )


def _window_probabilities(
    model: nn.Module, inputs: Tensor, mirror_tta: bool, amp: bool, cpu_amp: bool, device: torch.device
) -> Tensor:
    """Softmax of the model's logits for a window batch, averaged over mirrored inputs if asked."""
    spatial_dims = tuple(range(2, inputs.ndim))
    flips = [()]
    if mirror_tta:
        flips += [
            dims for r in range(1, len(spatial_dims) + 1) for dims in itertools.combinations(spatial_dims, r)
        ]
    autocast = bf16_autocast(device, amp, cpu_amp)
    total = None
    for dims in flips:
        with autocast:
            logits = model(inputs.flip(dims) if dims else inputs)
        if isinstance(logits, (list, tuple)):  # deep-supervision models: the full-resolution head comes first
            logits = logits[0]
        # dtype= makes the softmax read bf16 logits and compute in fp32 in one kernel (no fp32 copy of the logits)
        probabilities = torch.softmax(logits, dim=1, dtype=torch.float32)
        if dims:
            probabilities = probabilities.flip(dims)
        total = probabilities if total is None else total + probabilities
    return total / len(flips) if len(flips) > 1 else total


def _check_output(probabilities: Tensor, inputs: Tensor, num_classes: int | None) -> None:
    if probabilities.ndim != inputs.ndim or probabilities.shape[2:] != inputs.shape[2:]:
        raise ValueError(
            f"model returned shape {tuple(probabilities.shape)} for input {tuple(inputs.shape)}; "
            f"expected (b, K, {', '.join(str(s) for s in inputs.shape[2:])})"
        )
    if num_classes is not None and probabilities.shape[1] != num_classes:
        raise ConfigError(
            f"model predicts {probabilities.shape[1]} classes but num_classes={num_classes} was given "
            f"(checkpoint and dataset labels disagree?)"
        )
