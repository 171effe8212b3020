"""SliceWise: a 2D model run over every slice equals stacking its per-slice outputs."""

from __future__ import annotations

import pytest
import torch

from mnseg.errors import ConfigError
from mnseg.models import SliceWise, create_model


def _tiny_2d(in_channels=2, num_classes=3):
    torch.manual_seed(0)
    return create_model("unet2d", in_channels=in_channels, num_classes=num_classes, depth=3, base_filters=4)


def _reference(model2d, volume, axis):
    """Loop over slices one by one and stack: the obvious, slow definition."""
    outputs = [model2d(volume.select(axis, i)) for i in range(volume.shape[axis])]
    return torch.stack(outputs, dim=axis)


@pytest.mark.parametrize("axis", [-1, 2, 3])
@pytest.mark.parametrize("slice_batch", [None, 3])
def test_matches_slice_by_slice_stacking(axis, slice_batch):
    model2d = _tiny_2d().eval()
    wrapped = SliceWise(model2d, axis=axis, slice_batch=slice_batch).eval()
    volume = torch.randn(2, 2, 12, 10, 7)
    with torch.no_grad():
        out = wrapped(volume)
        expected = _reference(model2d, volume, axis)
    assert out.shape == (2, 3, 12, 10, 7)
    assert torch.allclose(out, expected, atol=1e-6)


def test_attributes_and_gradients():
    model2d = _tiny_2d(in_channels=1, num_classes=2)
    wrapped = SliceWise(model2d, slice_batch=4)
    assert wrapped.spatial_dims == 3 and wrapped.inner is model2d
    wrapped.train()
    wrapped(torch.randn(1, 1, 16, 16, 9)).square().mean().backward()
    grads = [p.grad for p in model2d.parameters()]
    assert all(g is not None for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0


@pytest.mark.parametrize("kwargs", [dict(axis=1), dict(axis=0), dict(slice_batch=0)])
def test_bad_arguments_raise_config_error(kwargs):
    with pytest.raises(ConfigError):
        SliceWise(_tiny_2d(), **kwargs)


def test_rejects_a_3d_model():
    with pytest.raises(ConfigError):
        SliceWise(create_model("unet3d", depth=3, base_filters=2))
