"""What a method may use of the engine: the one module in ``engine/`` (and ``inference/``) that ``methods/``
imports. The rest of the contract is ``methods/base.py`` (``Method``, ``MethodContext``, ``Batch``,
``StepOutput``).

- ``Segment``: a learning-rate segment (warm-up + cosine, or step decay) a method returns from
  ``schedule_segments``; ``segment``: the one a model's ``optim`` settings ask for;
  ``current_lr``: the learning rate an optimiser steps with now; ``sigmoid_rampup``: the ramp of consistency
  weights.
- ``unwrap``: the bare module behind a DDP wrapper (EMA teachers and frozen copies are made from it).
- ``predict_probabilities``: sliding-window softmax of a whole volume, as validation and prediction compute it,
  with the window's ``WindowSettings`` (``WindowSettings.from_config(cfg)``).
- ``PatchSampler``: what the engine's patch sampler offers a method (``Method.batcher``, set by the trainer before
  the first epoch): the unlabelled cases, and where their crops are centred (M&N's foreground refresh).
"""

from __future__ import annotations

from typing import Protocol

from mnseg.engine.checkpoint import unwrap
from mnseg.engine.schedules import Segment, current_lr, segment, sigmoid_rampup
from mnseg.inference.window import WindowSettings

__all__ = [
    "PatchSampler", "Segment", "WindowSettings", "current_lr", "predict_probabilities", "segment", "sigmoid_rampup",
    "unwrap",
]


class PatchSampler(Protocol):
    unlabeled: list  # in-memory unlabelled cases: ``case_id``, ``image`` (C, X, Y, Z)

    def set_unlabeled_foreground(self, coords: dict[str, dict]) -> None:
        """Centre later unlabelled crops on these voxels: case id -> class -> (N, 3) coordinates."""


def predict_probabilities(models, image, window: WindowSettings, device, mirror_axes=None):
    """Softmax probabilities (K, X, Y, Z) of one preprocessed image (C, X, Y, Z) by sliding window; several models
    are averaged (``inference.predict.predict_probabilities``, looked up at call time)."""
    from mnseg.inference import predict

    if mirror_axes is None:
        return predict.predict_probabilities(models, image, window, device)
    return predict.predict_probabilities(models, image, window, device, mirror_axes)
