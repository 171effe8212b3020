"""Two models' predictions combined into one target: M&N's per-class mixes and agreed labels.

Kept apart from ``mn.py`` so each rule is tested on plain tensors and arrays, without a model.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def mix_with_remainder(mixed: Tensor, own: Tensor, from_mix: Tensor) -> Tensor:
    """``by_class_mix: remainder``: the classes ``from_mix`` (a boolean per class, broadcast like ``mixed``) keep
    their mixed mass M_c, the others share 1 - sum M in the proportions of ``own`` (the trained model's softmax)."""
    taken = (mixed * from_mix).sum(dim=1, keepdim=True)
    scale = taken.clamp_min(1.0)  # classes of S whose mixes sum past 1 are scaled to 1, the others get nothing
    rest_own = (own * ~from_mix).sum(dim=1, keepdim=True).clamp_min(1e-8)
    rest = (1.0 - taken).clamp_min(0.0) * own / rest_own
    return torch.where(from_mix, mixed / scale, rest)


def agreed_labels(labels: list[np.ndarray]) -> np.ndarray:
    """The first label map where every map names the same class, 0 (background) elsewhere."""
    agreed = labels[0].copy()
    for other in labels[1:]:
        agreed[other != labels[0]] = 0
    return agreed
