"""ua_mt: mean teacher whose consistency is masked by the teacher's predictive entropy over MC-dropout passes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import mnseg.methods
from mnseg.cli import main
from mnseg.config.schema import Config, load_config
from mnseg.engine.build import build_model
from mnseg.losses import softmax_mse_loss
from mnseg.methods.base import Batch
from mnseg.methods.ua_mt import UAMT, dropout_active
from mnseg.models import create_model
from tests.helpers.method_scaffold import attach_with_sgd, tiny_context
from tests.helpers.numpy_reference import np_softmax

TINY_RUN = "--num-labeled 2 --epochs 2 --iters-per-epoch 2 --batch-size 2 --patch-size 16,16,16 --no-progress".split()

SHAPE = (4, 6, 3)


@pytest.fixture(autouse=True)
def _registered(monkeypatch):
    monkeypatch.setitem(mnseg.methods.METHODS, "ua_mt", ("mnseg.methods.ua_mt", "UAMT"))


class FixedLogits(torch.nn.Module):
    """A 'teacher' whose logits ignore the input: one fixed (K, *S) map for every item and every pass."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.register_buffer("logits", logits)

    def forward(self, x):
        return self.logits.expand(x.shape[0], *self.logits.shape) + 0 * x.sum()


def zoned_logits():
    """Along axis X: rows 0-1 uniform (entropy ln 2), row 2 mildly sure (p = sigmoid(1)), row 3 very sure."""
    logits = torch.zeros(2, *SHAPE)
    logits[0, 2], logits[1, 2] = 0.5, -0.5
    logits[0, 3], logits[1, 3] = 6.0, -6.0
    return logits


def make_method(teacher=None, params=None, epochs=2, iters=5):
    cfg = Config.from_dict(
        {
            "method": {"name": "ua_mt", "params": {"noise_std": 0.1, **(params or {})}},
            "models": {"student": {}, "teacher": {}},
        }
    )
    method = UAMT(cfg, tiny_context(epochs=epochs, iters_per_epoch=iters))
    torch.manual_seed(0)
    method.attach({"student": torch.nn.Conv3d(1, 2, 1), "teacher": torch.nn.Conv3d(1, 2, 1)}, {}, {})
    # then a hand-made teacher (setup() insists on the student's architecture)
    method.models["teacher"] = teacher if teacher is not None else FixedLogits(zoned_logits())
    return method


def entropy(p):
    return -(p * np.log(p + 1e-6)).sum(axis=0)


# --- the uncertainty mask ------------------------------------------------------------------------------------
def test_uncertainty_mask_excludes_high_entropy_voxels():
    method = make_method()
    x = torch.randn(2, 1, *SHAPE)
    u = method.uncertainty(x)[:, 0].numpy()
    probs = torch.softmax(zoned_logits(), 0).numpy()
    assert np.allclose(u, entropy(probs)[None], atol=1e-6)

    start, end = method.threshold(0), method.threshold(method.total_steps)
    assert start == pytest.approx((0.75 + 0.25 * math.exp(-5)) * math.log(2))
    assert end == pytest.approx(math.log(2))
    mild = entropy(probs)[2, 0, 0]
    assert start < mild < end  # row 2 is counted only once the threshold has risen

    mask_start = u < start
    assert not mask_start[:, :3].any() and mask_start[:, 3].all()
    mask_mid = u < method.threshold(method.total_steps * 0.9)
    assert not mask_mid[:, :2].any() and mask_mid[:, 2:].all()


def test_masked_loss_matches_hand_computation():
    method = make_method()
    x = torch.randn(2, 1, *SHAPE)
    student_logits = torch.randn(2, 2, *SHAPE)
    loss, logs = method.consistency_loss(student_logits, x, step=0)

    p = np_softmax(student_logits.numpy())
    q = torch.softmax(zoned_logits(), 0).numpy()[None]
    mask = np.zeros((2, 1, *SHAPE))
    mask[:, :, 3] = 1.0  # only the very sure row counts at step 0
    expected = (mask * (p - q) ** 2).sum() / (2 * mask.sum() + 1e-16)  # UA-MT's formula, K = 2
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert float(logs["certain_fraction"]) == pytest.approx(0.25)


def test_all_certain_equals_mean_teacher_loss():
    sure = torch.zeros(2, *SHAPE)
    sure[0], sure[1] = 8.0, -8.0
    method = make_method(teacher=FixedLogits(sure))
    student_logits = torch.randn(2, 2, *SHAPE)
    loss, _ = method.consistency_loss(student_logits, torch.randn(2, 1, *SHAPE), step=0)
    expected = softmax_mse_loss(student_logits, sure.expand(2, *sure.shape))
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)


def test_all_uncertain_gives_zero_with_gradient():
    method = make_method(teacher=FixedLogits(torch.zeros(2, *SHAPE)))
    student_logits = torch.randn(2, 2, *SHAPE, requires_grad=True)
    loss, _ = method.consistency_loss(student_logits, torch.randn(2, 1, *SHAPE), step=0)
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.equal(student_logits.grad, torch.zeros_like(student_logits))


def test_uncertainty_uses_t_noisy_teacher_passes(monkeypatch):
    calls = []
    teacher = FixedLogits(zoned_logits())
    original = teacher.forward
    monkeypatch.setattr(teacher, "forward", lambda x: calls.append(x.shape[0]) or original(x))
    method = make_method(teacher=teacher, params={"uncertainty_passes": 8, "uncertainty_chunk": 3})
    method.uncertainty(torch.randn(2, 1, *SHAPE))
    assert calls == [6, 6, 4]  # 3 + 3 + 2 copies of the 2-item batch = 8 passes


def test_ramps_of_threshold_and_weight_follow_the_paper():
    """H(t) = (3/4 + 1/4 e^(-5(1-t/t_max)^2)) ln K and lambda(t) = 0.1 e^(-5(1-t/t_max)^2), over the whole run."""
    method = make_method(epochs=4, iters=5)  # t_max = 20
    for t in (0, 5, 13, 20, 25):
        ramp = math.exp(-5 * (1 - min(t, 20) / 20) ** 2)
        assert method.threshold(t) == pytest.approx((0.75 + 0.25 * ramp) * math.log(2))
        assert method.unlabeled_weight(t) == pytest.approx(0.1 * ramp)


# --- Monte-Carlo dropout ------------------------------------------------------------------------------------------
def dropout_teacher():
    """A batch-norm UNet with channel dropout p = 0.5 (the preset's placement), in eval mode as the engine leaves it."""
    torch.manual_seed(0)
    kwargs = dict(depth=3, base_filters=4, norm="batch", dropout=0.5, dropout_at="bottleneck_head")
    return create_model("unet3d", **kwargs).eval(), kwargs


def batch_norm_state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


@pytest.mark.parametrize("mc_dropout", [True, False])
def test_dropout_makes_the_passes_differ_without_noise_and_keeps_norm_statistics(mc_dropout):
    teacher, _ = dropout_teacher()
    method = make_method(teacher=teacher, params={"noise_std": 0.0, "uncertainty_passes": 3, "uncertainty_chunk": 1,
                                                  "mc_dropout": mc_dropout})
    seen = []
    teacher.register_forward_hook(lambda m, i, out: seen.append(torch.softmax(out.float(), 1)))
    before = batch_norm_state(teacher)
    x = torch.randn(1, 1, 8, 8, 8)
    u = method.uncertainty(x)
    assert len(seen) == 3
    differ = [not torch.allclose(seen[0], other) for other in seen[1:]]
    assert all(differ) if mc_dropout else not any(differ)  # no input noise: only dropout can tell passes apart
    mean = torch.stack(seen).mean(0)
    torch.testing.assert_close(u, -(mean * torch.log(mean + 1e-6)).sum(1, keepdim=True))  # eq. 3 over the passes
    after = batch_norm_state(teacher)
    assert before.keys() == after.keys() and len(before) > 0
    assert all(torch.equal(before[k], after[k]) for k in before), "the passes must not touch norm statistics"
    assert not any(m.training for m in teacher.modules()), "the teacher is back in eval mode, dropout included"


def test_dropout_active_switches_dropout_layers_only():
    teacher, _ = dropout_teacher()
    with dropout_active(teacher) as count:
        assert count == 1 and teacher.channel_dropout.training
        assert not any(m.training for m in teacher.modules() if isinstance(m, torch.nn.BatchNorm3d))
    assert not teacher.channel_dropout.training


def test_preset_networks_have_dropout_and_match():
    cfg = load_config("ua_mt")
    assert cfg.method.params.get("mc_dropout", True)
    built = {r: build_model(cfg.models[r], 1, 2) for r in ("student", "teacher")}
    for role, model in built.items():
        assert cfg.models[role].kwargs["dropout"] > 0, role
        assert any(isinstance(m, torch.nn.Dropout3d) and m.p == 0.5 for m in model.modules()), role
    assert built["student"].state_dict().keys() == built["teacher"].state_dict().keys()


# --- (b) gradients ---------------------------------------------------------------------------------------------
def test_gradient_reaches_student_not_teacher():
    torch.manual_seed(0)
    student = create_model("unet3d", depth=3, base_filters=4)
    teacher = create_model("unet3d", depth=3, base_filters=4)
    cfg = Config.from_dict(
        {"method": {"name": "ua_mt", "params": {"rampup": 0.0}}, "models": {"student": {}, "teacher": {}}}
    )
    ctx = tiny_context(ignore_index=2, batch_size=1, epochs=1, iters_per_epoch=2, n_labeled=1, n_unlabeled=1)
    method = attach_with_sgd(UAMT(cfg, ctx), {"student": student, "teacher": teacher}, trained=["student"])
    label = torch.randint(0, 3, (1, 8, 8, 8))
    out = method.training_step(Batch(torch.randn(1, 1, 8, 8, 8), label, torch.randn(1, 1, 8, 8, 8)), 0, 1)
    out.loss.backward()
    assert "certain_fraction" in out.logs
    for name, p in student.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())


def test_training_step_with_dropout_teacher_trains_student_only_and_keeps_teacher_statistics():
    teacher, kwargs = dropout_teacher()
    torch.manual_seed(1)
    student = create_model("unet3d", **kwargs)
    cfg = Config.from_dict(
        {"method": {"name": "ua_mt", "params": {"rampup": 0.0}}, "models": {"student": {}, "teacher": {}}}
    )
    ctx = tiny_context(batch_size=1, epochs=1, iters_per_epoch=2, n_labeled=1, n_unlabeled=1)
    method = attach_with_sgd(UAMT(cfg, ctx), {"student": student, "teacher": teacher}, trained=["student"])
    teacher.eval()  # as the trainer leaves a frozen role
    before = batch_norm_state(teacher)
    label = torch.randint(0, 2, (1, 8, 8, 8))
    out = method.training_step(Batch(torch.randn(1, 1, 8, 8, 8), label, torch.randn(1, 1, 8, 8, 8)), 0, 1)
    out.loss.backward()
    assert "certain_fraction" in out.logs and "loss_u" in out.logs
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(v, batch_norm_state(teacher)[k]) for k, v in before.items())


# --- (c) end to end through the CLI -------------------------------------------------------------------------
def test_cli_train_end_to_end(toy_dataset, tmp_path):
    tiny = []
    for role in ("student", "teacher"):
        tiny += [f"models.{role}.name=unet3d", f"models.{role}.kwargs={{depth: 3, base_filters: 4}}"]
    args = ["train", str(toy_dataset), "--method", "ua_mt", *TINY_RUN, "--run-dir", str(tmp_path / "run")]
    rc = main([*args, f"data.cache_dir={tmp_path / 'cache'}", "method.params.uncertainty_passes=2", *tiny])
    assert rc == 0
    run = tmp_path / "run"
    assert (run / "checkpoints" / "last.pt").exists()
    header = (run / "history.csv").read_text().splitlines()[0]
    assert "certain_fraction" in header and "loss_u" in header
