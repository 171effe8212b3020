"""A small fully-convolutional 3D discriminator for adversarial segmentation training.

As Hung et al. (2018)'s discriminator, in 3D: ``num_layers`` stride-2 convolutions (LeakyReLU 0.2, no
normalisation, so a single-voxel map is fine) with ``base_filters * 2**i`` channels, then a 3x3x3
convolution to one real/fake logit per cell. With ``per_voxel`` (default) the logit map is upsampled
(trilinear) to the input size: a per-voxel confidence map, which Hung et al.'s self-training thresholds.
Kernel 3 with padding 1 (instead of their 4) keeps every size valid: each layer maps n to ceil(n / 2).

Input: class probabilities (B, K, *S), with the image concatenated (B, K + C, *S) when ``use_image``
(Zhang et al. 2017's evaluation network judges image-segmentation pairs). Output: (B, 1, *S) logits
(per_voxel) or (B, 1, *S / 2**num_layers) (per patch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mnseg.errors import ConfigError
from mnseg.models.registry import register_model


class Discriminator3D(nn.Module):
    spatial_dims = 3

    def __init__(
        self,
        in_channels: int,
        base_filters: int = 32,
        num_layers: int = 4,
        per_voxel: bool = True,
        use_image: bool = False,
    ):
        super().__init__()
        if not isinstance(num_layers, int) or num_layers < 1:
            raise ConfigError(f"model 'discriminator3d': num_layers must be a positive integer, got {num_layers!r}")
        if not isinstance(base_filters, int) or base_filters < 1:
            raise ConfigError(f"model 'discriminator3d': base_filters must be a positive integer, got {base_filters!r}")
        self.per_voxel, self.use_image = bool(per_voxel), bool(use_image)
        self.in_channels = in_channels
        layers: list[nn.Module] = []
        channels = in_channels
        for i in range(num_layers):
            out = base_filters * 2**i
            layers += [nn.Conv3d(channels, out, 3, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True)]
            channels = out
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Conv3d(channels, 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"discriminator expects (B, {self.in_channels}, X, Y, Z) input, got {tuple(x.shape)}")
        logits = self.classifier(self.features(x))
        if self.per_voxel:
            logits = F.interpolate(logits, size=x.shape[2:], mode="trilinear", align_corners=False)
        return logits


@register_model("discriminator3d")
def discriminator3d(
    in_channels: int = 1,
    num_classes: int = 2,
    base_filters: int = 32,
    num_layers: int = 4,
    per_voxel: bool = True,
    use_image: bool = False,
) -> Discriminator3D:
    """3D real/fake discriminator over K-class probability maps (+ the C image channels with ``use_image``)."""
    channels = num_classes + (in_channels if use_image else 0)
    return Discriminator3D(channels, base_filters, num_layers, per_voxel, use_image)
