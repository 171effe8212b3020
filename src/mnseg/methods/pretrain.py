"""Self-supervised pretraining of a 3D UNet on unlabelled crops: one pretext task per run (``task``).

The run reads no label: its split has no labelled and no validation case (``data.num_labeled: 0``), every batch is
B unlabelled crops of imagesTr + imagesUnlabeled (+ imagesTs with ``data.transductive``), after the network's usual
augmentation (``models.net.augment``). Two roles: ``net``, the UNet a later run starts from
(``models.<role>.init``), and ``head``, the task's small head (``pretext_head``, widths from the net). Losses, with
x a crop, E(x) the encoder's (bottleneck) features, D(x) the decoder's (the classifier's input), pool the means
over a ``pool_grid``^3 of cells, flattened (docs/methods/pretrain.md goes through each against its code line):

- ``rotation`` (Gidaris et al. 2018, in 3D): T_k one of K known orientations (quarter turns in (X, Y), a flip of Z;
  K = 8, or 4 when X != Y), k uniform per crop; L = CE(h(pool E(T_k x)), k). Trains the encoder.
- ``contrastive``: two views v_1 = T_a(j_1(x)), v_2 = T_b(j_2(x)) (j: intensity jitter, T: orientations), then
  L = NT-Xent(g(pool T_a^-1 E(v_1)), g(pool T_b^-1 E(v_2)))                   (global: SimCLR, Chen et al. 2020)
    + local_weight * NT-Xent(l(T_a^-1 D(v_1))[P], l(T_b^-1 D(v_2))[P])        (voxel-local)
  P: ``local_voxels`` random voxels per crop, the same voxel of x in both views (T undone on the features), each
  voxel's negatives the other sampled voxels of the batch. ``decoder: false`` contrasts E's voxels instead of D's.
- ``reconstruction`` (masked volumes: Models Genesis' in-painting, MAE's masking): M random ``mask_block``^3
  cubes covering ``mask_ratio`` of the crop, x_M = x with M set to 0 (the mean of a z-scored scan);
  L = sum_M (r(D(x_M)) - x)^2 / |M| (``masked_only``; else the mean over every voxel). Trains encoder and decoder.
- ``clustering`` (Invariant Information Clustering, Ji et al. 2019, voxel-level): two views as ``contrastive``'s,
  phi = softmax(c(T^-1 D(v))) a K-way (``clusters``) assignment of every voxel of x in each view, and
  L = -I(z, z'), I = sum_ij P_ij log(P_ij / (P_i P_j)), P = sym(mean over voxels of phi(v_1) phi(v_2)^T)
  (``pretext.iic_loss``). Trains encoder and decoder.

Every task adds 0 x the logits' mean, so every network parameter is in the graph (DDP's reducer needs that): the
parts a task does not train get zero gradients (weight decay alone moves them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mnseg.errors import ConfigError
from mnseg.methods.base import Batch, Method, Params, StepOutput
from mnseg.methods.pretext import (
    UNetTaps,
    allowed_orientations,
    block_mask,
    iic_loss,
    jitter,
    nt_xent,
    orient_batch,
    pooled,
    sample_voxels,
    widths,
)

TASKS = ("rotation", "contrastive", "reconstruction", "clustering")


@dataclass
class PretrainParams(Params):
    task: str = "rotation"  # rotation | contrastive | reconstruction | clustering
    pool_grid: int = 2  # rotation, contrastive: the encoder's features pooled over pool_grid^3 cells
    temperature: float = 0.1  # contrastive: tau of both InfoNCE terms
    local_weight: float = 1.0  # contrastive: weight of the voxel-local term beside the global one
    local_voxels: int = 256  # contrastive: voxels sampled per crop for the local term
    decoder: bool = True  # contrastive: local term over the decoder's voxels (false: the encoder's bottleneck)
    jitter: float = 0.2  # contrastive, clustering: intensity jitter s of each view (contrast 1 +- s, shift +- s,
    # noise s / 2)
    mask_ratio: float = 0.5  # reconstruction: the masked fraction of the crop
    mask_block: int = 8  # reconstruction: the masked cubes' edge (voxels)
    masked_only: bool = True  # reconstruction: the error over the masked voxels only (false: every voxel)
    clusters: int = 8  # clustering: K, the clusters every voxel is softly assigned to


class Pretrain(Method):
    """Self-supervised pretraining of a 3D UNet (rotation, contrastive, masked reconstruction or clustering) on
    unlabelled crops; labels are never read."""

    name = "pretrain"
    params_class = PretrainParams
    default_models = {"net": {"name": "unet3d"}, "head": {"name": "pretext_head"}}
    label_free = True

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        p = self.p
        if p.task not in TASKS:
            raise ConfigError(f"method.params.task must be one of {', '.join(TASKS)}, got {p.task!r}")
        if p.pool_grid < 1:
            raise ConfigError(f"method.params.pool_grid must be >= 1, got {p.pool_grid}")
        if p.temperature <= 0 or p.local_weight < 0 or p.local_voxels < 1 or p.jitter < 0:
            raise ConfigError("method.params: temperature must be > 0, local_weight >= 0, local_voxels >= 1 and "
                              f"jitter >= 0, got {p.temperature}, {p.local_weight}, {p.local_voxels}, {p.jitter}")
        if not 0.0 < p.mask_ratio <= 1.0 or p.mask_block < 1:
            raise ConfigError(f"method.params: mask_ratio must be in (0, 1] and mask_block >= 1, got {p.mask_ratio} "
                              f"and {p.mask_block}")
        if p.clusters < 2:
            raise ConfigError(f"method.params.clusters must be >= 2 (one cluster holds no information), got "
                              f"{p.clusters}")
        self.orientations = allowed_orientations(cfg.data.patch_size)
        self.taps: UNetTaps | None = None

    def derived_kwargs(self, role: str, built: dict[str, nn.Module]) -> dict:
        """The head's task and widths, from the net: the bottleneck's channels, and the decoder's (or the
        bottleneck's, ``decoder: false``) for voxel heads."""
        if role != "head":
            return {}
        encoder, decoder = widths(built["net"])
        local = decoder if self.p.task in ("reconstruction", "clustering") or self.p.decoder else encoder
        classes = self.p.clusters if self.p.task == "clustering" else len(self.orientations)
        return {"task": self.p.task, "encoder_width": encoder * self.p.pool_grid**3, "local_width": local,
                "classes": classes}

    def setup(self) -> None:
        self.taps = UNetTaps(self.models["net"])

    def batch_split(self, epoch: int, iteration: int) -> tuple[int, int]:
        return 0, self.ctx.batch_size

    # --- the step ------------------------------------------------------------------------------------------
    def training_step(self, batch: Batch, epoch: int, iteration: int) -> StepOutput:
        image, _ = self.augment("net", batch.image_u)
        step = {"rotation": self.rotation_loss, "contrastive": self.contrastive_loss,
                "reconstruction": self.reconstruction_loss, "clustering": self.clustering_loss}[self.p.task]
        loss, logits, logs = step(image)
        return StepOutput(loss + 0.0 * logits.float().mean(), logs)  # every parameter in the graph (DDP)

    def random_orientations(self, n: int) -> tuple[Tensor, list[int]]:
        """(class index per item (n,), its orientation k); torch's global generator, checkpointed with the run."""
        cls = torch.randint(len(self.orientations), (n,))
        return cls, [self.orientations[int(c)] for c in cls]

    def rotation_loss(self, image: Tensor) -> tuple[Tensor, Tensor, dict]:
        """CE(h(pool E(T_k x)), k)."""
        cls, ks = self.random_orientations(image.shape[0])
        logits, encoder, _ = self.taps(orient_batch(image, ks))
        scores, _ = self.models["head"](pooled=pooled(encoder, self.p.pool_grid))
        target = cls.to(scores.device)
        loss = F.cross_entropy(scores.float(), target)
        return loss, logits, {"accuracy": (scores.argmax(1) == target).float().mean().detach()}

    def two_views(self, image: Tensor) -> tuple[Tensor, list[int], list[int]]:
        """(cat(v_1, v_2), a, b): v_1 = T_a(j_1(x)), v_2 = T_b(j_2(x)), a random orientation and jitter per view."""
        b = image.shape[0]
        _, ka = self.random_orientations(b)
        _, kb = self.random_orientations(b)
        s = self.p.jitter
        views = torch.cat([orient_batch(jitter(image, s), ka), orient_batch(jitter(image, s), kb)])
        return views, ka, kb

    def contrastive_loss(self, image: Tensor) -> tuple[Tensor, Tensor, dict]:
        """NT-Xent over the pooled encoder features of two views + local_weight x NT-Xent over the voxels."""
        p, b = self.p, image.shape[0]
        views, ka, kb = self.two_views(image)
        logits, encoder, decoder = self.taps(views)  # both views in one forward
        coarse = torch.cat([orient_batch(encoder[:b], ka, inverse=True), orient_batch(encoder[b:], kb, inverse=True)])
        if p.decoder:
            first, second = orient_batch(decoder[:b], ka, inverse=True), orient_batch(decoder[b:], kb, inverse=True)
        else:
            first, second = coarse[:b], coarse[b:]
        index = torch.randint(first[0, 0].numel(), (b, p.local_voxels), device=image.device)
        local_in = torch.cat([sample_voxels(first, index), sample_voxels(second, index)])  # voxel i of x, twice
        g, z = self.models["head"](pooled=pooled(coarse, p.pool_grid), voxels=local_in)
        loss_g = nt_xent(g[:b], g[b:], p.temperature)
        n = b * p.local_voxels
        loss_l = nt_xent(z[:n], z[n:], p.temperature)
        return loss_g + p.local_weight * loss_l, logits, {"loss_global": loss_g.detach(), "loss_local": loss_l.detach()}

    def reconstruction_loss(self, image: Tensor) -> tuple[Tensor, Tensor, dict]:
        """sum over the masked voxels of (r(D(x_M)) - x)^2 / their count (or the mean over all voxels)."""
        p = self.p
        mask = block_mask(image.shape[0], image.shape[2:], p.mask_block, p.mask_ratio, image.device)
        logits, _, decoder = self.taps(image.masked_fill(mask, 0.0))
        _, out = self.models["head"](voxels=decoder.movedim(1, -1))
        error = (out.movedim(-1, 1).float() - image.float()) ** 2
        weight = mask.expand_as(error).float() if p.masked_only else torch.ones_like(error)
        loss = (error * weight).sum() / weight.sum().clamp_min(1.0)
        return loss, logits, {"masked_fraction": mask.float().mean().detach()}

    def clustering_loss(self, image: Tensor) -> tuple[Tensor, Tensor, dict]:
        """-I(z, z') of the voxels' K-way assignments phi(v_1), phi(v_2), orientations undone (IIC)."""
        p, b = self.p, image.shape[0]
        views, ka, kb = self.two_views(image)
        logits, _, decoder = self.taps(views)  # both views in one forward
        aligned = torch.cat([orient_batch(decoder[:b], ka, inverse=True), orient_batch(decoder[b:], kb, inverse=True)])
        _, scores = self.models["head"](voxels=aligned.movedim(1, -1).flatten(0, -2))  # (2 N, K), voxel n of x twice
        phi = torch.softmax(scores.float(), dim=1)
        n = phi.shape[0] // 2
        loss, joint = iic_loss(phi[:n], phi[n:])
        used = (joint.sum(dim=1) > 1.0 / (10 * p.clusters)).sum()
        return loss, logits, {"mutual_information": -loss.detach(), "clusters_used": used.float()}
