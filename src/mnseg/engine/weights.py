"""Inference weights as safetensors: tensors plus a JSON header, so reading them cannot run code.

``RUN_DIR/checkpoints/<tag>.safetensors`` holds every role's state dict (keys ``role/param``) beside the
training checkpoint ``<tag>.pt``. Prediction and export read these, the run's ``config.yaml`` and
``plans.json`` (or the same inside an exported zip, ``engine/export.py``), and nothing else.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mnseg.errors import MnsegError
from mnseg.utils.atomic import atomic_path

FORMAT = "mnseg-weights-1"
SEP = "/"


def flatten(models: dict[str, dict]) -> dict[str, torch.Tensor]:
    """``{role: state_dict}`` -> ``{"role/param": tensor}``, each a contiguous CPU copy (safetensors refuses shared
    or strided storage)."""
    tensors = {}
    for role, state in models.items():
        if SEP in role:
            raise MnsegError(f"model role {role!r}: a role name cannot contain {SEP!r}")
        for key, value in state.items():
            if not isinstance(value, torch.Tensor):
                raise MnsegError(f"model '{role}': state entry {key} is a {type(value).__name__}, not a tensor")
            tensors[f"{role}{SEP}{key}"] = value.detach().cpu().clone(memory_format=torch.contiguous_format)
    return tensors


def weights_metadata(roles, epoch: int) -> dict[str, str]:
    import mnseg

    return {"format": FORMAT, "roles": json.dumps(list(roles)), "epoch": str(int(epoch)), "mnseg": mnseg.__version__}


def save_weights(path: str | Path, models: dict[str, dict], epoch: int) -> None:
    from safetensors.torch import save_file

    tensors = flatten(models)
    with atomic_path(path, suffix=".tmp") as tmp:
        save_file(tensors, str(tmp), metadata=weights_metadata(models, epoch))


def weights_bytes(models: dict[str, dict], epoch: int) -> bytes:
    from safetensors.torch import save

    return save(flatten(models), metadata=weights_metadata(models, epoch))


def read_weights(data: bytes, where: str) -> tuple[dict[str, dict], dict]:
    """``(state dicts by role, header metadata)`` from the bytes of a weights file; ``where`` names it in errors."""
    from safetensors.torch import load

    try:
        size = struct.unpack("<Q", data[:8])[0]
        meta = json.loads(data[8 : 8 + size]).get("__metadata__") or {}
        tensors = load(data)
    except Exception as exc:  # noqa: BLE001 - truncated or not safetensors at all
        raise MnsegError(f"{where}: cannot read weights ({type(exc).__name__}: {exc})") from None
    if meta.get("format") != FORMAT:
        raise MnsegError(f"{where}: not mnseg weights (format {meta.get('format')!r}, expected {FORMAT!r})")
    try:
        roles = [str(r) for r in json.loads(meta["roles"])]
    except (KeyError, TypeError, ValueError):
        raise MnsegError(f"{where}: corrupt header (no list of model roles)") from None
    models: dict[str, dict] = {role: {} for role in roles}
    for key, value in tensors.items():
        role, _, name = key.partition(SEP)
        if role not in models:
            raise MnsegError(f"{where}: tensor {key} belongs to no model role listed in the header ({roles})")
        models[role][name] = value
    return models, meta


@dataclass
class ModelFiles:
    """What prediction needs, from a run directory or an exported zip."""

    source: str  # the weights file, for messages
    config: dict
    plans: dict
    weights: dict[str, dict]
    meta: dict = field(default_factory=dict)


def open_model(path: str | Path, checkpoint: str = "best") -> ModelFiles:
    """A run directory's weights ('best' falls back to 'last'), or an exported zip (which holds one set)."""
    path = Path(path)
    if path.is_file():
        from mnseg.engine.export import read_zip

        return read_zip(path)
    return read_run_dir(path, checkpoint)


def read_run_dir(run_dir: Path, checkpoint: str = "best") -> ModelFiles:
    from mnseg.engine.run_dir import RunDir

    run = RunDir(run_dir)
    config, plans = run.read_config(), run.read_plans()
    tags = [checkpoint, "last"] if checkpoint == "best" else [checkpoint]
    for tag in tags:
        if run.weights(tag).exists():
            where = run.weights(tag)
            models, meta = read_weights(where.read_bytes(), str(where))
            return ModelFiles(str(where), config, plans, models, meta)
    old = [run.checkpoint(t) for t in tags if run.checkpoint(t).exists()]
    if old:
        raise MnsegError(
            f"{old[0]}: a checkpoint from an earlier mnseg, without the safe weights file "
            f"{run.weights(tags[0]).name} beside it (predict and export never open a pickle: it could "
            f"run code); convert the run once: mnseg convert-checkpoint {run_dir}"
        )
    raise MnsegError(f"{run.checkpoints}: no weights ({' or '.join(run.weights(t).name for t in tags)})")
