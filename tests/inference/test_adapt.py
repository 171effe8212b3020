"""Test-time adaptation (inference/adapt.py): BN adapt sets the scan's statistics, TENT lowers the scan's entropy
through the norm layers' affine parameters alone, and the loaded state comes back after every scan."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mnseg.errors import ConfigError
from mnseg.inference.adapt import AdaptSettings, ScanAdapter, affine_parameters, mean_entropy, scan_entropy
from mnseg.inference.window import WindowSettings, sliding_window_probabilities
from mnseg.models import create_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CPU = torch.device("cpu")


def _window(patch=(16, 16, 16), sw_batch_size=8):
    return WindowSettings(tuple(patch), 0.5, "constant", False, sw_batch_size, False, False)


def _bn_model():
    """Voxel-wise before its BatchNorm, so the features a BN layer sees do not depend on how the scan is tiled."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv3d(1, 2, 1), nn.BatchNorm3d(2), nn.ReLU(), nn.Conv3d(2, 3, 3, padding=1)).eval()


def _tiny_unet(norm="instance"):
    torch.manual_seed(0)
    return create_model("unet3d", in_channels=1, num_classes=3, depth=3, base_filters=4, norm=norm).eval()


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _changed(model, before):
    return sorted(k for k, v in model.state_dict().items() if not torch.equal(v, before[k]))


def _shifted_scan(shape=(16, 16, 16), seed=1, scale=3.0, shift=5.0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(1, *shape, generator=generator) * scale + shift  # far from the BN layer's initial statistics


def test_settings_reject_bad_values():
    for bad, match in [({"mode": "tent"}, "choose one of none, norm, entropy"), ({"steps": 0}, "positive integer"),
                       ({"steps": 2.5}, "positive integer"), ({"lr": -1e-3}, "positive number"),
                       ({"lr": math.nan}, "positive number")]:
        with pytest.raises(ConfigError, match=match):
            AdaptSettings(**{"mode": "entropy", **bad})


def test_mean_entropy_is_log_k_for_uniform_and_near_zero_for_confident_logits():
    assert float(mean_entropy(torch.zeros(2, 4, 3, 3, 3))) == pytest.approx(math.log(4), rel=1e-6)
    confident = torch.zeros(1, 3, 2, 2, 2)
    confident[:, 1] = 50.0
    assert float(mean_entropy([confident, torch.zeros(1, 3, 1, 1, 1)])) < 1e-12  # deep supervision: first head


@pytest.mark.parametrize("patch", [(16, 16, 16), (8, 8, 8)])
def test_norm_adapt_gives_batchnorm_the_scans_statistics_and_restores_them(patch):
    model, image = _bn_model(), _shifted_scan()
    before = _state(model)
    adapter = ScanAdapter([model], ["net"], AdaptSettings("norm"), CPU)
    assert not adapter.notes
    adapter.adapt(image, _window(patch))  # 1 or 8 tiles, all in one window batch
    with torch.no_grad():
        features = model[0](image.unsqueeze(0))
    bn = model[1]
    torch.testing.assert_close(bn.running_mean, features.mean(dim=(0, 2, 3, 4)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn.running_var, features.var(dim=(0, 2, 3, 4), unbiased=True), rtol=1e-3, atol=1e-5)
    assert _changed(model, before) == ["1.num_batches_tracked", "1.running_mean", "1.running_var"]
    assert not model.training and bn.momentum == 0.1
    adapter.restore()
    assert _changed(model, before) == []


def test_norm_adapt_changes_the_prediction_of_a_batchnorm_model():
    model, image, window = _bn_model(), _shifted_scan(), _window()
    plain = sliding_window_probabilities(model, image, window.patch_size)
    adapter = ScanAdapter([model], ["net"], AdaptSettings("norm"), CPU)
    with adapter.scan(image, window):
        adapted = sliding_window_probabilities(model, image, window.patch_size)
    assert (adapted - plain).abs().max() > 1e-3
    torch.testing.assert_close(sliding_window_probabilities(model, image, window.patch_size), plain, rtol=0, atol=0)


def test_continual_norm_adapt_averages_the_statistics_of_the_scans_so_far():
    model, window = _bn_model(), _window()
    first, second = _shifted_scan(seed=1), _shifted_scan(seed=2, scale=1.0, shift=-4.0)
    before = _state(model)
    adapter = ScanAdapter([model], ["net"], AdaptSettings("norm", episodic=False), CPU)
    with adapter.scan(first, window):
        pass
    assert _changed(model, before)  # carried over to the next scan
    with adapter.scan(second, window):
        pass
    with torch.no_grad():
        means = [model[0](x.unsqueeze(0)).mean(dim=(0, 2, 3, 4)) for x in (first, second)]
    torch.testing.assert_close(model[1].running_mean, (means[0] + means[1]) / 2, rtol=1e-4, atol=1e-5)
    adapter.restore()
    assert _changed(model, before) == []


def test_norm_on_an_instance_norm_model_says_so_and_changes_nothing():
    model, image, window = _tiny_unet(), torch.randn(1, 32, 32, 32), _window((32, 32, 32))
    before = _state(model)
    adapter = ScanAdapter([model], ["net"], AdaptSettings("norm"), CPU)
    (note,) = adapter.notes
    assert "model 'net' has no BatchNorm layer" in note and "InstanceNorm3d" in note and "unchanged" in note
    adapter.adapt(image, window)
    assert _changed(model, before) == []


def test_entropy_adaptation_lowers_the_scans_entropy_through_norm_affine_parameters_only():
    model, image, window = _tiny_unet(), torch.randn(1, 32, 32, 32), _window((32, 32, 32))
    before = _state(model)
    affine = {id(p) for p in affine_parameters(model)}
    # by state-dict key: DynUNet reaches some layers under two names (skip_layers aliases its blocks)
    affine_names = {n for n, p in model.state_dict(keep_vars=True).items() if id(p) in affine}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    entropy_before = scan_entropy(model, image, window, CPU)
    adapter = ScanAdapter([model], ["net"], AdaptSettings("entropy", steps=4, lr=1e-2), CPU)
    adapter.adapt(image, window)
    entropy_after = scan_entropy(model, image, window, CPU)
    assert entropy_after < entropy_before - 1e-3, (entropy_before, entropy_after)
    (losses,) = adapter.last_losses
    assert losses[0] == pytest.approx(entropy_before, rel=1e-5) and losses[-1] < losses[0]
    changed = set(_changed(model, before))
    assert changed and changed <= affine_names, changed - affine_names
    assert any(n.endswith("weight") for n in changed) and any(n.endswith("bias") for n in changed)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags and not model.training
    adapter.restore()
    assert _changed(model, before) == []
    assert scan_entropy(model, image, window, CPU) == pytest.approx(entropy_before, rel=0, abs=0)


def test_episodic_adaptation_restores_the_model_after_each_scan_even_on_error():
    model, window = _tiny_unet(), _window((32, 32, 32))
    before = _state(model)
    adapter = ScanAdapter([model], ["net"], AdaptSettings("entropy", steps=1, lr=1e-2), CPU)
    with adapter.scan(torch.randn(1, 32, 32, 32), window):
        assert _changed(model, before)
    assert _changed(model, before) == []
    with pytest.raises(RuntimeError, match="boom"), adapter.scan(torch.randn(1, 32, 32, 32), window):
        raise RuntimeError("boom")
    assert _changed(model, before) == []


def test_entropy_on_a_model_without_affine_norm_layers_is_refused():
    with pytest.raises(ConfigError, match="model 'net' has no normalisation layer with affine parameters"):
        ScanAdapter([nn.Conv3d(1, 2, 1)], ["net"], AdaptSettings("entropy"), CPU)
    with pytest.raises(ValueError, match="other than 'none'"):
        ScanAdapter([nn.Conv3d(1, 2, 1)], ["net"], AdaptSettings("none"), CPU)
