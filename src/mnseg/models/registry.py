"""Model registry (timm style) and the shape helpers every model family shares.

A family file decorates a factory ``f(in_channels, num_classes, **kwargs)`` with
``@register_model("name")``; the engine builds models only through
``create_model(name, ...)``, so configs name models by string and a bad name or
option becomes a ``ConfigError`` the user can read instead of a ``TypeError``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
import torch.nn.functional as F

from mnseg.errors import ConfigError

_REGISTRY: dict[str, Callable[..., torch.nn.Module]] = {}


def register_model(name: str):
    """Decorator: make a factory available to ``create_model`` under ``name``."""

    def decorate(factory: Callable[..., torch.nn.Module]):
        if name in _REGISTRY and _REGISTRY[name] is not factory:
            raise ValueError(f"model name {name!r} is registered twice")
        _REGISTRY[name] = factory
        return factory

    return decorate


def list_models() -> list[str]:
    """Names accepted by ``create_model``, sorted."""
    return sorted(_REGISTRY)


def model_kwargs(name: str) -> list[str]:
    """Keyword options the factory of ``name`` accepts besides in_channels/num_classes."""
    factory = _factory(name)
    params = inspect.signature(factory).parameters
    return [p for p in params if p not in ("in_channels", "num_classes")]


def create_model(name: str, in_channels: int = 1, num_classes: int = 2, **kwargs) -> torch.nn.Module:
    """Build a registered model; unknown names or options raise ``ConfigError``."""
    factory = _factory(name)
    accepted = model_kwargs(name)
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ConfigError(
            f"model {name!r} does not accept option(s) {', '.join(unknown)}; "
            f"accepted: {', '.join(accepted) or '(none)'}"
        )
    if not isinstance(in_channels, int) or in_channels < 1:
        raise ConfigError(f"model {name!r}: in_channels must be a positive integer, got {in_channels!r}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"model {name!r}: num_classes must be a positive integer, got {num_classes!r}")
    return factory(in_channels=in_channels, num_classes=num_classes, **kwargs)


def _factory(name: str) -> Callable[..., torch.nn.Module]:
    if name not in _REGISTRY:
        raise ConfigError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    return _REGISTRY[name]


# --- shape helpers: networks with strided stages need sizes divisible by a power of two ---------------


def pad_to_multiple(
    x: torch.Tensor, multiple: int, spatial_dims: int, minimum: int = 0
) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Zero-pad the last ``spatial_dims`` axes at their far end up to a multiple of ``multiple``
    (and to at least ``minimum``).

    Zero is the mean of a z-scored image, so the padding looks like "average
    tissue" rather than a bright edge. Returns the padded tensor and the
    original spatial size for ``crop_spatial``.
    """
    size = tuple(x.shape[-spatial_dims:])
    extra = [max(s + (-s) % multiple, minimum) - s for s in size]
    if not any(extra):
        return x, size
    pad: list[int] = []
    for e in reversed(extra):  # F.pad lists the last axis first
        pad += [0, e]
    return F.pad(x, pad), size


def crop_spatial(x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Undo ``pad_to_multiple``: keep the first ``size`` voxels of each spatial axis."""
    if tuple(x.shape[-len(size) :]) == tuple(size):
        return x
    index = (Ellipsis, *(slice(0, s) for s in size))
    return x[index]


def padded_forward(net: torch.nn.Module, x: torch.Tensor, multiple: int, spatial_dims: int) -> torch.Tensor:
    """``net`` on ``x`` padded to a multiple of ``multiple``, cropped back to ``x``'s size.

    At least 2 voxels per axis reach the bottleneck (``minimum = 2 * multiple``):
    instance and batch norm fail on a single voxel.
    """
    padded, size = pad_to_multiple(x, multiple, spatial_dims, minimum=2 * multiple)
    return crop_spatial(net(padded), size)


def check_choice(model: str, option: str, value, choices) -> None:
    """Raise ``ConfigError`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ConfigError(
            f"model {model!r}: {option}={value!r} is not allowed; choose one of {', '.join(map(str, choices))}"
        )
