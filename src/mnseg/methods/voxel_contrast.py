"""What the voxel-contrastive methods share: voxel features, class prototypes, stratified group sampling, InfoNCE.

Voxel features are the input of a model's final classification layer (the last 1x1x1 ``Conv3d`` with
``num_classes`` outputs: DynUNet's and SwinUNETR's output conv), read with a forward hook, so a contrastive method
adds no parameters and the model files stay as they are (``dual_contrast``, ``arco``).

Stratified group sampling (You et al., "Rethinking Semi-Supervised Medical Image Segmentation: A
Variance-Reduction Perspective", NeurIPS 2023, ARCO's SG and SAG): to draw ``count`` voxels from a candidate set
S (e.g. the voxels of one class), S in raster order (item, x, y, z) is cut into G groups of equal size
(consecutive runs, so each group is a contiguous slab of S's region; G = min(groups, |S|)), and the draws are dealt
to the groups in turn from a random start, so every group gets floor(count/G) or ceil(count/G) of them (or, with
pairs, floor or ceil of count/2G pairs). Within a group a draw is uniform (with replacement); SAG (``antithetic``)
draws pairs, the second the mirror image of the first in its group (position p -> size - 1 - p, the antithetic
variate u -> 1 - u). As every group holds |S|/G voxels and gets count/G draws, the plain mean over the draws is
unbiased, and its variance is at most that of ``count`` uniform draws from S (stratification removes the
between-group part). Every class gets its own ``count`` draws however few voxels it has, so a tail class has its
quota of anchors, spread over its whole extent. G = 1 without pairs is naive (uniform) sampling.

Everything is tensor arithmetic on the device: no host sync, no Python loop over voxels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mnseg.errors import ConfigError


# --- voxel features ---------------------------------------------------------------------------------------
def classifier_conv(model: nn.Module, num_classes: int) -> nn.Conv3d | None:
    """The last 1x1x1 Conv3d with ``num_classes`` outputs: the layer whose input is the voxel features."""
    found = None
    for module in model.modules():
        if (
            isinstance(module, nn.Conv3d)
            and module.out_channels == num_classes
            and tuple(module.kernel_size) == (1, 1, 1)
        ):
            found = module
    return found


def match_spatial(features: Tensor, size: tuple[int, ...]) -> Tensor:
    """Features at the logits' size: crop far-end padding (our models pad there), or upsample if smaller."""
    if tuple(features.shape[2:]) == tuple(size):
        return features
    if all(f >= s for f, s in zip(features.shape[2:], size)):
        return features[(Ellipsis, *(slice(0, s) for s in size))]
    return F.interpolate(features, size=size, mode="trilinear", align_corners=False)


class ClassifierInputs:
    """Each role's voxel features (its classifier's input), kept only during ``forward``; one persistent hook per
    model (a compiled forward is not recompiled for hooks that come and go)."""

    def __init__(self, method: str):
        self.method = method
        self.kept: dict[str, Tensor] = {}
        self.capture = False

    def attach(self, role: str, model: nn.Module, num_classes: int, model_name: str) -> None:
        conv = classifier_conv(model, num_classes)
        if conv is None:
            raise ConfigError(
                f"{self.method}: model '{role}' ({model_name}) has no 1x1x1 Conv3d with {num_classes} outputs to take "
                "voxel features from; use a 3D model (unet3d, unet3d_mn, swinunetr)"
            )

        def keep_input(module, inputs, output):
            if self.capture:
                self.kept[role] = inputs[0]

        conv.register_forward_hook(keep_input)

    def forward(self, role: str, model: nn.Module, image: Tensor) -> tuple[Tensor, Tensor]:
        """(logits, features (B, D, *S) at the logits' size)."""
        self.capture = True
        try:
            logits = model(image)
        finally:
            self.capture = False
        return logits, match_spatial(self.kept.pop(role), tuple(logits.shape[2:]))


def flat_voxels(features: Tensor) -> Tensor:
    """(B, D, *S) -> (B * prod(S), D), voxels in raster order (item, x, y, z), as ``labels.reshape(-1)``."""
    return features.movedim(1, -1).reshape(-1, features.shape[1])


def class_prototypes(features: Tensor, classes: Tensor, reliable: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """(K, D) unit class means of (N, D) ``features`` over the ``reliable`` voxels, and which classes have one."""
    onehot = F.one_hot(classes.clamp(0, num_classes - 1), num_classes).to(features.dtype)
    onehot = onehot * reliable.to(features.dtype).unsqueeze(1)
    sums = onehot.t() @ features  # (K, D)
    present = onehot.sum(dim=0) > 0
    return F.normalize(sums, dim=1), present


# --- stratified group sampling (ARCO) ---------------------------------------------------------------------
def stratified_group_sample(
    candidates: Tensor,
    count: int,
    groups: int,
    antithetic: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``count`` indices into the (N,) bool ``candidates``, stratified over groups (module docstring).

    Returns (index (count,), valid (count,), group (count,)): ``valid`` is False for every draw when there is no
    candidate (``index`` is then 0); ``group`` is the group each draw came from.
    """
    device = candidates.device
    rank_of = torch.cumsum(candidates.reshape(-1).long(), dim=0)  # rank_of[i] = candidates up to and including i
    n = rank_of[-1] if rank_of.numel() else torch.zeros((), dtype=torch.long, device=device)
    g = torch.clamp(torch.minimum(n, torch.tensor(int(groups), device=device)), min=1)
    draw = torch.arange(count, device=device)
    slot = draw // 2 if antithetic else draw  # SAG: draws 2i and 2i+1 are a pair, they share a group and u
    start = torch.randint(int(groups), (), generator=generator, device=device)
    group = (slot + start) % g
    lo, hi = group * n // g, (group + 1) * n // g  # the group's ranks [lo, hi): sizes differ by at most 1
    u = torch.rand((count + 1) // 2 if antithetic else count, generator=generator, device=device)[slot]
    pos = torch.minimum((u * (hi - lo)).long(), (hi - lo - 1).clamp_min(0))
    if antithetic:
        pos = torch.where(draw % 2 == 1, (hi - lo - 1).clamp_min(0) - pos, pos)  # the mirror of its pair
    index = torch.searchsorted(rank_of, lo + pos + 1).clamp_max(max(candidates.numel() - 1, 0))
    valid = (n > 0).expand(count)
    return torch.where(valid, index, torch.zeros_like(index)), valid, group


def sample_by_class(
    classes: Tensor,
    valid: Tensor,
    num_classes: int,
    anchors: int,
    negatives: int,
    groups: int,
    antithetic: bool = False,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """Per class c, ``anchors`` voxels of class c and ``negatives`` per anchor of the other classes, each set by
    stratified group sampling among the ``valid`` voxels. (N,) inputs; returns ``anchor`` (K, m) and ``negative``
    (K, m, n) indices with their ``*_valid`` masks."""
    out: dict[str, list[Tensor]] = {"anchor": [], "anchor_valid": [], "negative": [], "negative_valid": []}
    for c in range(num_classes):
        own = valid & (classes == c)
        a, a_ok, _ = stratified_group_sample(own, anchors, groups, antithetic, generator)
        k, k_ok, _ = stratified_group_sample(valid & ~own, anchors * negatives, groups, antithetic, generator)
        for key, value in (("anchor", a), ("anchor_valid", a_ok), ("negative", k), ("negative_valid", k_ok)):
            out[key].append(value)
    stacked = {key: torch.stack(values) for key, values in out.items()}
    for key in ("negative", "negative_valid"):
        stacked[key] = stacked[key].reshape(num_classes, anchors, negatives)
    return stacked


# --- the contrastive loss ---------------------------------------------------------------------------------
def prototype_info_nce(anchor: Tensor, positive: Tensor, negative: Tensor, use: Tensor, temperature: float) -> Tensor:
    """mean over the classes in ``use`` of mean_i -log( e^{s(a_i, mu_c)/tau} / (e^{s(a_i, mu_c)/tau}
    + sum_j e^{s(a_i, k_ij)/tau}) ), s the cosine similarity.

    ``anchor`` (K, m, D), ``positive`` (K, D), ``negative`` (K, m, n, D), ``use`` (K,) bool. An exact 0, still
    connected to ``anchor``, when no class is used. Runs in float32 even under autocast (sums over many keys
    divided by a small temperature lose too much in bfloat16).
    """
    with torch.autocast(anchor.device.type, enabled=False):
        a = F.normalize(anchor.float(), dim=-1)
        pos = (a * F.normalize(positive.float(), dim=-1).unsqueeze(1)).sum(-1, keepdim=True)  # (K, m, 1)
        neg = torch.einsum("kmd,kmnd->kmn", a, F.normalize(negative.float(), dim=-1))
        logits = torch.cat([pos, neg], dim=-1) / temperature
        per_class = -torch.log_softmax(logits, dim=-1)[..., 0].mean(dim=1)  # (K,)
        weight = use.to(per_class.dtype)
        return (per_class * weight).sum() / weight.sum().clamp_min(1.0)
