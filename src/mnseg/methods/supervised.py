"""Supervised baseline: labelled patches only, L = w_ce * CE + w_dice * soft Dice."""

from __future__ import annotations

from dataclasses import dataclass

from mnseg.losses import supervised_loss
from mnseg.methods.base import Batch, Method, Params, StepOutput


@dataclass
class SupervisedParams(Params):
    w_ce: float = 1.0  # weight of cross-entropy
    w_dice: float = 1.0  # weight of soft Dice


class Supervised(Method):
    """Plain supervised training on the labelled cases (the lower bound every method must beat)."""

    name = "supervised"
    default_models = {"net": {"name": "unet3d"}}
    params_class = SupervisedParams

    def training_step(self, batch: Batch, epoch: int, iteration: int) -> StepOutput:
        image, (label,) = self.augment("net", batch.image_l, [batch.label_l], ["label"])
        logits = self.models["net"](image)
        loss = supervised_loss(
            logits,
            label,
            w_ce=self.p.w_ce,
            w_dice=self.p.w_dice,
            ignore_index=self.ctx.ignore_index,
            reduce_sums=batch.reduce_sums,
        )
        return StepOutput(loss, {"loss_l": loss.detach()})
