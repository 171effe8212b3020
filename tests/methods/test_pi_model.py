"""pi_model: two stochastic passes of one network, squared softmax difference, Gaussian ramp-up; both passes train."""

from __future__ import annotations

import math

import pytest
import torch

import mnseg.methods
from mnseg.cli import main
from mnseg.config.schema import Config
from mnseg.losses import paired_softmax_mse
from mnseg.methods.base import Batch
from mnseg.methods.pi_model import PiModel
from mnseg.models import create_model
from tests.helpers.cli_run import TINY_RUN
from tests.helpers.method_scaffold import attach_with_sgd, tiny_context
from tests.helpers.numpy_reference import conv1x1, np_softmax, np_supervised

IGNORE = 2


@pytest.fixture(autouse=True)
def _registered(monkeypatch):
    monkeypatch.setitem(mnseg.methods.METHODS, "pi_model", ("mnseg.methods.pi_model", "PiModel"))


def make_method(params=None, net=None, n_unlabeled=2, epochs=2, iters=5):
    cfg = Config.from_dict({"method": {"name": "pi_model", "params": params or {}}, "models": {"net": {}}})
    method = PiModel(cfg, tiny_context(ignore_index=IGNORE, epochs=epochs, iters_per_epoch=iters,
                                       n_unlabeled=n_unlabeled))  # fmt: skip
    if net is None:
        torch.manual_seed(0)
        net = torch.nn.Conv3d(1, 2, 1)
    return attach_with_sgd(method, {"net": net})


def make_batch(b_l=2, b_u=2, shape=(4, 5, 3), seed=0):
    g = torch.Generator().manual_seed(seed)
    label = (torch.rand(b_l, *shape, generator=g) > 0.5).long()
    label[:, 0] = IGNORE
    return Batch(torch.randn(b_l, 1, *shape, generator=g), label, torch.randn(b_u, 1, *shape, generator=g))


def scripted_noise(method, *noises):
    """g(x) = x + the next of ``noises`` (cut to x's batch), so a test knows each pass's input."""
    queue = list(noises)
    method.noisy = lambda image: image + queue.pop(0)[: image.shape[0]]


# --- (a) each term against a hand computation ------------------------------------------------------------
def test_paired_consistency_on_known_softmaxes():
    a = torch.zeros(1, 2, 1, 1, 1)  # softmax (1/2, 1/2)
    b = torch.tensor([math.log(3.0), 0.0]).view(1, 2, 1, 1, 1)  # softmax (3/4, 1/4)
    assert float(paired_softmax_mse(a, b)) == pytest.approx(0.25**2)  # mean over the 2 classes of 1/16
    c = torch.cat([a, b], dim=2)  # two voxels: the difference at one, none at the other
    assert float(paired_softmax_mse(c, torch.cat([b, b], dim=2))) == pytest.approx(0.25**2 / 2)


def test_gaussian_rampup_at_the_start_middle_and_end():
    method = make_method({"consistency": 0.3, "rampup": 0.4})  # 10 iterations: t_ramp = 4
    assert method.unlabeled_weight(0) == pytest.approx(0.3 * math.exp(-5.0))
    assert method.unlabeled_weight(2) == pytest.approx(0.3 * math.exp(-5.0 * 0.25))
    assert method.unlabeled_weight(4) == pytest.approx(0.3)
    assert method.unlabeled_weight(9) == pytest.approx(0.3)
    assert make_method().p.rampup == pytest.approx(80 / 300)  # the paper's 80 of 300 epochs


def test_loss_matches_hand_computation():
    method = make_method({"consistency": 0.3, "rampup": 0.5})
    batch = make_batch()
    g = torch.Generator().manual_seed(5)
    n1, n2 = torch.randn(4, 1, 4, 5, 3, generator=g), torch.randn(4, 1, 4, 5, 3, generator=g)
    scripted_noise(method, n1, n2)
    out = method.training_step(batch, epoch=0, iteration=3)

    x = torch.cat([batch.image_l, batch.image_u])
    z, z_tilde = conv1x1(method.models["net"], x + n1), conv1x1(method.models["net"], x + n2)
    weight = 0.3 * math.exp(-5 * (1 - 3 / 5) ** 2)
    consistency = ((np_softmax(z) - np_softmax(z_tilde)) ** 2).mean()  # over classes, voxels and all 4 items
    expected = np_supervised(z[:2], batch.label_l.numpy(), IGNORE) + weight * consistency
    assert float(out.loss.detach()) == pytest.approx(expected, rel=1e-5)
    assert float(out.logs["loss_u"]) == pytest.approx(consistency, rel=1e-5)


def test_consistency_on_unlabelled_only_and_no_unlabelled_items():
    method = make_method({"consistency_on_labeled": False, "rampup": 0.0})
    batch = make_batch()
    g = torch.Generator().manual_seed(6)
    n1, n2 = torch.randn(4, 1, 4, 5, 3, generator=g), torch.randn(2, 1, 4, 5, 3, generator=g)
    scripted_noise(method, n1, n2)
    out = method.training_step(batch, 0, 0)
    net = method.models["net"]
    z_u, z_tilde = conv1x1(net, batch.image_u + n1[2:]), conv1x1(net, batch.image_u + n2)
    assert float(out.logs["loss_u"]) == pytest.approx(((np_softmax(z_u) - np_softmax(z_tilde)) ** 2).mean(), rel=1e-5)

    method = make_method({"consistency_on_labeled": False}, n_unlabeled=0)
    assert method.batch_split(0, 0) == (2, 0)
    batch = make_batch(b_u=0)
    scripted_noise(method, n1)
    out = method.training_step(batch, 0, 0)
    expected = np_supervised(conv1x1(method.models["net"], batch.image_l + n1[:2]), batch.label_l.numpy(), IGNORE)
    assert float(out.loss.detach()) == pytest.approx(expected, rel=1e-5) and "loss_u" not in out.logs


# --- (b) where the gradients go ------------------------------------------------------------------------
class Recording(torch.nn.Module):
    """The wrapped network, keeping every output with its gradient."""

    def __init__(self, net):
        super().__init__()
        self.net, self.outputs = net, []

    def forward(self, x):
        out = self.net(x)
        out.retain_grad()
        self.outputs.append(out)
        return out


def test_gradient_flows_through_both_passes():
    torch.manual_seed(0)
    net = Recording(torch.nn.Conv3d(1, 2, 1))
    method = make_method({"w_ce": 0.0, "w_dice": 0.0, "rampup": 0.0}, net=net)  # L = w * consistency alone
    batch = make_batch()
    method.training_step(batch, 0, 0).loss.backward()
    first, second = net.outputs
    for name, out in (("first", first), ("second", second)):
        assert out.grad is not None and out.grad.abs().sum() > 0, f"no gradient through the {name} pass"
    assert net.net.weight.grad.abs().sum() > 0


def test_two_passes_differ_by_dropout_alone():
    torch.manual_seed(0)
    net = create_model("unet3d", depth=3, base_filters=4, dropout=0.5)
    method = make_method({"noise_std": 0.0, "rampup": 0.0}, net=net)
    net.train()
    out = method.training_step(make_batch(shape=(8, 8, 8)), 0, 0)
    assert float(out.logs["loss_u"]) > 0  # same input, different dropout masks
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    net.eval()  # no dropout, no noise: the two passes agree exactly
    with torch.no_grad():
        x = make_batch(shape=(8, 8, 8)).image_u
        assert float(paired_softmax_mse(net(x), net(x))) == 0.0


# --- (c) end to end through the CLI -------------------------------------------------------------------
def test_cli_train_end_to_end(toy_dataset, tmp_path):
    args = ["train", str(toy_dataset), "--method", "pi_model", *TINY_RUN, "--run-dir", str(tmp_path / "run")]
    tiny = ["models.net.name=unet3d", "models.net.kwargs={depth: 3, base_filters: 4, dropout: 0.1}"]
    assert main([*args, f"data.cache_dir={tmp_path / 'cache'}", *tiny]) == 0
    run = tmp_path / "run"
    assert (run / "checkpoints" / "last.pt").exists()
    history = (run / "history.csv").read_text().splitlines()
    assert len(history) == 3 and "loss_u" in history[0]
