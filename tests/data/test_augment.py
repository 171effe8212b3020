"""Batched augmentation: alignment of image and targets, value sets, intensities, determinism."""

from __future__ import annotations

import json

import pytest
import torch

from mnseg.data.augment import AugmentConfig, Augmenter
from mnseg.errors import ConfigError

SPATIAL_ONLY = dict(gamma=None, noise_std=0.0)


def asymmetric_label(batch: int, spatial: tuple[int, ...]) -> torch.Tensor:
    """An L-shaped object that no flip maps onto itself."""
    label = torch.zeros(batch, *spatial, dtype=torch.long)
    if len(spatial) == 3:
        label[:, 2:10, 3:6, 4:7] = 1
        label[:, 2:5, 6:14, 4:7] = 2
    else:
        label[:, 2:10, 3:6] = 1
        label[:, 2:5, 6:14] = 2
    return label


def central_blob(batch: int, spatial: tuple[int, ...]) -> torch.Tensor:
    label = torch.zeros(batch, *spatial, dtype=torch.long)
    centre = tuple(slice(s // 2 - 3, s // 2 + 3) for s in spatial)
    label[(slice(None), *centre)] = 1
    return label


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("spatial", [(16, 16), (12, 12, 12)])
def test_identity_config_is_bit_exact(spatial):
    image = torch.randn(2, 2, *spatial)
    label = asymmetric_label(2, spatial)
    augmenter = Augmenter(AugmentConfig.none(), spatial_dims=len(spatial))
    out_image, (out_label,) = augmenter(image, [label], ["label"], generator=seeded())
    assert torch.equal(out_image, image) and torch.equal(out_label, label)


@pytest.mark.parametrize("spatial", [(16, 16), (16, 16, 16)])
def test_flip_moves_image_and_label_together(spatial):
    n = len(spatial)
    label = asymmetric_label(16, spatial)
    image = label.unsqueeze(1).float() * 10 + 1
    config = AugmentConfig(scale=None, flip_axes=tuple(range(n)), **SPATIAL_ONLY)
    out_image, (out_label,) = Augmenter(config, n)(image, [label], ["label"], generator=seeded(1))
    assert torch.equal(out_image, out_label.unsqueeze(1).float() * 10 + 1)
    changed = [not torch.equal(out_label[i], label[i]) for i in range(16)]
    assert any(changed) and not all(changed)
    for i in range(16):  # every sample is its source flipped along some subset of axes
        candidates = [label[i]]
        for axis in range(n):
            candidates += [c.flip(axis) for c in candidates]
        assert any(torch.equal(out_label[i], c) for c in candidates)


@pytest.mark.parametrize("spatial", [(20, 20), (16, 16, 16)])
def test_nearest_resampling_keeps_label_values(spatial):
    label = asymmetric_label(4, spatial)
    label[:, -3:] = 5  # ignore label
    config = AugmentConfig(scale=(0.7, 1.3), rotate_deg=25.0, **SPATIAL_ONLY)
    image = torch.randn(4, 1, *spatial)
    _, (out,) = Augmenter(config, len(spatial))(image, [label], ["label"], generator=seeded(2), label_pad=5)
    assert out.dtype == label.dtype
    assert set(out.unique().tolist()) <= {0, 1, 2, 5}
    assert not torch.equal(out, label)


@pytest.mark.parametrize("spatial", [(20, 20), (16, 16, 16)])
def test_probs_sum_to_one_and_follow_the_label(spatial):
    n = len(spatial)
    label = asymmetric_label(4, spatial)
    probs = torch.nn.functional.one_hot(label, 3).movedim(-1, 1).float()
    config = AugmentConfig(scale=(0.7, 0.8), rotate_deg=20.0, **SPATIAL_ONLY)  # zoom out: padding appears
    image = torch.randn(4, 1, *spatial)
    _, (out_probs, out_label, out_mask) = Augmenter(config, n)(
        image,
        [probs, label, torch.ones_like(label, dtype=torch.bool)],
        ["prob", "label", "mask"],
        generator=seeded(3),
    )
    assert out_probs.shape == probs.shape
    assert torch.allclose(out_probs.sum(dim=1), torch.ones(4, *spatial), atol=1e-5)
    assert (out_probs >= 0).all()
    agreement = (out_probs.argmax(dim=1) == out_label).float().mean()
    assert agreement > 0.9
    assert out_mask.dtype == torch.bool
    assert not out_mask.all() and out_mask.any()  # outside the source is not valid
    assert (out_label[~out_mask] == 0).all()


@pytest.mark.parametrize("spatial", [(24, 24), (16, 16, 16)])
def test_zoom_in_grows_the_foreground(spatial):
    label = central_blob(2, spatial)
    config = AugmentConfig(scale=(1.5, 1.6), **SPATIAL_ONLY)
    image = label.unsqueeze(1).float()
    out_image, (out_label,) = Augmenter(config, len(spatial))(image, [label], ["label"], generator=seeded(4))
    before = label.flatten(1).float().mean(1)
    assert (out_label.flatten(1).float().mean(1) > 1.5 * before).all()
    assert (out_image.flatten(1).mean(1) > 1.5 * before).all()


def test_zoom_out_pads_image_with_channel_minimum():
    image = torch.rand(2, 2, 16, 16, 16) + torch.tensor([5.0, -3.0]).view(1, 2, 1, 1, 1)
    config = AugmentConfig(scale=(0.5, 0.6), **SPATIAL_ONLY)
    out, _ = Augmenter(config, 3)(image, generator=seeded(5))
    minimum = image.amin(dim=(2, 3, 4))
    assert torch.allclose(out[:, :, 0, 0, 0], minimum)
    assert (out.amin(dim=(2, 3, 4)) >= minimum - 1e-6).all()


@pytest.mark.parametrize("spatial", [(16, 16), (12, 12, 12)])
def test_gamma_keeps_per_sample_min_and_max(spatial):
    image = torch.randn(3, 2, *spatial) * 4 + 7
    config = AugmentConfig(scale=None, gamma=(0.5, 2.0), p_gamma=1.0)
    out, _ = Augmenter(config, len(spatial))(image, generator=seeded(6))
    dims = tuple(range(2, image.dim()))
    assert torch.allclose(out.amin(dim=dims), image.amin(dim=dims), atol=1e-5)
    assert torch.allclose(out.amax(dim=dims), image.amax(dim=dims), atol=1e-5)
    assert not torch.allclose(out, image)


def test_noise_touches_only_the_image():
    image = torch.zeros(4, 1, 12, 12, 12)
    label = central_blob(4, (12, 12, 12))
    config = AugmentConfig(scale=None, gamma=None, noise_std=0.5, p_noise=1.0)
    out, (out_label,) = Augmenter(config, 3)(image, [label], ["label"], generator=seeded(7))
    assert 0.4 < float(out.std()) < 0.6
    assert torch.equal(out_label, label)


@pytest.mark.parametrize("spatial", [(16, 16), (12, 12, 12)])
def test_seeded_generator_is_reproducible(spatial):
    config = (
        AugmentConfig.strong_2d()
        if len(spatial) == 2
        else AugmentConfig(rotate_deg=10.0, noise_std=0.1, p_noise=0.5, flip_axes=(0, 2))
    )
    augmenter = Augmenter(config, len(spatial))
    image = torch.randn(3, 1, *spatial)
    label = asymmetric_label(3, spatial)
    a = augmenter(image, [label], ["label"], generator=seeded(8))
    b = augmenter(image, [label], ["label"], generator=seeded(8))
    c = augmenter(image, [label], ["label"], generator=seeded(9))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1][0], b[1][0])
    assert not torch.equal(a[0], c[0])


def test_inputs_are_not_modified():
    image = torch.randn(2, 1, 12, 12, 12)
    label = asymmetric_label(2, (12, 12, 12))
    image_copy, label_copy = image.clone(), label.clone()
    config = AugmentConfig(
        rotate_deg=15.0, flip_axes=(0, 1, 2), gamma=(0.7, 1.5), p_gamma=1.0, noise_std=0.1, p_noise=1.0
    )
    Augmenter(config, 3)(image, [label], ["label"], generator=seeded(10))
    assert torch.equal(image, image_copy) and torch.equal(label, label_copy)


def test_p_spatial_zero_leaves_geometry_alone():
    label = asymmetric_label(2, (16, 16, 16))
    config = AugmentConfig(scale=(0.5, 0.6), p_spatial=0.0, **SPATIAL_ONLY)
    _, (out,) = Augmenter(config, 3)(label.unsqueeze(1).float(), [label], ["label"], generator=seeded(11))
    assert torch.equal(out, label)


def test_presets_and_dict_round_trip():
    conservative = AugmentConfig.conservative_3d()
    assert conservative.scale == (0.9, 1.1) and conservative.gamma == (0.8, 1.2)
    assert conservative.rotate_deg == 0 and conservative.flip_axes == () and conservative.noise_std == 0
    strong = AugmentConfig.strong_2d()
    assert strong.scale == (0.7, 1.4) and strong.rotate_deg == 30 and strong.noise_std == 0.1
    assert AugmentConfig.none().is_identity and not conservative.is_identity
    for config in (conservative, strong, AugmentConfig.none()):
        as_dict = config.to_dict()
        assert AugmentConfig.from_dict(as_dict) == config
        assert AugmentConfig.from_dict(json.loads(json.dumps(as_dict))) == config


def test_bad_config_values_are_config_errors():
    with pytest.raises(ConfigError, match="zoom"):
        AugmentConfig.from_dict({"zoom": (1, 2)})
    with pytest.raises(ConfigError, match="scale"):
        AugmentConfig(scale=(1.2, 0.9))
    with pytest.raises(ConfigError, match="p_gamma"):
        AugmentConfig(p_gamma=1.5)
    with pytest.raises(ConfigError, match="flip_axes"):
        Augmenter(AugmentConfig(flip_axes=(2,)), spatial_dims=2)


def test_bad_target_shapes_are_reported():
    augmenter = Augmenter(AugmentConfig(), 3)
    image = torch.zeros(2, 1, 8, 8, 8)
    with pytest.raises(ValueError, match="label target"):
        augmenter(image, [torch.zeros(2, 8, 8, 7, dtype=torch.long)], ["label"])
    with pytest.raises(ValueError, match="kind"):
        augmenter(image, [torch.zeros(2, 8, 8, 8)], ["weird"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_match_cpu_with_a_cpu_generator():
    config = AugmentConfig(rotate_deg=10.0, flip_axes=(0,), gamma=(0.7, 1.5), p_gamma=1.0)
    augmenter = Augmenter(config, 3)
    image = torch.randn(2, 1, 12, 12, 12)
    label = asymmetric_label(2, (12, 12, 12))
    cpu_image, (cpu_label,) = augmenter(image, [label], ["label"], generator=seeded(12))
    gpu_image, (gpu_label,) = augmenter(image.cuda(), [label.cuda()], ["label"], generator=seeded(12))
    assert gpu_image.is_cuda and gpu_label.is_cuda
    assert torch.allclose(gpu_image.cpu(), cpu_image, atol=1e-4)
    assert (gpu_label.cpu() == cpu_label).float().mean() > 0.99
