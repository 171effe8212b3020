"""A shareable model: one zip of safe weights, the resolved config, plans and a description, no pickle inside.

OUT.zip/
  model.json            format, mnseg and torch versions, method, roles, label names, source checkpoint, epoch
  config.yaml           the run's resolved configuration
  plans.json            the data facts prediction needs (labels, spacing, preprocessing)
  weights.safetensors   every role's weights (``engine/weights.py``)

``mnseg predict -m OUT.zip`` reads the members straight from the zip; nothing is extracted.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import yaml

from mnseg.engine.weights import ModelFiles, read_run_dir, read_weights, weights_bytes
from mnseg.errors import MnsegError
from mnseg.utils.atomic import atomic_path

FORMAT = "mnseg-model"
FORMAT_VERSION = 1
MEMBERS = ("model.json", "config.yaml", "plans.json", "weights.safetensors")
TEXT_LIMIT = 64 * 2**20


def export_model(run_dir: str | Path, out: str | Path, checkpoint: str = "best", overwrite: bool = False) -> dict:
    """Write ``out`` from a run directory's safe weights (never its pickled checkpoints); returns model.json."""
    import torch

    import mnseg

    run_dir, out = Path(run_dir), Path(out)
    if out.exists() and not overwrite:
        raise MnsegError(f"{out}: exists; use --overwrite to replace it")
    files = read_run_dir(run_dir, checkpoint)
    description = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "mnseg_version": mnseg.__version__,
        "torch_version": torch.__version__,
        "method": (files.config.get("method") or {}).get("name"),
        "roles": list(files.weights),
        "checkpoint": Path(files.source).stem,
        "epoch": int(files.meta.get("epoch", -1)),
        "labels": files.plans.get("labels"),
        "num_classes": files.plans.get("num_classes"),
        "in_channels": files.plans.get("in_channels"),
        "trained_with_mnseg": files.meta.get("mnseg"),
    }
    with atomic_path(out, suffix=".zip") as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("model.json", json.dumps(description, indent=2) + "\n")
        zf.writestr("config.yaml", yaml.safe_dump(files.config, sort_keys=False))
        zf.writestr("plans.json", json.dumps(files.plans, indent=2) + "\n")
        zf.writestr("weights.safetensors", weights_bytes(files.weights, description["epoch"]), zipfile.ZIP_STORED)
    return description


def read_zip(path: Path) -> ModelFiles:
    """The model in an exported zip; each problem is one line naming the zip and the member."""
    try:
        with zipfile.ZipFile(path) as zf:
            missing = [m for m in MEMBERS if m not in zf.namelist()]
            if missing:
                raise MnsegError(f"{path}: not an mnseg model zip (missing {', '.join(missing)})")
            big = [m for m in MEMBERS[:3] if zf.getinfo(m).file_size > TEXT_LIMIT]
            if big:  # a description is kilobytes; gigabytes would be a zip bomb
                raise MnsegError(f"{path}:{big[0]}: {zf.getinfo(big[0]).file_size} bytes, too large for a description")
            data = {m: zf.read(m) for m in MEMBERS}
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise MnsegError(f"{path}: not an mnseg run directory or model zip ({type(exc).__name__}: {exc})") from None
    try:
        description = json.loads(data["model.json"])
        config = yaml.safe_load(data["config.yaml"])
        plans = json.loads(data["plans.json"])
    except (ValueError, yaml.YAMLError) as exc:
        raise MnsegError(f"{path}: corrupt model description ({type(exc).__name__}: {exc})") from None
    if not isinstance(description, dict) or description.get("format") != FORMAT:
        raise MnsegError(f"{path}:model.json: not an mnseg model description")
    if description.get("format_version") != FORMAT_VERSION:
        raise MnsegError(
            f"{path}: model format version {description.get('format_version')} is not {FORMAT_VERSION}; "
            f"it needs another mnseg version (exported with {description.get('mnseg_version')})"
        )
    if not isinstance(config, dict) or not isinstance(plans, dict):
        raise MnsegError(f"{path}: config.yaml and plans.json must each hold a mapping")
    where = f"{path}:weights.safetensors"
    models, meta = read_weights(data["weights.safetensors"], where)
    return ModelFiles(where, config, plans, models, meta)
