"""Pictures in TensorBoard while training: a trainer hook, given to the trainer by whoever runs it."""

from __future__ import annotations

import numpy as np

from mnseg.engine.hooks import Hook
from mnseg.reporting.overlays import overlay_rgb


class OverlayHook(Hook):
    """After each validation, the first validation case's truth beside its prediction (the slice with most
    foreground) as ``val/truth_vs_prediction``; runs after the validation and TensorBoard hooks."""

    def after_epoch(self, epoch: int, row: dict) -> None:
        t = self.trainer
        example = getattr(t, "val_example", None)
        if t.tb is None or example is None:
            return
        case, pred = example
        label = case.label
        z = int(np.argmax((label > 0).sum(axis=(0, 1)))) if label is not None else case.image.shape[-1] // 2
        img = case.image[0, :, :, z]
        truth = overlay_rgb(img, label[:, :, z], t.ctx.num_classes)
        guess = overlay_rgb(img, pred[:, :, z], t.ctx.num_classes)
        t.tb.add_image("val/truth_vs_prediction", np.concatenate([truth, guess], axis=1), epoch + 1, dataformats="HWC")
