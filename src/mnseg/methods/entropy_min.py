"""Entropy minimisation: confident predictions on unlabelled data.

Grandvalet & Bengio, "Semi-supervised Learning by Entropy Minimization" (NeurIPS 2005); for segmentation
as in ADVENT's direct entropy loss (Vu et al., CVPR 2019) and SSL4MIS's 3D baseline:
    L = L_sup(f(x_l), y_l) + lambda(t) * 1/|V| sum_v H(p_v) / ln K,   H(p) = -sum_c p_c ln p_c,
p = softmax f(x_u), lambda(t) = 0.1 * sigmoid ramp-up over the run (``rampup: 0`` keeps lambda constant).
Normalising by ln K keeps the term in [0, 1] for any class count (SSL4MIS does the same).
``entropy_on_labeled: true`` also adds the labelled patches to the entropy term, as SSL4MIS's code does.
"""

from __future__ import annotations

from dataclasses import dataclass

from mnseg.losses import entropy_loss
from mnseg.methods.base import Batch, StepOutput
from mnseg.methods.semi import SemiParams, SemiSupervised


@dataclass
class EntropyMinParams(SemiParams):
    entropy_on_labeled: bool = False  # the labelled patches join the entropy term (SSL4MIS's code)


class EntropyMin(SemiSupervised):
    """Entropy minimisation: ramped softmax entropy on unlabelled patches (Grandvalet & Bengio 2005)."""

    name = "entropy_min"
    default_models = {"net": {"name": "unet3d_mn"}}
    params_class = EntropyMinParams

    def training_step(self, batch: Batch, epoch: int, iteration: int) -> StepOutput:
        step = self.global_step(epoch, iteration)
        images, label, b_l, b_u = self.augmented_batch(batch)
        logits = self.models["net"](images)
        loss_l = self.labelled_loss(logits[:b_l], label, batch.reduce_sums)
        logs = {"loss_l": loss_l.detach()}
        first = 0 if self.p.entropy_on_labeled else b_l
        if first == b_l and b_u == 0:
            return StepOutput(loss_l, logs)
        loss_u = entropy_loss(logits[first:])
        weight = self.unlabeled_weight(step)
        logs.update(loss_u=loss_u.detach(), w_u=weight)
        return StepOutput(loss_l + weight * loss_u, logs)
