"""Checkpoints: models, optimisers, schedulers, method state and every RNG, written atomically.

Written so ``torch.load(weights_only=True)`` reads them back: only tensors, numbers, strings and containers.
NumPy values (RNG and sampler states, M&N's foreground coordinates) are encoded as tensors or plain numbers,
since unpickling anything else could run code hidden in a file someone was given. Files from earlier mnseg
versions (full pickles) are refused with the way to convert them (``engine/legacy.py``).
"""

from __future__ import annotations

import pickle
import random
import re
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from mnseg.errors import MnsegError
from mnseg.utils.atomic import atomic_torch_save

FORMAT_VERSION = 2  # 1: a full pickle (mnseg 0.1.0 before safe checkpoints)
_ARRAY, _SCALAR = "__mnseg_ndarray__", "__mnseg_npscalar__"
_PLAIN = (str, int, float, bool, bytes, type(None), torch.dtype, torch.device, torch.Size)


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


def to_safe(obj, where: str = "checkpoint"):
    """``obj`` with NumPy arrays and scalars encoded; anything a weights-only load would refuse raises.

    Containers are rebuilt only where something below them changed (a state dict keeps its ``_metadata``).
    """
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in "biuf":
            raise MnsegError(f"{where}: a NumPy array of dtype {obj.dtype} cannot be stored safely")
        arr = np.ascontiguousarray(obj)
        if arr.dtype.kind == "u" and arr.itemsize > 1:  # old torch lacks uint16/32/64: keep the bits as signed
            arr = arr.view(f"i{arr.itemsize}")
        return {_ARRAY: torch.from_numpy(arr.copy()), "dtype": obj.dtype.str}
    if isinstance(obj, np.generic):  # before the plain types: np.float64 subclasses float yet pickles as NumPy
        if obj.dtype.kind not in "biuf":
            raise MnsegError(f"{where}: a NumPy value of dtype {obj.dtype} cannot be stored safely")
        return {_SCALAR: obj.item(), "dtype": obj.dtype.str}
    if isinstance(obj, torch.Tensor) or type(obj) in _PLAIN:
        return obj
    if type(obj) in (dict, OrderedDict):
        out = {k: to_safe(v, f"{where}[{k!r}]") for k, v in obj.items()}
        bad = [k for k in out if type(k) not in _PLAIN]
        if bad:
            raise MnsegError(f"{where}: key {bad[0]!r} ({type(bad[0]).__name__}) cannot be stored safely")
        return obj if all(out[k] is obj[k] for k in obj) else type(obj)(out)
    if type(obj) in (list, tuple, set, frozenset):
        items = [to_safe(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return obj if all(a is b for a, b in zip(items, obj)) else type(obj)(items)
    raise MnsegError(
        f"{where}: a {type(obj).__module__}.{type(obj).__qualname__} cannot be stored in a checkpoint that loads "
        f"without running code; store it as tensors, numbers, strings, lists or dicts"
    )


def from_safe(obj):
    """Undo ``to_safe``: encoded NumPy values come back with their dtypes, bit for bit."""
    if type(obj) in (dict, OrderedDict):
        if len(obj) == 2 and "dtype" in obj and (_ARRAY in obj or _SCALAR in obj):
            dtype = np.dtype(obj["dtype"])
            if _SCALAR in obj:
                return dtype.type(obj[_SCALAR])
            arr = obj[_ARRAY].cpu().numpy()
            return arr.view(dtype) if arr.dtype.itemsize == dtype.itemsize and arr.dtype != dtype else arr
        out = {k: from_safe(v) for k, v in obj.items()}
        return obj if all(out[k] is obj[k] for k in obj) else type(obj)(out)
    if type(obj) in (list, tuple):
        items = [from_safe(v) for v in obj]
        return obj if all(a is b for a, b in zip(items, obj)) else type(obj)(items)
    return obj


def save_checkpoint(path: Path, **payload) -> None:
    atomic_torch_save(to_safe({"format_version": FORMAT_VERSION, **payload}, Path(path).name), path)


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    """Read a checkpoint without running code: a file holding anything but tensors and plain data is refused."""
    path = Path(path)
    if not path.exists():
        raise MnsegError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" not in str(exc) and "Unsupported global" not in str(exc):
            raise MnsegError(f"{path}: cannot read checkpoint (UnpicklingError: {exc})") from None
        raise MnsegError(unsafe_message(path, unsafe_globals(path, str(exc)))) from None
    except Exception as exc:  # noqa: BLE001 - any other failure means a corrupt file
        raise MnsegError(f"{path}: cannot read checkpoint ({type(exc).__name__}: {exc})") from None
    if isinstance(ckpt, dict) and ckpt.get("format_version") == 1:
        raise MnsegError(unsafe_message(path, []))
    if not isinstance(ckpt, dict) or ckpt.get("format_version") != FORMAT_VERSION:
        raise MnsegError(f"{path}: not an mnseg checkpoint (or from an incompatible version)")
    return from_safe(ckpt)


def unsafe_globals(path: Path, message: str = "") -> list[str]:
    """The Python objects a pickle would import, read from its opcodes without running it."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # noqa: BLE001 - older torch, or an unreadable file: the error message names one
        return re.findall(r"GLOBAL (\S+)", message)[:1]


def unsafe_message(path: Path, names: list[str]) -> str:
    """One line: what the file holds, why it is not loaded, and how to convert it if it is an old mnseg file."""
    from mnseg.engine.legacy import is_numpy_only
    from mnseg.engine.run_dir import RunDir

    run_dir = RunDir.of_checkpoint(path)
    if is_numpy_only(names):
        return (
            f"{path}: written by an earlier mnseg as a full pickle, which could run code when loaded, so it is "
            f"not read; convert the run once (no code runs): mnseg convert-checkpoint {run_dir}"
        )
    names = [n for n in names if not is_numpy_only([n])]  # the ones that are not an old mnseg's
    return (
        f"{path}: holds pickled Python objects ({', '.join(names[:5]) or 'unknown'}) and loading it could run "
        f"arbitrary code, so mnseg refuses it; only if you trust where it came from: "
        f"mnseg convert-checkpoint {run_dir} --trust"
    )


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP / torch.compile wrappers, whose state_dict keys are stable."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model
