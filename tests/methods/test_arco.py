"""arco: confidence-weighted pseudo-label CE, contrast classes, the total loss, where gradients go, CLI run."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import mnseg.methods
from mnseg.cli import main
from mnseg.config.schema import Config
from mnseg.errors import ConfigError
from mnseg.methods.arco import Arco, confidence_weighted_ce, contrast_classes
from mnseg.methods.base import Batch
from mnseg.methods.voxel_contrast import class_prototypes, flat_voxels, prototype_info_nce, sample_by_class
from mnseg.models import create_model
from tests.helpers.method_scaffold import attach_with_sgd, tiny_context
from tests.helpers.numpy_reference import np_softmax, np_supervised

TINY_RUN = "--num-labeled 2 --epochs 2 --iters-per-epoch 2 --batch-size 2 --patch-size 16,16,16 --no-progress".split()
IGNORE = 2
SMALL = {"anchors_per_class": 8, "negatives_per_anchor": 4, "groups": 4, "noise_std": 0.0}


@pytest.fixture(autouse=True)
def _registered(monkeypatch):
    monkeypatch.setitem(mnseg.methods.METHODS, "arco", ("mnseg.methods.arco", "Arco"))


def linear_net(seed: int) -> nn.Sequential:
    """features = W1 x + b1 (3 channels), logits = W2 features + b2: the second conv is the classifier."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv3d(1, 3, 1), nn.Conv3d(3, 2, 1))


def make_method(params=None, models=None, n_unlabeled=2):
    cfg = Config.from_dict({"method": {"name": "arco", "params": {**SMALL, **(params or {})}},
                            "models": {"student": {}, "teacher": {}}})  # fmt: skip
    method = Arco(cfg, tiny_context(ignore_index=IGNORE, n_unlabeled=n_unlabeled))
    models = models or {"student": linear_net(0), "teacher": linear_net(1)}
    models["teacher"].requires_grad_(False)
    return attach_with_sgd(method, models, trained=["student"])


def make_batch(b_l=2, b_u=2, shape=(4, 5, 3), seed=0):
    g = torch.Generator().manual_seed(seed)
    label = (torch.rand(b_l, *shape, generator=g) > 0.5).long()
    label[:, 0] = IGNORE
    return Batch(torch.randn(b_l, 1, *shape, generator=g), label, torch.randn(b_u, 1, *shape, generator=g))


def disagreeing_teacher(method):
    with torch.no_grad():
        for p in method.models["teacher"].parameters():
            p.copy_(torch.randn_like(p) * 2)


# --- (a) each term on its own ------------------------------------------------------------------------------
def test_confidence_weighted_ce_by_hand():
    logits = torch.tensor([0.0, 1.0, 2.0, 0.0]).view(1, 1, 4).repeat(2, 1, 1)
    logits = torch.stack([logits[:, 0], -logits[:, 0]], dim=1)  # (B=2, K=2, 4 voxels)
    teacher = torch.tensor([[[0.99, 0.2, 0.6, 0.98]], [[0.5, 0.5, 0.5, 0.5]]])
    teacher = torch.cat([teacher, 1 - teacher], dim=1)  # item 0: 2 of 4 voxels above 0.97; item 1: none
    loss, weight = confidence_weighted_ce(logits, teacher, 0.97)
    assert weight.tolist() == [0.5, 0.0]
    p = np_softmax(logits.numpy())
    pseudo = teacher.numpy().argmax(1)  # item 0: 0, 1, 0, 0
    ce = -np.log(np.take_along_axis(p, pseudo[:, None], 1)[:, 0])
    assert float(loss) == pytest.approx((0.5 * ce[0]).sum() / 8)  # the mean over all 8 voxels


def test_contrast_classes_keep_labels_and_confident_pseudo_labels():
    label = torch.tensor([[0, 1, IGNORE]])
    teacher = torch.tensor([[[0.8, 0.4, 0.65]]])
    teacher = torch.cat([teacher, 1 - teacher], dim=1)  # pseudo 0, 1, 0 with confidence 0.8, 0.6, 0.65
    classes, valid = contrast_classes(label, teacher, 0.7, IGNORE)
    assert classes.tolist() == [[0, 1, 0], [0, 1, 0]]
    assert valid.tolist() == [[True, True, False], [True, False, False]]


def test_loss_is_the_sum_of_its_terms():
    method = make_method({"consistency": 0.7, "contrast_weight": 0.3, "weak_threshold": 0.0, "strong_threshold": 0.6})
    disagreeing_teacher(method)
    batch = make_batch()
    state = method.generator.get_state()
    out = method.training_step(batch, 0, 1)

    x = torch.cat([batch.image_l, batch.image_u])
    with torch.no_grad():
        s, t = method.models["student"], method.models["teacher"]
        z, z_t = s[0](x), t[0](x)
        logits, logits_t = s[1](z), t[1](z_t)
    loss_l = np_supervised(logits[:2].numpy(), batch.label_l.numpy(), IGNORE, 1.0, 1.0)
    probs_t = torch.softmax(logits_t[2:], 1)
    loss_u, _ = confidence_weighted_ce(logits[2:], probs_t, 0.6)
    classes, valid = contrast_classes(batch.label_l, probs_t, 0.0, IGNORE)
    method.generator.set_state(state)
    draws = sample_by_class(classes.reshape(-1), valid.reshape(-1), 2, 8, 4, 4, True, method.generator)
    mu, present = class_prototypes(flat_voxels(z_t), classes.reshape(-1), valid.reshape(-1), 2)
    use = draws["anchor_valid"][:, 0] & draws["negative_valid"][:, 0, 0] & present
    loss_c = prototype_info_nce(flat_voxels(z)[draws["anchor"]], mu, flat_voxels(z_t)[draws["negative"]], use, 0.5)
    assert float(out.logs["loss_c"]) == pytest.approx(float(loss_c), rel=1e-5) and float(loss_c) > 0
    assert float(out.logs["contrast_classes"]) == 2.0
    expected = loss_l + 0.7 * float(loss_u) + 0.3 * float(loss_c)  # rampup 0: lambda_u constant
    assert float(out.loss.detach()) == pytest.approx(expected, rel=1e-5)


def test_sampling_choices_and_bad_parameters():
    assert make_method({"sampling": "naive"}).groups == 1
    sg = make_method({"sampling": "sg"})
    assert sg.groups == 4 and not sg.antithetic and make_method().antithetic
    with pytest.raises(ConfigError, match="sampling"):
        make_method({"sampling": "stratified"})
    with pytest.raises(ConfigError, match="consistency_on_labeled"):
        make_method({"consistency_on_labeled": True})


def test_no_unlabelled_items_still_contrasts_the_labelled_voxels():
    method = make_method(n_unlabeled=0)
    assert method.batch_split(0, 0) == (2, 0)
    out = method.training_step(make_batch(b_u=0), 0, 0)
    assert float(out.logs["loss_u"]) == 0.0 and float(out.logs["loss_c"]) > 0
    out.loss.backward()


# --- (b) where the gradients go ----------------------------------------------------------------------------
def test_the_teacher_gets_no_gradient_and_the_contrast_trains_the_student():
    torch.manual_seed(0)
    models = {"student": create_model("unet3d", depth=3, base_filters=4),
              "teacher": create_model("unet3d", depth=3, base_filters=4)}  # fmt: skip
    method = make_method({"noise_std": 0.1, "weak_threshold": 0.0}, models=models)
    batch = make_batch(shape=(8, 8, 8))
    method.training_step(batch, 0, 1).loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in models["student"].parameters())
    assert all(p.grad is None and not p.requires_grad for p in models["teacher"].parameters())

    # the contrast alone: gradient reaches the student's features at the anchors only, never the teacher's
    models["student"].zero_grad()
    x = torch.cat([batch.image_l, batch.image_u])
    _, z = method.taps.forward("student", models["student"], x)
    z = z.detach().requires_grad_(True)
    with torch.no_grad():
        logits_t, z_t = method.taps.forward("teacher", models["teacher"], x)
    classes, valid = contrast_classes(batch.label_l, torch.softmax(logits_t[2:], 1), 0.0, IGNORE)
    state = method.generator.get_state()
    loss_c, _ = method.contrastive_loss(z, z_t, classes, valid)
    loss_c.backward()
    method.generator.set_state(state)
    anchors = sample_by_class(classes.reshape(-1), valid.reshape(-1), 2, 8, 4, 4, True, method.generator)["anchor"]
    touched = flat_voxels(z.grad).abs().sum(1) > 0
    assert touched.any() and set(touched.nonzero().flatten().tolist()) <= set(anchors.flatten().tolist())
    assert not z_t.requires_grad


def test_setup_copies_the_student_and_taps_both_models():
    method = make_method()
    for p, q in zip(method.models["student"].parameters(), method.models["teacher"].parameters()):
        assert torch.equal(p, q)
    with pytest.raises(ConfigError, match="student"):
        make_method(models={"student": nn.Conv3d(1, 2, 3, padding=1), "teacher": nn.Conv3d(1, 2, 3, padding=1)})
    assert math.isclose(make_method().p.temperature, 0.5)


# --- (c) end to end through the CLI -------------------------------------------------------------------------
def test_cli_train_end_to_end(toy_dataset, tmp_path):
    tiny = ["method.params.anchors_per_class=16", "method.params.negatives_per_anchor=8"]
    for role in ("student", "teacher"):
        tiny += [f"models.{role}.name=unet3d", f"models.{role}.kwargs={{depth: 3, base_filters: 4}}"]
    args = ["train", str(toy_dataset), "--method", "arco", *TINY_RUN, "--run-dir", str(tmp_path / "run")]
    assert main([*args, f"data.cache_dir={tmp_path / 'cache'}", *tiny]) == 0
    run = tmp_path / "run"
    assert (run / "checkpoints" / "last.pt").exists()
    history = (run / "history.csv").read_text().splitlines()
    assert len(history) == 3 and all(c in history[0] for c in ("loss_u", "loss_c", "contrast_classes"))
