"""2D UNet trained from scratch (same MONAI DynUNet as ``unet3d``, in 2D).

Batch norm is the default here because 2D training batches many slices.
"""

from __future__ import annotations

from mnseg.models.registry import register_model
from mnseg.models.unet3d import PlainUNet


@register_model("unet2d")
def unet2d(
    in_channels: int = 1,
    num_classes: int = 2,
    depth: int = 5,
    base_filters: int = 32,
    norm: str = "batch",
    dropout: float = 0.0,
) -> PlainUNet:
    """2D UNet; filters base_filters * 2**level for ``depth`` levels; any input size."""
    return PlainUNet(2, in_channels, num_classes, depth, base_filters, norm, dropout, name="unet2d")
