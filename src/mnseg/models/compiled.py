"""torch.compile for training (``train.compile``), with the module left as it was for everything else.

Why not ``torch.compile(model)``: that returns a wrapper whose parameter names gain an ``_orig_mod.`` prefix,
and methods reach into their models (EMA teachers copy state dicts and walk parameters, M&N deep-copies its
models into frozen pseudo-mask generators, the adversarial method calls its discriminator functionally). Here the
module keeps its class lineage, names and state dict; only its ``forward`` runs through a compiled function,
made lazily per instance. A deep copy (an EMA teacher, a generator) drops the compiled function and compiles its
own on first use, so a copy never runs the original's weights.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["compile_forward", "is_compiled"]

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")


class _CompiledForward:
    """Mixed into a module's own class: ``forward`` goes through ``torch.compile`` of the class's forward."""

    _compile_mode: str | None = None

    def forward(self, *args, **kwargs):
        compiled = self.__dict__.get("_compiled_forward")
        if compiled is None:
            compiled = torch.compile(super().forward, mode=self._compile_mode)
            self.__dict__["_compiled_forward"] = compiled
        return compiled(*args, **kwargs)

    def __getstate__(self):
        state = super().__getstate__()
        state = dict(state)
        state.pop("_compiled_forward", None)  # bound to this instance: a copy compiles its own
        return state


_CLASSES: dict[type, type] = {}


def compile_forward(model: nn.Module, mode: str = "default") -> nn.Module:
    """Make ``model`` (in place; also returned) run its forward through ``torch.compile``; compilation happens at the
    first call. ``mode`` is torch.compile's (default, reduce-overhead, max-autotune)."""
    if mode not in COMPILE_MODES:
        from mnseg.errors import ConfigError

        raise ConfigError(f"unknown compile mode '{mode}'; choose one of {', '.join(COMPILE_MODES)}")
    cls = type(model)
    if not issubclass(cls, _CompiledForward):
        if cls not in _CLASSES:
            _CLASSES[cls] = type(f"Compiled{cls.__name__}", (_CompiledForward, cls), {})
        model.__class__ = _CLASSES[cls]
    model._compile_mode = None if mode == "default" else mode
    model.__dict__.pop("_compiled_forward", None)
    return model


def is_compiled(model: nn.Module) -> bool:
    return isinstance(model, _CompiledForward)
