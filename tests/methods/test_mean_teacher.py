"""mean_teacher: supervised loss + ramped softmax-MSE to an EMA teacher on unlabelled patches."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import mnseg.methods
from mnseg.cli import main
from mnseg.config.schema import Config
from mnseg.errors import ConfigError
from mnseg.methods.base import Batch
from mnseg.methods.mean_teacher import MeanTeacher
from mnseg.models import create_model
from tests.helpers.cli_run import TINY_RUN
from tests.helpers.method_scaffold import assert_supervised_only_without_unlabelled_items, attach_with_sgd, tiny_context
from tests.helpers.numpy_reference import conv1x1, np_softmax, np_supervised

IGNORE = 2


@pytest.fixture(autouse=True)
def _registered(monkeypatch):
    monkeypatch.setitem(mnseg.methods.METHODS, "mean_teacher", ("mnseg.methods.mean_teacher", "MeanTeacher"))


def make_method(params=None, models=None, n_unlabeled=2, epochs=2, iters=5):
    cfg = Config.from_dict(
        {
            "method": {"name": "mean_teacher", "params": {"noise_std": 0.0, **(params or {})}},
            "models": {"student": {}, "teacher": {}},
        }
    )
    ctx = tiny_context(ignore_index=IGNORE, epochs=epochs, iters_per_epoch=iters, n_unlabeled=n_unlabeled)
    method = MeanTeacher(cfg, ctx)
    if models is None:
        torch.manual_seed(0)
        models = {"student": torch.nn.Conv3d(1, 2, 1), "teacher": torch.nn.Conv3d(1, 2, 1)}
    models["teacher"].requires_grad_(False)
    return attach_with_sgd(method, models, trained=["student"])


def make_batch(b_l=2, b_u=2, shape=(4, 5, 3), seed=0):
    g = torch.Generator().manual_seed(seed)
    label = (torch.rand(b_l, *shape, generator=g) > 0.5).long()
    label[:, 0] = IGNORE  # one slab nobody annotated
    return Batch(torch.randn(b_l, 1, *shape, generator=g), label, torch.randn(b_u, 1, *shape, generator=g))


# --- independent numpy references ---------------------------------------------------------------------------
def np_ramp(step, length):
    return math.exp(-5 * (1 - min(step, length) / length) ** 2)


# --- (a) the loss on a hand-computed example -----------------------------------------------------------------
def test_loss_matches_hand_computation():
    method = make_method({"consistency": 0.3, "rampup": 0.5})
    torch.manual_seed(1)
    method.models["teacher"].weight.copy_(torch.randn(2, 1, 1, 1, 1))  # a teacher that disagrees
    batch = make_batch()
    out = method.training_step(batch, epoch=0, iteration=3)

    s_l = conv1x1(method.models["student"], batch.image_l)
    p_u = np_softmax(conv1x1(method.models["student"], batch.image_u))
    q_u = np_softmax(conv1x1(method.models["teacher"], batch.image_u))
    weight = 0.3 * np_ramp(3, 0.5 * 10)
    expected = np_supervised(s_l, batch.label_l.numpy(), IGNORE) + weight * ((p_u - q_u) ** 2).mean()
    assert float(out.loss.detach()) == pytest.approx(expected, rel=1e-5)
    assert float(out.logs["w_u"]) == pytest.approx(weight)


def test_setup_copies_student_and_checks_architecture():
    method = make_method()
    for p, q in zip(method.models["student"].parameters(), method.models["teacher"].parameters()):
        assert torch.equal(p, q)
    with pytest.raises(ConfigError, match="same network"):
        make_method(models={"student": torch.nn.Conv3d(1, 2, 1), "teacher": torch.nn.Conv3d(1, 2, 3)})


def test_ema_update_follows_ua_mt_schedule():
    method = make_method({"ema_decay": 0.99})
    student, teacher = method.models["student"], method.models["teacher"]
    with torch.no_grad():
        teacher.weight.fill_(1.0)
        student.weight.fill_(3.0)
    method.after_optimizer_step(epoch=0, iteration=0)  # alpha = min(1 - 1/1, 0.99) = 0: teacher := student
    assert torch.allclose(teacher.weight, torch.full_like(teacher.weight, 3.0))
    with torch.no_grad():
        teacher.weight.fill_(1.0)
    method.after_optimizer_step(epoch=1, iteration=0)  # global step 5: alpha = 1 - 1/6
    alpha = 1 - 1 / 6
    assert torch.allclose(teacher.weight, torch.full_like(teacher.weight, alpha * 1 + (1 - alpha) * 3))


def test_no_unlabelled_items_gives_the_supervised_loss():
    method = make_method(n_unlabeled=0)
    assert_supervised_only_without_unlabelled_items(method, make_batch(b_u=0), method.models["student"], IGNORE)


def test_batch_split_is_b_labelled_plus_b_unlabelled():
    assert make_method().batch_split(0, 0) == (2, 2)
    assert make_method({"unlabeled_batch_size": 3}).batch_split(0, 0) == (2, 3)


# --- (b) gradients ---------------------------------------------------------------------------------------------
def test_gradient_reaches_student_not_teacher():
    torch.manual_seed(0)
    models = {
        "student": create_model("unet3d", depth=3, base_filters=4),
        "teacher": create_model("unet3d", depth=3, base_filters=4),
    }
    method = make_method({"noise_std": 0.1, "rampup": 0.0}, models=models)
    batch = make_batch(shape=(8, 8, 8))
    out = method.training_step(batch, 0, 1)
    out.loss.backward()
    for name, p in models["student"].named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert all(p.grad is None and not p.requires_grad for p in models["teacher"].parameters())

    # the consistency term alone moves the student
    models["student"].zero_grad()
    image_u = batch.image_u
    loss_u, _ = method.consistency_loss(models["student"](image_u), image_u, step=1)
    loss_u.backward()
    assert float(loss_u.detach()) > 0
    assert any(p.grad.abs().sum() > 0 for p in models["student"].parameters())
    assert all(p.grad is None for p in models["teacher"].parameters())


# --- (c) end to end through the CLI -------------------------------------------------------------------------
def test_cli_train_end_to_end(toy_dataset, tmp_path):
    tiny = []
    for role in ("student", "teacher"):
        tiny += [f"models.{role}.name=unet3d", f"models.{role}.kwargs={{depth: 3, base_filters: 4}}"]
    args = ["train", str(toy_dataset), "--method", "mean_teacher", *TINY_RUN, "--run-dir", str(tmp_path / "run")]
    rc = main([*args, f"data.cache_dir={tmp_path / 'cache'}", *tiny])
    assert rc == 0
    run = tmp_path / "run"
    assert (run / "checkpoints" / "last.pt").exists()
    history = (run / "history.csv").read_text().splitlines()
    assert len(history) == 3 and "loss_u" in history[0]


def test_the_labelled_dice_pools_with_the_batch_reduce_sums():
    """The batch's ``reduce_sums`` (the trainer's sum over processes) reaches the labelled loss's batch Dice: once,
    with intersection and denominator per class; an identity sum leaves the loss bit-identical."""
    method = make_method()
    batch = make_batch()
    plain = method.training_step(batch, 0, 1).loss
    seen = []
    pooled = method.training_step(dataclasses.replace(batch, reduce_sums=lambda t: seen.append(t.shape) or t), 0, 1)
    assert seen == [torch.Size([2, 2])]
    assert torch.equal(pooled.loss, plain)
    doubled = method.training_step(dataclasses.replace(batch, reduce_sums=lambda t: t * torch.tensor([[2.0], [1.0]])),
                                   0, 1)
    assert float(doubled.loss.detach()) < float(plain.detach())  # a larger pooled intersection: a smaller Dice loss
