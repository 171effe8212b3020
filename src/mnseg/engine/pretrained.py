"""``models.<role>.init=PATH``: a model starts training from pretrained weights, matched by name.

PATH may be a run directory (its best weights, else its last), a run's ``checkpoints/<tag>.pt`` or
``<tag>.safetensors`` (a ``mnseg pretrain`` run's, or any method's), an exported model zip, or a plain state dict
(``.pt``/``.pth`` read with ``weights_only=True``, or ``.safetensors``). Nothing read here can run code: a pickle
holding anything but tensors and plain data is refused.

A file holding several roles (``net`` and ``head`` of a pretrain run, ``student`` and ``teacher``) gives the role
``init_role`` names, else the role of the same name, else the one whose weights match the most by name and shape.
Leading ``module.`` / ``_orig_mod.`` (DDP, torch.compile) are stripped from the file's names. Every weight of the
model (parameters and persistent buffers; tensors shared under two names count once) is either copied from the
file, or listed in the log line as missing from the file or of another shape, and left as initialised; the file's
names the model lacks are listed too. A file of which nothing matches is a ``ConfigError``, as is a missing or
unreadable file. Applied once, when a run starts (never on resume, never at prediction).
"""

from __future__ import annotations

import json
import pickle
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from mnseg.errors import ConfigError, MnsegError

WRAPPER_PREFIXES = ("module.", "_orig_mod.")


@dataclass
class InitReport:
    source: str
    role: str | None  # the file's role the weights came from (None: a plain state dict)
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # the model's weights not in the file
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)  # (name, file shape, model shape)
    unused: list[str] = field(default_factory=list)  # the file's weights the model has no place for

    @property
    def complete(self) -> bool:
        return not self.missing and not self.mismatched

    def line(self, target: str) -> str:
        """One log line; it starts with 'warning:' when a weight of the model was left as initialised."""
        total = len(self.loaded) + len(self.missing) + len(self.mismatched)
        role = f" (role {self.role})" if self.role else ""
        parts = [f"{target}.init: {len(self.loaded)} of {total} weights from {self.source}{role}"]
        if self.missing:
            parts.append("not in the file, left as initialised: " + ", ".join(self.missing))
        if self.mismatched:
            parts.append("shape differs, left as initialised: " + ", ".join(
                f"{n} (file {_shape(a)}, model {_shape(b)})" for n, a, b in self.mismatched))
        if self.unused:
            parts.append("in the file but not in the model: " + ", ".join(self.unused))
        return ("" if self.complete else "warning: ") + "; ".join(parts)


def _shape(shape: tuple) -> str:
    return "x".join(str(s) for s in shape) or "scalar"


# --- reading ----------------------------------------------------------------------------------------------
def read_states(path: str | Path, target: str) -> tuple[dict[str, dict], str]:
    """(role -> state dict, the file read); a plain state dict is role ''. ConfigError naming the file."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{target}.init: {path}: no such file or run directory")
    try:
        if path.is_dir() or path.suffix == ".zip":
            from mnseg.engine.weights import open_model

            files = open_model(path)
            return files.weights, files.source
        if path.suffix == ".safetensors":
            return _read_safetensors(path), str(path)
        return _read_pickle(path), str(path)
    except MnsegError as exc:
        raise ConfigError(f"{target}.init: {_one_line(exc)}") from None
    except OSError as exc:
        raise ConfigError(f"{target}.init: {path}: cannot read ({exc.strerror or exc})") from None


def _one_line(exc: Exception) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _read_safetensors(path: Path) -> dict[str, dict]:
    from safetensors.torch import load

    from mnseg.engine.weights import FORMAT, read_weights

    data = path.read_bytes()
    try:
        size = struct.unpack("<Q", data[:8])[0]
        meta = json.loads(data[8: 8 + size]).get("__metadata__") or {}
    except Exception as exc:  # noqa: BLE001 - truncated, or not safetensors at all
        raise MnsegError(f"{path}: cannot read weights ({type(exc).__name__}: {_one_line(exc)})") from None
    if meta.get("format") == FORMAT:
        return read_weights(data, str(path))[0]
    try:
        return {"": load(data)}
    except Exception as exc:  # noqa: BLE001
        raise MnsegError(f"{path}: cannot read weights ({type(exc).__name__}: {_one_line(exc)})") from None


def _read_pickle(path: Path) -> dict[str, dict]:
    """An mnseg checkpoint (its ``models``), or a plain state dict (possibly under ``state_dict`` / ``model``)."""
    from mnseg.engine.checkpoint import FORMAT_VERSION, load_checkpoint, unsafe_globals

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        names = ", ".join(unsafe_globals(path, str(exc))[:3]) or "unknown objects"
        raise MnsegError(f"{path}: holds pickled Python objects ({names}); loading it could run code, so it is "
                         "not read (give a state dict of tensors, or a .safetensors file)") from None
    except Exception as exc:  # noqa: BLE001 - any other failure: not a torch file, or a corrupt one
        raise MnsegError(f"{path}: cannot read weights ({type(exc).__name__}: {_one_line(exc)})") from None
    if isinstance(obj, dict) and obj.get("format_version") == FORMAT_VERSION:
        return load_checkpoint(path)["models"]
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise MnsegError(f"{path}: not a state dict (a mapping of names to tensors) nor an mnseg checkpoint")
    return {"": obj}


# --- matching ---------------------------------------------------------------------------------------------
def model_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and persistent buffer once, by its first name (a tensor shared by two modules, as DynUNet's
    skip layers share its blocks, has two names in the state dict)."""
    persistent = set(model.state_dict())
    named = [*model.named_parameters(), *model.named_buffers()]
    return {name: t for name, t in named if name in persistent}


def strip_wrappers(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        name = key
        while name.startswith(WRAPPER_PREFIXES):
            name = name.split(".", 1)[1]
        out[name] = value
    return out


def matches(state: dict, weights: dict) -> int:
    return sum(1 for n, t in weights.items() if n in state and tuple(state[n].shape) == tuple(t.shape))


def pick_role(states: dict[str, dict], role: str, weights: dict, wanted: str | None, target: str) -> str:
    if wanted is not None:
        if wanted not in states:
            raise ConfigError(f"{target}.init_role: the file holds no role {wanted!r} (its roles: "
                              f"{', '.join(sorted(states))})")
        return wanted
    if len(states) == 1:
        return next(iter(states))
    if role in states:
        return role
    return max(states, key=lambda r: matches(strip_wrappers(states[r]), weights))


@torch.no_grad()
def load_by_name(model: nn.Module, state: dict, source: str = "", role: str | None = None) -> InitReport:
    """Copy every weight of ``model`` found in ``state`` by name and shape; report the rest (see module doc)."""
    state = strip_wrappers(state)
    weights = model_weights(model)
    report = InitReport(source, role or None)
    for name, tensor in weights.items():
        if name not in state:
            report.missing.append(name)
        elif tuple(state[name].shape) != tuple(tensor.shape):
            report.mismatched.append((name, tuple(state[name].shape), tuple(tensor.shape)))
        else:
            tensor.copy_(state[name].to(tensor.device))
            report.loaded.append(name)
    known = set(model.state_dict())
    report.unused = [n for n in state if n not in known]
    return report


def init_models(cfg, models: dict[str, nn.Module], log=print) -> dict[str, InitReport]:
    """Apply every built role's ``init`` (before placement and optimisers); one log line per role."""
    reports = {}
    for role, model in models.items():
        mcfg = cfg.models[role]
        if not mcfg.init:
            continue
        target = f"models.{role}"
        states, source = read_states(mcfg.init, target)
        from_role = pick_role(states, role, model_weights(model), mcfg.init_role, target)
        report = load_by_name(model, states[from_role], source, from_role)
        if not report.loaded:
            file_names = ", ".join(list(strip_wrappers(states[from_role]))[:3])
            model_names = ", ".join(list(model_weights(model))[:3])
            raise ConfigError(f"{target}.init: {source}: no weight matches {target} ({mcfg.name}) by name and shape "
                              f"(the file has {file_names}, ...; the model {model_names}, ...)")
        log(report.line(target))
        reports[role] = report
    return reports


def check_init_files(cfg) -> None:
    """Every ``models.<role>.init`` names something that exists (before a run writes anything)."""
    for role, mcfg in cfg.models.items():
        if mcfg.init and not Path(mcfg.init).exists():
            raise ConfigError(f"models.{role}.init: {mcfg.init}: no such file or run directory")
