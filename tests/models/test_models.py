"""Model registry and every registered model: shapes on even/odd sizes, gradients, weight loading."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from mnseg.errors import ConfigError
from mnseg.models import create_model, list_models, model_kwargs
from mnseg.models.effunet import weights_path

# Smallest settings per model that still exercise the real architecture.
TINY = {
    "unet3d": dict(depth=3, base_filters=4),
    "unet3d_mn": {},
    "swinunetr": dict(feature_size=12),
    "unet2d": dict(depth=3, base_filters=4),
    "segformer": dict(size="b0"),
    "effunet": dict(variant="lite0"),
}
SIZES = {3: [(16, 16, 16), (17, 18, 19)], 2: [(32, 32), (33, 31)]}
HAS_EINOPS = importlib.util.find_spec("einops") is not None


def test_every_registered_model_has_a_tiny_test_setting():
    # not segmentation networks: the discriminators and the pretext heads (tests/methods/test_pretrain.py,
    # tests/methods/test_domain_adaptation.py)
    assert set(list_models()) - {"discriminator3d", "domain_classifier3d", "pretext_head"} == set(TINY)


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n == "swinunetr" else n for n in sorted(TINY)]
)
def test_forward_shape_and_gradient(name):
    """swinunetr is marked slow: it pads to 64^3 (bottleneck > 1 voxel), about 20 s on 2 CPU cores."""
    if name == "swinunetr" and not HAS_EINOPS:
        pytest.skip("MONAI SwinUNETR needs einops")
    torch.manual_seed(0)
    model = create_model(name, in_channels=1, num_classes=3, **TINY[name])
    assert model.spatial_dims in (2, 3)
    sizes = SIZES[model.spatial_dims][-1:] if name in ("unet3d_mn", "swinunetr") else SIZES[model.spatial_dims]
    batch = 2 if model.spatial_dims == 2 else 1
    for size in sizes:
        model.zero_grad()
        x = torch.randn(batch, 1, *size)
        logits = model(x)
        assert logits.shape == (batch, 3, *size)
        logits.float().square().mean().backward()
        params = [p for p in model.parameters() if p.requires_grad]
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
        # the layer nearest the input only gets a gradient if it flowed through the whole network
        first = next(p for p in model.parameters() if p.requires_grad)
        assert first.grad.abs().sum() > 0


def test_unknown_model_lists_known_names():
    with pytest.raises(ConfigError) as info:
        create_model("no_such_net")
    for name in list_models():
        assert name in str(info.value)


def test_unknown_option_lists_accepted_options():
    with pytest.raises(ConfigError) as info:
        create_model("unet3d", widht=3)
    assert "widht" in str(info.value)
    for option in model_kwargs("unet3d"):
        assert option in str(info.value)


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("unet3d", dict(norm="group")),
        ("unet3d", dict(depth=2)),
        ("unet2d", dict(base_filters=0)),
        ("segformer", dict(size="b9")),
        ("effunet", dict(variant="lite9")),
        ("effunet", dict(decoder_channels=(8, 8))),
        ("effunet", dict(input_scale=0.5)),
    ],
)
def test_bad_option_values_raise_config_error(name, kwargs):
    with pytest.raises(ConfigError):
        create_model(name, **kwargs)


def test_bad_channel_counts_raise_config_error():
    with pytest.raises(ConfigError):
        create_model("unet2d", in_channels=0)
    with pytest.raises(ConfigError):
        create_model("unet2d", num_classes=0)


def test_unet3d_mn_is_the_papers_network():
    model = create_model("unet3d_mn", num_classes=2)
    assert model.filters == [32, 64, 128, 256, 512]
    assert model.spatial_dims == 3
    norms = [m for m in model.modules() if isinstance(m, torch.nn.InstanceNorm3d)]
    assert norms and not any(isinstance(m, torch.nn.BatchNorm3d) for m in model.modules())


def test_unet_norm_option_selects_the_norm_layer():
    model = create_model("unet3d", depth=3, base_filters=4, norm="batch")
    assert any(isinstance(m, torch.nn.BatchNorm3d) for m in model.modules())
    assert not any(isinstance(m, torch.nn.InstanceNorm3d) for m in model.modules())


def test_unet_dropout_placement():
    """dropout_at: 'all' (DynUNet: after every conv) or 'bottleneck_head' (UA-MT's V-Net: two channel dropouts)."""
    plain = create_model("unet3d", depth=3, base_filters=4)
    everywhere = create_model("unet3d", depth=3, base_filters=4, dropout=0.2)
    vnet = create_model("unet3d", depth=3, base_filters=4, dropout=0.5, dropout_at="bottleneck_head")
    drops = lambda m: [x for x in m.modules() if isinstance(x, torch.nn.modules.dropout._DropoutNd)]  # noqa: E731
    assert not drops(plain) and len(drops(everywhere)) > 2
    assert [type(d) for d in drops(vnet)] == [torch.nn.Dropout3d] and drops(vnet)[0].p == 0.5
    assert plain.state_dict().keys() == everywhere.state_dict().keys() == vnet.state_dict().keys()
    vnet.load_state_dict(plain.state_dict())
    x = torch.randn(1, 1, 8, 8, 8)
    vnet.eval()
    torch.testing.assert_close(vnet(x), plain.eval()(x))  # eval: dropout off, the same network
    calls = []
    vnet.channel_dropout.register_forward_hook(lambda m, i, o: calls.append(tuple(i[0].shape)))
    vnet.train()(x)
    assert calls == [(1, 16, 2, 2, 2), (1, 4, 8, 8, 8)]  # the bottleneck's output, then the classifier's input
    with pytest.raises(ConfigError, match="dropout_at"):
        create_model("unet3d_mn", dropout=0.5, dropout_at="decoder")


@pytest.mark.parametrize("size, hidden", [("b0", [32, 64, 160, 256]), ("b1", [64, 128, 320, 512])])
def test_segformer_sizes_follow_the_published_variants(size, hidden):
    model = create_model("segformer", size=size, num_classes=4)
    assert list(model.net.config.hidden_sizes) == hidden
    assert model.net.config.num_labels == 4


def test_multichannel_input_is_mixed_to_rgb_by_a_trainable_layer():
    model = create_model("effunet", in_channels=2, num_classes=2, pretrained=False)
    assert model.input_map.mix is not None and model.input_map.mix.weight.requires_grad
    assert model(torch.randn(2, 2, 32, 32)).shape == (2, 2, 32, 32)


def test_effunet_input_scale_runs_on_enlarged_slices_and_answers_on_the_input_grid():
    torch.manual_seed(0)
    plain = create_model("effunet", pretrained=False).eval()
    scaled = create_model("effunet", pretrained=False, input_scale=2).eval()
    scaled.load_state_dict(plain.state_dict())
    seen = []
    hook = scaled.encoder._conv_stem.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape[-2:])))
    x = torch.randn(2, 1, 40, 24, requires_grad=True)
    out = scaled(x)
    hook.remove()
    assert out.shape == (2, 2, 40, 24) and seen == [(96, 64)]  # 80x48 enlarged, padded to multiples of 32
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with torch.no_grad():
        assert not torch.allclose(scaled(x), plain(x))  # another function of the input, same weights


def test_grey_input_is_repeated_and_imagenet_normalised():
    model = create_model("effunet", pretrained=False)
    grey = torch.zeros(1, 1, 4, 4)  # z-score 0 maps to mid-grey 0.5
    rgb = model.input_map(grey)
    expected = (0.5 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    assert rgb.shape == (1, 3, 4, 4)
    assert torch.allclose(rgb[0, :, 0, 0], expected)


@pytest.mark.parametrize("variant", ["lite0", "lite1", "lite2"])
def test_effunet_loads_the_shipped_weights_bit_for_bit(variant):
    model = create_model("effunet", variant=variant, pretrained=True)
    shipped = torch.load(weights_path(variant), map_location="cpu", weights_only=True)
    encoder = model.encoder.state_dict()
    matched = [key for key in shipped if key in encoder]
    for key in matched:
        assert torch.equal(encoder[key], shipped[key]), key
    classifier = [key for key in shipped if key.startswith("_fc.")]
    assert classifier
    assert len(matched) == len(shipped) - len(classifier)


def test_effunet_without_pretrained_differs_from_the_shipped_weights():
    model = create_model("effunet", variant="lite0", pretrained=False)
    shipped = torch.load(weights_path("lite0"), map_location="cpu", weights_only=True)
    assert not torch.equal(model.encoder.state_dict()["_conv_stem.weight"], shipped["_conv_stem.weight"])


def _tiny_segformer_folder(path):
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    config = SegformerConfig(
        hidden_sizes=[8, 16, 24, 32],
        depths=[1, 1, 1, 1],
        num_attention_heads=[1, 1, 1, 1],
        decoder_hidden_size=16,
        num_labels=5,
    )
    torch.manual_seed(1)
    source = SegformerForSemanticSegmentation(config)
    source.save_pretrained(path)
    return source


def _offline(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_segformer_loads_a_local_folder_offline(tmp_path, monkeypatch):
    _offline(monkeypatch, tmp_path)
    source = _tiny_segformer_folder(tmp_path / "tiny_segformer")
    model = create_model("segformer", pretrained=str(tmp_path / "tiny_segformer"), num_classes=3)
    loaded = model.net.segformer.state_dict()
    original = source.segformer.state_dict()
    assert loaded.keys() == original.keys()
    for key, value in original.items():
        assert torch.equal(loaded[key], value), key
    assert model.net.decode_head.classifier.out_channels == 3
    assert model(torch.randn(2, 1, 33, 32)).shape == (2, 3, 33, 32)


@pytest.mark.parametrize("pretrained", ["nvidia/mit-b0", "/no/such/segformer/folder"])
def test_segformer_unloadable_weights_give_a_clear_error(tmp_path, monkeypatch, pretrained):
    _offline(monkeypatch, tmp_path)
    with pytest.raises(ConfigError) as info:
        create_model("segformer", pretrained=pretrained)
    assert pretrained in str(info.value) and "local folder" in str(info.value)
