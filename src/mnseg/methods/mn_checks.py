"""M&N's checks on its switches beyond the paper, run before any training: an unknown value, a value out of range,
two switches that exclude each other, or a setting that would do nothing without the switch it tunes is refused
with the key's name."""

from __future__ import annotations

import dataclasses
import os

from mnseg.errors import ConfigError

# switch -> the settings that only tune it: setting those while the switch is off (its first choice) does nothing,
# so it is refused (as by_class_mix without partner_weight_by_class)
TUNING = {
    "pseudo_align": ("align_decay", "align_max_ratio", "align_classes", "align_down_only"),
    "copy_paste": ("paste_ratio",),
}


def check_switches(p, choices: dict[str, tuple[str, ...]], num_classes: int) -> None:
    """``p``: M&N's parameters (a dataclass, whose defaults say what is set); ``choices``: each switch's values."""
    defaults = {f.name: f.default for f in dataclasses.fields(p)}
    for key, allowed in choices.items():
        if getattr(p, key) not in allowed:
            raise ConfigError(f"method.params.{key}='{getattr(p, key)}' unknown; choose one of {', '.join(allowed)}")
    for switch, keys in TUNING.items():
        off, on = choices[switch][:2]
        unused = [k for k in keys if getattr(p, switch) == off and getattr(p, k) != defaults[k]]
        if unused:
            keys_set = ", ".join(f"method.params.{k}" for k in unused)
            raise ConfigError(f"{keys_set} only {'tunes' if len(unused) == 1 else 'tune'} {switch}={on}: set "
                              f"method.params.{switch}={on}, or leave {'it' if len(unused) == 1 else 'them'} out")
    if not 0.0 < float(p.paste_ratio) <= 1.0:
        raise ConfigError(f"method.params.paste_ratio={p.paste_ratio} must lie in (0, 1]")
    if not 0.0 <= float(p.partner_weight) <= 1.0:
        raise ConfigError(f"method.params.partner_weight={p.partner_weight} must lie between 0 and 1")
    if p.generator == "ema":
        if p.fixed_pseudo:
            raise ConfigError("method.params.generator=ema and fixed_pseudo=true exclude each other: "
                              "fixed pseudo-masks come from frozen models, not moving averages")
        if not 0.0 <= float(p.generator_decay) < 1.0:
            raise ConfigError(f"method.params.generator_decay={p.generator_decay} must lie in [0, 1)")
    if p.oracle_pseudo and p.pseudo_weight == "agree":
        # the oracle's targets come from labels, not from two models whose argmax could agree
        raise ConfigError("method.params.oracle_pseudo=true and pseudo_weight=agree exclude each other: the oracle's "
                          "pseudo-masks are labels, there are no two models' predictions to agree")
    by_class = p.partner_weight_by_class
    if p.partner_rare_share is not None:
        if by_class is not None:
            raise ConfigError("method.params.partner_rare_share and partner_weight_by_class exclude each other: both "
                              "set the partner's share per class (the first from the labels, the second by hand)")
        if p.pseudo != "ensemble":
            raise ConfigError("method.params.partner_rare_share needs pseudo=ensemble (it mixes both models)")
        if not 0.0 < float(p.partner_rare_share) < 1.0:
            raise ConfigError(f"method.params.partner_rare_share={p.partner_rare_share} must lie in (0, 1)")
    elif by_class is not None:
        if p.pseudo != "ensemble":
            raise ConfigError("method.params.partner_weight_by_class needs pseudo=ensemble (it mixes both models)")
        if len(by_class) != num_classes or not all(0.0 <= float(w) <= 1.0 for w in by_class):
            raise ConfigError(f"method.params.partner_weight_by_class={list(by_class)} must hold one weight in "
                              f"[0, 1] per class ({num_classes} classes)")
    elif p.by_class_mix != "renormalise":
        raise ConfigError("method.params.by_class_mix needs partner_weight_by_class or partner_rare_share (it says "
                          "how to apply per-class weights)")
    if p.pseudo_align != "none":
        _check_alignment(p, num_classes)


def _check_alignment(p, num_classes: int) -> None:
    if not 0.0 <= float(p.align_decay) < 1.0:
        raise ConfigError(f"method.params.align_decay={p.align_decay} must lie in [0, 1)")
    if not float(p.align_max_ratio) >= 1.0:
        raise ConfigError(f"method.params.align_max_ratio={p.align_max_ratio} must be at least 1")
    if not all(0 <= int(c) < num_classes for c in p.align_classes or []):
        raise ConfigError(f"method.params.align_classes={list(p.align_classes)} must name classes 0 to "
                          f"{num_classes - 1}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # uneven shards carry no pooled sums, so each process would keep its own frequencies
        raise ConfigError("method.params.pseudo_align=labels runs in one process only (not under torchrun)")
