"""Turn configuration into objects: models (with fine-tuning and slice-wise wrapping), optimisers, augmenters;
and place models on their device with the run's speed options (channels-last memory, bf16 frozen weights)."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import nn

from mnseg.config.schema import ModelConfig, OptimConfig, TrainConfig
from mnseg.errors import ConfigError
from mnseg.utils.precision import uses_bf16

FROZEN_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def build_model(mcfg: ModelConfig, in_channels: int, num_classes: int) -> nn.Module:
    """A model whose forward takes (B, C, X, Y, Z) patches: 2D models are wrapped slice by slice."""
    from mnseg.models import create_model
    from mnseg.models.checkpointing import enable_activation_checkpointing
    from mnseg.models.finetune import apply_finetuning, has_frozen_parameters
    from mnseg.models.slicewise import SliceWise

    frozen_dtype(mcfg)  # a bad value fails before the model is built
    model = create_model(mcfg.name, in_channels=in_channels, num_classes=num_classes, **dict(mcfg.kwargs))
    if mcfg.finetune:
        model = apply_finetuning(
            model, mcfg.finetune, rank=mcfg.lora_rank, alpha=mcfg.lora_alpha, dropout=mcfg.lora_dropout,
            train_bias_norm=mcfg.lora_train_bias_norm,
        )
    if mcfg.frozen_dtype and not has_frozen_parameters(model):
        raise ConfigError(
            f"model '{mcfg.name}': frozen_dtype={mcfg.frozen_dtype!r} needs frozen parameters, but finetune="
            f"{mcfg.finetune!r} trains them all (use finetune lora or decoder, or drop frozen_dtype)"
        )
    if getattr(model, "spatial_dims", 3) == 2:
        model = SliceWise(model, axis=mcfg.slice_axis, slice_batch=mcfg.slice_batch)
    if mcfg.activation_checkpoint:
        enable_activation_checkpointing(model, mcfg.name)
    return model


def input_range(plans: dict) -> str:
    """'unit' when the intensities are CT-windowed to [0, 1], else 'zscore' (how ImageNet inputs are mapped)."""
    from mnseg.data.normalize import resolve_normalization

    method = resolve_normalization(plans.get("preprocess", {}).get("normalization", "auto"), plans.get("modality", ""))
    return "unit" if method == "ct" else "zscore"


def resolve_input_ranges(cfg, plans: dict) -> None:
    """Models that map intensities to ImageNet's input (an ``input_range`` option) get the range of this dataset's
    normalisation unless their kwargs set one; written into the run's config.yaml, so prediction (and a resumed or
    exported run) maps inputs as training did. Runs made before this option keep the z-score mapping they had."""
    from mnseg.models import model_kwargs

    for mcfg in cfg.models.values():
        if "input_range" not in mcfg.kwargs and "input_range" in model_kwargs(mcfg.name):
            mcfg.kwargs = {**mcfg.kwargs, "input_range": input_range(plans)}


def add_method_roles(cfg) -> None:
    """Model sections a method adds to itself (DANN's domain classifier, from the ``domain`` settings), put into
    ``cfg`` before the run's config.yaml is written, so that file shows every model the run trains; building adds
    the same section when it is missing (runs made before this)."""
    from mnseg.methods import method_class
    from mnseg.methods.domain_adaptation import adapted

    adapted(method_class(cfg.method.name), cfg)


def frozen_dtype(mcfg: ModelConfig) -> torch.dtype | None:
    """The dtype of ``mcfg.frozen_dtype`` (None when unset); ConfigError for anything but bfloat16."""
    if mcfg.frozen_dtype is None:
        return None
    if mcfg.frozen_dtype not in FROZEN_DTYPES:
        raise ConfigError(
            f"model '{mcfg.name}': frozen_dtype={mcfg.frozen_dtype!r} is not supported; use 'bfloat16' (the "
            "autocast dtype) or leave it unset"
        )
    return FROZEN_DTYPES[mcfg.frozen_dtype]


def uses_bf16_autocast(tcfg: TrainConfig, device: torch.device) -> bool:
    """Whether the trainer runs forwards under bf16 autocast (``mnseg.utils.precision``: CUDA with ``train.amp``,
    a CPU with native bf16 with ``train.cpu_amp`` too)."""
    return uses_bf16(device, tcfg.amp, tcfg.cpu_amp)


def to_channels_last(obj):
    """A tensor, or every 4D/5D parameter and buffer of a module (in place), in channels-last memory format:
    ``channels_last_3d`` for 5D tensors (3D convolutions), ``channels_last`` for 4D ones (2D convolutions), so a
    slice-wise 2D model and a 3D model each get their own. cuDNN then skips its NCDHW->NDHWC conversions.
    Other tensors are returned unchanged. Values are unchanged; only strides differ."""

    def convert(t: torch.Tensor) -> torch.Tensor:
        if t.dim() == 5:
            return t.contiguous(memory_format=torch.channels_last_3d)
        if t.dim() == 4:
            return t.contiguous(memory_format=torch.channels_last)
        return t

    if isinstance(obj, nn.Module):
        return obj._apply(convert)
    return convert(obj)


def place_model(model: nn.Module, mcfg: ModelConfig, tcfg: TrainConfig, device: torch.device) -> nn.Module:
    """Move a built model to ``device`` and apply the run's speed options (all off by default).

    ``train.compile`` is not applied here but by the trainer (``compile_forward``), so prediction never compiles.
    ``train.channels_last``: weights in channels-last memory format. ``mcfg.frozen_dtype``: frozen Linear/Conv
    weights stored in bf16, only where forwards run under bf16 autocast (CUDA with ``train.amp``); elsewhere
    (CPU, amp off) the option is ignored, as ``train.amp`` is on the CPU, because fp32 inputs cannot meet bf16
    weights without autocast. Checkpoints load either way (``load_state_dict`` copies into each parameter's dtype).
    """
    from mnseg.models.finetune import cast_frozen_weights

    model = model.to(device)
    if tcfg.channels_last:
        to_channels_last(model)
    dtype = frozen_dtype(mcfg)
    if dtype is not None and uses_bf16_autocast(tcfg, device):
        cast_frozen_weights(model, dtype)
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
        return torch.optim.SGD(
            params, lr=ocfg.lr, momentum=ocfg.momentum, nesterov=ocfg.nesterov, weight_decay=ocfg.weight_decay
        )
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


def build_method(cfg, plans: dict, device: torch.device, n_labeled: int = 0, n_unlabeled: int = 0,
                 class_shares: tuple[float, ...] | None = None):
    """The configured method and its models, built on the CPU, neither placed nor attached: ``(method, models)``
    with one model per role the method declares. The trainer and ``load_run`` both start here; ``class_shares``
    (the labelled voxels' class shares, see ``labelled_class_shares``) only the trainer knows."""
    from mnseg.methods import method_class
    from mnseg.methods.base import MethodContext
    from mnseg.methods.domain_adaptation import adapted

    cls = method_class(cfg.method.name)
    missing = set(cls.default_models) - set(cfg.models)
    if missing:
        raise ConfigError(
            f"method '{cls.name}' needs model roles {sorted(cls.default_models)}; config has "
            f"{sorted(cfg.models)} (start from its preset: --config {cls.name})"
        )
    cls = adapted(cls, cfg)  # domain.*: the domain terms added to any method's step (and DANN's classifier role)
    ctx = MethodContext(
        num_classes=plans["num_classes"],
        in_channels=plans["in_channels"],
        ignore_index=plans["ignore_label"],
        batch_size=cfg.train.batch_size,
        epochs=cfg.train.epochs,
        iters_per_epoch=cfg.train.iters_per_epoch,
        n_labeled=n_labeled,
        n_unlabeled=n_unlabeled,
        device=device,
        class_shares=class_shares,
    )
    method = cls(cfg, ctx)
    models: dict[str, nn.Module] = {}
    for role in cls.default_models:
        mcfg = cfg.models[role]
        derived = method.derived_kwargs(role, models)
        if derived:
            mcfg = dataclasses.replace(mcfg, kwargs={**mcfg.kwargs, **derived})
        models[role] = build_model(mcfg, plans["in_channels"], plans["num_classes"])
    return method, models


def labelled_class_shares(labels, num_classes: int, ignore_index: int | None) -> tuple[float, ...]:
    """Each class's share of the voxels of ``labels`` (label arrays), the ignore label left out: how rare a class
    is in what the run learns from (class values outside 0..num_classes-1 are the dataset check's to refuse)."""
    counts = np.zeros(num_classes, dtype=np.int64)
    for label in labels:
        values = np.asarray(label).ravel()
        if ignore_index is not None:
            values = values[values != ignore_index]
        counts += np.bincount(values.astype(np.int64), minlength=num_classes)[:num_classes]
    total = counts.sum()
    return tuple(float(c) / total if total else 0.0 for c in counts)
