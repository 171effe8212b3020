"""entropy_min: supervised loss + ramped mean normalised softmax entropy on unlabelled patches."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import mnseg.methods
from mnseg.config.schema import Config
from mnseg.methods.base import Batch
from mnseg.methods.entropy_min import EntropyMin
from mnseg.models import create_model
from tests.helpers.cli_run import TINY_NET, history_columns, train_tiny
from tests.helpers.method_scaffold import assert_supervised_only_without_unlabelled_items, attach_with_sgd, tiny_context
from tests.helpers.numpy_reference import conv1x1, np_softmax, np_supervised

K = 3  # background + 2 classes; label 3 is "ignore"
IGNORE = 3


@pytest.fixture(autouse=True)
def _registered(monkeypatch):
    monkeypatch.setitem(mnseg.methods.METHODS, "entropy_min", ("mnseg.methods.entropy_min", "EntropyMin"))


def make_method(params=None, model=None, n_unlabeled=2):
    cfg = Config.from_dict({"method": {"name": "entropy_min", "params": params or {}}, "models": {"net": {}}})
    method = EntropyMin(cfg, tiny_context(num_classes=K, ignore_index=IGNORE, n_unlabeled=n_unlabeled))
    torch.manual_seed(0)
    return attach_with_sgd(method, {"net": model if model is not None else torch.nn.Conv3d(1, K, 1)})


def make_batch(b_l=2, b_u=2, shape=(3, 4, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(0, K + 1, (b_l, *shape), generator=g)  # includes the ignore label
    return Batch(torch.randn(b_l, 1, *shape, generator=g), label, torch.randn(b_u, 1, *shape, generator=g))


def np_entropy(logits):
    p = np_softmax(logits)
    return (-(p * np.log(p)).sum(axis=1) / math.log(K)).mean()


# --- (a) the loss on a hand-computed example -----------------------------------------------------------------
@pytest.mark.parametrize("rampup", [0.0, 0.8])
def test_loss_matches_hand_computation(rampup):
    method = make_method({"consistency": 0.2, "rampup": rampup, "w_ce": 0.7, "w_dice": 0.4})
    batch = make_batch()
    out = method.training_step(batch, epoch=0, iteration=4)
    net = method.models["net"]
    ramp = 1.0 if rampup == 0 else math.exp(-5 * (1 - 4 / 8) ** 2)
    supervised = np_supervised(conv1x1(net, batch.image_l), batch.label_l.numpy(), IGNORE, 0.7, 0.4)
    expected = supervised + 0.2 * ramp * np_entropy(conv1x1(net, batch.image_u))
    assert float(out.loss.detach()) == pytest.approx(expected, rel=1e-5)
    assert float(out.logs["loss_u"]) == pytest.approx(np_entropy(conv1x1(net, batch.image_u)), rel=1e-5)


def test_entropy_on_labeled_adds_labelled_patches():
    method = make_method({"entropy_on_labeled": True, "rampup": 0.0})
    batch = make_batch()
    out = method.training_step(batch, 0, 0)
    net = method.models["net"]
    both = np.concatenate([conv1x1(net, batch.image_l), conv1x1(net, batch.image_u)])
    assert float(out.logs["loss_u"]) == pytest.approx(np_entropy(both), rel=1e-5)


def test_no_unlabelled_items_gives_the_supervised_loss():
    method = make_method(n_unlabeled=0)
    assert_supervised_only_without_unlabelled_items(method, make_batch(b_u=0), method.models["net"], IGNORE)


# --- (b) gradients ---------------------------------------------------------------------------------------------
def test_gradient_reaches_every_parameter_and_entropy_term_sharpens():
    torch.manual_seed(0)
    net = create_model("unet3d", in_channels=1, num_classes=K, depth=3, base_filters=4)
    method = make_method({"rampup": 0.0}, model=net)
    out = method.training_step(make_batch(shape=(8, 8, 8)), 0, 0)
    out.loss.backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name

    # a gradient step on the entropy term alone lowers the entropy of the unlabelled predictions
    conv = torch.nn.Conv3d(1, K, 1)
    method = make_method({"rampup": 0.0, "w_ce": 0.0, "w_dice": 0.0, "consistency": 1.0}, model=conv)
    batch = make_batch()
    before = method.training_step(batch, 0, 0)
    before.loss.backward()
    method.optimizers["net"].step()
    after = method.training_step(batch, 0, 0)
    assert float(after.logs["loss_u"]) < float(before.logs["loss_u"])


# --- (c) end to end through the CLI -------------------------------------------------------------------------
def test_cli_train_end_to_end(toy_dataset_multiclass, tmp_path):
    run = train_tiny(toy_dataset_multiclass, tmp_path, "entropy_min", *TINY_NET)
    assert "loss_u" in history_columns(run)
