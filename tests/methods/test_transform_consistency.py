"""transform_consistency: softmax-MSE between f(T x) and T f(x) for random exact flips / quarter turns."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import mnseg.methods
import mnseg.methods.transform_consistency as tc
from mnseg.config.schema import Config
from mnseg.methods.base import Batch
from mnseg.methods.transform_consistency import ExactTransform, TransformConsistency, sample_transforms
from mnseg.models import create_model
from tests.helpers.cli_run import TINY_NET, history_columns, train_tiny
from tests.helpers.method_scaffold import attach_with_sgd, tiny_context
from tests.helpers.numpy_reference import np_softmax, np_supervised

IGNORE = 2


@pytest.fixture(autouse=True)
def _registered(monkeypatch):
    monkeypatch.setitem(
        mnseg.methods.METHODS, "transform_consistency", ("mnseg.methods.transform_consistency", "TransformConsistency")
    )


def make_method(params=None, model=None, n_unlabeled=2):
    cfg = Config.from_dict({"method": {"name": "transform_consistency", "params": params or {}}, "models": {"net": {}}})
    method = TransformConsistency(cfg, tiny_context(ignore_index=IGNORE, n_unlabeled=n_unlabeled))
    torch.manual_seed(0)
    return attach_with_sgd(method, {"net": model if model is not None else torch.nn.Conv3d(1, 2, 3, padding=1)})


def make_batch(b_l=2, b_u=2, shape=(4, 4, 3), seed=0):
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(0, 3, (b_l, *shape), generator=g)
    return Batch(torch.randn(b_l, 1, *shape, generator=g), label, torch.randn(b_u, 1, *shape, generator=g))


def np_transform(x, flips, turns):
    """numpy reference of ExactTransform on one item (C, X, Y, Z)."""
    for axis in flips:
        x = np.flip(x, axis + 1)
    return np.rot90(x, turns, axes=(1, 2))


# --- the transformations ------------------------------------------------------------------------------------
def test_exact_transform_matches_numpy():
    x = torch.randn(2, 4, 4, 3)
    for flips, turns in [((), 1), ((0,), 0), ((1, 2), 3), ((0, 1, 2), 2)]:
        got = ExactTransform(flips, turns)(x).numpy()
        assert np.array_equal(got, np_transform(x.numpy(), flips, turns))


def test_quarter_turns_only_when_the_plane_is_square():
    torch.manual_seed(0)
    assert {t.quarter_turns for t in sample_transforms(200, (4, 6, 4))} == {0, 2}
    assert {t.quarter_turns for t in sample_transforms(200, (4, 4, 6))} == {0, 1, 2, 3}
    assert {t.flips for t in sample_transforms(50, (4, 4, 6), flip_axes=(), rotate=False)} == {()}


# --- (a) the loss on a hand-computed example -----------------------------------------------------------------
def test_loss_matches_hand_computation(monkeypatch):
    chosen = [ExactTransform((0,), 1), ExactTransform((2,), 3)]
    monkeypatch.setattr(tc, "sample_transforms", lambda n, *a, **k: chosen[:n])
    method = make_method({"consistency": 0.4, "rampup": 0.5})
    batch = make_batch()
    out = method.training_step(batch, epoch=0, iteration=2)

    net = method.models["net"]
    with torch.no_grad():
        logits_l = net(batch.image_l).numpy()
        p_u = np_softmax(net(batch.image_u).numpy())
    x_u = batch.image_u.numpy()
    moved = np.stack([np_transform(x_u[i], t.flips, t.quarter_turns) for i, t in enumerate(chosen)])
    with torch.no_grad():
        q = np_softmax(net(torch.from_numpy(moved.copy())).numpy())
    target = np.stack([np_transform(p_u[i], t.flips, t.quarter_turns) for i, t in enumerate(chosen)])
    consistency = ((q - target) ** 2).mean()
    weight = 0.4 * math.exp(-5 * (1 - 2 / 5) ** 2)
    expected = np_supervised(logits_l, batch.label_l.numpy(), IGNORE) + weight * consistency
    assert consistency > 1e-6  # a 3x3x3 conv is not equivariant: the term is not trivially zero
    assert float(out.loss.detach()) == pytest.approx(expected, rel=1e-5)


def test_equivariant_network_has_zero_consistency():
    method = make_method({"rampup": 0.0}, model=torch.nn.Conv3d(1, 2, 1))  # pointwise: commutes with any T
    out = method.training_step(make_batch(), 0, 0)
    assert float(out.logs["loss_u"]) == pytest.approx(0.0, abs=1e-12)


def test_no_unlabelled_items_gives_the_supervised_loss():
    method = make_method(n_unlabeled=0)
    assert method.batch_split(0, 0) == (2, 0)
    batch = make_batch(b_u=0)
    out = method.training_step(batch, 0, 0)
    with torch.no_grad():
        expected = np_supervised(method.models["net"](batch.image_l).numpy(), batch.label_l.numpy(), IGNORE)
    assert float(out.loss.detach()) == pytest.approx(expected, rel=1e-5)
    assert "loss_u" not in out.logs


def test_affine_option_masks_voxels_from_outside():
    method = make_method({"affine": True, "affine_rotate_deg": 30.0, "affine_scale": [0.8, 0.8]})
    images = torch.randn(2, 1, 8, 8, 8)
    probs = torch.softmax(torch.randn(2, 2, 8, 8, 8), dim=1)
    moved, moved_probs, inside = method.transform(images, probs)
    assert moved.shape == images.shape and moved_probs.shape == probs.shape
    assert inside.dtype == torch.bool and inside.any() and not inside.all()  # zooming out leaves a border
    assert torch.allclose(moved_probs.sum(dim=1), torch.ones(2, 8, 8, 8), atol=1e-5)


# --- (b) gradients ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("detach_target", [False, True])
def test_gradient_reaches_every_parameter(detach_target):
    torch.manual_seed(0)
    net = create_model("unet3d", depth=3, base_filters=4)
    method = make_method({"rampup": 0.0, "detach_target": detach_target}, model=net)
    out = method.training_step(make_batch(shape=(8, 8, 8)), 0, 0)
    out.loss.backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_both_branches_receive_gradient_unless_detached(monkeypatch):
    """With the target detached, the consistency gradient equals that of f(T x) alone."""
    monkeypatch.setattr(tc, "sample_transforms", lambda n, *a, **k: [ExactTransform((0,), 1)] * n)
    grads = {}
    for detach in (False, True):
        method = make_method({"rampup": 0.0, "w_ce": 0.0, "w_dice": 0.0, "detach_target": detach})
        out = method.training_step(make_batch(), 0, 0)
        out.loss.backward()
        grads[detach] = method.models["net"].weight.grad.clone()
    assert not torch.allclose(grads[False], grads[True])


# --- (c) end to end through the CLI -------------------------------------------------------------------------
def test_cli_train_end_to_end(toy_dataset, tmp_path):
    run = train_tiny(toy_dataset, tmp_path, "transform_consistency", *TINY_NET)
    assert "loss_u" in history_columns(run)
