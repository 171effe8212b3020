"""One-time conversion of run directories written before safe checkpoints (full pickles) to the safe formats.

An old ``last.pt`` / ``best.pt`` pickles NumPy arrays (the RNG states), nothing else beyond tensors. Such a
file is read with a weights-only load that allows exactly NumPy's array and scalar rebuilders, so no code
runs. A file that needs anything more is converted only with ``trust=True`` (a full unpickle the user vouched
for). The result: ``<tag>.pt`` rewritten in the safe format and ``<tag>.safetensors`` beside it.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from mnseg.engine.checkpoint import FORMAT_VERSION, load_checkpoint, save_checkpoint, unsafe_globals
from mnseg.engine.run_dir import RunDir
from mnseg.engine.weights import save_weights
from mnseg.errors import MnsegError


def _numpy_globals() -> list:
    core = np._core if hasattr(np, "_core") else np.core
    rebuild, scalar = core.multiarray._reconstruct, core.multiarray.scalar
    out = [rebuild, scalar, np.ndarray, np.dtype]
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):  # files from NumPy 1 and 2
        out += [(rebuild, f"{module}._reconstruct"), (scalar, f"{module}.scalar")]
    out += [type(np.dtype(t)) for t in "?bBhHiIlLqQefdgFD" if type(np.dtype(t)) is not np.dtype]
    return out


def _names(entry) -> str:
    return entry[1] if isinstance(entry, tuple) else f"{entry.__module__}.{entry.__qualname__}"


NUMPY_NAMES = frozenset(_names(g) for g in _numpy_globals()) | {
    "numpy.dtype", "numpy.ndarray", "numpy.core.multiarray._reconstruct", "numpy.core.multiarray.scalar",
    "numpy._core.multiarray._reconstruct", "numpy._core.multiarray.scalar",
}


def is_numpy_only(names) -> bool:
    return all(n in NUMPY_NAMES or n.startswith("numpy.dtypes.") for n in names)


def read_old_checkpoint(path: Path, trust: bool = False) -> dict:
    """An old checkpoint's payload, read without running code unless ``trust``."""
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" not in str(exc) and "Unsupported global" not in str(exc):
            raise MnsegError(f"{path}: cannot read checkpoint (UnpicklingError: {exc})") from None
        names = [n for n in unsafe_globals(path, str(exc)) if not is_numpy_only([n])]
        if not trust:
            raise MnsegError(
                f"{path}: holds pickled Python objects beyond tensors and NumPy arrays "
                f"({', '.join(names[:5]) or 'unknown'}); loading it could run arbitrary code, so it is not "
                f"converted. Only if you trust where it came from: add --trust"
            ) from None
    except Exception as exc:  # noqa: BLE001 - truncated or not a torch file
        raise MnsegError(f"{path}: cannot read checkpoint ({type(exc).__name__}: {exc})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)  # the user vouched for this file
    except Exception as exc:  # noqa: BLE001
        raise MnsegError(f"{path}: cannot read checkpoint ({type(exc).__name__}: {exc})") from None


def convert_run(run_dir: str | Path, trust: bool = False, log: Callable[[str], object] = print) -> list[Path]:
    """Rewrite a run directory's checkpoints in the safe formats; returns the files written."""
    run = RunDir(run_dir)
    run.read_config()  # an mnseg run directory, or say it is not
    written: list[Path] = []
    found = [tag for tag in ("last", "best") if run.checkpoint(tag).exists()]
    if not found:
        names = ", ".join(run.checkpoint(t).name for t in ("last", "best"))
        raise MnsegError(f"{run.checkpoints}: no checkpoints ({names}) to convert")
    for tag in found:
        path = run.checkpoint(tag)
        ckpt = read_old_checkpoint(path, trust)
        if not isinstance(ckpt, dict) or ckpt.get("format_version") not in (1, FORMAT_VERSION) or "models" not in ckpt:
            raise MnsegError(f"{path}: not an mnseg checkpoint (or from an incompatible version)")
        if ckpt["format_version"] == FORMAT_VERSION and run.weights(tag).exists():
            log(f"{path}: already in the safe format")
            continue
        payload = {k: v for k, v in ckpt.items() if k != "format_version"}
        save_weights(run.weights(tag), payload["models"], int(payload.get("epoch", 0)))
        save_checkpoint(path, **payload)
        load_checkpoint(path)  # reads back with weights_only=True, or says why not
        written += [run.weights(tag), path]
        log(f"converted {path} (and wrote {run.weights(tag).name})")
    return written
