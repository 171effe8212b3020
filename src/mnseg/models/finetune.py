"""Fine-tuning strategies for pretrained models: whole, decoder-only, LoRA (via peft).

A model names its pretrained part in ``encoder_module_names`` (dotted
submodule names) and its default LoRA targets in ``lora_target_modules`` (a
peft regex over module names). Everything outside the encoder (decoder, head,
input mapping) always trains. ``train_bias_norm`` (LoRA only) also trains every
bias and every LayerNorm inside the encoder, as M&N's published code does (peft's
``bias="all"`` plus its LayerNorms in ``modules_to_save``); off by default.
The chosen settings are stored on the model as ``finetuning`` so a checkpoint
loader can re-apply them before loading weights.

Batch-norm running statistics inside a frozen encoder still adapt in train mode
(only parameters are frozen): medical images differ from ImageNet and adapted
statistics help; put those layers in eval mode yourself to keep them fixed.
"""

from __future__ import annotations

import torch

from mnseg.errors import ConfigError

STRATEGIES = ("whole", "decoder", "lora")


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared parameters counted once."""
    params = list(model.parameters())  # parameters() already de-duplicates shared tensors
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def apply_finetuning(
    model: torch.nn.Module,
    strategy: str,
    rank: int = 8,
    alpha: float = 16,
    dropout: float = 0.0,
    target_modules=None,
    train_bias_norm: bool = False,
) -> torch.nn.Module:
    """Set which parameters train (and add LoRA adapters for ``lora``); returns the same module.

    Forward contract and ``spatial_dims`` are unchanged. For ``lora`` on a model
    without a declared encoder, the whole model counts as encoder (only LoRA trains);
    ``train_bias_norm`` adds the encoder's biases and LayerNorm weights to what trains.
    """
    from mnseg.models.slicewise import SliceWise

    if isinstance(model, SliceWise):
        apply_finetuning(model.inner, strategy, rank, alpha, dropout, target_modules, train_bias_norm)
        model.finetuning = model.inner.finetuning
        return model
    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown fine-tuning strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    encoder = tuple(getattr(model, "encoder_module_names", ()))
    name = type(model).__name__
    settings = {"strategy": strategy}
    if strategy == "whole":
        model.requires_grad_(True)
    elif strategy == "decoder":
        if not encoder:
            raise ConfigError(f"model {name} has no pretrained encoder to freeze; use strategy 'whole'")
        _set_trainable(model, encoder, train_encoder=lambda _: False)
    else:
        targets = target_modules if target_modules is not None else getattr(model, "lora_target_modules", None)
        if not targets:
            raise ConfigError(f"model {name} has no default LoRA target modules; pass target_modules")
        _inject_lora(model, name, rank, alpha, dropout, targets)
        extra = bias_and_layernorm_names(model) if train_bias_norm else set()
        _set_trainable(model, encoder or ("",), train_encoder=lambda param_name: "lora_" in param_name
                       or param_name in extra)
        settings.update(rank=rank, alpha=alpha, dropout=dropout, target_modules=targets)
        if train_bias_norm:
            settings["train_bias_norm"] = True
    model.finetuning = settings
    return model


def _inject_lora(model, name, rank, alpha, dropout, targets) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    if not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"LoRA rank must be a positive integer, got {rank!r}")
    if not 0.0 <= float(dropout) < 1.0:
        raise ConfigError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=float(dropout), target_modules=targets)
    try:
        inject_adapter_in_model(config, model)
    except ValueError as error:
        raise ConfigError(f"cannot add LoRA to model {name} with target_modules={targets!r}: {error}") from error


def bias_and_layernorm_names(model: torch.nn.Module) -> set[str]:
    """Names of every bias parameter and of every ``torch.nn.LayerNorm``'s parameters (weight and bias)."""
    names = {n for n, _ in model.named_parameters() if n.rsplit(".", 1)[-1] == "bias"}
    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.LayerNorm):
            names.update(f"{module_name}.{n}" if module_name else n for n, _ in module.named_parameters())
    return names


def _set_trainable(model, encoder: tuple[str, ...], train_encoder) -> None:
    """Train every parameter outside ``encoder``; inside it, those for which ``train_encoder(name)``."""
    prefixes = tuple(f"{e}." if e else "" for e in encoder)
    for param_name, param in model.named_parameters():
        inside = any(param_name.startswith(p) for p in prefixes)
        param.requires_grad_(train_encoder(param_name) if inside else True)


# Layers whose weights autocast lowers to bf16 on every call (and, for frozen weights, never caches the cast).
_AUTOCAST_LOWERED = (
    torch.nn.Linear,
    torch.nn.Conv1d,
    torch.nn.Conv2d,
    torch.nn.Conv3d,
    torch.nn.ConvTranspose1d,
    torch.nn.ConvTranspose2d,
    torch.nn.ConvTranspose3d,
)


def cast_frozen_weights(model: torch.nn.Module, dtype: torch.dtype = torch.bfloat16) -> int:
    """Store the frozen (``requires_grad=False``) weights and biases of Linear/Conv layers in ``dtype``, in place;
    returns how many tensors were cast.

    Why: under bf16 autocast every call re-casts fp32 weights (autocast caches casts only of trainable leaves),
    so a frozen backbone run over many slices pays a cast per layer per call, and keeps an fp32 copy it never
    updates. Trainable parameters (LoRA adapters, decoder) and norm layers (autocast runs norms in fp32) keep
    their dtype. The model then needs autocast for its forward: fp32 inputs cannot meet bf16 weights.
    """
    cast = 0
    for module in model.modules():
        if not isinstance(module, _AUTOCAST_LOWERED):
            continue
        for param in module.parameters(recurse=False):
            if not param.requires_grad and param.dtype != dtype and param.is_floating_point():
                param.data = param.data.to(dtype)
                cast += 1
    return cast


def has_frozen_parameters(model: torch.nn.Module) -> bool:
    return any(not p.requires_grad for p in model.parameters())
