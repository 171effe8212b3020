"""CPS: loss against a hand computation, gradients into both networks, different initialisation, CLI run."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

import mnseg.methods
from mnseg.config.schema import Config
from mnseg.engine.schedules import sigmoid_rampup
from mnseg.methods.base import Batch, MethodContext
from mnseg.methods.cps import CPS
from mnseg.models import create_model
from tests.helpers.cli_run import history_columns, train_tiny

REGISTRY_LINE = ("mnseg.methods.cps", "CPS")


def make_method(params=None, ignore_index=None, b=1, n_unlabeled=1, epochs=1, iters=1, seed=0) -> CPS:
    cfg = Config.from_dict(
        {
            "method": {"name": "cps", "params": params or {}},
            "models": {"net_a": {}, "net_b": {}},
            "train": {"seed": seed},
        }
    )
    ctx = MethodContext(2, 1, ignore_index, b, epochs, iters, 1, n_unlabeled)
    return CPS(cfg, ctx)


def conv_model(weight: float, bias: tuple[float, float]) -> nn.Conv3d:
    """1x1x1 conv, 1 -> 2 classes: logits = (w0 x + b0, w1 x + b1)."""
    conv = nn.Conv3d(1, 2, 1)
    with torch.no_grad():
        conv.weight[:] = torch.tensor([weight, -weight]).view(2, 1, 1, 1, 1)
        conv.bias[:] = torch.tensor(bias)
    return conv


# --- an independent reference in numpy ---------------------------------------------------------------------
def softmax(z):
    e = np.exp(z - z.max(axis=0))
    return e / e.sum(axis=0)


def ref_ce(logits, target, valid):
    """Mean over valid voxels of -log softmax(logits)[target]; logits (K, N)."""
    p = softmax(logits)
    nll = -np.log(p[target, np.arange(target.size)])
    return float((nll * valid).sum() / max(valid.sum(), 1))


def ref_dice(logits, target, valid, smooth=1e-5):
    p = softmax(logits)
    losses = []
    for c in range(p.shape[0]):
        t = (target == c).astype(float) * valid
        pc = p[c] * valid
        losses.append(1 - (2 * (pc * t).sum() + smooth) / (pc.sum() + t.sum() + smooth))
    return float(np.mean(losses))


def numpy_logits(x, weight, bias):
    """(K, N) logits of conv_model for flat voxel values x."""
    return np.stack([weight * x + bias[0], -weight * x + bias[1]])


def test_loss_matches_hand_computation_with_ignore_label():
    method = make_method({"lambda_cps": 1.5, "w_ce": 1.0, "w_dice": 1.0}, ignore_index=2)
    wa, ba, wb, bb = 1.0, (0.0, 0.2), -0.5, (0.3, 0.0)
    method.attach({"net_a": conv_model(wa, ba), "net_b": conv_model(wb, bb)}, {}, {})
    x_l = np.array([1.0, -2.0, 0.5])
    x_u = np.array([0.4, -1.0, 2.0])
    y = np.array([1, 0, 2])  # the last voxel nobody annotated
    batch = Batch(
        torch.tensor(x_l, dtype=torch.float32).view(1, 1, 3, 1, 1),
        torch.tensor(y).view(1, 3, 1, 1),
        torch.tensor(x_u, dtype=torch.float32).view(1, 1, 3, 1, 1),
    )
    out = method.training_step(batch, 0, 0)

    valid = (y != 2).astype(float)
    y0 = np.where(y == 2, 0, y)
    expected = 0.0
    for w, b in ((wa, ba), (wb, bb)):
        z = numpy_logits(x_l, w, b)
        expected += ref_ce(z, y0, valid) + ref_dice(z, y0, valid)
    x_all = np.concatenate([x_l, x_u])
    za, zb = numpy_logits(x_all, wa, ba), numpy_logits(x_all, wb, bb)
    ones = np.ones(x_all.size)
    cps = ref_ce(za, zb.argmax(0), ones) + ref_ce(zb, za.argmax(0), ones)
    expected += 1.5 * cps
    assert float(out.loss.detach()) == pytest.approx(expected, rel=1e-5)
    assert float(out.logs["loss_cps"]) == pytest.approx(cps, rel=1e-5)


def test_without_unlabelled_items_cps_uses_labelled_or_is_zero():
    method = make_method({"cps_on_labeled": False}, n_unlabeled=0)
    method.attach({"net_a": conv_model(1.0, (0, 0)), "net_b": conv_model(-1.0, (0, 0))}, {}, {})
    assert method.batch_split(0, 0) == (1, 0)
    batch = Batch(torch.randn(1, 1, 2, 2, 2), torch.randint(0, 2, (1, 2, 2, 2)), torch.zeros(0, 1, 2, 2, 2))
    out = method.training_step(batch, 0, 0)
    assert float(out.logs["loss_cps"]) == 0.0
    out.loss.backward()  # still connected

    method = make_method({"cps_on_labeled": True}, n_unlabeled=0)
    method.attach({"net_a": conv_model(1.0, (0, 0)), "net_b": conv_model(-1.0, (0, 0))}, {}, {})
    assert float(method.training_step(batch, 0, 0).logs["loss_cps"]) > 0


def tiny_unet(seed):
    torch.manual_seed(seed)
    return create_model("unet3d", in_channels=1, num_classes=2, depth=3, base_filters=2)


@pytest.mark.parametrize("only_cps", [False, True])
def test_gradient_reaches_every_parameter_of_both_networks(only_cps):
    params = {"w_ce": 0.0, "w_dice": 0.0} if only_cps else {}
    method = make_method(params, b=2)
    models = {"net_a": tiny_unet(0), "net_b": tiny_unet(1)}
    method.attach(models, {}, {})
    torch.manual_seed(2)
    batch = Batch(torch.randn(2, 1, 8, 8, 8), torch.randint(0, 2, (2, 8, 8, 8)), torch.randn(2, 1, 8, 8, 8))
    method.training_step(batch, 0, 0).loss.backward()
    for role, model in models.items():
        grads = [p.grad for p in model.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), role
        assert next(model.parameters()).grad.abs().sum() > 0, f"{role}: no gradient at the input layer"


def test_identical_networks_are_reinitialised_reproducibly():
    net_a = tiny_unet(0)
    copies = []
    for _ in range(2):
        method = make_method(seed=5)
        models = {"net_a": copy.deepcopy(net_a), "net_b": copy.deepcopy(net_a)}
        method.attach(models, {}, {})
        copies.append(models)
    a, b = copies[0]["net_a"], copies[0]["net_b"]
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), net_a.parameters())), "net_a must stay as built"
    assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters())), "net_b must differ"
    assert all(torch.equal(p, q) for p, q in zip(b.parameters(), copies[1]["net_b"].parameters())), "seeded"

    different = {"net_a": tiny_unet(0), "net_b": tiny_unet(1)}
    before = copy.deepcopy(different["net_b"].state_dict())
    make_method().attach(different, {}, {})
    assert all(torch.equal(before[k], v) for k, v in different["net_b"].state_dict().items()), "left alone"


def test_rampup_and_predictor_choices():
    method = make_method({"lambda_cps": 2.0, "rampup_epochs": 2}, epochs=4, iters=10)
    assert method.cps_weight(0, 0) == pytest.approx(2.0 * math.exp(-5.0))
    assert method.cps_weight(1, 0) == pytest.approx(2.0 * math.exp(-5.0 * 0.25))
    assert method.cps_weight(3, 0) == pytest.approx(2.0)
    assert sigmoid_rampup(5, 0) == 1.0
    models = {"net_a": tiny_unet(0), "net_b": tiny_unet(1)}
    method.attach(models, {}, {})
    assert method.predictor() is models["net_a"]
    assert method.predictor("b") is models["net_b"]
    assert method.predictor("average") == [models["net_a"], models["net_b"]]


def test_cli_training_run(toy_dataset, tmp_path, monkeypatch):
    monkeypatch.setitem(mnseg.methods.METHODS, "cps", REGISTRY_LINE)
    run = train_tiny(toy_dataset, tmp_path, "cps",
                     "models.net_a.name=unet3d", "models.net_a.kwargs={depth: 3, base_filters: 4}",
                     "models.net_b.name=unet3d", "models.net_b.kwargs={depth: 3, base_filters: 4}")  # fmt: skip
    history = (run / "history.csv").read_text()
    assert "loss_cps" in history_columns(run)
    assert len(history.strip().splitlines()) == 3


def test_both_labelled_dice_terms_pool_with_the_batch_reduce_sums():
    method = make_method(b=2)
    method.attach({"net_a": conv_model(1.0, (0.0, 0.2)), "net_b": conv_model(-0.5, (0.3, 0.0))}, {}, {})
    g = torch.Generator().manual_seed(0)
    batch = Batch(torch.randn(2, 1, 4, 4, 4, generator=g), torch.randint(0, 2, (2, 4, 4, 4), generator=g),
                  torch.randn(2, 1, 4, 4, 4, generator=g))
    plain = method.training_step(batch, 0, 0).loss
    seen = []
    batch.reduce_sums = lambda t: seen.append(t.shape) or t
    assert torch.equal(method.training_step(batch, 0, 0).loss, plain)
    assert seen == [torch.Size([2, 2])] * 2  # net_a's and net_b's
