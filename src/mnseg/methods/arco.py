"""ARCO: mean teacher + voxel contrast whose anchors and negatives are drawn by stratified group sampling.

You, Dai, Min, Liu, Clifton, Zhou, Staib & Duncan, "Rethinking Semi-Supervised Medical Image Segmentation: A
Variance-Reduction Perspective" (NeurIPS 2023; code: charlesyou999648/ARCO, built on ReCo, Liu et al. ICLR 2022).
Student f_theta (trained, predicts), teacher f_theta' its EMA (no gradient), z / z' their voxel features (the
classifier's input), P' = softmax f_theta'(x) on the clean patch, y^ = argmax P', c^ = max P':
    L      = L_sup(f_theta(x_l + n), y_l) + lambda_u L_unsup + lambda_c L_contrast
    L_unsup  = mean_{b, v in unlabelled} w_b CE(f_theta(x_u + n)_v, y^_v),  w_b = share of item b's voxels with
               c^ >= strong_threshold (ReCo's and ARCO's code; detached)
    classes: labelled voxels their label (the ignore label left out), unlabelled voxels y^ where c^ >= weak_threshold
    mu_c   = normalise(mean of z' over the voxels of class c)                      (positive key, teacher)
    A_c    = m anchors of class c, N_c = m x k negatives of the other classes, both drawn by stratified group
             sampling (SG; SAG with antithetic pairs, the default as in the code) among those voxels
    L_contrast = mean_{c present} mean_{i in A_c} -log( e^{s(z_i, mu_c)/tau} / (e^{s(z_i, mu_c)/tau}
               + sum_{j in N_c(i)} e^{s(z_i, z'_j)/tau}) ),   s = cosine similarity
    theta'_t = alpha_t theta'_{t-1} + (1 - alpha_t) theta_t                           (mean_teacher.py)
Only the anchors carry gradient (student features); keys and prototypes are the teacher's (no gradient). The
sampler is ``methods/voxel_contrast.py`` (stratified_group_sample); n is mean teacher's input noise, on the
student's patch only (the teacher sees the clean patch, as the code's pseudo-labels).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from mnseg.errors import ConfigError
from mnseg.methods.base import Batch, StepOutput
from mnseg.methods.mean_teacher import MeanTeacher, MeanTeacherParams
from mnseg.methods.voxel_contrast import (
    ClassifierInputs,
    class_prototypes,
    flat_voxels,
    prototype_info_nce,
    sample_by_class,
)

SAMPLINGS = {"sag": (True, True), "sg": (True, False), "naive": (False, False)}  # -> (stratified, antithetic)


def confidence_weighted_ce(logits: Tensor, teacher_probs: Tensor, strong_threshold: float) -> tuple[Tensor, Tensor]:
    """L_unsup = mean_{b,v} w_b CE(logits_v, argmax P'_v), w_b = share of item b's voxels with max P' >= threshold.

    Returns the loss and w (B,); an exact, connected 0 without items. Teacher probabilities are detached here."""
    if logits.shape[0] == 0:
        return 0.0 * logits.sum(), logits.new_zeros(0)
    confidence, pseudo = teacher_probs.detach().max(dim=1)
    weight = (confidence >= strong_threshold).flatten(1).float().mean(dim=1)  # (B,)
    per_voxel = F.cross_entropy(logits.float(), pseudo, reduction="none")  # (B, *S)
    return (per_voxel * weight.view(-1, *[1] * (per_voxel.dim() - 1))).mean(), weight


def contrast_classes(
    label: Tensor, teacher_probs_u: Tensor, weak_threshold: float, ignore_index: int | None
) -> tuple[Tensor, Tensor]:
    """(classes, valid), (B_l + B_u, *S): labels where annotated, the teacher's pseudo-label where c^ >= weak."""
    valid_l = torch.ones_like(label, dtype=torch.bool) if ignore_index is None else label != ignore_index
    classes_l = torch.where(valid_l, label, torch.zeros_like(label))
    confidence, pseudo = teacher_probs_u.detach().max(dim=1)
    return torch.cat([classes_l, pseudo]), torch.cat([valid_l, confidence >= weak_threshold])


@dataclass
class ArcoParams(MeanTeacherParams):
    consistency: float = 1.0  # lambda_u (the code's k3 = 1)
    rampup: float = 0.0  # the code's weights are constant
    w_ce: float = 1.0  # L_sup = CE + Dice, as the code
    w_dice: float = 1.0
    contrast_weight: float = 0.01  # lambda_c (the code's k1 = 0.01)
    temperature: float = 0.5  # tau (the code's temp)
    anchors_per_class: int = 256  # m (the code's num_queries)
    negatives_per_anchor: int = 512  # k (the code's num_negatives)
    groups: int = 16  # G (the code cuts into 4 x 4)
    sampling: str = "sag"  # sag (the code's asmc), sg (smc) or naive (uniform)
    weak_threshold: float = 0.7  # unlabelled voxels join the contrast where c^ >= this (ReCo)
    strong_threshold: float = 0.97  # w_b counts voxels with c^ >= this (the code's strong_threshold)


class Arco(MeanTeacher):
    """ARCO: mean teacher, confidence-weighted pseudo-labels, voxel contrast with stratified group sampling."""

    name = "arco"
    params_class = ArcoParams

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        if self.on_labeled:
            raise ConfigError("arco: consistency_on_labeled does not apply (pseudo-labels are for unlabelled items)")
        if self.p.sampling not in SAMPLINGS:
            choices = ", ".join(SAMPLINGS)
            raise ConfigError(f"method.params.sampling='{self.p.sampling}' unknown; choose one of {choices}")
        stratified, self.antithetic = SAMPLINGS[self.p.sampling]
        self.groups = int(self.p.groups) if stratified else 1
        if self.groups < 1 or int(self.p.anchors_per_class) < 1 or int(self.p.negatives_per_anchor) < 1:
            raise ConfigError("method.params: groups, anchors_per_class and negatives_per_anchor must be >= 1")
        self.taps = ClassifierInputs(self.name)
        self.generator = torch.Generator(device=ctx.device)
        self.generator.manual_seed(int(cfg.train.seed) + 13)

    def setup(self) -> None:
        super().setup()
        for role in ("student", "teacher"):
            self.taps.attach(role, self.models[role], self.ctx.num_classes, self.cfg.models[role].name)

    # --- the contrast ----------------------------------------------------------------------------------------
    def contrastive_loss(self, z: Tensor, z_teacher: Tensor, classes: Tensor, valid: Tensor) -> tuple[Tensor, dict]:
        """L_contrast on (B, D, *S) student/teacher features and (B, *S) classes/valid (module docstring)."""
        K, m, k = self.ctx.num_classes, int(self.p.anchors_per_class), int(self.p.negatives_per_anchor)
        classes, valid = classes.reshape(-1), valid.reshape(-1)
        draws = sample_by_class(classes, valid, K, m, k, self.groups, self.antithetic, self.generator)
        student, teacher = flat_voxels(z), flat_voxels(z_teacher).detach()
        mu, present = class_prototypes(teacher.float(), classes, valid, K)
        use = draws["anchor_valid"][:, 0] & draws["negative_valid"][:, 0, 0] & present
        anchor = student[draws["anchor"]]  # (K, m, D): the only term with gradient
        negative = teacher[draws["negative"]]  # (K, m, k, D)
        loss = prototype_info_nce(anchor, mu, negative, use, float(self.p.temperature))
        return loss, {"contrast_classes": use.float().sum().detach()}

    # --- the step --------------------------------------------------------------------------------------------
    def training_step(self, batch: Batch, epoch: int, iteration: int) -> StepOutput:
        step = self.global_step(epoch, iteration)
        image_l, (label,) = self.augment("student", batch.image_l, [batch.label_l], ["label"])
        image_u, _ = self.augment("student", batch.image_u)
        b_l = image_l.shape[0]
        images = torch.cat([image_l, image_u])
        student_input = self.noisy(images) if self.student_noise else images
        logits, z = self.taps.forward("student", self.models["student"], student_input)
        with torch.no_grad():
            logits_t, z_t = self.taps.forward("teacher", self.models["teacher"], images)
        probs_t = torch.softmax(logits_t[b_l:].float(), dim=1)

        loss_l = self.labelled_loss(logits[:b_l], label, batch.reduce_sums)
        loss_u, confident = confidence_weighted_ce(logits[b_l:], probs_t, float(self.p.strong_threshold))
        classes, valid = contrast_classes(label, probs_t, float(self.p.weak_threshold), self.ctx.ignore_index)
        loss_c, extra = self.contrastive_loss(z, z_t, classes, valid)
        weight_u, weight_c = self.unlabeled_weight(step), float(self.p.contrast_weight)
        logs = {"loss_l": loss_l.detach(), "loss_u": loss_u.detach(), "loss_c": loss_c.detach(), "w_u": weight_u}
        logs.update(confident=confident.mean().detach() if confident.numel() else 0.0, **extra)
        return StepOutput(loss_l + weight_u * loss_u + weight_c * loss_c, logs)

    # --- state -----------------------------------------------------------------------------------------------
    def extra_state(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_extra_state(self, state: dict) -> None:
        if "generator" in state:
            self.generator.set_state(state["generator"].cpu())
