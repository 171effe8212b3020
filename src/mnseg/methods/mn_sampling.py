"""M&N's rules for b_u, the unlabelled items of a co-training batch of B (``method.params.lrg``).

The paper's LR-guided sampling ties b_u to the trained model's learning rate, so unlabelled items enter as the
rate falls; the authors' code uses the model's own co-training epochs instead; ``uniform`` is the ablation that
draws each item from the pooled cases. ``fixed`` (a constant share) is handled in ``MN.batch_split``.
"""

from __future__ import annotations

import math

import numpy as np

SAMPLING = ("lr", "epoch-linear", "uniform", "fixed")


def lr_guided_unlabeled_count(lr_now: float, lr_init: float, lr_final: float, batch_size: int) -> int:
    """M&N's LR-guided sampling: b_u = floor((lr_init - lr_now) / (lr_init - lr_final) * B), clipped to [0, B]."""
    if lr_init == lr_final:
        return 0
    share = (lr_init - lr_now) / (lr_init - lr_final)
    return int(min(max(math.floor(share * batch_size + 1e-9), 0), batch_size))


def epoch_linear_unlabeled_count(epoch_in_stage: int, stage_epochs: int, batch_size: int) -> int:
    """The published M&N code's b_u (train.py, create_loaders): floor(e / N * B), e the model's own co-training
    epochs before this one (0 .. N-1), N its co-training epochs; the same float expression, so it peaks at B - 1."""
    if stage_epochs <= 0:
        return 0
    return int(min(max(math.floor(epoch_in_stage / stage_epochs * batch_size), 0), batch_size))


def uniform_unlabeled_count(n_labeled: int, n_unlabeled: int, batch_size: int, rng: np.random.Generator) -> int:
    """Ablation: every batch item drawn uniformly from the pooled labelled and unlabelled cases."""
    total = n_labeled + n_unlabeled
    return int(rng.binomial(batch_size, n_unlabeled / total)) if total else 0
