"""Value checks of a run configuration, before anything is built or written.

Types are checked when the config is read (``config._coerce``); this checks ranges, so that ``--batch-size 0``,
a two-number patch size or a negative learning rate stop with one line naming the setting, instead of a
traceback from deep inside PyTorch, or (``--epochs 0``) a run that silently trains nothing.
"""

from __future__ import annotations

from mnseg.config.schema import Config
from mnseg.errors import ConfigError

__all__ = ["check_config"]

ON_NAN = ("stop", "skip")
SCHEDULES = ("cosine", "step")
GRL_SCHEDULES = ("dann", "constant")


def _problems(cfg: Config) -> list[str]:
    from mnseg.inference.window import BLEND_MODES
    from mnseg.models.compiled import COMPILE_MODES

    t, d, i = cfg.train, cfg.data, cfg.infer
    problems = []

    def need(ok: bool, text: str) -> None:
        if not ok:
            problems.append(text)

    for name in ("epochs", "iters_per_epoch", "batch_size"):
        need(getattr(t, name) >= 1, f"train.{name} must be at least 1, got {getattr(t, name)}")
    need(t.seed >= 0, f"train.seed must be >= 0, got {t.seed}")
    for name in ("val_every", "checkpoint_every", "check_every"):
        need(getattr(t, name) >= 0, f"train.{name} must be >= 0, got {getattr(t, name)}")
    need(isinstance(t.keep_epochs, list) and all(isinstance(e, int) and 1 <= e <= t.epochs for e in t.keep_epochs),
         f"train.keep_epochs must be a list of epochs between 1 and train.epochs={t.epochs}, got {t.keep_epochs!r}")
    need(t.on_nan in ON_NAN, f"train.on_nan must be one of {', '.join(ON_NAN)}, got {t.on_nan!r}")
    need(t.compile_mode in COMPILE_MODES,
         f"train.compile_mode must be one of {', '.join(COMPILE_MODES)}, got {t.compile_mode!r}")

    patch = d.patch_size
    need(isinstance(patch, list | tuple) and len(patch) == 3 and all(isinstance(p, int) and p >= 1 for p in patch),
         f"data.patch_size must be three positive whole numbers (X, Y, Z), got {patch!r}")
    need(0.0 <= d.fg_prob <= 1.0, f"data.fg_prob must be a probability in [0, 1], got {d.fg_prob}")
    need(d.num_labeled is None or d.num_labeled >= 0, f"data.num_labeled must be >= 0, got {d.num_labeled}")
    need(d.num_val >= 0, f"data.num_val must be >= 0, got {d.num_val}")
    need(d.num_workers >= 0, f"data.num_workers must be >= 0, got {d.num_workers}")

    need(0.0 <= i.overlap < 1.0, f"infer.overlap must be in [0, 1), got {i.overlap}")
    need(i.sw_batch_size >= 1, f"infer.sw_batch_size must be at least 1, got {i.sw_batch_size}")
    need(i.blend in BLEND_MODES, f"infer.blend must be one of {', '.join(BLEND_MODES)}, got {i.blend!r}")

    for role, m in cfg.models.items():
        o = m.optim
        for name in ("lr", "final_lr", "weight_decay"):
            need(getattr(o, name) >= 0, f"models.{role}.optim.{name} must be >= 0, got {getattr(o, name)}")
        need(o.final_lr <= o.lr, f"models.{role}.optim.final_lr ({o.final_lr}) must not exceed its lr ({o.lr})")
        need(o.warmup_epochs >= 0, f"models.{role}.optim.warmup_epochs must be >= 0, got {o.warmup_epochs}")
        need(o.schedule in SCHEDULES, f"models.{role}.optim.schedule must be one of {', '.join(SCHEDULES)}, "
             f"got {o.schedule!r}")
        need(o.schedule != "step" or o.step_size >= 1,
             f"models.{role}.optim.step_size must be at least 1 (iterations) with schedule: step, got {o.step_size}")
        need(0.0 < o.step_gamma <= 1.0, f"models.{role}.optim.step_gamma must be in (0, 1], got {o.step_gamma}")
        need(0.0 <= o.momentum < 1.0, f"models.{role}.optim.momentum must be in [0, 1), got {o.momentum}")
        r = o.restart_epochs
        need(isinstance(r, list) and all(isinstance(e, int) and 0 < e < cfg.train.epochs for e in r)
             and r == sorted(set(r)), f"models.{role}.optim.restart_epochs must be increasing epochs between 1 and "
             f"train.epochs - 1 ({cfg.train.epochs - 1}), got {r!r}")
        need(not (o.name.lower() == "sgd" and o.nesterov and o.momentum == 0),
             f"models.{role}.optim.nesterov needs momentum > 0 (set nesterov: false)")
        need(o.grad_clip is None or o.grad_clip >= 0,
             f"models.{role}.optim.grad_clip must be >= 0 (or null: no clipping), got {o.grad_clip}")
        need(m.lora_rank >= 1, f"models.{role}.lora_rank must be at least 1, got {m.lora_rank}")
        need(0.0 <= m.lora_dropout < 1.0, f"models.{role}.lora_dropout must be in [0, 1), got {m.lora_dropout}")
        need(not m.lora_train_bias_norm or m.finetune == "lora",
             f"models.{role}.lora_train_bias_norm needs finetune: lora, got finetune: {m.finetune}")
    problems += _label_problems(cfg)
    problems += _domain_problems(cfg)
    return problems


def _domain_problems(cfg: Config) -> list[str]:
    from mnseg.methods import METHODS, method_class

    dom = cfg.domain
    problems = [f"domain.{name} must be >= 0, got {getattr(dom, name)}"
                for name in ("dann_weight", "target_entropy_weight", "grl_lambda") if getattr(dom, name) < 0]
    if dom.grl_schedule not in GRL_SCHEDULES:
        problems.append(f"domain.grl_schedule must be one of {', '.join(GRL_SCHEDULES)}, got {dom.grl_schedule!r}")
    if dom.target_batch_size is not None and dom.target_batch_size < 1:
        problems.append(f"domain.target_batch_size must be at least 1 (or null: train.batch_size), "
                        f"got {dom.target_batch_size}")
    if dom.classifier_width < 1:
        problems.append(f"domain.classifier_width must be at least 1, got {dom.classifier_width}")
    if dom.classifier_lr is not None and dom.classifier_lr < 0:
        problems.append(f"domain.classifier_lr must be >= 0, got {dom.classifier_lr}")
    if dom.active and cfg.method.name in METHODS and method_class(cfg.method.name).label_free:
        problems.append(f"domain adaptation adapts a segmenter; method {cfg.method.name} trains none "
                        "(set domain.dann_weight=0 and domain.target_entropy_weight=0)")
    return problems


def _label_problems(cfg: Config) -> list[str]:
    """A method that reads no label (pretraining) runs without labelled or validation cases; any other needs some."""
    from mnseg.methods import METHODS, method_class

    if cfg.method.name not in METHODS:
        return []  # the trainer names the unknown method
    d = cfg.data
    if method_class(cfg.method.name).label_free:
        if d.num_labeled != 0 or d.num_val:
            return [f"method {cfg.method.name} reads no label: it needs data.num_labeled=0 and data.num_val=0, got "
                    f"{d.num_labeled} and {d.num_val} (mnseg pretrain sets both)"]
    elif d.num_labeled == 0:
        return [f"method {cfg.method.name} trains on labelled cases; data.num_labeled=0 leaves none"]
    return []


def check_config(cfg: Config) -> None:
    """ConfigError listing every out-of-range setting of ``cfg`` (nothing when all are fine)."""
    problems = _problems(cfg)
    if problems:
        raise ConfigError("invalid settings: " + "; ".join(problems))
