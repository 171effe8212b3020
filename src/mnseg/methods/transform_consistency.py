"""Transformation consistency: segmentations that move with the image (equivariance).

Bortsova et al., "Semi-supervised Medical Image Segmentation via Learning Consistency under
Transformations" (MICCAI 2019). A random transformation T is drawn per patch and, with p = softmax f,
    L = L_sup(f(x_l), y_l) + lambda(t) * 1/|Omega_T| sum_{v in Omega_T} 1/K sum_c (p(T x)_{c,v} - (T p(x))_{c,v})^2
both branches share the weights and both receive gradient (the paper's Siamese network; ``detach_target:
true`` stops it through T softmax f(x)). T is exact by default: flips along ``flip_axes`` (each with
probability 0.5), then k quarter turns in the plane of spatial axes 0 and 1 (k uniform in 0..3; 0 or 2 when
the patch is not square in that plane), so Omega_T is the whole patch. ``affine: true`` composes a small
random zoom/rotation (``affine_scale``, ``affine_rotate_deg``) resampled linearly with the package's
Augmenter; Omega_T then leaves out the voxels that came from outside the patch.
The paper's transformation is an elastic deformation and its consistency covers labelled images too
(``consistency_on_labeled: true``); lambda(t) = 0.1 * sigmoid ramp-up, the mean-teacher default.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from mnseg.errors import ConfigError
from mnseg.methods.base import Batch, StepOutput
from mnseg.methods.semi import SemiParams, SemiSupervised


@dataclass(frozen=True)
class ExactTransform:
    """Flips of some spatial axes, then ``quarter_turns`` x 90 degrees in the plane of spatial axes 0 and 1."""

    flips: tuple[int, ...] = ()
    quarter_turns: int = 0

    def __call__(self, x: Tensor) -> Tensor:
        """Applies to one item (C, X, Y, Z): image channels or class probabilities alike."""
        for axis in self.flips:
            x = x.flip(axis + 1)
        return torch.rot90(x, self.quarter_turns, dims=(1, 2)) if self.quarter_turns % 4 else x


def apply_each(transforms: list[ExactTransform], x: Tensor) -> Tensor:
    """Item i of the batch ``x`` (B, C, *S) transformed by ``transforms[i]``."""
    return torch.stack([t(item) for t, item in zip(transforms, x)]) if len(transforms) else x


def sample_transforms(n: int, spatial_shape, flip_axes=(0, 1, 2), rotate: bool = True) -> list[ExactTransform]:
    """n random exact transforms; quarter turns 1 and 3 only when the rotation plane is square."""
    turns = (4 if spatial_shape[0] == spatial_shape[1] else 2) if rotate else 1
    step = 1 if turns == 4 else 2
    out = []
    for _ in range(n):
        flips = tuple(a for a in flip_axes if torch.rand(()) < 0.5)
        out.append(ExactTransform(flips, int(torch.randint(turns, ())) * step))
    return out


@dataclass
class TransformConsistencyParams(SemiParams):
    flip_axes: list = field(default_factory=lambda: [0, 1, 2])
    rot90: bool = True
    affine: bool = False
    affine_scale: list = field(default_factory=lambda: [0.9, 1.1])
    affine_rotate_deg: float = 10.0
    consistency_on_labeled: bool = False
    detach_target: bool = False


class TransformConsistency(SemiSupervised):
    """Transformation consistency: softmax-MSE between f(T x) and T f(x), flips/rot90 (Bortsova et al. 2019)."""

    name = "transform_consistency"
    params_class = TransformConsistencyParams
    default_models = {"net": {"name": "unet3d_mn"}}

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.flip_axes = tuple(int(a) for a in self.p.flip_axes)
        if any(a not in (0, 1, 2) for a in self.flip_axes):
            raise ConfigError(f"method.params.flip_axes must be spatial axes 0, 1, 2, got {list(self.flip_axes)}")
        self.rotate = bool(self.p.rot90)
        self.affine = None
        if self.p.affine:
            from mnseg.data.augment import AugmentConfig, Augmenter

            scale = tuple(self.p.affine_scale)
            config = AugmentConfig(scale=scale, rotate_deg=float(self.p.affine_rotate_deg), gamma=None)
            self.affine = Augmenter(config, spatial_dims=3)

    def transform(self, images: Tensor, probs: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """(T x, T p, Omega_T as a (B, *S) mask or None when every voxel counts) with one T per item."""
        ts = sample_transforms(images.shape[0], images.shape[2:], self.flip_axes, self.rotate)
        images, probs = apply_each(ts, images), apply_each(ts, probs)
        if self.affine is None:
            return images, probs, None
        inside = torch.ones(images.shape[0], *images.shape[2:], dtype=torch.bool, device=images.device)
        images, (probs, inside) = self.affine(images, [probs, inside], ["prob", "mask"])
        return images, probs, inside

    def training_step(self, batch: Batch, epoch: int, iteration: int) -> StepOutput:
        step = self.global_step(epoch, iteration)
        net = self.models["net"]
        images, label, b_l, b_u = self.augmented_batch(batch)
        first = 0 if self.p.consistency_on_labeled else b_l
        if first == b_l and b_u == 0:
            loss_l = self.labelled_loss(net(images), label, batch.reduce_sums)
            return StepOutput(loss_l, {"loss_l": loss_l.detach()})

        logits = net(images)
        probs = torch.softmax(logits[first:].float(), dim=1)
        if self.p.detach_target:
            probs = probs.detach()
        moved_images, moved_probs, inside = self.transform(images[first:], probs)
        probs_of_moved = torch.softmax(net(moved_images).float(), dim=1)
        per_voxel = ((probs_of_moved - moved_probs) ** 2).mean(dim=1)
        if inside is None:
            loss_u = per_voxel.mean()
        else:
            weight = inside.float()
            loss_u = (per_voxel * weight).sum() / weight.sum().clamp_min(1.0)

        loss_l = self.labelled_loss(logits[:b_l], label, batch.reduce_sums)
        weight_u = self.unlabeled_weight(step)
        logs = {"loss_l": loss_l.detach(), "loss_u": loss_u.detach(), "w_u": weight_u}
        return StepOutput(loss_l + weight_u * loss_u, logs)
