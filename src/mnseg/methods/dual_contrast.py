"""Dual subnets of different architectures: confidence-gated consistency and prototype contrast.

Lu, Wu, Kateb & Chaddad, "Semi-Supervised Medical Image Segmentation via Dual Networks", 2025
(arXiv:2505.17690; it builds on MCF, Wang et al., CVPR 2023). Roles: ``net_a`` and ``net_b``, two 3D
networks of different architecture (``models.net_a`` / ``models.net_b``), both trained every step on the
same B labelled + B unlabelled patches. P_a, P_b are their softmax outputs, z_a, z_b their voxel features.

    L_s = L_sup(P_a, Y*) + L_sup(P_b, Y*)                       (CE + Dice, ignore label skipped)
Pseudo-label: the subnet with the lower supervised loss this step ("winner" w) provides  Y^ = argmax P_w.
Entropy split: H = -sum_c P_w log P_w / log K; unlabelled voxels with H above its ``unreliable_quantile``
quantile in the batch are unreliable (U), the rest reliable (R); labelled (not ignored) voxels are reliable
with their true class. The unlabelled loss (eq. 2) is the entropy-filtered pseudo-supervision plus L_reg:
    L_pl  = sum_n [CE(P_n, Y^) + Dice(P_n, Y^)] over R                     (``pseudo_supervision``)
    M     = [max P_a > T(t)] & [max P_b > T(t)] & [argmax P_a != argmax P_b]        (unlabelled voxels)
    L_reg = mean_M ||M P_a - M P_b||_1                                      (``reg_form: pair``, default)
    L_u   = L_pl + L_reg
L_reg pulls the two subnets towards each other where both are confident but disagree, so it trains both;
``reg_form: winner`` is mnseg's earlier form, mean_M ||P_a - onehot Y^||_1 + mean_M ||P_b - onehot Y^||_1.
T(t) moves linearly from ``threshold_start`` to ``threshold_end`` over the run ("adjusted during training").
For each subnet n (its own feature space):
    mu_c   = normalise(mean of normalise(z_n) over reliable voxels of class c)      (class prototypes)
    L_pull = mean_{i in A} -log( exp(z_i . sg(mu_{y_i}) / tau) / sum_k exp(z_i . sg(mu_k) / tau) )
    L_push = mean_{c != k} (1 + mu_c . mu_k) / 2
    L_c    = sum_n (L_pull + L_push)
A: anchors drawn from U, ``anchors_per_class`` per (pseudo-)class when ``class_balanced`` (default), so
rare classes such as lesions are represented, else that many times K uniformly. sg: stop-gradient, so
the pull moves unreliable features towards their prototype, and the push moves prototypes apart.
    L = L_s + lambda_u L_u + lambda_c(t) L_c,    lambda_u = 1
lambda_c(t) = 0.1 exp(-4 (1 - t/t_max)^2) (Gaussian ramp-up to 0.1, default, ``lambda_c_form: rampup``);
the paper prints 0.1 exp(4 (1 - t/t_max)^2), which falls from about 5.5 to 0.1 (``lambda_c_form: literal``).

Unlike the public code of the method (its unlabelled and contrastive terms are computed on detached
tensors in ``no_grad`` and so train nothing), every term here carries gradient into both subnets.

Voxel features are the input of each model's final classification layer, taken with a forward hook on the
last ``Conv3d`` with kernel 1x1x1 and ``num_classes`` outputs (DynUNet's and SwinUNETR's output conv);
features padded by the model are cropped back to the logits' size. 2D slice-wise models are not supported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from mnseg.errors import ConfigError
from mnseg.losses import ReduceSums, supervised_loss
from mnseg.methods.base import Batch, StepOutput
from mnseg.methods.paired import PairedNetworks, PairedParams
from mnseg.methods.voxel_contrast import ClassifierInputs, class_prototypes

ROLES = ("net_a", "net_b")
LAMBDA_C_FORMS = ("rampup", "literal")
REG_FORMS = ("pair", "winner")


# --- pieces of the loss, as functions so they can be checked on their own ---------------------------------
def lambda_c_at(step: int, total_steps: int, form: str = "rampup", scale: float = 0.1) -> float:
    """rampup: scale e^(-4 (1 - t/T)^2) rising to ``scale``; literal (as printed): scale e^(4 (1 - t/T)^2)."""
    phase = 1.0 - min(max(step / max(total_steps, 1), 0.0), 1.0)
    sign = -1.0 if form == "rampup" else 1.0
    return float(scale * math.exp(sign * 4.0 * phase * phase))


def gated_l1_consistency(
    probs_a: Tensor, probs_b: Tensor, pseudo: Tensor, threshold: float, form: str = "pair"
) -> tuple[Tensor, Tensor]:
    """L_reg on voxels where both subnets are confident above T but disagree (the gate M).

    ``pair`` (the paper): mean_M sum_c |P_a - P_b|, gradient into both. ``winner``: the L1 of each subnet to
    onehot(pseudo), summed. Returns the loss and the (B, *S) gate M; averages over M (0, still connected, when
    M is empty).
    """
    conf_a, label_a = probs_a.max(dim=1)
    conf_b, label_b = probs_b.max(dim=1)
    gate = (conf_a > threshold) & (conf_b > threshold) & (label_a != label_b)
    weight = gate.to(probs_a.dtype)
    count = weight.sum().clamp_min(1.0)
    if form == "pair":
        return ((probs_a - probs_b).abs().sum(dim=1) * weight).sum() / count, gate
    target = F.one_hot(pseudo, probs_a.shape[1]).movedim(-1, 1).to(probs_a.dtype)
    loss = sum(((p - target).abs().sum(dim=1) * weight).sum() / count for p in (probs_a, probs_b))
    return loss, gate


def filtered_pseudo_supervision(
    logits: Tensor, pseudo: Tensor, unreliable: Tensor, w_ce: float = 1.0, w_dice: float = 1.0,
    reduce_sums: ReduceSums | None = None,
) -> Tensor:
    """w_ce CE + w_dice Dice of (B, K, *S) logits against the pseudo-label (B, *S), unreliable voxels left out
    (``reduce_sums``: the batch's, see ``losses.soft_dice_loss``)."""
    left_out = logits.shape[1]  # a class index no pseudo-label has
    target = torch.where(unreliable, torch.full_like(pseudo, left_out), pseudo)
    return supervised_loss(logits, target, w_ce=w_ce, w_dice=w_dice, ignore_index=left_out, reduce_sums=reduce_sums)


def normalised_entropy(probs: Tensor) -> Tensor:
    """Voxel entropy of (B, K, *S) probabilities divided by log K, in [0, 1]."""
    entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum(dim=1)
    return entropy / math.log(probs.shape[1]) if probs.shape[1] > 1 else entropy


def upper_quantile_mask(values: Tensor, quantile: float) -> Tensor:
    """True where ``values`` lie above their ``quantile`` (kthvalue: no size limit, unlike torch.quantile)."""
    flat = values.reshape(-1).float()
    if flat.numel() == 0:
        return torch.zeros_like(values, dtype=torch.bool)
    k = min(max(int(math.ceil(quantile * flat.numel())), 1), flat.numel())
    return values > flat.kthvalue(k).values


def sample_anchors(
    classes: Tensor,
    candidates: Tensor,
    num_classes: int,
    per_class: int,
    class_balanced: bool = True,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Indices of anchor voxels among ``candidates`` and a validity mask (no host sync).

    Class-balanced: up to ``per_class`` random candidates of every class (a class with fewer gives all it
    has). Otherwise ``per_class * num_classes`` candidates drawn uniformly, whatever their class.
    """
    n = classes.numel()
    scores = torch.rand(n, generator=generator, device=classes.device)
    groups = [candidates & (classes == c) for c in range(num_classes)] if class_balanced else [candidates]
    take = per_class if class_balanced else per_class * num_classes
    index, valid = [], []
    for group in groups:
        top = torch.topk(torch.where(group, scores, torch.full_like(scores, -1.0)), min(take, n))
        index.append(top.indices)
        valid.append(top.values >= 0)
    return torch.cat(index), torch.cat(valid)


def prototype_contrast(
    features: Tensor,
    classes: Tensor,
    reliable: Tensor,
    unreliable: Tensor,
    num_classes: int,
    *,
    per_class: int,
    temperature: float,
    class_balanced: bool = True,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, dict]:
    """L_pull + L_push for one subnet; ``features`` (N, D) raw, ``classes``/masks (N,).

    Runs in float32 even under autocast: sums over many voxels and logits divided by a small
    temperature lose too much in bfloat16.
    """
    with torch.autocast(features.device.type, enabled=False):
        return _prototype_contrast(
            features.float(), classes, reliable, unreliable, num_classes, per_class, temperature, class_balanced,
            generator,
        )  # fmt: skip


def _prototype_contrast(
    features, classes, reliable, unreliable, num_classes, per_class, temperature, class_balanced, generator
):
    z = F.normalize(features, dim=1)
    protos, present = class_prototypes(z, classes, reliable, num_classes)
    index, valid = sample_anchors(classes, unreliable, num_classes, per_class, class_balanced, generator)
    anchor_class = classes[index]
    valid = valid & present[anchor_class]
    logits = z[index] @ protos.detach().t() / temperature  # (M, K)
    logits = logits.masked_fill(~present.unsqueeze(0), -1e4)
    nll = -torch.log_softmax(logits, dim=1).gather(1, anchor_class.unsqueeze(1)).squeeze(1)
    weight = valid.to(nll.dtype)
    pull = (nll * weight).sum() / weight.sum().clamp_min(1.0)

    pair = (present.unsqueeze(0) & present.unsqueeze(1)).to(z.dtype)
    pair = pair * (1.0 - torch.eye(num_classes, device=z.device, dtype=z.dtype))
    push = ((1.0 + protos @ protos.t()) / 2.0 * pair).sum() / pair.sum().clamp_min(1.0)
    return pull + push, {"pull": pull.detach(), "push": push.detach(), "anchors": weight.sum().detach()}


# --- the method -------------------------------------------------------------------------------------------
@dataclass
class DualContrastParams(PairedParams):
    lambda_u: float = 1.0
    lambda_c: float = 0.1
    lambda_c_form: str = "rampup"
    reg_form: str = "pair"  # L_reg: pair (|M P_a - M P_b|, the paper) or winner (L1 to the winner's one-hot)
    pseudo_supervision: bool = True  # eq. 2's CE + Dice against the entropy-filtered pseudo-labels
    threshold_start: float = 0.6
    threshold_end: float = 0.9
    unreliable_quantile: float = 0.8
    anchors_per_class: int = 256
    temperature: float = 0.1
    class_balanced: bool = True


class DualContrast(PairedNetworks):
    """Dual subnets: winner's pseudo-labels, confidence-gated L1, prototype contrast (Lu et al. 2025)."""

    name = "dual_contrast"
    params_class = DualContrastParams
    default_models = {
        "net_a": {"name": "unet3d"},
        "net_b": {"name": "unet3d", "kwargs": {"depth": 4, "base_filters": 24}},
    }

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.weights = {k: float(getattr(self.p, k)) for k in ("w_ce", "w_dice")}
        self.lambda_u = float(self.p.lambda_u)
        self.lambda_c = float(self.p.lambda_c)
        self.lambda_c_form = self.p.lambda_c_form
        if self.lambda_c_form not in LAMBDA_C_FORMS:
            raise ConfigError(
                f"method.params.lambda_c_form='{self.lambda_c_form}' unknown; choose one of {', '.join(LAMBDA_C_FORMS)}"
            )
        self.reg_form = self.p.reg_form
        if self.reg_form not in REG_FORMS:
            raise ConfigError(f"method.params.reg_form='{self.reg_form}' unknown; choose one of {', '.join(REG_FORMS)}")
        self.pseudo_supervision = bool(self.p.pseudo_supervision)
        self.threshold_start = float(self.p.threshold_start)
        self.threshold_end = float(self.p.threshold_end)
        self.unreliable_quantile = float(self.p.unreliable_quantile)
        if not 0.0 <= self.unreliable_quantile <= 1.0:
            raise ConfigError(f"method.params.unreliable_quantile must be in [0, 1], got {self.unreliable_quantile}")
        self.anchors_per_class = int(self.p.anchors_per_class)
        self.temperature = float(self.p.temperature)
        self.class_balanced = bool(self.p.class_balanced)
        self.generator = torch.Generator(device=ctx.device)
        self.generator.manual_seed(int(cfg.train.seed) + 11)
        self.taps = ClassifierInputs(self.name)  # voxel features: each model's classifier input

    # --- set-up: feature hooks ------------------------------------------------------------------------------
    def setup(self) -> None:
        for role in ROLES:
            self.taps.attach(role, self.models[role], self.ctx.num_classes, self.cfg.models[role].name)

    def forward_with_features(self, role: str, image: Tensor) -> tuple[Tensor, Tensor]:
        return self.taps.forward(role, self.models[role], image)

    # --- schedules ------------------------------------------------------------------------------------------
    def progress(self, epoch: int, iteration: int) -> tuple[int, int]:
        it = self.ctx.iters_per_epoch
        return epoch * it + iteration, self.ctx.epochs * it

    def threshold(self, epoch: int, iteration: int) -> float:
        step, total = self.progress(epoch, iteration)
        share = min(step / max(total - 1, 1), 1.0)
        return self.threshold_start + (self.threshold_end - self.threshold_start) * share

    def contrast_weight(self, epoch: int, iteration: int) -> float:
        step, total = self.progress(epoch, iteration)
        return lambda_c_at(step, total, self.lambda_c_form, self.lambda_c)

    # --- the step -------------------------------------------------------------------------------------------
    def training_step(self, batch: Batch, epoch: int, iteration: int) -> StepOutput:
        b_l, b_u = batch.b_l, batch.b_u
        image = torch.cat([batch.image_l, batch.image_u]) if b_u else batch.image_l
        label = torch.cat([batch.label_l, batch.label_l.new_zeros((b_u, *batch.label_l.shape[1:]))])
        image, (label,) = self.augment("net_a", image, [label], ["label"])
        logits, feats = {}, {}
        for role in ROLES:
            logits[role], feats[role] = self.forward_with_features(role, image)
        probs = {role: torch.softmax(logits[role].float(), dim=1) for role in ROLES}

        loss_sup = {
            role: supervised_loss(logits[role][:b_l], label[:b_l], ignore_index=self.ctx.ignore_index,
                                  reduce_sums=batch.reduce_sums, **self.weights)
            for role in ROLES
        }
        a_wins = loss_sup["net_a"].detach() <= loss_sup["net_b"].detach()  # tensor: no host sync
        winner = torch.where(a_wins, probs["net_a"].detach(), probs["net_b"].detach())
        pseudo = winner.argmax(dim=1)
        logs = {f"loss_sup_{r[-1]}": loss_sup[r].detach() for r in ROLES}
        logs["a_wins"] = a_wins.float()

        unreliable = self.unreliable_voxels(winner, b_l)
        loss_u = self.unlabelled_loss(logits, probs, pseudo, unreliable, b_l, epoch, iteration, logs, batch.reduce_sums)
        loss_c = self.contrastive_loss(feats, pseudo, label, unreliable, b_l, logs)
        weight_c = self.contrast_weight(epoch, iteration)
        loss = loss_sup["net_a"] + loss_sup["net_b"] + self.lambda_u * loss_u + weight_c * loss_c
        logs.update({"loss_u": loss_u.detach(), "loss_c": loss_c.detach(), "lambda_c": weight_c})
        return StepOutput(loss, logs)

    def unreliable_voxels(self, winner: Tensor, b_l: int) -> Tensor:
        """(B, *S) U: unlabelled voxels whose winner entropy lies above its ``unreliable_quantile`` (labelled: none)."""
        unreliable = torch.zeros((winner.shape[0], *winner.shape[2:]), dtype=torch.bool, device=winner.device)
        if winner.shape[0] > b_l:
            unreliable[b_l:] = upper_quantile_mask(normalised_entropy(winner[b_l:]), self.unreliable_quantile)
        return unreliable

    def unlabelled_loss(
        self, logits, probs, pseudo, unreliable, b_l: int, epoch: int, iteration: int, logs: dict,
        reduce_sums: ReduceSums | None = None,
    ):
        """lambda_u's term L_u = L_pl + L_reg on the unlabelled items (an exact, connected 0 when there are none);
        ``reduce_sums``: the batch's, for L_pl's batch Dice."""
        pa, pb = probs["net_a"][b_l:], probs["net_b"][b_l:]
        if pa.shape[0] == 0:
            return 0.0 * (probs["net_a"].sum() + probs["net_b"].sum())
        loss_reg, gate = gated_l1_consistency(pa, pb, pseudo[b_l:], self.threshold(epoch, iteration), self.reg_form)
        logs["gate_fraction"] = gate.float().mean().detach()
        logs["loss_reg"] = loss_reg.detach()
        if not self.pseudo_supervision:
            return loss_reg
        loss_pl = sum(
            filtered_pseudo_supervision(
                logits[role][b_l:], pseudo[b_l:], unreliable[b_l:], reduce_sums=reduce_sums, **self.weights
            )
            for role in ROLES
        )
        logs["loss_pl"] = loss_pl.detach()
        return loss_pl + loss_reg

    def contrastive_loss(self, feats, pseudo, label, unreliable, b_l: int, logs: dict) -> Tensor:
        """lambda_c's term: prototype contrast in each subnet's feature space (shared split and classes)."""
        ignore = self.ctx.ignore_index
        labelled = torch.zeros_like(pseudo, dtype=torch.bool)
        labelled[:b_l] = True
        valid = labelled if ignore is None else labelled & (label != ignore)
        classes = torch.where(labelled, torch.where(valid, label, torch.zeros_like(label)), pseudo)
        reliable = valid | (~labelled & ~unreliable)
        total = 0.0
        for role in ROLES:
            f = feats[role].movedim(1, -1).reshape(-1, feats[role].shape[1])
            loss, parts = prototype_contrast(
                f,
                classes.reshape(-1),
                reliable.reshape(-1),
                unreliable.reshape(-1),
                self.ctx.num_classes,
                per_class=self.anchors_per_class,
                temperature=self.temperature,
                class_balanced=self.class_balanced,
                generator=self.generator,
            )
            total = total + loss
            logs[f"contrast_pull_{role[-1]}"] = parts["pull"]
            logs[f"contrast_push_{role[-1]}"] = parts["push"]
        return total

    # --- inference and state --------------------------------------------------------------------------------
    def extra_state(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_extra_state(self, state: dict) -> None:
        if "generator" in state:
            self.generator.set_state(state["generator"].cpu())
