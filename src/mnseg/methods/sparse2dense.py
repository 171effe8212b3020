"""Sparse-to-dense: a 2D teacher trained on the annotated slices labels whole volumes for a 3D student.

Bujak et al., "Optimization in Sparse 2D to Dense 3D Weakly Supervised Learning: Application to Multi-Label
Segmentation of Large ex vivo MRI Data" (2026). Labelled volumes are annotated on a few slices along one axis
(by default axis 2 of the RAS+-reoriented volume, the teacher's ``slice_axis``); the ignore label marks the
voxels nobody annotated, and every loss below skips them.

Roles: ``teacher`` f (a 2D model run slice by slice along the annotated axis) and ``student`` g (a 3D UNet).

Stage 1 (epochs < ``teacher_epochs``): only f trains, on the annotated slices s of labelled patches, strongly
augmented in-plane (2D):
    L_f = w_ce CE(f(s), y) + w_dice Dice(f(s), y)            over annotated voxels only,
or, with ``soft_edges: true``, against soft-edge labels
    y~(v) = sum_{u in N(v)} a(u) onehot(y(u)) / sum_{u in N(v)} a(u),
N(v) the (2w+1) x (2w+1) in-slice window around v (w = ``edge_width``), a(u) = 1 where u is annotated:
one-hot wherever the window holds one class, soft within w voxels of a class border, each row summing to 1;
    L_f = w_ce KL(y~ || f(s)) + w_dice Dice(f(s), y~)         (KL = soft CE minus the constant H(y~)).

Stage 2 (the remaining epochs): f is frozen in eval mode. For every labelled and unlabelled patch x
    P = softmax(f(x))  (no gradient),   Y = argmax_c P (``pseudo: hard``) or Y = P (``pseudo: soft``),
and on labelled patches the real annotation overrides the pseudo-label where it exists: Y(v) = y(v) for every
annotated voxel v (y(v) != ignore). g learns from conservatively augmented (x, Y):
    L_g = w_ce CE(g(x), Y) + w_dice Dice(g(x), Y)             (hard)
    L_g = w_ce KL(Y || g(x)) + w_dice Dice(g(x), Y)           (soft)
Each model's learning-rate schedule (warm-up + cosine) spans its own stage; in the other stage its lr is 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from mnseg.engine.contract import Segment
from mnseg.errors import ConfigError
from mnseg.losses import ReduceSums, pseudo_label_loss, supervised_loss
from mnseg.methods.base import Batch, Method, Params, StepOutput

PSEUDO = ("hard", "soft")
PREDICT = ("student", "teacher", "average")


def soft_edge_labels(
    labels: Tensor, num_classes: int, edge_width: int, ignore_index: int | None = None
) -> tuple[Tensor, Tensor]:
    """Soft one-hot targets (N, K, H, W) and the annotated-voxel mask (N, H, W) for 2D label maps (N, H, W).

    Each annotated voxel gets the class frequencies of the annotated voxels in its (2w+1)^2 in-slice window:
    exactly one-hot away from class borders, soft (rows sum to 1) in a band of ``edge_width`` voxels on each
    side of a border. Unannotated voxels get an all-zero row and are left out by the mask.
    """
    if labels.dim() != 3:
        raise ValueError(f"soft_edge_labels expects 2D label maps (N, H, W), got {tuple(labels.shape)}")
    if ignore_index is None:
        annotated = torch.ones_like(labels, dtype=torch.bool)
    else:
        annotated = labels != ignore_index
    weight = annotated.unsqueeze(1).float()  # (N, 1, H, W)
    hard = torch.where(annotated, labels, torch.zeros_like(labels)).long()
    one_hot = F.one_hot(hard, num_classes).movedim(-1, 1).float() * weight
    if edge_width <= 0:
        return one_hot, annotated
    window = 2 * edge_width + 1
    class_share = F.avg_pool2d(one_hot, window, stride=1, padding=edge_width)
    annotated_share = F.avg_pool2d(weight, window, stride=1, padding=edge_width)
    soft = class_share / annotated_share.clamp_min(1e-12)
    return soft * weight, annotated


@dataclass
class Sparse2DenseParams(Params):
    pseudo: str = "hard"
    soft_edges: bool = False
    edge_width: int = 2
    annotated_slices_only: bool = True
    w_ce: float = 1.0  # weight of cross-entropy in the labelled loss
    w_dice: float = 1.0  # weight of soft Dice
    teacher_epochs: int | None = None  # stage 1 (the 2D teacher) epochs (default: half the run)
    labeled_per_batch: int | None = None  # labelled items per student batch (default: B // 2)
    predict: str = "student"


class Sparse2Dense(Method):
    """Sparse-to-dense: 2D teacher on annotated slices -> dense pseudo-labels -> 3D student (Bujak et al. 2026)."""

    name = "sparse2dense"
    params_class = Sparse2DenseParams
    default_models = {"teacher": {"name": "effunet", "finetune": "whole"}, "student": {"name": "unet3d"}}
    predict_role = "student"
    slice_augmented = ("teacher",)  # teacher_augment_2d: in-plane on the annotated slices

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.teacher_epochs = int(max(ctx.epochs // 2, 1) if self.p.teacher_epochs is None else self.p.teacher_epochs)
        if not 0 < self.teacher_epochs < ctx.epochs:
            raise ConfigError(
                f"method.params.teacher_epochs={self.teacher_epochs} must lie between 1 and "
                f"train.epochs-1={ctx.epochs - 1} (stage 1 trains the teacher, the rest the student)"
            )
        self.pseudo = str(self.p.pseudo)
        if self.pseudo not in PSEUDO:
            raise ConfigError(f"method.params.pseudo='{self.pseudo}' unknown; choose one of {', '.join(PSEUDO)}")
        self.soft_edges = bool(self.p.soft_edges)
        self.edge_width = int(self.p.edge_width)
        if self.edge_width < 1:
            raise ConfigError(f"method.params.edge_width must be at least 1 voxel, got {self.edge_width}")
        self.weights = {k: float(getattr(self.p, k)) for k in ("w_ce", "w_dice")}
        self.annotated_slices_only = bool(self.p.annotated_slices_only)
        labeled = self.p.labeled_per_batch
        self.labeled_per_batch = ctx.batch_size // 2 if labeled is None else int(labeled)
        if not 0 <= self.labeled_per_batch <= ctx.batch_size:
            raise ConfigError(
                f"method.params.labeled_per_batch={self.labeled_per_batch} must lie between 0 and "
                f"train.batch_size={ctx.batch_size}"
            )
        if self.p.predict not in PREDICT:
            raise ConfigError(
                f"method.params.predict='{self.p.predict}' unknown; choose one of "
                f"{', '.join(PREDICT)}"
            )
        self.teacher_augment_2d = None

    def setup(self) -> None:
        from mnseg.data.augment import Augmenter
        from mnseg.engine.contract import unwrap

        teacher = unwrap(self.models["teacher"])
        if not (hasattr(teacher, "inner") and hasattr(teacher, "axis")):
            raise ConfigError(
                f"sparse2dense: models.teacher must be a 2D model (run slice by slice along the annotated axis); "
                f"'{self.cfg.models['teacher'].name}' is 3D"
            )
        self.teacher_slicewise = teacher
        augmenter = self.augmenters.get("teacher")
        if augmenter is not None:
            # The engine builds 3D augmenters; the teacher sees single slices, so its rotations stay in-plane.
            self.teacher_augment_2d = Augmenter(augmenter.config, spatial_dims=2)

    # --- schedule ----------------------------------------------------------------------------------------
    def is_teacher_stage(self, epoch: int) -> bool:
        return epoch < self.teacher_epochs

    def schedule_segments(self, role: str) -> list[Segment]:
        """Teacher: warm-up + cosine over stage 1, then lr 0. Student: lr 0, then warm-up + cosine over stage 2."""
        optim = self.cfg.models[role].optim
        it = self.ctx.iters_per_epoch
        stage1, stage2 = self.teacher_epochs * it, (self.ctx.epochs - self.teacher_epochs) * it
        own_stage = Segment(
            stage1 if role == "teacher" else stage2, optim.lr, optim.final_lr, optim.warmup_epochs * it
        )
        idle = Segment(stage2 if role == "teacher" else stage1, 0.0, 0.0, 0)
        return [own_stage, idle] if role == "teacher" else [idle, own_stage]

    def active_roles(self, epoch: int) -> list[str]:
        return ["teacher"] if self.is_teacher_stage(epoch) else ["student"]

    def phase(self, epoch: int) -> str:
        return "teacher" if self.is_teacher_stage(epoch) else "student"

    def batch_split(self, epoch: int, iteration: int) -> tuple[int, int]:
        """Stage 1: (B, 0). Stage 2: (labeled_per_batch, B - labeled_per_batch), default (B//2, B - B//2)."""
        B = self.ctx.batch_size
        if self.is_teacher_stage(epoch) or self.ctx.n_unlabeled == 0:
            return B, 0
        return self.labeled_per_batch, B - self.labeled_per_batch

    # --- the step ------------------------------------------------------------------------------------------
    def training_step(self, batch: Batch, epoch: int, iteration: int) -> StepOutput:
        if self.is_teacher_stage(epoch):
            return self._teacher_step(batch)
        return self._student_step(batch)

    def annotated_slices(self, image: Tensor, label: Tensor) -> tuple[Tensor, Tensor]:
        """Slices (N, C, H, W) and labels (N, H, W) along the teacher's axis; only annotated ones by default.

        Skipping the slices nobody annotated saves most of the teacher's compute (their loss is 0 anyway);
        choosing them costs one host sync per step.
        """
        axis = self.teacher_slicewise.axis  # axis of (B, C, X, Y, Z)
        slices = image.movedim(axis, 1).flatten(0, 1)
        labels = label.movedim(axis - 1, 1).flatten(0, 1)
        ignore = self.ctx.ignore_index
        if self.annotated_slices_only and ignore is not None:
            keep = (labels != ignore).flatten(1).any(dim=1).nonzero().squeeze(1)
            if keep.numel() == 0:
                keep = keep.new_zeros(1)  # nothing annotated: one slice gives an exact zero loss with a graph
            slices, labels = slices[keep], labels[keep]
        return slices, labels

    def teacher_loss(self, logits: Tensor, labels: Tensor, reduce_sums: ReduceSums | None = None) -> Tensor:
        """L_f on 2D slices: hard CE + Dice, or KL + Dice against soft-edge labels (``reduce_sums``: the batch's)."""
        if not self.soft_edges:
            return supervised_loss(
                logits, labels, w_ce=self.weights["w_ce"], w_dice=self.weights["w_dice"],
                ignore_index=self.ctx.ignore_index, reduce_sums=reduce_sums,
            )
        target, annotated = soft_edge_labels(labels, logits.shape[1], self.edge_width, self.ctx.ignore_index)
        return pseudo_label_loss(
            logits, target, w_kl=self.weights["w_ce"], w_dice=self.weights["w_dice"], mask=annotated,
            reduce_sums=reduce_sums,
        )

    def _teacher_step(self, batch: Batch) -> StepOutput:
        slices, labels = self.annotated_slices(batch.image_l, batch.label_l)
        if self.teacher_augment_2d is not None:
            pad = 0 if self.ctx.ignore_index is None else self.ctx.ignore_index
            slices, (labels,) = self.teacher_augment_2d(slices, [labels], ["label"], label_pad=pad)
        loss = self.teacher_loss(self.teacher_slicewise.inner(slices), labels, batch.reduce_sums)
        return StepOutput(loss, {"loss_teacher": loss.detach()})

    @torch.no_grad()
    def dense_targets(self, image_l: Tensor, label_l: Tensor, image_u: Tensor) -> tuple[Tensor, Tensor]:
        """(Y, P): the student's targets for cat(image_l, image_u) and the teacher's probabilities P.

        Y is argmax P (hard, (B, X, Y, Z)) or P (soft, (B, K, X, Y, Z)); on labelled patches the annotated
        voxels take the real label (as one-hot rows when soft). The teacher must be in eval mode (the engine
        puts it there in stage 2).
        """
        b_l = image_l.shape[0]
        probs = torch.softmax(self.models["teacher"](torch.cat([image_l, image_u])).float(), dim=1)
        ignore = self.ctx.ignore_index
        annotated = torch.ones_like(label_l, dtype=torch.bool) if ignore is None else label_l != ignore
        real = torch.where(annotated, label_l, torch.zeros_like(label_l))
        if self.pseudo == "hard":
            target = probs.argmax(dim=1)
            labelled_part = torch.where(annotated, real, target[:b_l])
        else:
            target = probs
            real_rows = F.one_hot(real, probs.shape[1]).movedim(-1, 1).to(probs.dtype)
            labelled_part = torch.where(annotated.unsqueeze(1), real_rows, probs[:b_l])
        return torch.cat([labelled_part, target[b_l:]]), probs

    def student_loss(self, logits: Tensor, target: Tensor, reduce_sums: ReduceSums | None = None) -> Tensor:
        """L_g: CE + Dice against hard targets, KL + Dice against soft ones (``reduce_sums``: the batch's)."""
        if self.pseudo == "hard":
            return supervised_loss(
                logits, target, w_ce=self.weights["w_ce"], w_dice=self.weights["w_dice"],
                ignore_index=self.ctx.ignore_index, reduce_sums=reduce_sums,
            )
        return pseudo_label_loss(logits, target, w_kl=self.weights["w_ce"], w_dice=self.weights["w_dice"],
                                 reduce_sums=reduce_sums)

    def _student_step(self, batch: Batch) -> StepOutput:
        target, probs = self.dense_targets(batch.image_l, batch.label_l, batch.image_u)
        image = torch.cat([batch.image_l, batch.image_u])
        kind = "label" if self.pseudo == "hard" else "prob"
        image, (target,) = self.augment("student", image, [target], [kind])
        loss = self.student_loss(self.models["student"](image), target, batch.reduce_sums)
        teacher_labels = probs.argmax(dim=1)
        logs = {"loss_student": loss.detach(), "pseudo_fg": (teacher_labels != 0).float().mean()}
        if batch.b_l and self.ctx.ignore_index is not None:
            annotated = batch.label_l != self.ctx.ignore_index
            agree = ((teacher_labels[: batch.b_l] == batch.label_l) & annotated).sum()
            logs["teacher_agreement"] = agree.float() / annotated.sum().clamp_min(1)
        return StepOutput(loss, logs)

    # --- inference -----------------------------------------------------------------------------------------
    def predictor(self, which: str | None = None):
        which = which or self.p.predict
        if which not in PREDICT:
            raise ConfigError(f"sparse2dense predicts with {', '.join(PREDICT)}, not '{which}'")
        if which == "average":
            return [self.models["student"], self.models["teacher"]]
        return self.models[which]
