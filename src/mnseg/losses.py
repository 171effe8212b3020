"""Segmentation losses shared by every method.

Shapes: ``logits`` (B, K, *S) for 2D or 3D; label targets (B, *S) int64; probability targets (B, K, *S);
masks (B, *S) (bool, or float weights in [0, 1]).

Every loss averages only over the voxels that count (not ignored, inside the mask) and divides by
``max(count, 1)``, so a batch with nothing to learn from gives an exact 0 that is still connected to
``logits`` (``loss.backward()`` works, gradients are 0) instead of NaN. This needs no host sync, so it
costs nothing on a GPU. Targets never receive gradient: they are detached here, not by the caller
(``paired_softmax_mse`` has no target: both of its predictions receive gradient).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ReduceSums",
    "soft_dice_loss",
    "cross_entropy_loss",
    "kl_loss",
    "supervised_loss",
    "pseudo_label_loss",
    "softmax_mse_loss",
    "paired_softmax_mse",
    "entropy_loss",
    "hard_pseudo_label_ce",
]


# How a loss pools batch statistics over the shards of one global batch: a differentiable sum of a tensor over
# every shard (under torchrun, the processes; ``Batch.reduce_sums``, set by the trainer). The losses that pool take
# it as an argument; None, the default, means this batch is the whole batch.
ReduceSums = Callable[[Tensor], Tensor]


def _check_logits(logits: Tensor) -> None:
    if logits.dim() < 3:
        raise ValueError(f"logits must have shape (B, K, *spatial), got {tuple(logits.shape)}")


def _voxel_weight(mask: Tensor | None, logits: Tensor) -> Tensor | None:
    """Mask as float weights of shape (B, *S); accepts (B, *S) or (B, 1, *S)."""
    if mask is None:
        return None
    expected = (logits.shape[0], *logits.shape[2:])
    if mask.dim() == logits.dim() and mask.shape[1] == 1:
        mask = mask[:, 0]
    if tuple(mask.shape) != expected:
        raise ValueError(f"mask must have shape {expected} (B, *spatial), got {tuple(mask.shape)}")
    return mask.to(dtype=torch.float32)


def _combine(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None:
        return b
    if b is None:
        return a
    return a * b


def _masked_mean(per_voxel: Tensor, weight: Tensor | None) -> Tensor:
    """Mean of a (B, *S) map over the voxels with weight > 0 (weighted); 0 with grad when none count."""
    if weight is None:
        return per_voxel.mean()
    return (per_voxel * weight).sum() / weight.sum().clamp_min(1.0)


def label_targets(logits: Tensor, labels: Tensor, ignore_index: int | None) -> tuple[Tensor, Tensor | None]:
    """One-hot (B, K, *S) float targets and a (B, *S) validity weight (None when nothing is ignored); shaped like
    ``logits`` (or any (B, K, *S) tensor). The losses and M&N's copy-paste share it."""
    expected = (logits.shape[0], *logits.shape[2:])
    if tuple(labels.shape) != expected:
        raise ValueError(f"label target must have shape {expected} (B, *spatial), got {tuple(labels.shape)}")
    return one_hot_targets(labels, logits.shape[1], ignore_index)


def one_hot_targets(labels: Tensor, num_classes: int, ignore_index: int | None) -> tuple[Tensor, Tensor | None]:
    """``label_targets`` for callers that have a class count but no logits to shape against (M&N's oracle)."""
    labels = labels.long()
    valid = None
    if ignore_index is not None:
        is_valid = labels != ignore_index
        labels = torch.where(is_valid, labels, torch.zeros_like(labels))
        valid = is_valid.to(torch.float32)
    one_hot = F.one_hot(labels, num_classes=num_classes)  # (B, *S, K)
    one_hot = one_hot.movedim(-1, 1).to(torch.float32)
    return one_hot, valid


def _prob_targets(logits: Tensor, probs: Tensor) -> Tensor:
    if probs.shape != logits.shape:
        raise ValueError(
            f"probability target must have the logits' shape {tuple(logits.shape)}, got {tuple(probs.shape)}"
        )
    return probs.detach().to(torch.float32)


def soft_dice_loss(
    logits: Tensor,
    target: Tensor,
    *,
    ignore_index: int | None = None,
    mask: Tensor | None = None,
    include_background: bool = True,
    batch_dice: bool = True,
    smooth: float = 1e-5,
    squared: bool = False,
    reduce_sums: ReduceSums | None = None,
) -> Tensor:
    """Soft Dice loss ``1 - mean_c (2|P*T| + s) / (|P| + |T| + s)`` of softmax(logits) against ``target``.

    ``squared`` uses ``sum P^2 + sum T^2`` as the denominator (Milletari et al.'s V-Net form, the M&N authors'
    code). For a soft target T only this form is maximised by P = T (Cauchy-Schwarz); the linear form is
    maximised by a thresholded T, so it sharpens soft pseudo-masks. For one-hot targets both agree at P = T.

    ``target`` is either int labels (B, *S) or probabilities (B, K, *S) (M&N's Dice(g, P) with soft
    pseudo-labels). Voxels equal to ``ignore_index`` (label targets only) or outside ``mask`` are left out
    of numerator and denominator alike. ``batch_dice`` pools batch and space per class (nnU-Net's batch
    Dice); otherwise Dice is per sample and class, averaged over the samples that have any valid voxel.

    ``reduce_sums`` (batch Dice only) pools the per-class intersection and denominator over the shards of the
    global batch before the ratio (``Batch.reduce_sums``: the processes of a torchrun job), so every shard's loss
    is the whole batch's Dice. Every shard must then make the same pooled calls in the same order.
    """
    _check_logits(logits)
    if target.dim() == logits.dim() - 1:
        target_probs, valid = label_targets(logits, target, ignore_index)
    else:
        target_probs, valid = _prob_targets(logits, target), None
    weight = _combine(valid, _voxel_weight(mask, logits))
    probs = torch.softmax(logits.float(), dim=1)
    if weight is not None:
        w = weight.unsqueeze(1)
        probs_w, target_w = probs * w, target_probs * w
    else:
        probs_w, target_w = probs, target_probs

    spatial = tuple(range(2, logits.dim()))
    reduce_dims = (0, *spatial) if batch_dice else spatial
    intersection = (probs_w * target_probs).sum(dim=reduce_dims)
    if squared:
        denominator = (probs_w * probs).sum(dim=reduce_dims) + (target_w * target_probs).sum(dim=reduce_dims)
    else:
        denominator = probs_w.sum(dim=reduce_dims) + target_w.sum(dim=reduce_dims)
    if batch_dice and reduce_sums is not None:
        intersection, denominator = reduce_sums(torch.stack((intersection, denominator))).unbind(0)
    dice = (2.0 * intersection + smooth) / (denominator + smooth)  # (K,) or (B, K)
    if not include_background:
        dice = dice[..., 1:]
    per_class_loss = 1.0 - dice
    if batch_dice or weight is None:
        return per_class_loss.mean()
    has_valid = (weight.flatten(1).sum(dim=1) > 0).to(per_class_loss.dtype)  # (B,)
    num_terms = (has_valid.sum() * per_class_loss.shape[1]).clamp_min(1)
    return (per_class_loss * has_valid[:, None]).sum() / num_terms


def cross_entropy_loss(logits: Tensor, labels: Tensor, *, ignore_index: int | None = None) -> Tensor:
    """Cross-entropy averaged over the voxels whose label is not ``ignore_index``."""
    _check_logits(logits)
    expected = (logits.shape[0], *logits.shape[2:])
    if tuple(labels.shape) != expected:
        raise ValueError(f"labels must have shape {expected} (B, *spatial), got {tuple(labels.shape)}")
    labels = labels.long()
    per_voxel = F.cross_entropy(
        logits.float(), labels, reduction="none", ignore_index=-100 if ignore_index is None else ignore_index
    )
    valid = None if ignore_index is None else (labels != ignore_index).to(torch.float32)
    return _masked_mean(per_voxel, valid)


def kl_loss(logits: Tensor, target_probs: Tensor, *, mask: Tensor | None = None, eps: float = 1e-8) -> Tensor:
    """KL(P || softmax(logits)) = sum_c P log(P / Q), averaged over (masked) voxels; P gets no gradient."""
    _check_logits(logits)
    p = _prob_targets(logits, target_probs)
    log_q = torch.log_softmax(logits.float(), dim=1)
    per_voxel = (p * (torch.log(p.clamp_min(eps)) - log_q)).sum(dim=1)
    return _masked_mean(per_voxel, _voxel_weight(mask, logits))


def supervised_loss(
    logits: Tensor,
    labels: Tensor,
    *,
    w_ce: float = 1.0,
    w_dice: float = 1.0,
    ignore_index: int | None = None,
    reduce_sums: ReduceSums | None = None,
) -> Tensor:
    """Labelled-data loss L_l = w_ce * CE + w_dice * Dice (batch Dice, background included; ``reduce_sums`` see
    soft_dice_loss)."""
    ce = cross_entropy_loss(logits, labels, ignore_index=ignore_index)
    dice = soft_dice_loss(logits, labels, ignore_index=ignore_index, reduce_sums=reduce_sums)
    return w_ce * ce + w_dice * dice


def pseudo_label_loss(
    logits: Tensor,
    target_probs: Tensor,
    *,
    w_kl: float = 1.0,
    w_dice: float = 1.0,
    mask: Tensor | None = None,
    squared_dice: bool = False,
    reduce_sums: ReduceSums | None = None,
) -> Tensor:
    """Unlabelled-data loss against soft pseudo-labels P: L_u = w_kl * KL(P || Q) + w_dice * Dice(Q, P).

    ``mask`` may hold float voxel weights (confidence-weighted pseudo-masks); ``squared_dice`` and ``reduce_sums``
    see soft_dice_loss."""
    kl = kl_loss(logits, target_probs, mask=mask)
    dice = soft_dice_loss(logits, target_probs, mask=mask, squared=squared_dice, reduce_sums=reduce_sums)
    return w_kl * kl + w_dice * dice


def softmax_mse_loss(
    logits: Tensor,
    target_logits_or_probs: Tensor,
    *,
    mask: Tensor | None = None,
    target_is_logits: bool = True,
) -> Tensor:
    """Mean-teacher consistency: squared softmax difference, mean over classes and (masked) voxels."""
    _check_logits(logits)
    target = _prob_targets(logits, target_logits_or_probs)
    if target_is_logits:
        target = torch.softmax(target, dim=1)
    per_voxel = ((torch.softmax(logits.float(), dim=1) - target) ** 2).mean(dim=1)
    return _masked_mean(per_voxel, _voxel_weight(mask, logits))


def paired_softmax_mse(logits_a: Tensor, logits_b: Tensor, *, mask: Tensor | None = None) -> Tensor:
    """mean over classes and (masked) voxels of (softmax a - softmax b)^2; unlike ``softmax_mse_loss`` neither side
    is a target, so both receive gradient (the Pi-model's two stochastic passes)."""
    _check_logits(logits_a)
    if logits_b.shape != logits_a.shape:
        raise ValueError(f"logits_b must have logits_a's shape {tuple(logits_a.shape)}, got {tuple(logits_b.shape)}")
    diff = torch.softmax(logits_a.float(), dim=1) - torch.softmax(logits_b.float(), dim=1)
    return _masked_mean((diff**2).mean(dim=1), _voxel_weight(mask, logits_a))


def entropy_loss(logits: Tensor, *, mask: Tensor | None = None, normalised: bool = True) -> Tensor:
    """Mean voxel entropy of softmax(logits) divided by log K, so it lies in [0, 1] for any class count; in nats
    with ``normalised=False`` (TENT's objective at prediction, ``inference/adapt.py``)."""
    _check_logits(logits)
    num_classes = logits.shape[1]
    log_p = torch.log_softmax(logits.float(), dim=1)
    per_voxel = -(log_p.exp() * log_p).sum(dim=1)
    if normalised and num_classes > 1:
        per_voxel = per_voxel / math.log(num_classes)
    return _masked_mean(per_voxel, _voxel_weight(mask, logits))


def hard_pseudo_label_ce(logits: Tensor, other_logits: Tensor, *, mask: Tensor | None = None) -> Tensor:
    """Cross pseudo supervision: CE of ``logits`` against the argmax of the other (detached) network."""
    _check_logits(logits)
    if other_logits.shape != logits.shape:
        raise ValueError(
            f"other_logits must have the logits' shape {tuple(logits.shape)}, got {tuple(other_logits.shape)}"
        )
    pseudo = other_logits.detach().argmax(dim=1)
    per_voxel = F.cross_entropy(logits.float(), pseudo, reduction="none")
    return _masked_mean(per_voxel, _voxel_weight(mask, logits))
