"""CPS: cross pseudo supervision between two networks of the same architecture, initialised differently.

Chen et al., "Semi-Supervised Semantic Segmentation with Cross Pseudo Supervision", CVPR 2021.
Roles: ``net_a`` (f(theta_a)) and ``net_b`` (f(theta_b)), both trained every step.

Each network's hard prediction supervises the other:
    Y_a = argmax P_a,   Y_b = argmax P_b                      (one-hot pseudo-labels, no gradient)
    L_cps = CE(P_a, Y_b) + CE(P_b, Y_a)                        over labelled and unlabelled voxels
    L_s   = L_sup(P_a, Y*) + L_sup(P_b, Y*)                    labelled voxels (ignore label skipped)
    L     = L_s + lambda(t) * L_cps,                           lambda = 1.5 (the paper's value)
L_sup is the project's w_ce CE + w_dice Dice (the paper uses CE alone: set ``w_dice: 0``).
lambda(t) = lambda * exp(-5 (1 - t / T_r)^2) for t < T_r (sigmoid-shaped ramp-up over ``rampup_epochs``),
lambda afterwards; ``rampup_epochs: 0`` (default) keeps it constant, as in the paper.

Batches hold B labelled and B unlabelled patches (the paper's equal labelled/unlabelled batch sizes).
Both networks see the same augmented patches, so their predictions are aligned voxel by voxel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mnseg.engine.contract import sigmoid_rampup
from mnseg.errors import ConfigError
from mnseg.losses import hard_pseudo_label_ce, supervised_loss
from mnseg.methods.base import Batch, StepOutput
from mnseg.methods.paired import PairedNetworks, PairedParams

ROLES = ("net_a", "net_b")


def parameters_equal(a: nn.Module, b: nn.Module) -> bool:
    pa, pb = list(a.parameters()), list(b.parameters())
    return len(pa) == len(pb) and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(pa, pb))


@torch.no_grad()
def reinitialise(model: nn.Module, seed: int) -> None:
    """Reset every layer whose own parameters are all trainable, from a fixed seed (frozen weights stay)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in model.modules():
            own = list(module.parameters(recurse=False))
            if own and all(p.requires_grad for p in own) and hasattr(module, "reset_parameters"):
                module.reset_parameters()


@dataclass
class CPSParams(PairedParams):
    lambda_cps: float = 1.5
    rampup_epochs: float = 0  # ramp of the CPS weight, in epochs (0: none)
    cps_on_labeled: bool = True


class CPS(PairedNetworks):
    """CPS: two differently initialised networks supervise each other with hard pseudo-labels (Chen et al. 2021)."""

    name = "cps"
    params_class = CPSParams
    default_models = {"net_a": {"name": "unet3d"}, "net_b": {"name": "unet3d"}}

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.lambda_cps = float(self.p.lambda_cps)
        self.rampup_epochs = float(self.p.rampup_epochs)
        self.cps_on_labeled = bool(self.p.cps_on_labeled)
        self.weights = {k: float(getattr(self.p, k)) for k in ("w_ce", "w_dice")}
        if self.lambda_cps < 0 or self.rampup_epochs < 0:
            raise ConfigError("method.params.lambda_cps and rampup_epochs must be >= 0")

    def setup(self) -> None:
        a, b = self.models["net_a"], self.models["net_b"]
        if parameters_equal(a, b):
            # CPS relies on the two networks starting apart; identical copies would agree forever.
            reinitialise(b, self.cfg.train.seed + 1)

    def cps_weight(self, epoch: int, iteration: int) -> float:
        it = self.ctx.iters_per_epoch
        return self.lambda_cps * sigmoid_rampup(epoch * it + iteration, self.rampup_epochs * it)

    def training_step(self, batch: Batch, epoch: int, iteration: int) -> StepOutput:
        b_l, b_u = batch.b_l, batch.b_u
        image = torch.cat([batch.image_l, batch.image_u]) if b_u else batch.image_l
        label = torch.cat([batch.label_l, batch.label_l.new_zeros((b_u, *batch.label_l.shape[1:]))])
        image, (label,) = self.augment("net_a", image, [label], ["label"])
        logits_a, logits_b = self.models["net_a"](image), self.models["net_b"](image)

        loss_sup = {
            role: supervised_loss(logits[:b_l], label[:b_l], ignore_index=self.ctx.ignore_index,
                                  reduce_sums=batch.reduce_sums, **self.weights)
            for role, logits in zip(ROLES, (logits_a, logits_b))
        }
        start = 0 if self.cps_on_labeled else b_l
        if start < b_l + b_u:
            pa, pb = logits_a[start:], logits_b[start:]
            loss_cps = hard_pseudo_label_ce(pa, pb) + hard_pseudo_label_ce(pb, pa)
        else:  # nothing to cross-supervise: an exact 0 still connected to both graphs
            loss_cps = 0.0 * (logits_a.sum() + logits_b.sum())
        weight = self.cps_weight(epoch, iteration)
        loss = loss_sup["net_a"] + loss_sup["net_b"] + weight * loss_cps
        logs = {
            "loss_sup_a": loss_sup["net_a"].detach(),
            "loss_sup_b": loss_sup["net_b"].detach(),
            "loss_cps": loss_cps.detach(),
            "lambda_cps": weight,
        }
        return StepOutput(loss, logs)
