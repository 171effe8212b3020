"""Activation checkpointing: keep a model's stage inputs, recompute the rest in the backward pass.

Why: the paper's M&N recipe keeps the activations of a SegFormer over 5 x 64 slices and of a 32-filter 3D UNet
over 160 x 160 x 64 crops, which sets the peak GPU memory (issue 8 asks for half of plain PyTorch's). Trading a
second forward of each stage for not storing its insides is the standard way down (as nnU-Net's and MONAI's
optional checkpointing). Values and gradients are unchanged: the recompute replays the same RNG state, and
batch-norm running statistics are restored after it so the recompute does not count the batch twice.

Supported: slice-wise 2D models (each ``slice_batch`` chunk of slices is one checkpoint) and the plain UNets
(``PlainUNet``: input block, every down level, bottleneck, every up level). Checkpointing acts only where
gradients are being recorded (training); evaluation and pseudo-mask generation run as before.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mnseg.errors import ConfigError

__all__ = ["enable_activation_checkpointing", "checkpointed_call", "saved_activation_bytes"]


@contextlib.contextmanager
def _running_stats_kept(module: nn.Module):
    """Leave batch-norm running statistics as they were on entry (for a recompute of a batch already counted)."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats]
    saved = [{k: b.clone() for k, b in m.named_buffers(recurse=False) if b is not None} for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, buffers in zip(norms, saved):
                for k, value in buffers.items():
                    getattr(m, k).copy_(value)


def checkpointed_call(module: nn.Module, fn: Callable, *args):
    """``fn(*args)`` through a non-reentrant checkpoint when gradients are recorded, else plainly.

    ``module`` holds the parameters and norms ``fn`` uses; its batch-norm statistics are updated once (by the
    first forward), not again by the recompute.
    """
    if not torch.is_grad_enabled():
        return fn(*args)
    calls = 0

    def run(*inputs):
        nonlocal calls
        calls += 1
        if calls == 1:
            return fn(*inputs)
        with _running_stats_kept(module):
            return fn(*inputs)

    return checkpoint(run, *args, use_reentrant=False, preserve_rng_state=True)


class _CheckpointedStage:
    """Mixed into a stage's own class so its forward is checkpointed while its parameter names stay the same
    (checkpoints load with or without the option) and deep copies (EMA teachers) stay independent."""

    def forward(self, *args):
        return checkpointed_call(self, super().forward, *args)


_STAGE_CLASSES: dict[type, type] = {}


def _checkpoint_stage(module: nn.Module) -> None:
    cls = type(module)
    if issubclass(cls, _CheckpointedStage):
        return
    if cls not in _STAGE_CLASSES:
        _STAGE_CLASSES[cls] = type(f"Checkpointed{cls.__name__}", (_CheckpointedStage, cls), {})
    module.__class__ = _STAGE_CLASSES[cls]


def enable_activation_checkpointing(model: nn.Module, name: str = "model") -> nn.Module:
    """Turn on activation checkpointing for ``model`` in place (and return it); ConfigError where unsupported."""
    from mnseg.models.slicewise import SliceWise
    from mnseg.models.unet3d import PlainUNet

    if isinstance(model, SliceWise):
        if model.slice_batch is None:
            raise ConfigError(
                f"model '{name}': activation_checkpoint on a 2D model recomputes slice_batch slices at a time; set "
                f"slice_batch as well (e.g. 16). Batch norms inside then see each chunk's statistics."
            )
        model.checkpoint_chunks = True
        return model
    if isinstance(model, PlainUNet):
        net = model.net
        for stage in [net.input_block, *net.downsamples, net.bottleneck, *net.upsamples]:
            _checkpoint_stage(stage)
        return model
    raise ConfigError(
        f"model '{name}': activation_checkpoint is supported for 2D models run slice by slice and for the plain "
        f"UNets (unet3d, unet3d_mn), not for {type(model).__name__}"
    )


def saved_activation_bytes(fn: Callable[[], torch.Tensor]) -> tuple[int, torch.Tensor]:
    """Bytes of distinct tensors autograd keeps for the backward of ``fn()`` (and its output): the activation
    memory a checkpoint saves, measurable on any device. Tensors a checkpoint holds for itself (its inputs) are
    not seen, so compare this figure between settings of one model, not as an absolute peak."""
    seen: dict[tuple, int] = {}

    def pack(t: torch.Tensor):
        key = (t.untyped_storage().data_ptr(), t.device)
        seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out
