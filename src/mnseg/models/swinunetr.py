"""MONAI SwinUNETR with a size-agnostic forward.

SwinUNETR downsamples five times, so it needs sizes divisible by 32; the input
is zero-padded up to that (and to at least 64 so that the bottleneck has
more than one voxel) and the logits are cropped back. MONAI's SwinUNETR needs ``einops``.
"""

from __future__ import annotations

import importlib.util

import torch
from monai.networks.nets import SwinUNETR

from mnseg.errors import ConfigError
from mnseg.models.registry import padded_forward, register_model


class SwinUNETR3D(torch.nn.Module):
    spatial_dims = 3
    size_divisor = 32

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        feature_size: int = 24,
        use_checkpoint: bool = False,
        use_v2: bool = False,
    ):
        super().__init__()
        if importlib.util.find_spec("einops") is None:
            raise ConfigError("model 'swinunetr' needs the package einops (pip install einops)")
        if not isinstance(feature_size, int) or feature_size < 12 or feature_size % 12:
            raise ConfigError(
                f"model 'swinunetr': feature_size must be a positive multiple of 12, got {feature_size!r}"
            )
        self.net = SwinUNETR(
            in_channels=in_channels,
            out_channels=num_classes,
            feature_size=feature_size,
            use_checkpoint=use_checkpoint,
            use_v2=use_v2,
            spatial_dims=3,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return padded_forward(self.net, x, self.size_divisor, self.spatial_dims)


@register_model("swinunetr")
def swinunetr(
    in_channels: int = 1,
    num_classes: int = 2,
    feature_size: int = 24,
    use_checkpoint: bool = False,
    use_v2: bool = False,
) -> SwinUNETR3D:
    """3D SwinUNETR (MONAI); ``feature_size`` 24 by default (12 for quick tests)."""
    return SwinUNETR3D(in_channels, num_classes, feature_size, use_checkpoint, use_v2)
