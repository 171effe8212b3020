"""Turn configuration into objects: models (with fine-tuning and slice-wise wrapping), optimisers, augmenters."""

from __future__ import annotations

import torch
from torch import nn

from mnseg.config import ModelConfig, OptimConfig
from mnseg.errors import ConfigError


def build_model(mcfg: ModelConfig, in_channels: int, num_classes: int) -> nn.Module:
    """A model whose forward takes (B, C, X, Y, Z) patches: 2D models are wrapped slice by slice."""
    from mnseg.models import create_model
    from mnseg.models.finetune import apply_finetuning
    from mnseg.models.slicewise import SliceWise

    model = create_model(mcfg.name, in_channels=in_channels, num_classes=num_classes, **dict(mcfg.kwargs))
    if mcfg.finetune:
        model = apply_finetuning(
            model, mcfg.finetune, rank=mcfg.lora_rank, alpha=mcfg.lora_alpha, dropout=mcfg.lora_dropout
        )
    if getattr(model, "spatial_dims", 3) == 2:
        model = SliceWise(model, axis=mcfg.slice_axis, slice_batch=mcfg.slice_batch)
    return model


def build_optimizer(model: nn.Module, ocfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("a trained model has no trainable parameters (check its fine-tuning strategy)")
    fused = {"fused": True} if device.type == "cuda" else {}
    name = ocfg.name.lower()
    if name == "adamw":
        return torch.optim.AdamW(params, lr=ocfg.lr, weight_decay=ocfg.weight_decay, **fused)
    if name == "adam":
        return torch.optim.Adam(params, lr=ocfg.lr, weight_decay=ocfg.weight_decay, **fused)
    if name == "sgd":
        return torch.optim.SGD(params, lr=ocfg.lr, momentum=0.99, nesterov=True, weight_decay=ocfg.weight_decay)
    raise ConfigError(f"unknown optimiser '{ocfg.name}' (adamw, adam, sgd)")


def build_augmenter(mcfg: ModelConfig):
    from mnseg.data.augment import AugmentConfig, Augmenter

    presets = {
        "conservative_3d": AugmentConfig.conservative_3d,
        "strong_2d": AugmentConfig.strong_2d,
        "none": AugmentConfig.none,
    }
    if mcfg.augment.preset not in presets:
        raise ConfigError(f"unknown augmentation preset '{mcfg.augment.preset}' ({', '.join(presets)})")
    base = presets[mcfg.augment.preset]().to_dict()
    base.update(mcfg.augment.overrides or {})
    config = AugmentConfig.from_dict(base)
    # Patches are 3D for every model; 2D models see them slice by slice afterwards.
    return Augmenter(config, spatial_dims=3)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda asked for, but no CUDA device is available")
    return torch.device(name)
