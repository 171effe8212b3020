"""Learning methods, one file each; ``create_method(name)`` finds them by name."""

from __future__ import annotations

import importlib

from mnseg.errors import ConfigError

# name -> (module, class). A new method is one file plus one line here.
METHODS = {
    "supervised": ("mnseg.methods.supervised", "Supervised"),
    "mn": ("mnseg.methods.mn", "MN"),
    "sparse2dense": ("mnseg.methods.sparse2dense", "Sparse2Dense"),
    "mean_teacher": ("mnseg.methods.mean_teacher", "MeanTeacher"),
    "ua_mt": ("mnseg.methods.ua_mt", "UAMT"),
    "entropy_min": ("mnseg.methods.entropy_min", "EntropyMin"),
    "transform_consistency": ("mnseg.methods.transform_consistency", "TransformConsistency"),
    "cps": ("mnseg.methods.cps", "CPS"),
    "adversarial": ("mnseg.methods.adversarial", "Adversarial"),
    "dual_contrast": ("mnseg.methods.dual_contrast", "DualContrast"),
}


def method_class(name: str):
    if name not in METHODS:
        raise ConfigError(f"unknown method '{name}'; known: {', '.join(sorted(METHODS))}")
    module, cls = METHODS[name]
    return getattr(importlib.import_module(module), cls)


def list_methods() -> list[tuple[str, str]]:
    """(name, one-line description with the paper) for help texts."""
    out = []
    for name in sorted(METHODS):
        cls = method_class(name)
        out.append((name, (cls.__doc__ or "").strip().splitlines()[0]))
    return out
