"""UA-MT: mean teacher whose consistency counts only where the teacher is certain under Monte-Carlo dropout.

Yu et al., "Uncertainty-aware Self-ensembling Model for Semi-supervised 3D Left Atrium Segmentation"
(MICCAI 2019). On top of the mean teacher (see mean_teacher.py), the teacher runs T = 8 stochastic passes on
the unlabelled patch, each with its dropout layers active (Monte-Carlo dropout, Gal & Ghahramani 2016) and
input noise n_t ~ clamp(N(0, 0.1^2), -0.2, 0.2):
    mu_c = 1/T sum_t softmax f_theta'(x_u + n_t; dropout_t)_c,    u = -sum_c mu_c log(mu_c + 1e-6)     (eq. 3)
    H(t) = (3/4 + 1/4 exp(-5 (1 - t/t_max)^2)) * ln K                                     (threshold ramp)
    L_c  = sum_v I(u_v < H) sum_c (p_c - q_c)^2 / (K * sum_v I(u_v < H) + 1e-16)                   (eq. 4)
    L    = L_sup + lambda(t) L_c,   lambda(t) = 0.1 exp(-5 (1 - t/t_max)^2)                        (eq. 1)
p the student's softmax (clean input, as in UA-MT's code), q the teacher's softmax on one more noisy pass with
dropout active (their teacher is in train mode throughout). Only dropout layers are switched to train mode
(``mc_dropout``, default): the teacher's norms stay in eval mode, so its batch-norm running statistics (the
student's, averaged) are used and never updated by these passes. ``mc_dropout: false`` keeps the teacher wholly
in eval mode (the passes then differ by input noise only). The network needs dropout for this to matter: the
ua_mt preset uses p = 0.5 at the bottleneck and before the classifier, as their V-Net.
UA-MT's code divides by 2 * sum(mask) with K = 2 hard-coded; K * sum(mask) is the same there and makes L_c
the masked mean over classes and voxels for any K (with no voxel masked it equals the mean teacher's loss).
The student predicts.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mnseg.engine.contract import sigmoid_rampup
from mnseg.errors import ConfigError
from mnseg.methods.mean_teacher import MeanTeacher, MeanTeacherParams


@contextlib.contextmanager
def dropout_active(model: nn.Module, active: bool = True):
    """Inside: ``model``'s dropout layers in train mode, every other layer in the mode it had (Monte-Carlo
    dropout; norms in eval mode neither use batch statistics nor update their running ones). Restored after."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)] if active else []
    modes = [m.training for m in layers]
    for m in layers:
        m.train()
    try:
        yield len(layers)
    finally:
        for m, mode in zip(layers, modes):
            m.train(mode)


@dataclass
class UAMTParams(MeanTeacherParams):
    uncertainty_passes: int = 8  # T
    uncertainty_chunk: int = 2  # copies of the batch per teacher forward (UA-MT's code: 2)
    student_noise: bool = False  # UA-MT gives the student the clean patch
    mc_dropout: bool = True  # the teacher's dropout is active in its passes (false: wholly eval, noise only)


class UAMT(MeanTeacher):
    """UA-MT: mean teacher with an MC-dropout uncertainty mask on the consistency (Yu et al. 2019)."""

    name = "ua_mt"
    params_class = UAMTParams

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.passes = int(self.p.uncertainty_passes)
        self.chunk = int(self.p.uncertainty_chunk)
        self.mc_dropout = bool(self.p.mc_dropout)
        if self.passes < 1 or self.chunk < 1:
            raise ConfigError(
                f"method.params.uncertainty_passes and uncertainty_chunk must be >= 1, "
                f"got {self.passes} and {self.chunk}"
            )

    def threshold(self, step: int) -> float:
        """H(t) = (0.75 + 0.25 * sigmoid_rampup(t, t_max)) * ln K."""
        return (0.75 + 0.25 * sigmoid_rampup(step, self.total_steps)) * math.log(self.ctx.num_classes)

    def teacher_probs(self, inputs: Tensor) -> Tensor:
        """softmax f_theta'(inputs + n; dropout) : one stochastic teacher pass (no gradient)."""
        teacher = self.models["teacher"]
        with torch.no_grad(), dropout_active(teacher, self.mc_dropout):
            return torch.softmax(teacher(self.noisy(inputs)).float(), dim=1)

    @torch.no_grad()
    def uncertainty(self, inputs: Tensor) -> Tensor:
        """Predictive entropy (B, 1, *S) of the teacher's mean softmax over T stochastic passes (eq. 3).

        Passes run ``uncertainty_chunk`` copies of the batch at a time (UA-MT's code: 2), bounding memory; each
        copy gets its own noise and, with ``mc_dropout``, its own dropout masks.
        """
        mean = None
        done = 0
        while done < self.passes:
            n = min(self.chunk, self.passes - done)
            probs = self.teacher_probs(inputs.repeat(n, *[1] * (inputs.dim() - 1)))
            total = probs.reshape(n, inputs.shape[0], *probs.shape[1:]).sum(dim=0)
            mean = total if mean is None else mean + total
            done += n
        mean = mean / self.passes
        return -(mean * torch.log(mean + 1e-6)).sum(dim=1, keepdim=True)

    def consistency_loss(self, student_logits: Tensor, inputs: Tensor, step: int) -> tuple[Tensor, dict]:
        """L_c (eq. 4): squared softmax difference averaged over the voxels with u < H(t), and over classes."""
        target = self.teacher_probs(inputs)
        mask = (self.uncertainty(inputs) < self.threshold(step)).float()
        squared = (torch.softmax(student_logits.float(), dim=1) - target) ** 2
        num_classes = student_logits.shape[1]
        loss = (mask * squared).sum() / (num_classes * mask.sum() + 1e-16)
        return loss, {"certain_fraction": mask.mean()}
