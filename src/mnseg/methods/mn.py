"""M&N: a 2D natural-image pretrained model and a 3D model co-trained on each other's pseudo-masks.

Yeung et al., "Semi-Supervised 3D Medical Segmentation from 2D Natural Images Pretrained Model".
Roles: ``net2d`` (f, pretrained 2D model fine-tuned with LoRA, run slice by slice along depth) and
``net3d`` (g, a 3D UNet from scratch).

Stage 1 (epochs < ``sup_epochs``): f and g each learn from labelled patches, L_l = w_ce CE + w_dice Dice.
Stage 2, alternating epochs (1st, 3rd, ... co-training epoch trains g on f's pseudo-masks; 2nd, 4th, ...
trains f on g's; ``cotrain_first: net2d`` swaps them, as the authors' code): every batch has b_l labelled and
b_u unlabelled patches and
    L_c = b_l / B * L_l + b_u / B * L_u,   L_u = w_kl KL(P || model) + w_dice Dice(model, P),
P the other model's softmax in eval mode, without gradient. LR-guided sampling:
    b_u = floor((lr_init - lr_now) / (lr_init - lr_final) * B),
lr_now the trained model's current learning rate, read from its optimiser (set by its scheduler).
``lrg: epoch-linear`` is the authors' code instead: b_u = floor(e / N * B), e the trained model's own co-training
epochs so far, N its co-training epochs (so b_u peaks at B - 1). An engine epoch of stage 2 trains one model: each
model gets half of the train.epochs - sup_epochs co-training epochs (mn_paper sets train.epochs to match the
authors' 3,500 per model). docs/methods/mn.md goes through the paper equation by equation.

Choices the paper leaves open (documented in docs/methods.md): by default each model's schedule restarts at
stage 2 (warm-up + cosine over stage 1, then cosine from lr_init to lr_final over stage 2), so b_u runs from 0
to B over co-training; ``schedule: single`` uses one warm-up + cosine over the whole run instead.

Switches beyond the paper, each off by default (``mn_paper`` keeps them off; docs/methods.md):
- ``soft_dice: squared``: Dice(g, P) with sum g^2 + sum P^2 below, maximised at g = P (the authors' code);
- ``min_labeled: k``: b_u <= B - k, a labelled floor (the authors' code keeps b_l >= 1);
- ``unlabeled_on_top``: b_l = B always, the LR-guided b_u unlabelled items on top (as mean teacher's B + B);
- ``w_u``: a factor on L_u (0: the starvation ablation);
- ``pseudo: ensemble``: P is the mean of both models' softmax (``partner_weight``: the partner's share in it, 0.5);
- ``partner_weight_by_class: [w_0, ..., w_C-1]`` (with ``pseudo: ensemble``): the partner's share per class,
  P_c = w_c P_partner,c + (1 - w_c) P_self,c renormalised over c, so a class can be taken from the partner (a rare
  class it brings) while the others stay the trained model's own;
- ``partner_rare_share: s`` (with ``pseudo: ensemble``): ``partner_weight_by_class`` worked out from the labels,
  w_c = ``partner_weight`` for each foreground class under the share s of the labelled training voxels and 0 for the
  others, so the partner brings the rare classes and the trained model keeps the common ones (no rare class: the
  plain mix, w_c = ``partner_weight`` for all);
- ``by_class_mix: remainder`` (with either of the two above): no renormalisation; the classes S with w_c > 0
  keep their mix M_c = w_c P_partner,c + (1 - w_c) P_self,c, the others share what is left in the trained model's
  own proportions, P_c = (1 - sum_S M) P_self,c / sum_{k not in S} P_self,k, so where the partner says lesion and
  the trained model white matter, the lesion keeps the plain mean's mass (renormalising shrinks it);
- ``pseudo_weight: confidence``: each voxel's L_u weighted by max_c P;
- ``pseudo_weight: agree``: L_u only on voxels where both models' argmax name the same class, so the trained model
  is never pulled towards a class that it and its partner dispute (where they agree, P is the pseudo-mask as set);
- ``fg_refresh: agree``: unlabelled crops centred on voxels where both models name the same class;
- ``pre2d_epochs: k``: the 2D model alone trains on labels for k epochs before stage 1 (no 3D updates);
- ``generator: ema``: P from each model's exponential moving average (decay ``generator_decay``, from the start of
  co-training, updated after each of that model's steps), so pseudo-masks are averaged over many updates rather
  than taken from one noisy iterate; with ``pseudo: ensemble`` the self half is then the model's mean teacher;
- ``pseudo_align: labels``: distribution alignment (Berthelot et al., ReMixMatch, ICLR 2020): P is rescaled per class
  by the labelled crops' class frequency over the pseudo-masks' own (argmax shares), running means (``align_decay``,
  the plain mean over the first 1 / (1 - decay) batches),
      P'_c = P_c * r_c / sum_k P_k * r_k,   r_c = clip(pi_c / pbar_c, 1 / align_max_ratio, align_max_ratio),
  so a rare class the generator under-predicts is raised and one it over-predicts is lowered (one process only;
  voxels of the ignore label are left out of pi, the unlabelled crops' padding counts in pbar); ``align_classes``
  limits it to some classes (r_c = 1 for the others), ``align_down_only`` to r_c <= 1 (a cap on runaway classes);
- ``copy_paste: labels``: each unlabelled item gets a cube (``paste_ratio`` of each side) of a labelled crop pasted
  in, its true labels the target there (BCP, Bai et al. CVPR 2023; ``copy_paste.py``), so targets hold a rare class;
- ``oracle_pseudo``: a diagnostic, the unlabelled imagesTr cases' true labels as P (the ceiling of any P).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from mnseg.engine.contract import Segment, current_lr, unwrap
from mnseg.errors import ConfigError
from mnseg.losses import one_hot_targets, pseudo_label_loss, supervised_loss
from mnseg.methods.alignment import align_distribution, class_counts, update_running_means
from mnseg.methods.base import Batch, Method, Params, StepOutput, ema_update_
from mnseg.methods.copy_paste import paste_labelled
from mnseg.methods.ensemble import agreed_labels, mix_with_remainder
from mnseg.methods.mn_checks import check_switches
from mnseg.methods.mn_sampling import (
    SAMPLING,
    epoch_linear_unlabeled_count,
    lr_guided_unlabeled_count,
    uniform_unlabeled_count,
)

CHOICES = {
    "soft_dice": ("linear", "squared"),
    "pseudo": ("partner", "ensemble"),
    "pseudo_weight": ("none", "confidence", "agree"),
    "fg_refresh": ("net3d", "agree"),
    "cotrain_first": ("net3d", "net2d"),
    "generator": ("live", "ema"),
    "pseudo_align": ("none", "labels"),
    "by_class_mix": ("renormalise", "remainder"),
    "copy_paste": ("none", "labels"),
}


@dataclass
class MNParams(Params):
    """M&N's parameters (the paper's, then the choices it leaves open, then the switches beyond it)."""

    sup_epochs: int | None = None  # stage 1 epochs, each model alone on labels (default: an eighth of the run)
    w_ce: float = 1.0  # L_l = w_ce CE + w_dice Dice
    w_dice: float = 1.0
    w_kl: float = 1.0  # L_u = w_kl KL(P || model) + w_dice Dice(model, P)
    lrg: str = "lr"  # b_u sampling: lr (LR-guided) | epoch-linear | uniform | fixed
    fixed_ratio: float = 0.5  # lrg=fixed: b_u = round(fixed_ratio * B)
    schedule: str = "restart"  # restart: each model's schedule restarts at stage 2 | single: one over the run
    fixed_pseudo: bool = False  # P from frozen copies of the models at the end of stage 1
    fg_refresh_every: int = 2  # co-training epochs between refreshes of the unlabelled crops' foreground (0: never)
    slices_2d: int | None = None  # slices of each crop the 2D model trains on (default: all)
    predict: str = "3d"  # the 3D model (the paper's output), 2d or average
    soft_dice: str = "linear"  # Dice form for probability targets: linear | squared
    min_labeled: int = 0  # b_u <= B - min_labeled
    unlabeled_on_top: bool = False  # b_l = B always, the b_u unlabelled items on top
    w_u: float = 1.0  # factor on L_u (0: the starvation ablation)
    pseudo: str = "partner"  # P: the partner's softmax | ensemble (the mean of both models')
    pseudo_weight: str = "none"  # each voxel's L_u weighted by: none | confidence (max_c P) | agree (same argmax)
    partner_weight: float = 0.5  # pseudo: ensemble: P = w P_partner + (1 - w) P_self
    partner_weight_by_class: list[float] | None = None  # pseudo: ensemble: one w per class (renormalised)
    partner_rare_share: float | None = None  # pseudo: ensemble: the partner's share only for classes rarer than this
    by_class_mix: str = "renormalise"  # per-class weights: renormalise | remainder (the others share the rest)
    fg_refresh: str = "net3d"  # unlabelled crop centres from: net3d | agree (both models name the same class)
    pre2d_epochs: int = 0  # epochs before stage 1 in which the 2D model alone trains on labels
    generator: str = "live"  # P from: live (the models as they train) | ema (their exponential moving averages)
    generator_decay: float = 0.99  # generator: ema: G <- decay G + (1 - decay) model after each of its steps
    pseudo_align: str = "none"  # none | labels: P's class frequencies moved to the labelled crops' (ReMixMatch DA)
    align_decay: float = 0.99  # pseudo_align: running means <- decay * mean + (1 - decay) * this batch's
    align_max_ratio: float = 10.0  # pseudo_align: each class's factor clipped to [1 / max, max]
    align_classes: list[int] | None = None  # pseudo_align: the classes rescaled (default all; others r_c = 1)
    align_down_only: bool = False  # pseudo_align: r_c <= 1, only lowering classes P over-predicts
    copy_paste: str = "none"  # none | labels: a labelled cube pasted into each unlabelled item (its labels as target)
    paste_ratio: float = 2 / 3  # copy_paste: the cube's side as a share of the crop's
    oracle_pseudo: bool = False  # diagnostic: the unlabelled imagesTr cases' true labels as P
    cotrain_first: str = "net3d"  # the role the 1st, 3rd, ... co-training epoch trains (net2d: the authors' code)


class MN(Method):
    """M&N: 2D pretrained (LoRA) + 3D UNet co-training with LR-guided sampling (Yeung et al.)."""

    name = "mn"
    params_class = MNParams
    default_models = {"net2d": {"name": "effunet", "finetune": "lora"}, "net3d": {"name": "unet3d_mn"}}
    predict_role = "net3d"

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.sup_epochs = int(max(self.ctx.epochs // 8, 1) if self.p.sup_epochs is None else self.p.sup_epochs)
        # epochs before stage 1 in which the 2D model alone trains on labels: a longer warm-up of the partner
        # (its updates cost no 3D updates); 0 in the paper
        self.pre2d = int(self.p.pre2d_epochs)
        if not 0 <= self.pre2d < self.ctx.epochs:
            raise ConfigError(f"method.params.pre2d_epochs={self.pre2d} must lie between 0 and train.epochs-1")
        if not 0 < self.sup_epochs < self.ctx.epochs - self.pre2d:
            raise ConfigError(
                f"method.params.sup_epochs={self.sup_epochs} must lie between 1 and "
                f"train.epochs-1-pre2d_epochs={self.ctx.epochs - 1 - self.pre2d}"
            )
        self.lrg = self.p.lrg
        if self.lrg not in SAMPLING:
            raise ConfigError(f"method.params.lrg='{self.lrg}' unknown; choose one of {', '.join(SAMPLING)}")
        self.weights = {k: float(getattr(self.p, k)) for k in ("w_ce", "w_dice", "w_kl", "w_u")}
        self.fixed_pseudo = bool(self.p.fixed_pseudo)
        self.choice = {k: getattr(self.p, k) for k in CHOICES}
        check_switches(self.p, CHOICES, self.ctx.num_classes)
        # pseudo_align: per trained role, running class frequencies {"labels": pi, "pseudo": pbar} (device tensors)
        self.class_priors: dict[str, dict[str, Tensor]] = {}
        self.align_batches: dict[str, int] = {}  # "<role>/<labels|pseudo>": batches in that running mean so far
        self.min_labeled = int(self.p.min_labeled)
        if not 0 <= self.min_labeled <= self.ctx.batch_size:
            raise ConfigError(f"method.params.min_labeled={self.min_labeled} must lie between 0 and "
                              f"train.batch_size={self.ctx.batch_size}")
        self.generators: dict[str, torch.nn.Module] = {}
        self._rng = np.random.default_rng(self.cfg.train.seed + 7)

    # --- schedule ----------------------------------------------------------------------------------------
    @property
    def cotrain_start(self) -> int:
        """The first co-training epoch."""
        return self.pre2d + self.sup_epochs

    @property
    def cotrain_epochs(self) -> int:
        return self.ctx.epochs - self.cotrain_start

    def schedule_segments(self, role: str) -> list[Segment]:
        optim = self.cfg.models[role].optim
        it = self.ctx.iters_per_epoch
        if self.p.schedule == "single":
            return [Segment(self.ctx.epochs * it, optim.lr, optim.final_lr, optim.warmup_epochs * it)]
        own_pre = self.pre2d if role == "net2d" else 0  # the 2D warm-up extends the 2D model's stage 1
        idle = [Segment(self.pre2d * it, 0.0, 0.0)] if self.pre2d and role != "net2d" else []
        return [
            *idle,
            Segment((own_pre + self.sup_epochs) * it, optim.lr, optim.final_lr, optim.warmup_epochs * it),
            Segment(self.cotrain_epochs * it, optim.lr, optim.final_lr, 0),
        ]

    def trained_role(self, epoch: int) -> str | None:
        """None in stage 1 (both train); then ``cotrain_first`` (net3d) on the 1st, 3rd, ... co-training epochs,
        the other role on the 2nd, 4th, ..."""
        if epoch < self.cotrain_start:
            return None
        first = self.choice["cotrain_first"]
        second = "net2d" if first == "net3d" else "net3d"
        return first if (epoch - self.cotrain_start) % 2 == 0 else second

    def role_cotrain_epochs(self, role: str) -> int:
        """How many co-training epochs train ``role``: the first role gets the odd one out."""
        n = self.cotrain_epochs
        return (n + 1) // 2 if role == self.choice["cotrain_first"] else n // 2

    def active_roles(self, epoch: int) -> list[str]:
        if epoch < self.pre2d:
            return ["net2d"]
        role = self.trained_role(epoch)
        return ["net2d", "net3d"] if role is None else [role]

    def phase(self, epoch: int) -> str:
        if epoch < self.pre2d:
            return "supervised-2d"
        role = self.trained_role(epoch)
        return "supervised" if role is None else f"cotrain-{role[3:]}"

    def batch_split(self, epoch: int, iteration: int) -> tuple[int, int]:
        B = self.ctx.batch_size
        role = self.trained_role(epoch)
        if role is None or self.ctx.n_unlabeled == 0:
            return B, 0
        if self.lrg == "lr":
            seg = self.schedule_segments(role)[-1]
            lr_init = seg.lr_init
            b_u = lr_guided_unlabeled_count(current_lr(self.optimizers[role]), lr_init, seg.lr_final, B)
        elif self.lrg == "epoch-linear":  # counted in the trained model's own co-training epochs, as the authors
            own = (epoch - self.cotrain_start) // 2
            b_u = epoch_linear_unlabeled_count(own, self.role_cotrain_epochs(role), B)
        elif self.lrg == "uniform":
            b_u = uniform_unlabeled_count(self.ctx.n_labeled, self.ctx.n_unlabeled, B, self._rng)
        else:
            b_u = int(round(float(self.p.fixed_ratio) * B))
        if self.p.unlabeled_on_top:
            return B, b_u  # B labelled items always, the LR-guided count of unlabelled ones on top
        b_u = min(b_u, B - self.min_labeled)  # the labelled floor (0 by default: the paper's formula)
        return B - b_u, b_u

    # --- pseudo-mask generators ------------------------------------------------------------------------------
    def generator_for(self, role: str) -> torch.nn.Module:
        other = "net2d" if role == "net3d" else "net3d"
        return self.generators.get(other, self.models[other])

    def on_epoch_start(self, epoch: int) -> None:
        frozen_or_ema = self.fixed_pseudo or self.choice["generator"] == "ema"
        if epoch == self.cotrain_start and frozen_or_ema and not self.generators:
            # fixed_pseudo (ablation "no iteration"): pseudo-masks from the models as they were after stage 1;
            # generator: ema: the same copies, then moved towards each model after its steps.
            self.generators = {
                r: copy.deepcopy(unwrap(m)).eval().requires_grad_(False) for r, m in self.models.items()
            }
        refresh = int(self.p.fg_refresh_every)
        if (
            epoch >= self.cotrain_start
            and refresh > 0
            and (epoch - self.cotrain_start) % refresh == 0
            and getattr(self, "batcher", None) is not None
            and self.batcher.unlabeled
        ):
            self._refresh_unlabeled_foreground()

    @torch.no_grad()
    def after_optimizer_step(self, epoch: int, iteration: int) -> None:
        """generator: ema: G_r <- d G_r + (1 - d) f_r for the model r that just stepped (float buffers alike)."""
        role = self.trained_role(epoch)
        if self.choice["generator"] != "ema" or role is None or role not in self.generators:
            return
        ema_update_(self.generators[role], unwrap(self.models[role]), float(self.p.generator_decay))

    @torch.no_grad()
    def _refresh_unlabeled_foreground(self) -> None:
        """Unlabelled crops include pseudo-mask foreground (prob. fg_prob): voxels the 3D model calls foreground,
        or (``fg_refresh: agree``) those where both models name the same class, so that crops centred on a rare
        class are not ones where the partner's pseudo-mask says another class."""
        from mnseg.data.sampling import foreground_coords
        from mnseg.engine.contract import WindowSettings, predict_probabilities

        roles = ("net3d", "net2d") if self.choice["fg_refresh"] == "agree" else ("net3d",)
        models = [self.generators.get(r, self.models[r]) for r in roles]  # the window loop sets eval mode
        coords = {}
        window = WindowSettings.from_config(self.cfg)
        for case in self.batcher.unlabeled:
            image = torch.from_numpy(case.image)
            labels = [predict_probabilities(m, image, window, self.ctx.device).argmax(0).cpu().numpy()
                      for m in models]
            coords[case.case_id] = foreground_coords(agreed_labels(labels), rng=self._rng)
        self.batcher.set_unlabeled_foreground(coords)
        self._unlabeled_fg = coords  # kept in checkpoints so a resumed run crops exactly as before

    # --- the step -------------------------------------------------------------------------------------------
    def _labelled_loss(self, logits, label, reduce_sums):
        return supervised_loss(
            logits, label, w_ce=self.weights["w_ce"], w_dice=self.weights["w_dice"], ignore_index=self.ctx.ignore_index,
            reduce_sums=reduce_sums,
        )

    def _depth_subset(self, role: str, *tensors):
        """Optionally train the 2D model on a random subset of each patch's slices (``slices_2d``; all by default,
        as the paper). The subset is taken after pseudo-masks exist, so the 3D generator still sees whole patches."""
        k = self.p.slices_2d
        depth = tensors[0].shape[-1]
        if role != "net2d" or not k or int(k) >= depth:
            return tensors
        idx = torch.randperm(depth, device=tensors[0].device)[: int(k)]
        return tuple(t.index_select(t.dim() - 1, idx) for t in tensors)

    def training_step(self, batch: Batch, epoch: int, iteration: int) -> StepOutput:
        role = self.trained_role(epoch)
        if role is None:
            logs, total = {}, 0.0
            for r in self.active_roles(epoch):
                image, (label,) = self.augment(r, batch.image_l, [batch.label_l], ["label"])
                image, label = self._depth_subset(r, image, label)
                loss = self._labelled_loss(self.models[r](image), label, batch.reduce_sums)
                logs[f"loss_{r[3:]}"] = loss.detach()
                total = total + loss
            return StepOutput(total, logs)

        b_l, b_u = batch.b_l, batch.b_u
        model = self.models[role]
        image_l, (label,) = self.augment(role, batch.image_l, [batch.label_l], ["label"])
        oracle = batch.label_u if self.p.oracle_pseudo else None
        if b_u and oracle is not None:  # diagnostic: the unlabelled items' true labels as pseudo-masks
            image_u, (oracle,) = self.augment(role, batch.image_u, [oracle], ["label"])
        elif b_u:
            image_u, _ = self.augment(role, batch.image_u)
        else:
            image_u = batch.image_u
        pseudo = weight = None
        logs = {}
        if b_u:
            if oracle is None:
                pseudo, weight = self._pseudo_masks(role, image_u)
                if self.choice["pseudo_align"] == "labels":
                    pseudo = self._align(role, pseudo, label if b_l else None, batch.reduce_sums, logs)
            else:  # one-hot labels; voxels of the ignore label weigh 0
                pseudo, weight = one_hot_targets(oracle, self.ctx.num_classes, self.ctx.ignore_index)
            # what the generator made, before any pasted labels: whether it still predicts a rare class
            logs.update(self._class_shares("pseudo", pseudo.argmax(dim=1), pseudo.shape[1]))
            if self.choice["pseudo_weight"] == "agree":
                logs["agree_share"] = weight.mean().detach()
            if self.choice["copy_paste"] == "labels" and b_l:
                image_u, pseudo, weight = paste_labelled(image_u, pseudo, image_l, label, weight=weight, rng=self._rng,
                                                         ratio=float(self.p.paste_ratio),
                                                         ignore_index=self.ctx.ignore_index)
            if weight is None:
                image_u, pseudo = self._depth_subset(role, image_u, pseudo)
            else:
                image_u, pseudo, weight = self._depth_subset(role, image_u, pseudo, weight)
        image_l, label = self._depth_subset(role, image_l, label)
        logits = model(torch.cat([image_l, image_u]) if b_u else image_l)
        loss = logits.new_zeros(())
        if b_l:
            loss_l = self._labelled_loss(logits[:b_l], label, batch.reduce_sums)
            loss = loss + b_l / (b_l + b_u) * loss_l
            logs["loss_l"] = loss_l.detach()
        if b_u:
            if self.choice["pseudo_weight"] == "confidence":  # times the pasted cube's weights (0 where ignored)
                weight = pseudo.amax(dim=1) if weight is None else weight * pseudo.amax(dim=1)
            loss_u = pseudo_label_loss(logits[b_l:], pseudo, w_kl=self.weights["w_kl"], w_dice=self.weights["w_dice"],
                                       mask=weight, squared_dice=self.choice["soft_dice"] == "squared",
                                       reduce_sums=batch.reduce_sums)
            loss = loss + self.weights["w_u"] * b_u / (b_l + b_u) * loss_u
            logs["loss_u"] = loss_u.detach()
            if b_l:
                logs.update(self._class_shares("label", label, pseudo.shape[1]))
        return StepOutput(loss, logs)

    @torch.no_grad()
    def _pseudo_masks(self, role: str, image_u: Tensor) -> tuple[Tensor, Tensor | None]:
        """P: the partner's softmax in eval mode, or (``pseudo: ensemble``) the mean of both models' softmax; and
        with ``pseudo_weight: agree`` the voxel weights (1 where both models' argmax agree, else 0), else None."""
        models = [self.generator_for(role)]
        if self.choice["pseudo"] == "ensemble" or self.choice["pseudo_weight"] == "agree":
            models.append(self.generators.get(role, self.models[role]))
        probs = []
        for model in models:
            was_training = model.training
            model.eval()
            probs.append(torch.softmax(model(image_u).float(), dim=1))
            model.train(was_training)
        weight = None
        if self.choice["pseudo_weight"] == "agree":
            weight = (probs[0].argmax(1) == probs[1].argmax(1)).float()
        if self.choice["pseudo"] == "partner":
            return probs[0], weight
        by_class = self.partner_weights_by_class()
        if by_class is not None:
            w = torch.tensor(by_class, device=probs[0].device)
            w = w.view(1, -1, *([1] * (probs[0].dim() - 2)))
            mixed = w * probs[0] + (1.0 - w) * probs[1]
            if self.choice["by_class_mix"] == "remainder":
                return mix_with_remainder(mixed, probs[1], w > 0), weight
            return mixed / mixed.sum(dim=1, keepdim=True).clamp_min(1e-8), weight
        w = float(self.p.partner_weight)
        if w == 0.5:  # the plain mean (bit for bit as before the weight existed)
            return torch.stack(probs).mean(0), weight
        return w * probs[0] + (1.0 - w) * probs[1], weight

    def partner_weights_by_class(self) -> list[float] | None:
        """The partner's share in P per class: ``partner_weight_by_class`` as given, or from ``partner_rare_share``
        and the labelled voxels' class shares (the trainer's; None when nothing was read)."""
        if self.p.partner_weight_by_class is not None:
            return [float(x) for x in self.p.partner_weight_by_class]
        if self.p.partner_rare_share is None:
            return None
        shares = self.ctx.class_shares
        if shares is None:
            raise ConfigError("method.params.partner_rare_share needs the labelled voxels' class shares, which only "
                              "training reads")
        return rare_class_weights(shares, float(self.p.partner_rare_share), float(self.p.partner_weight))

    def _align(self, role: str, pseudo: Tensor, label: Tensor | None, reduce_sums, logs: dict) -> Tensor:
        """pseudo_align: labels: update the running class frequencies of the labelled crops (pi) and of P (pbar)
        with this batch (pooled over processes by ``reduce_sums``), then return P aligned to pi."""
        total = reduce_sums or (lambda t: t)
        priors = self.class_priors.setdefault(role, {})
        # argmax shares, as the labels' (a soft mean is dominated by the small P every voxel gives a rare class)
        hard = class_counts(pseudo.argmax(dim=1), pseudo.shape[1])
        batch_priors = {"pseudo": total(hard) / total(pseudo.new_tensor(pseudo[:, 0].numel()))}
        if label is not None:
            counts = total(class_counts(label, pseudo.shape[1]))
            batch_priors["labels"] = counts / counts.sum().clamp_min(1.0)
            if "labels" in priors:  # crops wholly ignore-labelled leave the mean as it was
                batch_priors["labels"] = torch.where(counts.sum() > 0, batch_priors["labels"], priors["labels"])
        update_running_means(priors, self.align_batches, role, batch_priors, float(self.p.align_decay))
        if "labels" not in priors:  # no labelled crop seen yet: nothing to align to
            return pseudo
        aligned, ratio = align_distribution(pseudo, priors["labels"], priors["pseudo"], float(self.p.align_max_ratio),
                                            self.p.align_classes, bool(self.p.align_down_only))
        logs.update({f"align_ratio_{c}": ratio[c] for c in range(1, pseudo.shape[1])})
        return aligned

    def _class_shares(self, prefix: str, labels: Tensor, num_classes: int) -> dict[str, Tensor]:
        """Share of each foreground class among the (annotated) voxels, ``<prefix>_share_<class>``. Side by side,
        pseudo_share and label_share show whether the generating model still predicts a rare class (a lesion)
        that the trained model then learns to miss. Device tensors: no host sync."""
        counts = class_counts(labels, num_classes)
        share = counts / counts.sum().clamp_min(1.0)
        return {f"{prefix}_share_{c}": share[c] for c in range(1, num_classes)}

    # --- inference and state ------------------------------------------------------------------------------
    def predictor(self, which: str | None = None):
        # The 3D model's output is the paper's; the 2D model's or their average are options.
        return self.pick_predictor(which, {"3d": "net3d", "2d": "net2d"}, "3d")

    def extra_state(self) -> dict:
        fg = {
            case: {c: xyz.astype(np.int32) for c, xyz in classes.items()}
            for case, classes in getattr(self, "_unlabeled_fg", {}).items()
        }
        return {
            "generators": {r: m.state_dict() for r, m in self.generators.items()},
            "rng": self._rng.bit_generator.state,
            "unlabeled_fg": fg,
            "class_priors": {r: {k: v.cpu() for k, v in d.items()} for r, d in self.class_priors.items()},
            "align_batches": dict(self.align_batches),
        }

    def load_extra_state(self, state: dict) -> None:
        gens = state.get("generators") or {}
        if gens:
            self.generators = {r: copy.deepcopy(unwrap(self.models[r])).eval().requires_grad_(False) for r in gens}
            for r, sd in gens.items():
                self.generators[r].load_state_dict(sd)
        priors = state.get("class_priors", {})
        self.class_priors = {r: {k: v.to(self.ctx.device) for k, v in d.items()} for r, d in priors.items()}
        self.align_batches = dict(state.get("align_batches", {}))
        if "rng" in state:
            self._rng.bit_generator.state = state["rng"]
        if state.get("unlabeled_fg"):
            self._unlabeled_fg = state["unlabeled_fg"]
            if getattr(self, "batcher", None) is not None:
                self.batcher.set_unlabeled_foreground(self._unlabeled_fg)


def rare_class_weights(shares, rare_share: float, weight: float) -> list[float]:
    """``weight`` for each foreground class whose share of the labelled voxels is below ``rare_share``, 0 for the
    others and for background; ``weight`` for every class when none is rare (the plain mix)."""
    rare = [c > 0 and share < rare_share for c, share in enumerate(shares)]
    if not any(rare):
        return [weight] * len(shares)
    return [weight if r else 0.0 for r in rare]
