"""What a learning method is: its models, and the loss of one step.

A method reads like its paper: which models it holds, how many labelled and
unlabelled items each batch has, and the loss of one step. The engine owns
devices, AMP, optimisers, schedules, logging, checkpoints and DDP. This module and
``engine/contract.py`` are all of the engine a method sees.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from mnseg.config.schema import Config
from mnseg.engine.contract import PatchSampler, Segment, segment
from mnseg.errors import ConfigError
from mnseg.losses import ReduceSums


@dataclass
class MethodContext:
    """Facts about the data and run a method may need."""

    num_classes: int
    in_channels: int
    ignore_index: int | None
    batch_size: int
    epochs: int
    iters_per_epoch: int
    n_labeled: int
    n_unlabeled: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # each class's share of the labelled training voxels (ignore label left out), set by the trainer; None where no
    # labels were read (prediction, pretraining). M&N's partner_rare_share picks its rare classes from it
    class_shares: tuple[float, ...] | None = None


@dataclass
class Batch:
    """One training batch on the device: ``b_l`` labelled and ``b_u`` unlabelled patches."""

    image_l: torch.Tensor  # (b_l, C, X, Y, Z)
    label_l: torch.Tensor  # (b_l, X, Y, Z) int64, may contain the ignore label
    image_u: torch.Tensor  # (b_u, C, X, Y, Z)
    label_u: torch.Tensor | None = None  # the unlabelled items' labels: only M&N's oracle diagnostic has them
    # This batch is one shard of the global batch (one process's under torchrun): the differentiable sum over the
    # shards that batch Dice pools its sums with (the losses' ``reduce_sums``), set by the trainer when every shard
    # holds equally many labelled and unlabelled items; None when this batch is the whole batch. A method passes it
    # to every batch-Dice loss of its step, so the loss equals the one-process loss.
    reduce_sums: ReduceSums | None = None
    # target-domain crops (b_t, C, X, Y, Z) from imagesTarget, never labelled: only with domain adaptation on
    # (``domain.*``, read by ``methods/domain_adaptation.py``); methods themselves ignore them
    image_t: torch.Tensor | None = None

    @property
    def b_l(self) -> int:
        return int(self.image_l.shape[0])

    @property
    def b_u(self) -> int:
        return int(self.image_u.shape[0])


@dataclass
class StepOutput:
    loss: torch.Tensor
    logs: dict[str, torch.Tensor | float] = field(default_factory=dict)  # tensors: no host sync per step


@dataclass
class Params:
    """A method's parameters (``method.params`` in the YAML). Each method subclasses it in its own file: one field
    per parameter, with its default; None where the default is derived from the run (the method says how)."""


@torch.no_grad()
def ema_update_(average: nn.Module, model: nn.Module, decay: float) -> None:
    """average <- decay average + (1 - decay) model, weights and float buffers alike (integer buffers, e.g. batch
    counters, copied): the moving average of mean teacher's teacher and of M&N's ``generator: ema``."""
    for a, p in zip(average.parameters(), model.parameters()):
        a.lerp_(p.detach(), 1.0 - decay)
    for a, b in zip(average.buffers(), model.buffers()):
        if a.is_floating_point():
            a.lerp_(b, 1.0 - decay)
        else:
            a.copy_(b)


def parse_params(params_class: type[Params], given: Mapping[str, Any], method: str) -> Params:
    """``method.params`` as the method's ``Params``; an unknown key is a ``ConfigError`` naming the closest one."""
    names = [f.name for f in dataclasses.fields(params_class)]
    for key in given:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(
                f"method.params.{key}: method '{method}' has no such parameter{hint} "
                f"(its parameters: {', '.join(names) or 'none'})"
            )
    return params_class(**given)


class Method:
    """Base class; subclasses set ``default_models`` and ``params_class``, and override ``training_step``.

    ``models`` is a dict role -> module built by the engine from ``cfg.models``;
    roles listed in ``frozen_roles`` get no optimiser (e.g. an EMA teacher).
    """

    name: ClassVar[str] = "base"
    default_models: ClassVar[dict[str, dict]] = {"net": {"name": "unet3d"}}
    frozen_roles: ClassVar[tuple[str, ...]] = ()
    # role -> the role whose augmentation settings its training inputs get (when one batch feeds several models);
    # prediction's mirror TTA reads the flips from there.
    augmented_as: ClassVar[dict[str, str]] = {}
    # roles whose augmentation the method applies to their 2D slices (in-plane), not to the 3D patch
    slice_augmented: ClassVar[tuple[str, ...]] = ()
    predict_role: ClassVar[str] = "net"
    params_class: ClassVar[type[Params]] = Params
    # True for a method that reads no label (self-supervised pretraining): its runs have no labelled or validation
    # case (data.num_labeled 0, data.num_val 0), every batch is unlabelled crops.
    label_free: ClassVar[bool] = False

    def __init__(self, cfg: Config, ctx: MethodContext):
        self.cfg = cfg
        self.ctx = ctx
        self.p = parse_params(self.params_class, cfg.method.params, self.name)
        self.models: dict[str, nn.Module] = {}
        self.augmenters: dict[str, Any] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        # The engine's patch sampler (``contract.PatchSampler``), set by the trainer before the first epoch; None
        # outside training (prediction, unit tests).
        self.batcher: PatchSampler | None = None

    # --- set-up ----------------------------------------------------------------------------------------
    def attach(
        self, models: dict[str, nn.Module], augmenters: dict[str, Any], optimizers: dict[str, torch.optim.Optimizer]
    ) -> None:
        self.models, self.augmenters, self.optimizers = models, augmenters, optimizers
        self.setup()

    def setup(self) -> None:
        """Hook after models exist (e.g. copy the student into an EMA teacher)."""

    def derived_kwargs(self, role: str, built: dict[str, nn.Module]) -> dict:
        """Model options of ``role`` that follow from the roles built before it (``built``, in ``default_models``
        order), e.g. a head's input width from the network it reads; they replace configured ones. Default none."""
        return {}

    # --- schedule --------------------------------------------------------------------------------------
    def schedule_segments(self, role: str) -> list[Segment]:
        """Default: one segment over the whole run, warm-up + cosine or step decay (``optim.schedule``); with
        ``optim.restart_epochs`` one segment between two restarts, the warm-up in the first."""
        optim = self.cfg.models[role].optim
        it = self.ctx.iters_per_epoch
        bounds = [0, *optim.restart_epochs, self.ctx.epochs]
        return [segment(optim, (end - start) * it, optim.warmup_epochs * it if start == 0 else 0)
                for start, end in zip(bounds, bounds[1:])]

    def active_roles(self, epoch: int) -> list[str]:
        """Roles whose optimiser steps in this epoch."""
        return [r for r in self.models if r not in self.frozen_roles]

    def phase(self, epoch: int) -> str:
        return "train"

    def batch_split(self, epoch: int, iteration: int) -> tuple[int, int]:
        """(b_l, b_u) for the next batch; supervised methods use no unlabelled items."""
        return self.ctx.batch_size, 0

    # --- the step --------------------------------------------------------------------------------------
    def training_step(self, batch: Batch, epoch: int, iteration: int) -> StepOutput:
        raise NotImplementedError

    def after_optimizer_step(self, epoch: int, iteration: int) -> None:
        """Hook after the optimisers stepped (EMA updates)."""

    def on_epoch_start(self, epoch: int) -> None:
        """Hook at the start of every epoch."""

    # --- inference and state ---------------------------------------------------------------------------
    def predictor(self, which: str | None = None) -> nn.Module | list[nn.Module]:
        """The model(s) that predict; a list means their probabilities are averaged."""
        return self.models[which or self.predict_role]

    def pick_predictor(self, which: str | None, short_names: dict[str, str], default: str):
        """Resolve a prediction choice: a short name (e.g. 'a' -> 'net_a'), a role name, or 'average' of the roles."""
        which = which or getattr(self.p, "predict", None) or default
        options = {
            **{k: self.models[r] for k, r in short_names.items()},
            **{r: self.models[r] for r in short_names.values()},
        }
        options["average"] = [self.models[r] for r in short_names.values()]
        if which not in options:
            raise ConfigError(f"{self.name} predicts with {', '.join(repr(k) for k in options)}, not '{which}'")
        return options[which]

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    def augment(self, role: str, image: torch.Tensor, targets=(), kinds=()):
        aug = self.augmenters.get(role)
        if aug is None or image.shape[0] == 0:
            return image, list(targets)
        # Area brought in by a zoom-out is "not annotated" when the dataset has an ignore label.
        pad = self.ctx.ignore_index if self.ctx.ignore_index is not None else 0
        return aug(image, list(targets), list(kinds), label_pad=pad)
