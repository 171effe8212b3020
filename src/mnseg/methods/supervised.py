"""Supervised baseline: labelled patches only, L = w_ce * CE + w_dice * soft Dice."""

from __future__ import annotations

from mnseg.losses import supervised_loss
from mnseg.methods.base import Batch, Method, StepOutput


class Supervised(Method):
    """Plain supervised training on the labelled cases (the lower bound every method must beat)."""

    name = "supervised"
    default_models = {"net": {"name": "unet3d"}}

    def training_step(self, batch: Batch, epoch: int, iteration: int) -> StepOutput:
        image, (label,) = self.augment("net", batch.image_l, [batch.label_l], ["label"])
        logits = self.models["net"](image)
        loss = supervised_loss(
            logits,
            label,
            w_ce=self.param("w_ce", 1.0),
            w_dice=self.param("w_dice", 1.0),
            ignore_index=self.ctx.ignore_index,
        )
        return StepOutput(loss, {"loss_l": loss.detach()})
