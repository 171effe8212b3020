"""Class frequencies of label maps, and distribution alignment (Berthelot et al., "ReMixMatch", ICLR 2020), which
M&N's ``pseudo_align: labels`` uses.

A generator that under-predicts a rare class keeps teaching its absence; rescaling its soft pseudo-mask by the
ratio of the class frequencies the labels show to those it predicts moves the target's marginal to the labels'.
"""

from __future__ import annotations

import torch
from torch import Tensor


def class_counts(labels: Tensor, num_classes: int) -> Tensor:
    """Voxels of each class 0..num_classes-1 (float); the ignore label, outside that range, is left out."""
    return torch.stack([(labels == c).sum() for c in range(num_classes)]).float()


def align_distribution(probs: Tensor, target_prior: Tensor, current_prior: Tensor, max_ratio: float = 10.0,
                       classes: list[int] | None = None, down_only: bool = False) -> tuple[Tensor, Tensor]:
    """Distribution alignment (ReMixMatch): P'_c = P_c r_c / sum_k P_k r_k, r_c = target_c / current_c clipped to
    [1 / max_ratio, max_ratio] (so a class the generator never predicts cannot blow up). Returns (P', r).

    ``classes``: only these classes are rescaled, the others keep r_c = 1; ``down_only``: r_c <= 1, so a class the
    generator over-predicts is lowered and none is raised (a cap on a rare class whose false positives feed on
    themselves, without touching the common classes, whose shares differ between crops sampled differently)."""
    ratio = (target_prior / current_prior.clamp_min(1e-12)).clamp(1.0 / max_ratio, max_ratio)
    if down_only:
        ratio = ratio.clamp_max(1.0)
    if classes is not None:
        chosen = torch.zeros_like(ratio, dtype=torch.bool)
        chosen[[int(c) for c in classes]] = True
        ratio = torch.where(chosen, ratio, torch.ones_like(ratio))
    scaled = probs * ratio.view(1, -1, *([1] * (probs.dim() - 2)))
    return scaled / scaled.sum(dim=1, keepdim=True).clamp_min(1e-12), ratio


def update_running_means(means: dict[str, Tensor], batches: dict[str, int], prefix: str, values: dict[str, Tensor],
                         decay: float) -> None:
    """means[k] <- d means[k] + (1 - d) values[k] in place, d = min(decay, n / (n + 1)) after n batches (counted in
    ``batches`` under "<prefix>/<k>"): bias-corrected, the plain mean of the first 1 / (1 - decay) batches rather
    than the first batch's crops."""
    for key, value in values.items():
        n = batches.get(f"{prefix}/{key}", 0)
        d = min(decay, n / (n + 1))
        means[key] = value if n == 0 else d * means[key] + (1.0 - d) * value
        batches[f"{prefix}/{key}"] = n + 1
