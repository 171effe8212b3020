"""SegFormer (Hugging Face transformers) as a 2D segmentation model.

``pretrained`` is a hub id or a local folder saved with ``save_pretrained``.
Two heads (``head``): ``bilinear`` (default) re-initialises the classifier for
``num_classes`` and upsamples its 1/4-resolution logits bilinearly; ``transposed``
is M&N's published head: the classifier becomes an identity, the decode head's
1/4-resolution features are concatenated with the (ImageNet-mapped) input taken
at every 4th pixel, and a learned 4x4 stride-4 transposed convolution maps them
to ``num_classes`` logits at full resolution. With ``transposed`` the pretrained
decode head counts as part of the pretrained model (``encoder_module_names``),
as in the authors' code, where peft freezes it with the encoder. Without network access a
hub id only works if it is already in the local Hugging Face cache, so the
error says to pass a local folder. Inputs go through ``ImageNetInput`` (grey
repeated to RGB, ImageNet normalisation), sizes are padded to a multiple of 32,
and the output is cropped back to the input size.
"""

from __future__ import annotations

import pickle

import torch
import torch.nn.functional as F

from mnseg.errors import ConfigError
from mnseg.models.effunet import ImageNetInput
from mnseg.models.registry import check_choice, crop_spatial, pad_to_multiple, register_model

# Hidden sizes, depths and decode-head width of the published SegFormer variants (Xie et al. 2021).
VARIANTS = {
    "b0": {"hidden_sizes": [32, 64, 160, 256], "depths": [2, 2, 2, 2], "decoder_hidden_size": 256},
    "b1": {"hidden_sizes": [64, 128, 320, 512], "depths": [2, 2, 2, 2], "decoder_hidden_size": 256},
    "b2": {"hidden_sizes": [64, 128, 320, 512], "depths": [3, 4, 6, 3], "decoder_hidden_size": 768},
    "b3": {"hidden_sizes": [64, 128, 320, 512], "depths": [3, 4, 18, 3], "decoder_hidden_size": 768},
    "b4": {"hidden_sizes": [64, 128, 320, 512], "depths": [3, 8, 27, 3], "decoder_hidden_size": 768},
    "b5": {"hidden_sizes": [64, 128, 320, 512], "depths": [3, 6, 40, 3], "decoder_hidden_size": 768},
}


def load_segformer(pretrained: str | None, size: str, num_classes: int):
    """Random-init ``size`` variant, or the encoder of ``pretrained`` with a fresh ``num_classes`` head."""
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    if pretrained is None:
        config = SegformerConfig(num_labels=num_classes, num_attention_heads=[1, 2, 5, 8], **VARIANTS[size])
        return SegformerForSemanticSegmentation(config)
    try:
        return SegformerForSemanticSegmentation.from_pretrained(
            str(pretrained), num_labels=num_classes, ignore_mismatched_sizes=True
        )
    except pickle.UnpicklingError:  # transformers reads .bin weights with weights_only=True: it refused code
        raise ConfigError(
            f"model 'segformer': pretrained weights {str(pretrained)!r} hold pickled objects other than tensors, "
            "which could run code when loaded, so they were not loaded; use a folder with model.safetensors"
        ) from None
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"model 'segformer': cannot load pretrained weights {str(pretrained)!r} ({error}). "
            "Without network access, download the model once elsewhere (e.g. "
            "SegformerForSemanticSegmentation.from_pretrained(id).save_pretrained(folder)) and pass "
            "that local folder as pretrained=/path/to/folder"
        ) from error


HEADS = ("bilinear", "transposed")


class SegFormer2D(torch.nn.Module):
    spatial_dims = 2
    size_divisor = 32
    encoder_module_names = ("net.segformer",)
    # attention projections and MLP layers of the encoder (names of transformers 5.x and 4.x)
    lora_target_modules = (
        r"net\.segformer\..*\.(q_proj|k_proj|v_proj|o_proj|fc1|fc2"
        r"|query|key|value|attention\.output\.dense|dense1|dense2)"
    )

    def __init__(self, in_channels: int, num_classes: int, size: str = "b0", pretrained: str | None = None,
                 input_range: str = "zscore", head: str = "bilinear"):
        super().__init__()
        check_choice("segformer", "size", size, tuple(VARIANTS))
        check_choice("segformer", "head", head, HEADS)
        self.input_map = ImageNetInput(in_channels, input_range)
        self.net = load_segformer(pretrained, size, num_classes)
        self.head = head
        if head == "transposed":
            self.net.decode_head.classifier = torch.nn.Identity()  # the decode head now returns its features
            width = self.net.config.decoder_hidden_size
            self.up = torch.nn.ConvTranspose2d(width + 3, num_classes, kernel_size=4, stride=4)
            self.encoder_module_names = ("net",)  # encoder and decode head, both pretrained

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padded, size = pad_to_multiple(x, self.size_divisor, 2)
        rgb = self.input_map(padded)
        out = self.net(pixel_values=rgb).logits  # (N, num_classes or decoder width, H/4, W/4)
        if self.head == "transposed":
            logits = self.up(torch.cat([out, rgb[:, :, ::4, ::4]], dim=1))
        else:
            logits = F.interpolate(out, size=padded.shape[-2:], mode="bilinear", align_corners=False)
        return crop_spatial(logits, size)


@register_model("segformer")
def segformer(
    in_channels: int = 1, num_classes: int = 2, size: str = "b0", pretrained: str | None = None,
    input_range: str = "zscore", head: str = "bilinear",
) -> SegFormer2D:
    """SegFormer b0..b5 (random init), or ``pretrained`` hub id / local folder (its own size); ``input_range`` as
    effunet's (set by the engine from the dataset's normalisation); ``head``: bilinear (re-initialised classifier,
    bilinear upsampling) or transposed (M&N's: identity classifier, input concatenated, learned 4x transposed conv)."""
    return SegFormer2D(in_channels, num_classes, size, pretrained, input_range, head)
