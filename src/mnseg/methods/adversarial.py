"""Adversarial training: a discriminator judges segmentations; the segmenter learns to fool it on unlabelled data.

Two formulations (``formulation``). ``hung`` (default): Hung et al., "Adversarial Learning for Semi-Supervised
Semantic Segmentation", BMVC 2018: D tells ground-truth masks from predictions, with confidence-map
self-training. ``dan``: Zhang et al., "Deep Adversarial Networks for Biomedical Image Segmentation Utilizing
Unannotated Images" (DAN), MICCAI 2017: D (their evaluation network) judges image-segmentation pairs and tells
the segmentations of annotated images from those of unannotated ones. Roles: ``net`` (segmenter S) and ``disc``
(discriminator D, ``discriminator3d``: per-voxel real/fake logits over softmax maps, optionally with the image).

Each step, on B labelled and B unlabelled patches, P = softmax(S(x)), Y* the one-hot ground truth:
  hung:
    L_D   = BCE(D(Y*), 1) + BCE(D(P_detached), 0)                     trains D only
    L_adv = BCE(D(P_u), 1)                                             trains S only (D held fixed)
    L_semi = CE(P_u, argmax P_u) on voxels where sigmoid(D(P_u)) > T_semi, after ``semi_start`` iterations
  dan (D always sees the image: ``models.disc.kwargs.use_image: true``):
    L_D   = BCE(D(x_l, P_l_detached), 1) + BCE(D(x_u, P_u_detached), 0)     labelled = real, unlabelled = fake
    L_adv = BCE(D(x_u, P_u), 1)                                        trains S only (D held fixed)
    (no L_semi unless ``self_training: true``)
  both:
    L_S   = L_sup(P_l, Y*) + lambda_adv L_adv + lambda_semi L_semi
    L     = L_S + L_D
L_D is computed on detached predictions, so it pushes nothing into S; L_adv runs D with detached copies of
its parameters (``torch.func.functional_call``), so its gradient reaches S through P but never D. The two
graphs are disjoint, and the engine's single ``backward`` of their sum gives each optimiser exactly its
own gradient. Defaults: lambda_adv 0.001 and lambda_semi 0.1, T_semi 0.2 (Hung et al.'s values with
unlabelled data); semi_start a quarter of the run (their 5000 of 20000 iterations).

Ignore label: in D's "real" input the ignored voxels carry the (detached) prediction instead of a one-hot
mask, and per-voxel real logits there are left out of the BCE, so nobody-annotated voxels tell D nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.func import functional_call

import mnseg.models.discriminator  # noqa: F401  (registers "discriminator3d" for the engine)
from mnseg.errors import ConfigError
from mnseg.losses import ReduceSums, hard_pseudo_label_ce, supervised_loss
from mnseg.methods.base import Batch, Method, Params, StepOutput

ADV_ON = ("unlabeled", "all")
FORMULATIONS = ("hung", "dan")


def bce_with_logits(logits: torch.Tensor, target: float, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean BCE of (B, 1, *S) logits against a constant real (1) / fake (0) target; weighted voxels only.
    An empty batch gives a connected 0."""
    if logits.numel() == 0:
        return logits.float().sum() * 0.0
    per_voxel = F.binary_cross_entropy_with_logits(
        logits.float(), torch.full_like(logits, target, dtype=torch.float32), reduction="none"
    )
    if weight is None:
        return per_voxel.mean()
    weight = weight.to(per_voxel.dtype).expand_as(per_voxel)
    return (per_voxel * weight).sum() / weight.sum().clamp_min(1.0)


@dataclass
class AdversarialParams(Params):
    formulation: str = "hung"  # hung: D judges true masks vs predictions; dan: labelled vs unlabelled predictions
    lambda_adv: float = 0.001
    adv_on: str = "unlabeled"
    self_training: bool | None = None  # Hung et al.'s confidence self-training (default: on for hung, off for dan)
    lambda_semi: float = 0.1
    t_semi: float = 0.2
    w_ce: float = 1.0  # weight of cross-entropy in the labelled loss
    w_dice: float = 1.0  # weight of soft Dice
    semi_start: int | None = None  # first iteration of the self-training term (default: a quarter of the run)


class Adversarial(Method):
    """Adversarial: the segmenter learns to fool a 3D discriminator (Hung et al. 2018; DAN, Zhang et al. 2017)."""

    name = "adversarial"
    params_class = AdversarialParams
    default_models = {"net": {"name": "unet3d"}, "disc": {"name": "discriminator3d"}}
    predict_role = "net"

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.formulation = self.p.formulation
        if self.formulation not in FORMULATIONS:
            raise ConfigError(
                f"method.params.formulation='{self.formulation}' unknown; choose one of {', '.join(FORMULATIONS)}"
            )
        self.lambda_adv = float(self.p.lambda_adv)
        self.adv_on = self.p.adv_on
        if self.adv_on not in ADV_ON:
            raise ConfigError(f"method.params.adv_on='{self.adv_on}' unknown; choose one of {', '.join(ADV_ON)}")
        if self.formulation == "dan" and self.adv_on != "unlabeled":
            raise ConfigError("method.params.adv_on must be 'unlabeled' with formulation dan (labelled = real)")
        default_st = self.formulation == "hung"
        self.self_training = default_st if self.p.self_training is None else bool(self.p.self_training)
        self.lambda_semi = float(self.p.lambda_semi)
        self.t_semi = float(self.p.t_semi)
        total = ctx.epochs * ctx.iters_per_epoch
        self.semi_start = int(total // 4 if self.p.semi_start is None else self.p.semi_start)
        self.weights = {k: float(getattr(self.p, k)) for k in ("w_ce", "w_dice")}

    def batch_split(self, epoch: int, iteration: int) -> tuple[int, int]:
        B = self.ctx.batch_size
        return B, (B if self.ctx.n_unlabeled > 0 else 0)

    def setup(self) -> None:
        if self.formulation == "dan" and not getattr(self.models["disc"], "use_image", False):
            raise ConfigError(
                "adversarial: formulation dan judges image-segmentation pairs; set models.disc.kwargs.use_image=true"
            )

    # --- the discriminator's view -------------------------------------------------------------------------
    def disc_input(self, maps: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """(B, K, *S) maps, with the image channels appended when D judges image-mask pairs (DAN)."""
        if getattr(self.models["disc"], "use_image", False):
            return torch.cat([maps, image.to(maps.dtype)], dim=1)
        return maps

    def judge_with_fixed_disc(self, x: torch.Tensor) -> torch.Tensor:
        """D(x) with D's parameters detached: gradient flows into x (the segmenter), never into D."""
        disc = self.models["disc"]
        fixed = {name: t.detach() for name, t in [*disc.named_parameters(), *disc.named_buffers()]}
        return functional_call(disc, fixed, (x,))

    def real_maps(self, label: torch.Tensor, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One-hot ground truth; ignored voxels take the detached prediction. Also the valid-voxel mask."""
        ignore = self.ctx.ignore_index
        valid = None if ignore is None else label != ignore
        clean = label if valid is None else torch.where(valid, label, torch.zeros_like(label))
        one_hot = F.one_hot(clean.long(), probs.shape[1]).movedim(-1, 1).to(probs.dtype)
        if valid is None:
            return one_hot, None
        return torch.where(valid.unsqueeze(1), one_hot, probs.detach()), valid.unsqueeze(1)

    # --- the step -------------------------------------------------------------------------------------------
    def segmenter_loss(
        self, logits, probs, image, label, b_l: int, step: int, reduce_sums: ReduceSums | None = None
    ) -> tuple[torch.Tensor, dict]:
        """L_S = L_sup + lambda_adv L_adv + lambda_semi L_semi (gradient into the segmenter only); ``reduce_sums``:
        the batch's, for L_sup's batch Dice."""
        logs = {}
        loss_sup = supervised_loss(logits[:b_l], label[:b_l], ignore_index=self.ctx.ignore_index,
                                   reduce_sums=reduce_sums, **self.weights)
        loss = loss_sup
        logs["loss_sup"] = loss_sup.detach()
        start = b_l if self.adv_on == "unlabeled" else 0
        n = logits.shape[0]
        if start < n:
            d_fool = self.judge_with_fixed_disc(self.disc_input(probs[start:], image[start:]))
            loss_adv = bce_with_logits(d_fool, 1.0)
            loss = loss + self.lambda_adv * loss_adv
            logs["loss_adv"] = loss_adv.detach()
            if self.self_training and b_l < n and step >= self.semi_start:
                d_u = d_fool[b_l - start :].detach().float()
                if d_u.shape[2:] != logits.shape[2:]:
                    d_u = F.interpolate(d_u, size=logits.shape[2:], mode="trilinear", align_corners=False)
                confident = torch.sigmoid(d_u[:, 0]) > self.t_semi
                logits_u = logits[b_l:]
                loss_semi = hard_pseudo_label_ce(logits_u, logits_u.detach(), mask=confident)
                loss = loss + self.lambda_semi * loss_semi
                logs["loss_semi"] = loss_semi.detach()
                logs["semi_fraction"] = confident.float().mean().detach()
        return loss, logs

    def discriminator_loss(self, probs, image, label, b_l: int) -> tuple[torch.Tensor, dict]:
        """L_D = BCE(D(real), 1) + BCE(D(fake), 0) on detached predictions (gradient into D only).

        hung: real = Y* (the ground truth), fake = P of every item. dan: real = (x_l, P_l), fake = (x_u, P_u).
        """
        disc = self.models["disc"]
        detached = probs.detach()
        weight = None
        if self.formulation == "dan":
            d_real = disc(self.disc_input(detached[:b_l], image[:b_l]))
            # no unlabelled items: no fake, so no L_D (a connected 0)
            d_fake = disc(self.disc_input(detached[b_l:], image[b_l:])) if detached.shape[0] > b_l else d_real[:0]
        else:
            real, valid = self.real_maps(label[:b_l], detached[:b_l])
            d_real = disc(self.disc_input(real, image[:b_l]))
            d_fake = disc(self.disc_input(detached, image))
            weight = valid if valid is not None and d_real.shape[2:] == valid.shape[2:] else None
        loss = bce_with_logits(d_real, 1.0, weight) + bce_with_logits(d_fake, 0.0)
        if d_fake.numel() == 0:
            loss = loss * 0.0
        logs = {"loss_disc": loss.detach(), "d_real": torch.sigmoid(d_real.float()).mean().detach()}
        if d_fake.numel():
            logs["d_fake"] = torch.sigmoid(d_fake.float()).mean().detach()
        return loss, logs

    def training_step(self, batch: Batch, epoch: int, iteration: int) -> StepOutput:
        b_l, b_u = batch.b_l, batch.b_u
        image = torch.cat([batch.image_l, batch.image_u]) if b_u else batch.image_l
        label = torch.cat([batch.label_l, batch.label_l.new_zeros((b_u, *batch.label_l.shape[1:]))])
        image, (label,) = self.augment("net", image, [label], ["label"])
        logits = self.models["net"](image)
        probs = torch.softmax(logits.float(), dim=1)
        step = epoch * self.ctx.iters_per_epoch + iteration
        loss_s, logs = self.segmenter_loss(logits, probs, image, label, b_l, step, batch.reduce_sums)
        loss_d, logs_d = self.discriminator_loss(probs, image, label, b_l)
        logs.update(logs_d)
        return StepOutput(loss_s + loss_d, logs)
