"""Learning methods, one file each; ``method_class(name)`` finds them by name.

A new method is one file plus one line in ``METHODS``: name -> (module, class, one line with the paper).
The one-liners live here, not in the classes, so ``mnseg train --help`` lists methods without importing torch.
"""

from __future__ import annotations

import importlib

from mnseg.errors import ConfigError

METHODS = {
    "supervised": ("mnseg.methods.supervised", "Supervised", "labelled cases only, CE + soft Dice (the lower bound)"),
    "mn": ("mnseg.methods.mn", "MN",
           "M&N: 2D natural-image pretrained model (LoRA) + 3D UNet co-training, LR-guided sampling (Yeung et al.)"),
    "mean_teacher": ("mnseg.methods.mean_teacher", "MeanTeacher",
                     "EMA teacher, softmax-MSE consistency (Tarvainen & Valpola 2017)"),
    "ua_mt": ("mnseg.methods.ua_mt", "UAMT", "mean teacher with an MC-uncertainty mask (Yu et al. 2019)"),
    "cps": ("mnseg.methods.cps", "CPS", "cross pseudo supervision of two networks (Chen et al. 2021)"),
    "dual_contrast": ("mnseg.methods.dual_contrast", "DualContrast",
                      "dual subnets, confidence-gated consistency, prototype contrast (Lu et al. 2025)"),
    "sparse2dense": ("mnseg.methods.sparse2dense", "Sparse2Dense",
                     "2D teacher on annotated slices -> dense pseudo-labels -> 3D student (sparse-to-dense study)"),
    "entropy_min": ("mnseg.methods.entropy_min", "EntropyMin",
                    "entropy minimisation on unlabelled patches (Grandvalet & Bengio 2005)"),
    "adversarial": ("mnseg.methods.adversarial", "Adversarial",
                    "mask discriminator + confidence self-training (Zhang et al. 2017; Hung et al. 2018)"),
    "transform_consistency": ("mnseg.methods.transform_consistency", "TransformConsistency",
                              "equivariance f(Tx) = T f(x) on unlabelled patches (Bortsova et al. 2019)"),
    "pi_model": ("mnseg.methods.pi_model", "PiModel",
                 "two stochastic passes (noise, dropout) of one network made to agree (Laine & Aila 2017)"),
    "arco": ("mnseg.methods.arco", "Arco",
             "mean teacher + voxel contrast, anchors by stratified group sampling (You et al. 2023, ARCO)"),
    "pretrain": ("mnseg.methods.pretrain", "Pretrain",
                 "self-supervised pretraining on unlabelled crops: rotation, contrastive or masked reconstruction"),
}


def method_class(name: str):
    if name not in METHODS:
        raise ConfigError(f"unknown method '{name}'; known: {', '.join(sorted(METHODS))}")
    module, cls = METHODS[name][:2]
    return getattr(importlib.import_module(module), cls)


def list_methods() -> list[tuple[str, str]]:
    """(name, one-line description with the paper), without importing the method modules."""
    return [(name, entry[2] if len(entry) > 2 else "") for name, entry in METHODS.items()]
