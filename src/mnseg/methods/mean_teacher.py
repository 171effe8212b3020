"""Mean teacher: a student trained on labels and on agreement with its own exponential moving average.

Tarvainen & Valpola, "Mean teachers are better role models: Weight-averaged consistency targets improve
semi-supervised deep learning results" (NeurIPS 2017), as used for 3D segmentation in UA-MT (Yu et al.
2019) and SSL4MIS. With student f_theta and teacher f_theta' (no gradient):
    L = L_sup(f_theta(x_l), y_l) + lambda(t) * mean_{c, v} (softmax f_theta(x_u + n)  - softmax f_theta'(x_u + n'))^2
    theta'_t = alpha_t theta'_{t-1} + (1 - alpha_t) theta_t,   alpha_t = min(1 - 1 / (t + 1), alpha)
n, n' independent noises clamp(N(0, 0.1^2), -0.2, 0.2) (UA-MT's code; ``student_noise: false`` gives the
student the clean patch as UA-MT does), alpha = 0.99, lambda(t) = 0.1 * sigmoid ramp-up. Float buffers (e.g.
batch-norm statistics) are averaged like the weights. The teacher is never wrapped for DDP: it is updated
from the unwrapped student. The student predicts (as UA-MT tests it); ``infer.model=teacher`` uses the teacher.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mnseg.engine.contract import unwrap
from mnseg.errors import ConfigError
from mnseg.losses import softmax_mse_loss
from mnseg.methods.base import Batch, StepOutput, ema_update_
from mnseg.methods.semi import SemiParams, SemiSupervised


def clamped_noise(like: Tensor, std: float, clip: float) -> Tensor:
    """clamp(N(0, std^2), -clip, clip), UA-MT's input perturbation."""
    return torch.clamp(torch.randn_like(like) * std, -clip, clip)


@dataclass
class MeanTeacherParams(SemiParams):
    ema_decay: float = 0.99
    noise_std: float = 0.1
    noise_clip: float = 0.2
    consistency_on_labeled: bool = False
    student_noise: bool = True  # the student's patch is noised too (false: clean, as UA-MT)


class MeanTeacher(SemiSupervised):
    """Mean teacher: EMA-teacher softmax-MSE consistency on unlabelled patches (Tarvainen & Valpola 2017)."""

    name = "mean_teacher"
    params_class = MeanTeacherParams
    default_models = {"student": {"name": "unet3d_mn"}, "teacher": {"name": "unet3d_mn"}}
    frozen_roles = ("teacher",)
    predict_role = "student"
    train_role = "student"

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.ema_decay = float(self.p.ema_decay)
        if not 0.0 <= self.ema_decay <= 1.0:
            raise ConfigError(f"method.params.ema_decay must lie in [0, 1], got {self.ema_decay}")
        self.noise_std = float(self.p.noise_std)
        self.noise_clip = float(self.p.noise_clip)
        self.student_noise = bool(self.p.student_noise)
        self.on_labeled = bool(self.p.consistency_on_labeled)

    # --- the teacher ---------------------------------------------------------------------------------------
    def setup(self) -> None:
        student, teacher = unwrap(self.models["student"]), self.models["teacher"]
        s_names = [n for n, _ in student.named_parameters()]
        t_names = [n for n, _ in teacher.named_parameters()]
        if s_names != t_names or any(p.shape != q.shape for p, q in zip(student.parameters(), teacher.parameters())):
            raise ConfigError(
                "models.teacher must be the same network as models.student (same name, kwargs and fine-tuning); "
                "set both, e.g. models.student.name=X models.teacher.name=X"
            )
        teacher.requires_grad_(False)
        # Only when training: at prediction time the checkpoint's teacher is already loaded and must stay.
        if "student" in self.optimizers:
            teacher.load_state_dict(student.state_dict())

    @torch.no_grad()
    def after_optimizer_step(self, epoch: int, iteration: int) -> None:
        """theta' <- alpha_t theta' + (1 - alpha_t) theta, alpha_t = min(1 - 1/(t+1), alpha) (UA-MT's code)."""
        step = self.global_step(epoch, iteration)
        alpha = min(1.0 - 1.0 / (step + 1), self.ema_decay)
        ema_update_(self.models["teacher"], unwrap(self.models["student"]), alpha)

    def noisy(self, image: Tensor) -> Tensor:
        return image + clamped_noise(image, self.noise_std, self.noise_clip)

    # --- the step ------------------------------------------------------------------------------------------
    def consistency_loss(self, student_logits: Tensor, inputs: Tensor, step: int) -> tuple[Tensor, dict]:
        """mean_{c,v} (softmax student - softmax teacher(inputs + n'))^2; UA-MT adds its uncertainty mask."""
        with torch.no_grad():
            teacher_logits = self.models["teacher"](self.noisy(inputs))
        return softmax_mse_loss(student_logits, teacher_logits.float()), {}

    def training_step(self, batch: Batch, epoch: int, iteration: int) -> StepOutput:
        step = self.global_step(epoch, iteration)
        images, label, b_l, b_u = self.augmented_batch(batch)
        logits = self.models["student"](self.noisy(images) if self.student_noise else images)
        loss_l = self.labelled_loss(logits[:b_l], label, batch.reduce_sums)
        logs = {"loss_l": loss_l.detach()}
        first = 0 if self.on_labeled else b_l
        if b_u == 0 and not self.on_labeled:
            return StepOutput(loss_l, logs)
        loss_u, extra = self.consistency_loss(logits[first:], images[first:], step)
        weight = self.unlabeled_weight(step)
        logs.update(loss_u=loss_u.detach(), w_u=weight, **extra)
        return StepOutput(loss_l + weight * loss_u, logs)
