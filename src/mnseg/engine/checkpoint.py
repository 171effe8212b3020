"""Checkpoints: models, optimisers, schedulers, method state and every RNG, written atomically."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from mnseg.errors import MnsegError
from mnseg.utils.atomic import atomic_torch_save

FORMAT_VERSION = 1


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore every RNG. The states go back to the CPU first: a checkpoint loaded with
    ``map_location="cuda"`` carries them as CUDA tensors, which torch refuses as RNG states."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def save_checkpoint(path: Path, **payload) -> None:
    atomic_torch_save({"format_version": FORMAT_VERSION, **payload}, path)


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    if not Path(path).exists():
        raise MnsegError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a corrupt file
        raise MnsegError(f"{path}: cannot read checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format_version") != FORMAT_VERSION:
        raise MnsegError(f"{path}: not an mnseg checkpoint (or from an incompatible version)")
    return ckpt


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP / torch.compile wrappers, whose state_dict keys are stable."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model
