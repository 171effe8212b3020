"""What the pretext tasks of ``methods/pretrain.py`` are made of: the network's features, orientations, views,
masks and the InfoNCE loss. Tensor arithmetic only; ``pretrain.py`` puts them together into each task's loss.

- ``UNetTaps``: one forward of a 3D UNet (``unet3d``, ``unet3d_mn``: MONAI's DynUNet inside) that also returns
  the encoder's output (the bottleneck, coarse) and the decoder's (the input of the 1x1x1 classifier, full size).
- Orientations: 8 known transforms of a crop, ``k % 4`` quarter turns in the (X, Y) plane then a flip of Z when
  ``k >= 4`` (the dihedral group of the square times a flip); with X != Y only the 4 that keep the crop's shape
  (``k`` in 0, 2, 4, 6). ``unorient`` undoes one, so voxel correspondence between two views is exact.
- ``jitter``: an intensity view, per item a contrast ``a`` in [1 - s, 1 + s], a shift ``b`` in [-s, s] and Gaussian
  noise of std s / 2: ``a x + b + n``.
- ``nt_xent``: SimCLR's normalised-temperature cross entropy over 2N embeddings (each one's positive is its pair,
  the other 2N - 2 are negatives).
- ``block_mask``: a random set of cubes covering a fixed fraction of the crop (masked-volume reconstruction).
- ``iic_loss``: minus the mutual information of two views' cluster assignments (Invariant Information Clustering).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mnseg.engine.contract import unwrap
from mnseg.errors import ConfigError
from mnseg.methods.voxel_contrast import match_spatial

ORIENTATIONS = tuple(range(8))
SHAPE_KEEPING = (0, 2, 4, 6)


# --- features ---------------------------------------------------------------------------------------------
class UNetTaps:
    """Forward hooks on a PlainUNet's bottleneck (output) and output block (input), registered once; the model is
    called as a whole (through any DDP or compile wrapper), so gradients reach it as in any other method."""

    def __init__(self, model: nn.Module, role: str = "net"):
        bare = unwrap(model)
        net = getattr(bare, "net", None)
        if not hasattr(net, "bottleneck") or not hasattr(net, "output_block") or not hasattr(bare, "filters"):
            raise ConfigError(f"pretrain: models.{role} ({type(bare).__name__}) is not a 3D UNet with an encoder "
                              "bottleneck; use unet3d or unet3d_mn")
        self.model, self.kept, self.capture = model, {}, False

        def keep_output(module, inputs, output):
            if self.capture:
                self.kept["encoder"] = output

        def keep_input(module, inputs):
            if self.capture:
                self.kept["decoder"] = inputs[0]

        net.bottleneck.register_forward_hook(keep_output)
        net.output_block.register_forward_pre_hook(keep_input)

    def __call__(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(logits, encoder features (B, E, coarse grid), decoder features (B, D, *image size))."""
        self.capture = True
        try:
            logits = self.model(image)
        finally:
            self.capture = False
        kept, self.kept = self.kept, {}
        return logits, kept["encoder"], match_spatial(kept["decoder"], tuple(image.shape[2:]))


def widths(model: nn.Module) -> tuple[int, int]:
    """(encoder width: the bottleneck's channels, decoder width: the channels the classifier reads) of a UNet."""
    filters = list(getattr(unwrap(model), "filters", []))
    if not filters:
        raise ConfigError(f"pretrain: {type(unwrap(model)).__name__} is not a 3D UNet; use unet3d or unet3d_mn")
    return int(filters[-1]), int(filters[0])


def pooled(features: Tensor, grid: int) -> Tensor:
    """(B, C, *S) -> (B, C * grid^3): averages over a grid^3 of equal cells (adaptive average pooling), flattened.
    Not the plain spatial mean (grid 1): after instance norm every channel's spatial mean is its norm's bias
    whatever the input, so a pooled vector would carry almost nothing; the cells' means still do."""
    return F.adaptive_avg_pool3d(features.float(), grid).flatten(1)


# --- orientations -----------------------------------------------------------------------------------------
def allowed_orientations(patch_size) -> tuple[int, ...]:
    return ORIENTATIONS if int(patch_size[0]) == int(patch_size[1]) else SHAPE_KEEPING


def orient(x: Tensor, k: int) -> Tensor:
    """``x`` (..., X, Y, Z) turned ``k % 4`` quarter turns in (X, Y), then flipped along Z when ``k >= 4``."""
    y = torch.rot90(x, k % 4, dims=(-3, -2))
    return y.flip(-1) if k >= 4 else y


def unorient(x: Tensor, k: int) -> Tensor:
    """The inverse of ``orient(., k)``."""
    y = x.flip(-1) if k >= 4 else x
    return torch.rot90(y, -(k % 4), dims=(-3, -2))


def orient_batch(x: Tensor, ks, inverse: bool = False) -> Tensor:
    """Item ``i`` of (B, C, X, Y, Z) oriented by ``ks[i]`` (or un-oriented, ``inverse``)."""
    fn = unorient if inverse else orient
    return torch.stack([fn(x[i], int(k)) for i, k in enumerate(ks)])


# --- views and masks --------------------------------------------------------------------------------------
def jitter(x: Tensor, strength: float) -> Tensor:
    """a x + b + n per item: a ~ U(1 - s, 1 + s), b ~ U(-s, s), n ~ N(0, (s / 2)^2) per voxel."""
    shape = (x.shape[0],) + (1,) * (x.dim() - 1)
    a = 1.0 + strength * (2 * torch.rand(shape, device=x.device, dtype=x.dtype) - 1)
    b = strength * (2 * torch.rand(shape, device=x.device, dtype=x.dtype) - 1)
    return a * x + b + 0.5 * strength * torch.randn_like(x)


def block_mask(batch: int, size, block: int, ratio: float, device) -> Tensor:
    """(B, 1, X, Y, Z) bool, True on round(ratio * cells) of the crop's ``block``^3 cells per item (drawn anew per
    item), the far-end cells cut to the crop."""
    grid = [-(-int(s) // block) for s in size]
    cells = grid[0] * grid[1] * grid[2]
    count = min(max(int(round(ratio * cells)), 1), cells)
    order = torch.rand(batch, cells, device=device).argsort(dim=1)
    coarse = (order < count).reshape(batch, 1, *grid)  # a random subset of exactly ``count`` cells
    fine = coarse.repeat_interleave(block, 2).repeat_interleave(block, 3).repeat_interleave(block, 4)
    return fine[:, :, : int(size[0]), : int(size[1]), : int(size[2])]


def sample_voxels(features: Tensor, index: Tensor) -> Tensor:
    """(B, D, *S) features at (B, n) flat voxel indices -> (B * n, D)."""
    flat = features.flatten(2)
    picked = flat.gather(2, index.unsqueeze(1).expand(-1, flat.shape[1], -1))  # (B, D, n)
    return picked.transpose(1, 2).reshape(-1, flat.shape[1])


# --- the contrastive loss ---------------------------------------------------------------------------------
def nt_xent(a: Tensor, b: Tensor, temperature: float) -> Tensor:
    """SimCLR's loss: z = [a; b] (2N, D) unit rows, s_ij = z_i . z_j / tau, and
    L = mean_i -log( e^{s_{i,p(i)}} / sum_{j != i} e^{s_ij} ), p(i) = i + N (mod 2N) the other view of item i.
    Float32 even under autocast (a small temperature amplifies bfloat16's rounding)."""
    with torch.autocast(a.device.type, enabled=False):
        z = F.normalize(torch.cat([a, b]).float(), dim=1)
        n = a.shape[0]
        sim = z @ z.t() / temperature
        sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
        target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
        return F.cross_entropy(sim, target)


# --- the clustering loss ----------------------------------------------------------------------------------
def iic_loss(p1: Tensor, p2: Tensor, eps: float = 1e-12) -> tuple[Tensor, Tensor]:
    """Invariant Information Clustering (Ji, Henriques & Vedaldi, ICCV 2019): ``(-I(z, z'), P)`` for the (N, K)
    cluster probabilities phi(x), phi(x') of N voxels seen in two views (row n: the same voxel in both).

        P = sym( 1/N sum_n phi(x_n) phi(x'_n)^T ),  sym(A) = (A + A^T) / 2,    (K, K), the joint of (z, z')
        I(z, z') = sum_ij P_ij log( P_ij / (P_i P_j) ),  P_i = sum_j P_ij, P_j = sum_i P_ij

    I is at most log K, reached by confident (one-hot), balanced (every cluster 1/K of the voxels) and consistent
    (the same cluster in both views) assignments, so the loss neither collapses to one cluster (I = 0) nor
    spreads every voxel evenly (I = 0 too). 0 log 0 counts as 0: P multiplies logs of values clamped at ``eps``,
    so unused clusters give neither NaN nor infinite gradients. Float32 even under autocast."""
    with torch.autocast(p1.device.type, enabled=False):
        joint = p1.float().t() @ p2.float() / p1.shape[0]
        joint = (joint + joint.t()) / 2
        p_i, p_j = joint.sum(dim=1, keepdim=True), joint.sum(dim=0, keepdim=True)
        logs = joint.clamp_min(eps).log() - p_i.clamp_min(eps).log() - p_j.clamp_min(eps).log()
        return -(joint * logs).sum(), joint
