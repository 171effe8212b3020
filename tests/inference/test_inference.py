"""Sliding-window inference must reproduce whole-volume softmax for models that see one voxel at a time."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from mnseg.errors import ConfigError
from mnseg.inference.window import average_probabilities, sliding_window_probabilities


class PointwiseLogits(nn.Module):
    """logits = stack([-x, x, 2x]) of the first channel: voxelwise, so flip- and window-equivariant."""

    def __init__(self):
        super().__init__()
        self.calls = 0
        self.batch_sizes = []

    def forward(self, x):
        self.calls += 1
        self.batch_sizes.append(x.shape[0])
        first = x[:, :1]
        return torch.cat([-first, first, 2 * first], dim=1)


class SmallConv(nn.Module):
    """A fixed 3x3x3 conv: not flip-equivariant, so TTA must flip back correctly."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv3d(1, 2, 3, padding=1)

    def forward(self, x):
        return self.conv(x)


def _whole_volume_softmax(model, image):
    with torch.no_grad():
        return torch.softmax(model(image.unsqueeze(0)), dim=1)[0]


@pytest.mark.parametrize("blend", ["constant", "gaussian"])
@pytest.mark.parametrize("mirror_tta", [False, True])
def test_odd_sized_volume_matches_whole_volume_softmax(blend, mirror_tta):
    image = torch.randn(1, 19, 23, 17)
    model = PointwiseLogits()
    probs = sliding_window_probabilities(model, image, (8, 8, 8), blend=blend, mirror_tta=mirror_tta)
    assert probs.shape == (3, 19, 23, 17)
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs, _whole_volume_softmax(model, image), atol=1e-6, rtol=0)


def test_volume_smaller_than_patch_is_padded_and_cropped_back():
    image = torch.randn(2, 5, 9, 3)  # two channels; smaller than the patch on two axes
    model = PointwiseLogits()
    probs = sliding_window_probabilities(model, image, (8, 8, 8), overlap=0.5)
    assert probs.shape == (3, 5, 9, 3)
    torch.testing.assert_close(probs, _whole_volume_softmax(model, image), atol=1e-6, rtol=0)


def test_batch_input_matches_per_item_results():
    images = torch.randn(3, 1, 12, 10, 9)
    model = PointwiseLogits()
    batched = sliding_window_probabilities(model, images, (6, 6, 6), sw_batch_size=5)
    assert batched.shape == (3, 3, 12, 10, 9)
    for b in range(3):
        torch.testing.assert_close(batched[b], _whole_volume_softmax(model, images[b]), atol=1e-6, rtol=0)


def test_window_count_follows_overlap_and_batches_windows():
    model = PointwiseLogits()
    sliding_window_probabilities(
        model, torch.randn(1, 32, 32, 32), (16, 16, 16), overlap=0.5, sw_batch_size=4
    )
    # 50% overlap of 16 in 32 -> starts 0, 8, 16 per axis -> 27 windows -> ceil(27 / 4) model calls
    assert model.calls == 7
    assert model.batch_sizes == [4, 4, 4, 4, 4, 4, 3]

    model = PointwiseLogits()
    sliding_window_probabilities(
        model, torch.randn(1, 32, 32, 32), (16, 16, 16), overlap=0.0, sw_batch_size=8
    )
    assert model.calls == 1 and model.batch_sizes == [8]


def test_mirror_tta_averages_flipped_predictions_of_a_non_symmetric_model():
    image = torch.randn(1, 8, 8, 8)  # exactly one window, so TTA is the only averaging
    model = SmallConv()
    probs = sliding_window_probabilities(model, image, (8, 8, 8), mirror_tta=True)
    expected = []
    with torch.no_grad():
        for r in range(4):
            for dims in itertools.combinations((1, 2, 3), r):
                flipped = image.flip(dims) if dims else image
                expected.append(
                    _whole_volume_softmax(model, flipped).flip(dims)
                    if dims
                    else _whole_volume_softmax(model, flipped)
                )
    torch.testing.assert_close(probs, torch.stack(expected).mean(0), atol=1e-6, rtol=1e-6)
    no_tta = sliding_window_probabilities(model, image, (8, 8, 8), mirror_tta=False)
    assert not torch.allclose(probs, no_tta, atol=1e-4)


def test_overlapping_windows_of_a_conv_model_give_valid_probabilities():
    model = SmallConv()
    probs = sliding_window_probabilities(model, torch.randn(1, 17, 13, 11), (8, 8, 8), blend="gaussian")
    assert torch.isfinite(probs).all()
    torch.testing.assert_close(probs.sum(0), torch.ones(17, 13, 11), atol=1e-5, rtol=0)


def test_model_mode_is_restored_and_amp_on_cpu_is_plain_fp32():
    model = nn.Sequential(nn.Conv3d(1, 2, 1), nn.Dropout(p=0.9))
    model.train()
    image = torch.randn(1, 10, 10, 10)
    first = sliding_window_probabilities(model, image, (8, 8, 8), amp=True)
    second = sliding_window_probabilities(model, image, (8, 8, 8))
    assert model.training  # restored
    torch.testing.assert_close(first, second)  # dropout was off (eval) and amp did nothing on CPU


def test_two_dimensional_patch_uses_same_code_path():
    image = torch.randn(1, 21, 15)
    model = PointwiseLogits()
    probs = sliding_window_probabilities(model, image, (8, 8), blend="gaussian", mirror_tta=True)
    torch.testing.assert_close(probs, _whole_volume_softmax(model, image), atol=1e-6, rtol=0)


def test_bad_arguments_raise_clear_errors():
    model = PointwiseLogits()
    image = torch.randn(1, 8, 8, 8)
    with pytest.raises(ConfigError, match="overlap"):
        sliding_window_probabilities(model, image, (4, 4, 4), overlap=1.0)
    with pytest.raises(ConfigError, match="blending"):
        sliding_window_probabilities(model, image, (4, 4, 4), blend="median")
    with pytest.raises(ConfigError, match="num_classes=2"):
        sliding_window_probabilities(model, image, (4, 4, 4), num_classes=2)
    with pytest.raises(ValueError, match="does not fit"):
        sliding_window_probabilities(model, torch.randn(8, 8, 8), (4, 4, 4))


def test_average_probabilities_weights_and_errors():
    a = torch.softmax(torch.randn(2, 4, 4, 4), dim=0)
    b = torch.softmax(torch.randn(2, 4, 4, 4), dim=0)
    torch.testing.assert_close(average_probabilities([a, b]), (a + b) / 2)
    torch.testing.assert_close(average_probabilities([a, b], weights=[3, 1]), 0.75 * a + 0.25 * b)
    torch.testing.assert_close(average_probabilities([a, b], weights=[3, 1]).sum(0), torch.ones(4, 4, 4))
    with pytest.raises(ValueError, match="shape"):
        average_probabilities([a, b[:, :2]])
    with pytest.raises(ValueError, match="weights"):
        average_probabilities([a, b], weights=[1])
    with pytest.raises(ValueError, match="at least one"):
        average_probabilities([])
