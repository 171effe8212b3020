"""UA-MT: mean teacher whose consistency counts only where the teacher is certain.

Yu et al., "Uncertainty-aware Self-ensembling Model for Semi-supervised 3D Left Atrium Segmentation"
(MICCAI 2019). On top of the mean teacher (see mean_teacher.py), the teacher runs T = 8 times on the
unlabelled patch with noise clamp(N(0, 0.1^2), -0.2, 0.2):
    mu_c = 1/T sum_t softmax f_theta'(x_u + n_t)_c,      u = -sum_c mu_c log(mu_c + 1e-6)
    H(t) = (0.75 + 0.25 * ramp(t / t_max)) * ln K         (sigmoid ramp over the whole run)
    L_c  = sum_v I(u_v < H) sum_c (p_c - q_c)^2 / (K * sum_v I(u_v < H) + 1e-16)
p the student's softmax (clean input, as in UA-MT's code), q the teacher's softmax on one more noisy pass.
UA-MT's code divides by 2 * sum(mask) with K = 2 hard-coded; K * sum(mask) is the same there and makes L_c
the masked mean over classes and voxels for any K (with no voxel masked it equals the mean teacher's loss).
The student predicts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from mnseg.engine.contract import sigmoid_rampup
from mnseg.errors import ConfigError
from mnseg.methods.mean_teacher import MeanTeacher, MeanTeacherParams


@dataclass
class UAMTParams(MeanTeacherParams):
    uncertainty_passes: int = 8
    uncertainty_chunk: int = 2
    student_noise: bool = False  # UA-MT gives the student the clean patch


class UAMT(MeanTeacher):
    """UA-MT: mean teacher with an MC-uncertainty mask on the consistency (Yu et al. 2019)."""

    name = "ua_mt"
    params_class = UAMTParams

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.passes = int(self.p.uncertainty_passes)
        self.chunk = int(self.p.uncertainty_chunk)
        if self.passes < 1 or self.chunk < 1:
            raise ConfigError(
                f"method.params.uncertainty_passes and uncertainty_chunk must be >= 1, "
                f"got {self.passes} and {self.chunk}"
            )

    def threshold(self, step: int) -> float:
        """H(t) = (0.75 + 0.25 * sigmoid_rampup(t, t_max)) * ln K."""
        return (0.75 + 0.25 * sigmoid_rampup(step, self.total_steps)) * math.log(self.ctx.num_classes)

    @torch.no_grad()
    def uncertainty(self, inputs: Tensor) -> Tensor:
        """Predictive entropy (B, 1, *S) of the teacher's mean softmax over T noisy passes.

        Passes run ``uncertainty_chunk`` copies of the batch at a time (UA-MT's code: 2), bounding memory.
        """
        teacher = self.models["teacher"]
        mean = None
        done = 0
        while done < self.passes:
            n = min(self.chunk, self.passes - done)
            repeated = inputs.repeat(n, *[1] * (inputs.dim() - 1))
            probs = torch.softmax(teacher(self.noisy(repeated)).float(), dim=1)
            total = probs.reshape(n, inputs.shape[0], *probs.shape[1:]).sum(dim=0)
            mean = total if mean is None else mean + total
            done += n
        mean = mean / self.passes
        return -(mean * torch.log(mean + 1e-6)).sum(dim=1, keepdim=True)

    def consistency_loss(self, student_logits: Tensor, inputs: Tensor, step: int) -> tuple[Tensor, dict]:
        with torch.no_grad():
            target = torch.softmax(self.models["teacher"](self.noisy(inputs)).float(), dim=1)
            mask = (self.uncertainty(inputs) < self.threshold(step)).float()
        squared = (torch.softmax(student_logits.float(), dim=1) - target) ** 2
        num_classes = student_logits.shape[1]
        loss = (mask * squared).sum() / (num_classes * mask.sum() + 1e-16)
        return loss, {"certain_fraction": mask.mean()}
