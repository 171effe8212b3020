"""Labelled cubes pasted into unlabelled crops, with their true labels as the target there.

Bai et al., "Bidirectional Copy-Paste for Semi-Supervised Medical Image Segmentation", CVPR 2023, the inward
direction (labelled foreground into unlabelled background):

    X = M * X_l + (1 - M) * X_u,        T = M * onehot(Y_l) + (1 - M) * P,

M a cube of ``ratio`` of each side at a random place in the crop, P the pseudo-mask of X_u. Every unlabelled item
then carries true labels, a rare class's among them, so pseudo-masks that miss that class (M&N at 4 labelled: no
lesion voxel in the unlabelled subjects when co-training starts) do not teach the model that it never occurs.
Voxels of the ignore label inside M (sparse annotations) weigh 0.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from mnseg.losses import label_targets


def cube_masks(n: int, spatial: tuple[int, ...], ratio: float, rng: np.random.Generator, device=None) -> Tensor:
    """(n, 1, *spatial) booleans: per item one cube of round(ratio * side) voxels a side, placed uniformly."""
    mask = torch.zeros((n, 1, *spatial), dtype=torch.bool, device=device)
    for i in range(n):
        box = []
        for size in spatial:
            side = min(size, max(1, int(round(ratio * size))))
            start = int(rng.integers(0, size - side + 1))
            box.append(slice(start, start + side))
        mask[(i, 0, *box)] = True
    return mask


def paste_labelled(
    image_u: Tensor,
    pseudo: Tensor,
    image_l: Tensor,
    label_l: Tensor,
    *,
    ratio: float,
    rng: np.random.Generator,
    ignore_index: int | None = None,
    weight: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Unlabelled item i gets a cube of labelled item i mod b_l: returns the mixed images, targets (P outside the
    cube, the one-hot label inside) and voxel weights (``weight`` or 1 outside, 1 inside but 0 on ignored voxels;
    None when there is neither a weight nor an ignore label). M&N pastes only into batches with a labelled item."""
    n = image_u.shape[0]
    source = torch.arange(n, device=image_l.device) % image_l.shape[0]
    one_hot, valid = label_targets(pseudo, label_l[source], ignore_index)  # valid: None without an ignore label
    cube = cube_masks(n, tuple(image_u.shape[2:]), ratio, rng, image_u.device)
    image = torch.where(cube, image_l[source], image_u)
    target = torch.where(cube, one_hot.to(pseudo.dtype), pseudo)
    if weight is None and valid is None:  # nothing to weigh
        return image, target, None
    inside = torch.ones_like(pseudo[:, 0]) if valid is None else valid.to(pseudo.dtype)
    outside = torch.ones_like(pseudo[:, 0]) if weight is None else weight
    return image, target, torch.where(cube[:, 0], inside, outside)
