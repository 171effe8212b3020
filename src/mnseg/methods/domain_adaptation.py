"""Unsupervised domain adaptation for any method: DANN's domain loss and entropy minimisation on target crops.

The dataset's ``imagesTarget`` scans (another scanner, protocol or site; no label is ever read) are cropped like
the unlabelled ones and handed to the step as ``Batch.image_t``. With the method's own loss L_method unchanged,
    L = L_method + w_dann L_d + w_ent L_ent,
  DANN (Ganin & Lempitsky, "Unsupervised Domain Adaptation by Backpropagation", ICML 2015), on the adapted
  network's encoder bottleneck features f (``models/domain_classifier.py`` holds G_d and the reversal R_lambda):
    L_d = 1/2 [ mean_{source positions} BCE(G_d(R_lambda(f_s)), 0)
              + mean_{target positions} BCE(G_d(R_lambda(f_t)), 1) ],
  so G_d learns to tell the domains apart while the encoder, through R_lambda's -lambda gradient, learns features
  it cannot; lambda_p = lambda (2 / (1 + exp(-10 p)) - 1), p in [0, 1] the run's progress (the paper's schedule,
  ``grl_schedule: constant`` keeps lambda);
  entropy minimisation on the target (as ADVENT's direct entropy loss, Vu et al. CVPR 2019):
    L_ent = 1/|V| sum_v H(p_v) / ln K,   H(p) = -sum_c p_c ln p_c,   p = softmax of the target crops' logits.
f_s are the bottleneck outputs of every forward the method's own step runs through the adapted network (its
augmented source crops: the labelled ones, and the unlabelled ones for a semi-supervised method); f_t those of one
extra forward of the (augmented) target crops, whose logits give L_ent. Weights: ``domain.dann_weight``,
``domain.target_entropy_weight``; either at 0 switches its term off.

``adapted(cls, cfg)`` returns ``cls`` with these terms mixed in front of its ``training_step`` (a subclass made
once per method class), so no method file changes; with DANN on it adds the ``domain_classifier`` role, built
from the ``domain`` settings (hidden width, learning rate; otherwise the adapted network's optimiser settings) and
trained whenever the adapted network is. The terms are skipped in epochs where the adapted network does not train
(M&N's alternation).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mnseg.config.schema import AugmentSettings, Config, ModelConfig
from mnseg.engine.contract import unwrap
from mnseg.errors import ConfigError
from mnseg.losses import entropy_loss
from mnseg.methods.base import Batch, Method, StepOutput
from mnseg.models.domain_classifier import grad_reverse

DOMAIN_ROLE = "domain_classifier"
_ADAPTED: dict[tuple[type, bool], type] = {}


def adapted(cls: type[Method], cfg: Config) -> type[Method]:
    """``cls`` with the domain terms of ``cfg.domain`` (``cls`` itself when both weights are 0). With DANN on, a
    ``models.domain_classifier`` entry is added to ``cfg`` unless the config has one."""
    dom = cfg.domain
    if not dom.active:
        return cls
    dann = dom.dann_weight > 0
    if dann and DOMAIN_ROLE not in cfg.models:
        cfg.models[DOMAIN_ROLE] = classifier_config(cfg, adapted_role(cls, cfg))
    key = (cls, dann)
    if key not in _ADAPTED:
        roles = {**cls.default_models, **({DOMAIN_ROLE: {"name": "domain_classifier3d"}} if dann else {})}
        _ADAPTED[key] = type(f"DomainAdapted{cls.__name__}", (DomainAdaptation, cls),
                             {"default_models": roles, "__doc__": cls.__doc__, "__module__": cls.__module__})
    return _ADAPTED[key]


def adapted_role(cls: type[Method], cfg: Config) -> str:
    """The role adapted: ``domain.role``, else the method's predicting role; ConfigError for a role it lacks."""
    role = cfg.domain.role or cls.predict_role
    if role not in cls.default_models or role == DOMAIN_ROLE:
        raise ConfigError(f"domain.role: method {cls.name} has no model role {role!r} "
                          f"(its roles: {', '.join(cls.default_models)})")
    return role


def classifier_config(cfg: Config, role: str) -> ModelConfig:
    """G_d's model settings: ``domain.classifier_width`` hidden channels, the adapted role's optimiser (with
    ``domain.classifier_lr`` when set), no augmentation (it sees features, not images)."""
    optim = cfg.models[role].optim if role in cfg.models else ModelConfig().optim
    lr = cfg.domain.classifier_lr
    if lr is not None:
        optim = dataclasses.replace(optim, lr=float(lr), final_lr=min(optim.final_lr, float(lr)))
    return ModelConfig(name="domain_classifier3d", kwargs={"width": int(cfg.domain.classifier_width)},
                       optim=dataclasses.replace(optim), augment=AugmentSettings(preset="none"))


def bottleneck_of(model: nn.Module, role: str) -> nn.Module:
    """The encoder bottleneck of a 3D UNet (``unet3d``, ``unet3d_mn``: MONAI's DynUNet inside)."""
    bare = unwrap(model)
    net = getattr(bare, "net", None)
    if getattr(bare, "spatial_dims", None) != 3 or not hasattr(net, "bottleneck") or not hasattr(bare, "filters"):
        raise ConfigError(f"domain.dann_weight: models.{role} ({type(bare).__name__}) is not a 3D UNet with an encoder "
                          "bottleneck; DANN reads unet3d or unet3d_mn (domain.role picks the network)")
    return net.bottleneck


def grl_lambda(progress: float, lam: float, schedule: str) -> float:
    """lambda_p = lambda (2 / (1 + exp(-10 p)) - 1) (DANN's schedule: 0 at the start, -> lambda), or lambda."""
    if schedule == "constant":
        return float(lam)
    return float(lam) * (2.0 / (1.0 + math.exp(-10.0 * min(max(progress, 0.0), 1.0))) - 1.0)


def domain_loss(classifier: nn.Module, source: list[Tensor], target: list[Tensor], lam: float) -> tuple[Tensor, Tensor]:
    """L_d = 1/2 [mean BCE(G_d(R(f_s)), 0) + mean BCE(G_d(R(f_t)), 1)] over every bottleneck position, and G_d's
    accuracy (1/2 the source positions called source + 1/2 the target ones called target; 0.5: confused)."""
    s = torch.cat([classifier(grad_reverse(f, lam)).float().flatten() for f in source])
    t = torch.cat([classifier(grad_reverse(f, lam)).float().flatten() for f in target])
    loss = 0.5 * (F.binary_cross_entropy_with_logits(s, torch.zeros_like(s))
                  + F.binary_cross_entropy_with_logits(t, torch.ones_like(t)))
    accuracy = 0.5 * ((s < 0).float().mean() + (t > 0).float().mean())
    return loss, accuracy


class DomainAdaptation(Method):
    """Mixed in before a method's class by ``adapted``; defines no class attribute, so the method's own name,
    roles, parameters and predictor stay as they are."""

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.dom = cfg.domain
        self.da_role = adapted_role(type(self), cfg)
        self._captured: list[Tensor] | None = None  # bottleneck outputs, collected while a step runs

    # --- set-up --------------------------------------------------------------------------------------------
    def derived_kwargs(self, role: str, built: dict[str, nn.Module]) -> dict:
        if role != DOMAIN_ROLE:
            return super().derived_kwargs(role, built)
        bottleneck_of(built[self.da_role], self.da_role)
        return {"features": int(unwrap(built[self.da_role]).filters[-1])}

    def setup(self) -> None:
        super().setup()
        if self.dom.dann_weight > 0:
            bottleneck_of(self.models[self.da_role], self.da_role).register_forward_hook(self._keep)

    def _keep(self, module, inputs, output) -> None:
        if self._captured is not None:
            self._captured.append(output)

    def schedule_segments(self, role: str):
        if role == DOMAIN_ROLE:  # one segment over the run, whatever the method does with its own roles
            return Method.schedule_segments(self, role)
        return super().schedule_segments(role)

    def active_roles(self, epoch: int) -> list[str]:
        """The method's roles; G_d trains whenever the adapted network does."""
        roles = [r for r in super().active_roles(epoch) if r != DOMAIN_ROLE]
        return roles + [DOMAIN_ROLE] if self.da_role in roles and DOMAIN_ROLE in self.models else roles

    # --- the step ------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _capturing(self):
        """The list the adapted network's bottleneck outputs are appended to while the block runs."""
        kept: list[Tensor] = []
        self._captured = kept
        try:
            yield kept
        finally:
            self._captured = None

    def training_step(self, batch: Batch, epoch: int, iteration: int) -> StepOutput:
        with self._capturing() as source:
            out = super().training_step(batch, epoch, iteration)
        if self.da_role not in super().active_roles(epoch):
            return out
        loss, logs = self.target_terms(batch, source, epoch * self.ctx.iters_per_epoch + iteration)
        return StepOutput(out.loss + loss, {**out.logs, **logs})

    def target_terms(self, batch: Batch, source: list[Tensor], step: int) -> tuple[Tensor, dict]:
        """w_dann L_d + w_ent L_ent on this batch's target crops (and the source features of the method's step)."""
        if batch.image_t is None or batch.image_t.shape[0] == 0:
            raise ValueError("domain adaptation: the batch holds no target crops (Batch.image_t)")
        image_t, _ = self.augment(self.da_role, batch.image_t)
        with self._capturing() as target:
            logits_t = self.models[self.da_role](image_t)
        loss, logs = logits_t.new_zeros((), dtype=torch.float32), {}
        if self.dom.target_entropy_weight > 0:
            loss_ent = entropy_loss(logits_t)
            loss = loss + self.dom.target_entropy_weight * loss_ent
            logs["loss_target_entropy"] = loss_ent.detach()
        if self.dom.dann_weight > 0 and source:
            lam = grl_lambda(step / max(self.ctx.epochs * self.ctx.iters_per_epoch, 1), self.dom.grl_lambda,
                             self.dom.grl_schedule)
            loss_d, accuracy = domain_loss(self.models[DOMAIN_ROLE], source, target, lam)
            loss = loss + self.dom.dann_weight * loss_d
            logs.update(loss_domain=loss_d.detach(), domain_acc=accuracy.detach(), grl_lambda=lam)
        return loss, logs
