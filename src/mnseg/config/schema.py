"""Typed run configuration: dataclasses, YAML in and out, ``key.sub=value`` overrides.

One tree describes a whole run (data, models, optimisers, schedule, method,
inference); it is saved resolved in every run directory so a run can be
re-created, resumed or used for prediction from that file alone.
Presets live in ``mnseg/config/presets/*.yaml`` (paper settings are data, not code).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mnseg.errors import ConfigError

PRESET_DIR = Path(__file__).parent / "presets"


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 1e-3
    final_lr: float = 0.0
    weight_decay: float = 1e-4
    warmup_epochs: int = 0
    grad_clip: float | None = 12.0
    # cosine: warm-up, then cosine to final_lr at the run's end; step: lr x step_gamma every step_size iterations
    # (final_lr unused), as the SGD schedules of UA-MT/MCF-era code. Methods with their own segments (mn,
    # sparse2dense) always use cosine.
    schedule: str = "cosine"
    step_size: int = 0  # iterations between two decays (schedule: step)
    step_gamma: float = 0.1
    momentum: float = 0.99  # SGD only: nnU-Net's 0.99 with Nesterov by default
    nesterov: bool = True
    # Warm restarts (SGDR, Loshchilov & Hutter 2017): at each of these epochs the schedule starts again at lr
    # (warm-up only at the start). [30] on a 75-epoch run gives the LR curve M&N's 3D model sees (restart at
    # co-training), the supervised control for M&N's restart. Methods with their own segments ignore it.
    restart_epochs: list = field(default_factory=list)


@dataclass
class AugmentSettings:
    preset: str = "conservative_3d"  # conservative_3d | strong_2d | none
    overrides: dict = field(default_factory=dict)


@dataclass
class ModelConfig:
    name: str = "unet3d"
    kwargs: dict = field(default_factory=dict)
    finetune: str | None = None  # lora | decoder | whole (pretrained 2D models)
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_train_bias_norm: bool = False  # LoRA also trains every bias and LayerNorm of the encoder (M&N's code)
    slice_axis: int = -1  # 2D models run slice by slice along this axis of (X, Y, Z)
    slice_batch: int | None = None
    # "bfloat16": frozen pretrained Linear/Conv weights (LoRA / decoder fine-tuning) stored in bf16, so autocast
    # stops casting them on every call; applied only under bf16 autocast (CUDA with train.amp), ignored otherwise.
    frozen_dtype: str | None = None
    # Recompute activations in the backward pass instead of storing them (2D models: per slice_batch chunk; plain
    # UNets: per level): less GPU memory for a second forward. Values and gradients are unchanged.
    activation_checkpoint: bool = False
    # Start from pretrained weights (engine/pretrained.py): a run directory, a checkpoint (.pt / .safetensors, e.g.
    # a `mnseg pretrain` run's), a model zip or a plain state dict; matched by name, every unmatched one logged.
    init: str | None = None
    init_role: str | None = None  # which role of a file holding several (default: same name, else the best match)
    optim: OptimConfig = field(default_factory=OptimConfig)
    augment: AugmentSettings = field(default_factory=AugmentSettings)


@dataclass
class DataConfig:
    dataset: str = ""
    num_labeled: int | None = None
    num_val: int = 0
    transductive: bool = False
    patch_size: list = field(default_factory=lambda: [64, 64, 64])
    fg_prob: float = 0.5
    class_balanced: bool = True
    target_spacing: Any = None  # None | "median" | [sx, sy, sz]
    normalization: str = "auto"
    clahe: bool = False
    cache_dir: str | None = None
    num_workers: int = 0


@dataclass
class TrainConfig:
    epochs: int = 100
    iters_per_epoch: int = 50
    batch_size: int = 2
    seed: int = 0
    device: str = "auto"
    amp: bool = True  # bf16 autocast on CUDA (on a CPU only with cpu_amp)
    cpu_amp: bool = False  # with amp, bf16 autocast on a CPU with AMX / AVX-512 BF16 (about 2.4x faster steps)
    deterministic: bool = False
    val_every: int = 10
    checkpoint_every: int = 1
    keep_epochs: list = field(default_factory=list)  # also keep checkpoints/epoch<N>.pt after these epochs
    on_nan: str = "stop"  # stop | skip
    # NaN check (a host sync) every N steps: between checks the CPU prepares the next batch while the GPU still
    # works. A non-finite loss still stops the run before anything is saved; 1 names the exact step.
    check_every: int = 10
    # torch.compile every model's forward while training (compiles at the first steps; prediction stays eager)
    compile: bool = False
    compile_mode: str = "default"  # default | reduce-overhead | max-autotune
    channels_last: bool = False  # models and input batches in channels-last(-3d) memory format (a CUDA speed option)


@dataclass
class InferConfig:
    overlap: float = 0.5
    blend: str = "constant"
    mirror_tta: bool = False
    sw_batch_size: int = 4
    model: str | None = None  # which role predicts (method's default when None); "average" for ensembles


@dataclass
class DomainConfig:
    """Unsupervised domain adaptation, added to any method (``methods/domain_adaptation.py``): training also draws
    crops of the dataset's ``imagesTarget`` scans (never their labels) when either weight is above 0."""

    dann_weight: float = 0.0  # weight of DANN's domain loss (0: off); a gradient reversal before the classifier
    target_entropy_weight: float = 0.0  # weight of the mean voxel entropy on target predictions (0: off)
    grl_lambda: float = 1.0  # the reversal's factor lambda (its final value with grl_schedule: dann)
    grl_schedule: str = "dann"  # dann: lambda_p = lambda (2 / (1 + exp(-10 p)) - 1), p the run's progress; constant
    role: str | None = None  # the network adapted (default: the method's predicting role); a 3D UNet for DANN
    target_batch_size: int | None = None  # target crops per step (default: train.batch_size)
    classifier_width: int = 64  # the domain classifier's hidden channels
    classifier_lr: float | None = None  # its learning rate (default: the adapted network's)

    @property
    def active(self) -> bool:
        return self.dann_weight > 0 or self.target_entropy_weight > 0


@dataclass
class MethodConfig:
    name: str = "supervised"
    params: dict = field(default_factory=dict)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    models: dict = field(default_factory=lambda: {"net": ModelConfig()})
    train: TrainConfig = field(default_factory=TrainConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    domain: DomainConfig = field(default_factory=DomainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, d: dict) -> Config:
        return _build(cls, d or {}, "")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple = ()) -> Config:
    """Build a config from a YAML file or preset name, then apply ``key.sub=value`` overrides."""
    data: dict = read_yaml(resolve_preset(path)) if path else {}
    return Config.from_dict(apply_overrides(data, overrides))


def apply_overrides(data: dict, overrides: list[str] | tuple) -> dict:
    """Set each ``key.sub=value`` (value parsed as YAML) in a config dict, in place; returns it."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override '{item}' must look like key.sub=value")
        _set_path(data, key.strip().split("."), _override_value(item, value))
    return data


def _override_value(item: str, text: str) -> Any:
    """The YAML value of an override; ConfigError for text YAML cannot read, and for the easy slip ``{a:1}``
    (YAML reads a key ``a:1`` without a value: a space must follow each colon)."""
    if not text.strip():
        return None
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"override '{item}': the value is not valid YAML ({problem})") from None
    if isinstance(value, dict):
        glued = [k for k, v in value.items() if v is None and isinstance(k, str) and ":" in k]
        if glued:
            raise ConfigError(
                f"override '{item}': YAML reads {glued[0]!r} as a key without a value; put a space after each "
                f"colon, e.g. {{{glued[0].replace(':', ': ', 1)}}}"
            )
    return value


def resolve_preset(name_or_path: str | Path) -> Path:
    path = Path(name_or_path)
    if path.exists():
        return path
    preset = PRESET_DIR / f"{name_or_path}.yaml"
    if preset.exists():
        return preset
    known = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
    raise ConfigError(f"config '{name_or_path}' is neither a file nor a preset (presets: {known})")


def read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    base = data.pop("base", None)
    if base:
        merged = read_yaml(resolve_preset(base))
        _deep_merge(merged, data)
        data = merged
    return data


def _deep_merge(into: dict, new: dict) -> None:
    # a section that names another model or method starts its kwargs / params afresh: the base's were for the
    # thing it named (EfficientNet's variant means nothing to a 2D UNet)
    if "name" in new and into.get("name", new["name"]) != new["name"]:
        for key in ("kwargs", "params"):
            into.pop(key, None)
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _deep_merge(into[k], v)
        else:
            into[k] = v


def _set_path(data: dict, keys: list[str], value: Any) -> None:
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set '{'.'.join(keys)}': '{k}' is not a section")
    node[keys[-1]] = value


# Keys an earlier mnseg wrote that no longer do anything: dropped when a config is read, so the run directories and
# exported models that hold them keep working.
RETIRED_KEYS = {"TrainConfig": ("overlay_every",)}


def _build(cls, d: dict, where: str):
    if not isinstance(d, dict):
        raise ConfigError(f"'{where or 'config'}' must be a mapping, got {d!r}")
    d = {k: v for k, v in d.items() if k not in RETIRED_KEYS.get(cls.__name__, ())}
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ConfigError(f"unknown key(s) {sorted(unknown)} in '{where or 'config'}'; known: {sorted(names)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in d:
            continue
        value, hint, sub = d[f.name], hints[f.name], f"{where}.{f.name}".lstrip(".")
        if dataclasses.is_dataclass(hint):
            kwargs[f.name] = _build(hint, value or {}, sub)
        elif cls is Config and f.name == "models":
            if not isinstance(value, dict) or not value:
                raise ConfigError("'models' must map role names to model settings")
            kwargs[f.name] = {role: _build(ModelConfig, m or {}, f"models.{role}") for role, m in value.items()}
        else:
            kwargs[f.name] = _coerce(value, hint, sub)
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    if value is None:
        return None
    base = typing.get_origin(hint)
    args = typing.get_args(hint)
    if base in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        types = [a for a in args if a is not type(None)]
        if len(types) == 1:
            return _coerce(value, types[0], where)
        return value
    if hint is float and isinstance(value, int | float | str) and not isinstance(value, bool):
        try:
            return float(value)  # YAML 1.1 reads "3e-4" as a string
        except ValueError:
            pass
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is bool and isinstance(value, bool):
        return value
    if hint is str and isinstance(value, str):
        return value
    if hint in (float, int, bool, str):
        raise ConfigError(f"'{where}' must be {hint.__name__}, got {value!r}")
    return value
