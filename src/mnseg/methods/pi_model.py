"""Pi-model: one network evaluated twice per input, under different noise and dropout, made to agree.

Laine & Aila, "Temporal Ensembling for Semi-Supervised Learning" (ICLR 2017), section 2.1 and Algorithm 1. For every
item x_i of the batch B (labelled and unlabelled), g an input perturbation and f_theta the network with dropout:
    z_i  = f_theta(g(x_i)),   z~_i = f_theta(g(x_i))                 (two passes, independent noise and dropout)
    L    = L_sup(z_l, y_l) + w(t) * 1/(K |B|) sum_{i in B} sum_v ||softmax z_i - softmax z~_i||^2 / |v|
    w(t) = w_max * exp(-5 (1 - T)^2),  T = min(t / t_ramp, 1)       (Gaussian ramp-up, ``semi.py``)
Neither pass is detached: z and z~ are both the network's output and the squared difference trains both (the paper's
Algorithm 1 backpropagates the whole loss; the Pi-model has no fixed target, unlike mean teacher). The geometric
augmentation (the engine's augmenter) is drawn once per item and shared by both passes, so their voxel outputs
stay aligned; g adds Gaussian noise N(0, ``noise_std``^2) (the paper's 0.15), drawn for each pass, and each pass
draws its own dropout masks (the network trains in train mode; ``models.net.kwargs.dropout`` sets the rate).
L_sup (CE + Dice, ignore label left out) is computed on the first pass, as the paper's cross-entropy on z_i.
``consistency_on_labeled: false`` restricts the consistency to the unlabelled items.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mnseg.losses import paired_softmax_mse
from mnseg.methods.base import Batch, StepOutput
from mnseg.methods.semi import SemiParams, SemiSupervised


@dataclass
class PiModelParams(SemiParams):
    rampup: float = 80 / 300  # the paper ramps w(t) up over its first 80 of 300 epochs
    noise_std: float = 0.15  # the paper's Gaussian input noise
    consistency_on_labeled: bool = True  # the paper's sum runs over the whole batch B


class PiModel(SemiSupervised):
    """Pi-model: squared softmax difference of two stochastic passes of one network (Laine & Aila 2017)."""

    name = "pi_model"
    params_class = PiModelParams
    default_models = {"net": {"name": "unet3d_mn"}}

    def noisy(self, image: Tensor) -> Tensor:
        """g(x) = x + N(0, noise_std^2), a new draw on every call."""
        return image + float(self.p.noise_std) * torch.randn_like(image)

    def training_step(self, batch: Batch, epoch: int, iteration: int) -> StepOutput:
        step = self.global_step(epoch, iteration)
        net = self.models["net"]
        images, label, b_l, b_u = self.augmented_batch(batch)
        first = 0 if self.p.consistency_on_labeled else b_l
        if first == b_l and b_u == 0:  # nothing to be consistent on: one pass, L = L_sup
            loss_l = self.labelled_loss(net(self.noisy(images)), label, batch.reduce_sums)
            return StepOutput(loss_l, {"loss_l": loss_l.detach()})

        z = net(self.noisy(images))  # pass 1: noise n, dropout masks m
        z_tilde = net(self.noisy(images[first:]))  # pass 2: noise n', dropout masks m'
        loss_l = self.labelled_loss(z[:b_l], label, batch.reduce_sums)
        loss_u = paired_softmax_mse(z[first:], z_tilde)  # no detach: both passes receive gradient
        weight = self.unlabeled_weight(step)
        logs = {"loss_l": loss_l.detach(), "loss_u": loss_u.detach(), "w_u": weight}
        return StepOutput(loss_l + weight * loss_u, logs)
