"""What the single-network semi-supervised methods share: batch split, labelled loss, ramped weight.

Mean teacher, UA-MT, entropy minimisation and transformation consistency all train one network on
    L = L_sup(labelled) + lambda(t) * L_u(unlabelled),
    L_sup = w_ce CE + w_dice Dice (ignore label left out),
    lambda(t) = w_max * exp(-5 (1 - min(t, t_ramp) / t_ramp)^2)   (sigmoid ramp-up, Laine & Aila 2017),
t the global iteration (0-based) and t_ramp = ``rampup`` x the run's total iterations. Every batch holds
B labelled and B unlabelled patches (UA-MT/SSL4MIS: labelled_bs = unlabelled_bs), B = train.batch_size;
``unlabeled_batch_size`` changes the unlabelled count; with no unlabelled cases b_u = 0 and L = L_sup.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from mnseg.engine.contract import sigmoid_rampup
from mnseg.errors import ConfigError
from mnseg.losses import ReduceSums, supervised_loss
from mnseg.methods.base import Batch, Method, Params


@dataclass
class SemiParams(Params):
    consistency: float = 0.1  # w_max, the unlabelled term's weight after the ramp
    rampup: float = 1.0  # the ramp's length as a fraction of the run's iterations (0: no ramp)
    unlabeled_batch_size: int | None = None  # b_u (default: B, as many as labelled)
    w_ce: float = 0.5  # L_sup weights: 0.5/0.5 as UA-MT's and SSL4MIS's 0.5 (CE + Dice)
    w_dice: float = 0.5


class SemiSupervised(Method):
    """Base for one trained network (``train_role``) plus an unlabelled-data term with a ramped weight."""

    train_role: ClassVar[str] = "net"
    params_class = SemiParams

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.w_max = float(self.p.consistency)
        self.rampup = float(self.p.rampup)
        if self.w_max < 0 or not 0.0 <= self.rampup <= 1.0:
            raise ConfigError(
                f"method.params: consistency must be >= 0 and rampup a fraction of the run in [0, 1], "
                f"got consistency={self.w_max}, rampup={self.rampup}"
            )
        self.unlabeled_batch_size = self.p.unlabeled_batch_size
        if self.unlabeled_batch_size is not None and int(self.unlabeled_batch_size) < 0:
            raise ConfigError(f"method.params.unlabeled_batch_size must be >= 0, got {self.unlabeled_batch_size}")

    # --- schedule ----------------------------------------------------------------------------------------
    @property
    def total_steps(self) -> int:
        return self.ctx.epochs * self.ctx.iters_per_epoch

    def global_step(self, epoch: int, iteration: int) -> int:
        return epoch * self.ctx.iters_per_epoch + iteration

    def ramp(self, step: int) -> float:
        """0 -> 1 sigmoid ramp over the first ``rampup`` fraction of the run."""
        return sigmoid_rampup(step, self.rampup * self.total_steps)

    def unlabeled_weight(self, step: int) -> float:
        """lambda(t) = w_max * ramp(t)."""
        return self.w_max * self.ramp(step)

    def batch_split(self, epoch: int, iteration: int) -> tuple[int, int]:
        B = self.ctx.batch_size
        if self.ctx.n_unlabeled == 0:
            return B, 0
        return B, int(self.unlabeled_batch_size) if self.unlabeled_batch_size is not None else B

    # --- the batch ---------------------------------------------------------------------------------------
    def augmented_batch(self, batch: Batch) -> tuple[Tensor, Tensor, int, int]:
        """(images, label, b_l, b_u): the labelled items augmented with their labels, then the unlabelled ones (in
        this order, as the augmenter's random draws go), concatenated so one forward sees the whole batch."""
        role = self.train_role
        image_l, (label,) = self.augment(role, batch.image_l, [batch.label_l], ["label"])
        image_u, _ = self.augment(role, batch.image_u)
        return torch.cat([image_l, image_u]), label, image_l.shape[0], image_u.shape[0]

    # --- losses ------------------------------------------------------------------------------------------
    def labelled_loss(self, logits: Tensor, label: Tensor, reduce_sums: ReduceSums | None) -> Tensor:
        """L_sup = w_ce CE + w_dice Dice; defaults 0.5/0.5 as UA-MT's and SSL4MIS's 0.5 (CE + Dice). ``reduce_sums``:
        the batch's (``Batch.reduce_sums``), so batch Dice pools over the whole global batch."""
        return supervised_loss(
            logits,
            label,
            w_ce=float(self.p.w_ce),
            w_dice=float(self.p.w_dice),
            ignore_index=self.ctx.ignore_index,
            reduce_sums=reduce_sums,
        )
