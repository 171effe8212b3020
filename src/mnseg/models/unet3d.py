"""Plain UNet built from MONAI's DynUNet (nnU-Net's network), for 3D and 2D.

``unet3d_mn`` is the network of the M&N paper: 5 levels, 32 filters doubling
per level (32..512), instance norm. Any input size works: the input is padded
to a multiple of 2**(depth-1) (and to at least 2**depth, so the bottleneck has
more than one voxel) and the logits are cropped back.

Dropout (``dropout`` p, default 0: none) sits where ``dropout_at`` says: ``all`` is DynUNet's own placement
(element-wise dropout after every convolution, the output convolution included); ``bottleneck_head`` is
UA-MT's V-Net (``has_dropout``): channel dropout (``Dropout3d``/``Dropout2d``) on the bottleneck's output
and on the features entering the output convolution, nowhere else. Dropout adds no parameters, so weights
load with any setting.
"""

from __future__ import annotations

import torch
from monai.networks.nets import DynUNet

from mnseg.errors import ConfigError
from mnseg.models.registry import check_choice, padded_forward, register_model

NORMS = {"instance": ("INSTANCE", {"affine": True}), "batch": ("BATCH", {})}
DROPOUT_AT = ("all", "bottleneck_head")


class PlainUNet(torch.nn.Module):
    """DynUNet with stride-2 levels, no deep supervision, size-agnostic forward."""

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        num_classes: int,
        depth: int = 5,
        base_filters: int = 32,
        norm: str = "instance",
        dropout: float = 0.0,
        name: str = "unet",
        dropout_at: str = "all",
    ):
        super().__init__()
        if not isinstance(depth, int) or depth < 3:
            raise ConfigError(f"model {name!r}: depth must be an integer >= 3 (DynUNet needs 3 levels), got {depth!r}")
        if not isinstance(base_filters, int) or base_filters < 1:
            raise ConfigError(f"model {name!r}: base_filters must be a positive integer, got {base_filters!r}")
        check_choice(name, "norm", norm, tuple(NORMS))
        if not 0.0 <= float(dropout) < 1.0:
            raise ConfigError(f"model {name!r}: dropout must be in [0, 1), got {dropout!r}")
        check_choice(name, "dropout_at", dropout_at, DROPOUT_AT)
        self.spatial_dims = spatial_dims
        self.size_divisor = 2 ** (depth - 1)
        self.filters = [base_filters * 2**level for level in range(depth)]
        self.net = DynUNet(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=num_classes,
            kernel_size=[3] * depth,
            strides=[1] + [2] * (depth - 1),
            upsample_kernel_size=[2] * (depth - 1),
            filters=self.filters,
            dropout=(float(dropout) or None) if dropout_at == "all" else None,
            norm_name=NORMS[norm],
        )
        if dropout_at == "bottleneck_head" and float(dropout) > 0:
            channel_dropout = torch.nn.Dropout3d if spatial_dims == 3 else torch.nn.Dropout2d
            self.channel_dropout = channel_dropout(float(dropout))
            self.net.bottleneck.register_forward_hook(self._drop_output)
            self.net.output_block.register_forward_pre_hook(self._drop_input)

    # bound methods (not closures), so a deep copy's hooks use the copy's own dropout module and mode
    def _drop_output(self, module, inputs, output):
        return self.channel_dropout(output)

    def _drop_input(self, module, inputs):
        return (self.channel_dropout(inputs[0]),)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return padded_forward(self.net, x, self.size_divisor, self.spatial_dims)


@register_model("unet3d")
def unet3d(
    in_channels: int = 1,
    num_classes: int = 2,
    depth: int = 5,
    base_filters: int = 32,
    norm: str = "instance",
    dropout: float = 0.0,
    dropout_at: str = "all",
) -> PlainUNet:
    """3D UNet; filters base_filters * 2**level for ``depth`` levels."""
    return PlainUNet(3, in_channels, num_classes, depth, base_filters, norm, dropout, "unet3d", dropout_at)


@register_model("unet3d_mn")
def unet3d_mn(in_channels: int = 1, num_classes: int = 2, dropout: float = 0.0, dropout_at: str = "all") -> PlainUNet:
    """The M&N paper's 3D UNet: 5 levels, filters 32..512, instance norm."""
    return PlainUNet(3, in_channels, num_classes, 5, 32, "instance", dropout, "unet3d_mn", dropout_at)
