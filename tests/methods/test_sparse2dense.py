"""sparse2dense: 2D teacher on annotated slices -> dense pseudo-labels -> 3D student."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

import mnseg.methods
from mnseg.config.schema import Config, ModelConfig
from mnseg.engine.build import build_model
from mnseg.engine.schedules import lr_at
from mnseg.errors import ConfigError
from mnseg.methods.base import Batch
from mnseg.methods.sparse2dense import Sparse2Dense, soft_edge_labels
from mnseg.models.slicewise import SliceWise
from tests.helpers.method_scaffold import attach_with_sgd, tiny_context
from tests.helpers.numpy_reference import SMOOTH, np_softmax

IGNORE = 2  # two classes (background, fg) + the ignore label


@pytest.fixture(autouse=True)
def _registered(monkeypatch):
    monkeypatch.setitem(mnseg.methods.METHODS, "sparse2dense", ("mnseg.methods.sparse2dense", "Sparse2Dense"))


def make_method(params=None, batch_size=2, epochs=4, n_unlabeled=2, ignore_index=IGNORE, models=None):
    cfg = Config.from_dict(
        {
            "method": {"name": "sparse2dense", "params": {"teacher_epochs": 2, **(params or {})}},
            "models": {
                "teacher": {"name": "unet2d", "optim": {"lr": 1e-3, "warmup_epochs": 1}},
                "student": {"name": "unet3d", "optim": {"lr": 1e-4, "warmup_epochs": 1}},
            },
            "train": {"epochs": epochs, "iters_per_epoch": 3, "batch_size": batch_size},
        }
    )
    ctx = tiny_context(ignore_index=ignore_index, batch_size=batch_size, epochs=epochs, iters_per_epoch=3,
                       n_unlabeled=n_unlabeled)
    method = Sparse2Dense(cfg, ctx)
    if models is None:
        torch.manual_seed(0)
        models = {"teacher": SliceWise(torch.nn.Conv2d(1, 2, 1), axis=-1), "student": torch.nn.Conv3d(1, 2, 1)}
    return attach_with_sgd(method, models)


def sparse_batch(b_l=1, b_u=1, shape=(4, 5, 6), seed=0, annotated=(1, 4)):
    """Random images; labels annotated only on the given axis-2 slices, the rest ignore."""
    g = torch.Generator().manual_seed(seed)
    image_l = torch.randn(b_l, 1, *shape, generator=g)
    label_l = torch.full((b_l, *shape), IGNORE, dtype=torch.long)
    for z in annotated:
        label_l[..., z] = (torch.rand(b_l, *shape[:2], generator=g) > 0.5).long()
    return Batch(image_l, label_l, torch.randn(b_u, 1, *shape, generator=g))


# --- independent numpy reference losses -------------------------------------------------------------------
def conv1x1(weight, bias, image):
    """Logits of a 1x1(x1) conv with one input channel: (N, 1, ...) -> (N, K, ...)."""
    w = weight.detach().numpy().reshape(-1)
    b = bias.detach().numpy()
    x = image.numpy()[:, 0]
    return np.stack([w[k] * x + b[k] for k in range(len(w))], axis=1)


def np_ce_dice(logits, target_probs, mask):
    """mean over masked voxels of -sum_c T log P, plus mean_c (1 - batch soft Dice) over masked voxels."""
    p = np_softmax(logits)
    m = mask[:, None].astype(float)
    ce = -(target_probs * np.log(p)).sum(axis=1)[mask].mean()
    inter = (p * target_probs * m).sum(axis=tuple(i for i in range(p.ndim) if i != 1))
    denom = (p * m).sum(axis=tuple(i for i in range(p.ndim) if i != 1)) + (target_probs * m).sum(
        axis=tuple(i for i in range(p.ndim) if i != 1)
    )
    dice = (2 * inter + SMOOTH) / (denom + SMOOTH)
    return ce, (1 - dice).mean()


def np_one_hot(labels, k):
    return np.moveaxis(np.eye(k)[labels], -1, 1)


def np_soft_edges(labels2d, k, w):
    """Per voxel: class frequencies among the annotated voxels of its (2w+1)^2 window, by explicit loops."""
    n, h, wd = labels2d.shape
    out = np.zeros((n, k, h, wd))
    for i in range(n):
        for y in range(h):
            for x in range(wd):
                if labels2d[i, y, x] == IGNORE:
                    continue
                win = labels2d[i, max(y - w, 0) : y + w + 1, max(x - w, 0) : x + w + 1]
                win = win[win != IGNORE]
                for c in range(k):
                    out[i, c, y, x] = (win == c).mean()
    return out


# --- (a) losses on hand-computed examples ------------------------------------------------------------------
def test_teacher_loss_counts_only_annotated_voxels():
    method = make_method()
    batch = sparse_batch(b_l=2, b_u=0)
    out = method.training_step(batch, epoch=0, iteration=0)
    conv = method.models["teacher"].inner
    logits = conv1x1(conv.weight, conv.bias, batch.image_l)  # (B, K, X, Y, Z)
    labels = batch.label_l.numpy()
    mask = labels != IGNORE
    ce, dice = np_ce_dice(logits, np_one_hot(np.where(mask, labels, 0), 2), mask)
    assert out.loss.item() == pytest.approx(ce + dice, rel=1e-5)
    assert set(out.logs) == {"loss_teacher"}


def test_teacher_trains_on_annotated_slices_only():
    method = make_method()
    batch = sparse_batch(b_l=2, b_u=0, annotated=(1, 4))
    slices, labels = method.annotated_slices(batch.image_l, batch.label_l)
    assert slices.shape == (4, 1, 4, 5)  # 2 patches x 2 annotated slices
    assert torch.equal(slices[1], batch.image_l[0, :, :, :, 4])
    assert (labels != IGNORE).all()
    everything = make_method({"annotated_slices_only": False}).annotated_slices(batch.image_l, batch.label_l)
    assert everything[0].shape[0] == 2 * 6


def test_teacher_loss_with_soft_edges():
    method = make_method({"soft_edges": True, "edge_width": 1})
    batch = sparse_batch(b_l=1, b_u=0, shape=(6, 6, 3), annotated=(0, 2))
    out = method.training_step(batch, epoch=0, iteration=0)
    slices, labels = method.annotated_slices(batch.image_l, batch.label_l)
    conv = method.models["teacher"].inner
    logits = conv1x1(conv.weight, conv.bias, slices)
    target = np_soft_edges(labels.numpy(), 2, 1)
    mask = labels.numpy() != IGNORE
    p = np_softmax(logits)
    kl = (target * (np.log(np.clip(target, 1e-8, None)) - np.log(p))).sum(axis=1)[mask].mean()
    _, dice = np_ce_dice(logits, target, mask)
    assert out.loss.item() == pytest.approx(kl + dice, rel=1e-5)


@pytest.mark.parametrize("pseudo", ["hard", "soft"])
def test_student_loss_on_dense_pseudo_labels(pseudo):
    method = make_method({"pseudo": pseudo})
    batch = sparse_batch(b_l=1, b_u=1)
    out = method.training_step(batch, epoch=2, iteration=0)
    teacher, student = method.models["teacher"].inner, method.models["student"]
    image = torch.cat([batch.image_l, batch.image_u])
    teacher_p = np_softmax(conv1x1(teacher.weight, teacher.bias, image))
    labels = batch.label_l.numpy()
    annotated = labels != IGNORE
    real = np_one_hot(np.where(annotated, labels, 0), 2)
    if pseudo == "hard":
        target = np_one_hot(teacher_p.argmax(axis=1), 2)
    else:
        target = teacher_p.copy()
    target[:1] = np.where(annotated[:, None], real, target[:1])  # real labels override on annotated voxels
    logits = conv1x1(student.weight, student.bias, image)
    everywhere = np.ones(logits[:, 0].shape, bool)
    ce, dice = np_ce_dice(logits, target, everywhere)
    if pseudo == "soft":
        ce -= -(target * np.log(np.clip(target, 1e-8, None))).sum(axis=1).mean()  # KL = CE - H(target)
    assert out.loss.item() == pytest.approx(ce + dice, rel=1e-5)
    assert {"loss_student", "pseudo_fg", "teacher_agreement"} <= set(out.logs)


def test_labelled_targets_are_the_real_labels_on_annotated_slices():
    method = make_method()
    batch = sparse_batch(b_l=2, b_u=1)
    target, probs = method.dense_targets(batch.image_l, batch.label_l, batch.image_u)
    annotated = batch.label_l != IGNORE
    assert torch.equal(target[:2][annotated], batch.label_l[annotated])
    assert torch.equal(target[:2][~annotated], probs[:2].argmax(1)[~annotated])
    assert torch.equal(target[2:], probs[2:].argmax(1))
    soft = make_method({"pseudo": "soft"})
    soft_target, _ = soft.dense_targets(batch.image_l, batch.label_l, batch.image_u)
    rows = soft_target[:2].movedim(1, -1)[annotated]  # (n, K) one-hot rows of the real labels
    assert torch.equal(rows.argmax(1), batch.label_l[annotated])
    assert torch.equal(rows.max(1).values, torch.ones(len(rows)))


# --- soft-edge labels ----------------------------------------------------------------------------------------
def test_soft_edge_labels_one_hot_away_from_borders_and_soft_in_the_band():
    labels = torch.zeros(1, 12, 12, dtype=torch.long)
    labels[0, 3:9, 3:9] = 1
    labels[0, :, 11] = IGNORE
    width = 2
    soft, annotated = soft_edge_labels(labels, 2, width, IGNORE)
    assert soft.shape == (1, 2, 12, 12)
    torch.testing.assert_close(soft.sum(1)[annotated], torch.ones(int(annotated.sum())))
    assert (soft.sum(1)[~annotated] == 0).all()
    # Chebyshev distance to the nearest voxel of another class decides: one-hot beyond the band, soft within.
    lab = labels[0].numpy()
    ys, xs = np.nonzero(lab != IGNORE)
    for y, x in zip(ys, xs):
        win = lab[max(y - width, 0) : y + width + 1, max(x - width, 0) : x + width + 1]
        near_border = len(set(win[win != IGNORE].tolist())) > 1
        row = soft[0, :, y, x]
        if near_border:
            assert 0 < row[1] < 1
        else:
            assert torch.equal(row, torch.nn.functional.one_hot(labels[0, y, x], 2).float())
    np.testing.assert_allclose(soft.numpy(), np_soft_edges(labels.numpy(), 2, width), atol=1e-6)


# --- (b) gradients ----------------------------------------------------------------------------------------------
def tiny_models():
    torch.manual_seed(0)
    teacher = build_model(ModelConfig(name="unet2d", kwargs={"depth": 3, "base_filters": 2}), 1, 2)
    student = build_model(ModelConfig(name="unet3d", kwargs={"depth": 3, "base_filters": 2}), 1, 2)
    return {"teacher": teacher, "student": student}


@pytest.mark.parametrize("soft", [False, True])
def test_stage1_gradient_reaches_teacher_only(soft):
    method = make_method({"soft_edges": soft}, models=tiny_models())
    batch = sparse_batch(b_l=2, b_u=0, shape=(8, 8, 8), annotated=(1, 5))
    method.training_step(batch, epoch=0, iteration=0).loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in method.models["teacher"].parameters())
    assert any(p.grad.abs().sum() > 0 for p in method.models["teacher"].parameters())
    assert all(p.grad is None for p in method.models["student"].parameters())


@pytest.mark.parametrize("pseudo", ["hard", "soft"])
def test_stage2_gradient_reaches_student_only(pseudo):
    method = make_method({"pseudo": pseudo}, models=tiny_models())
    method.models["teacher"].eval()  # what the engine does for roles not active in this epoch
    batch = sparse_batch(b_l=1, b_u=1, shape=(8, 8, 8), annotated=(1, 5))
    method.training_step(batch, epoch=2, iteration=0).loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in method.models["student"].parameters())
    assert all(p.grad is None for p in method.models["teacher"].parameters())


# --- schedule, batch split, options --------------------------------------------------------------------------
def test_each_role_schedule_spans_its_own_stage():
    method = make_method(epochs=5)  # teacher_epochs 2, iters 3: stage 1 = steps 0..5, stage 2 = steps 6..14
    teacher, student = method.schedule_segments("teacher"), method.schedule_segments("student")
    assert [lr_at(student, t) for t in range(6)] == [0.0] * 6
    assert lr_at(student, 6) == pytest.approx(1e-4 / 3)  # warm-up (1 epoch = 3 steps) starts at stage 2
    assert lr_at(student, 8) == pytest.approx(1e-4)
    assert lr_at(student, 14) == pytest.approx(0.0)
    assert lr_at(teacher, 0) == pytest.approx(1e-3 / 3)
    assert lr_at(teacher, 5) == pytest.approx(0.0)
    assert all(lr_at(teacher, t) == 0.0 for t in range(6, 15))
    assert method.active_roles(1) == ["teacher"] and method.active_roles(2) == ["student"]


def test_batch_split():
    method = make_method(batch_size=5)
    assert method.batch_split(0, 0) == (5, 0)
    assert method.batch_split(2, 0) == (2, 3)
    assert make_method({"labeled_per_batch": 4}, batch_size=5).batch_split(3, 0) == (4, 1)
    assert make_method(batch_size=5, n_unlabeled=0).batch_split(2, 0) == (5, 0)


def test_student_step_without_unlabelled_items_and_without_ignore_label():
    method = make_method(ignore_index=None)
    image = torch.randn(2, 1, 4, 4, 4)
    label = (torch.rand(2, 4, 4, 4) > 0.5).long()
    out = method.training_step(Batch(image, label, image[:0]), epoch=2, iteration=0)
    # Dense labels and no unlabelled items: the student learns from the real labels alone.
    target, _ = method.dense_targets(image, label, image[:0])
    assert torch.equal(target, label)
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize(
    "params",
    [{"teacher_epochs": 4}, {"teacher_epochs": 0}, {"pseudo": "fuzzy"}, {"edge_width": 0},
     {"labeled_per_batch": 3}, {"predict": "nobody"}],
)
def test_bad_params_are_config_errors(params):
    with pytest.raises(ConfigError):
        make_method(params)


def test_teacher_must_be_2d_and_predictor_choice():
    with pytest.raises(ConfigError, match="2D"):
        make_method(models={"teacher": torch.nn.Conv3d(1, 2, 1), "student": torch.nn.Conv3d(1, 2, 1)})
    method = make_method()
    assert method.predictor() is method.models["student"]
    assert method.predictor("teacher") is method.models["teacher"]
    assert make_method({"predict": "teacher"}).predictor().__class__ is SliceWise
    assert len(method.predictor("average")) == 2


# --- (c) end to end through the CLI ---------------------------------------------------------------------------
def sparsify(dataset, every=4):
    """Keep every ``every``-th axial slice of each training label; the rest becomes the ignore label."""
    meta = json.loads((dataset / "dataset.json").read_text())
    ignore = max(meta["labels"].values()) + 1
    meta["labels"]["ignore"] = ignore
    (dataset / "dataset.json").write_text(json.dumps(meta))
    for path in (dataset / "labelsTr").glob("*.nii.gz"):
        img = nib.load(path)
        data = np.asarray(img.dataobj).astype(np.uint8)
        keep = np.zeros(data.shape[2], bool)
        keep[every // 2 :: every] = True
        data[:, :, ~keep] = ignore
        nib.save(nib.Nifti1Image(data, img.affine), path)
    return dataset


TINY = [
    "models.teacher.name=unet2d",
    "models.teacher.kwargs={depth: 3, base_filters: 2}",
    "models.teacher.finetune=null",
    "models.student.name=unet3d",
    "models.student.kwargs={depth: 3, base_filters: 2}",
    "method.params.teacher_epochs=1",
]


def test_cli_train_end_to_end_on_sparse_toy(toy_dataset, tmp_path):
    from mnseg.cli import main

    dataset = sparsify(toy_dataset)
    run = tmp_path / "run"
    rc = main(
        ["train", str(dataset), "--method", "sparse2dense", "--num-labeled", "2", "--epochs", "2",
         "--iters-per-epoch", "2", "--batch-size", "2", "--patch-size", "16,16,16", "--run-dir", str(run),
         "--no-progress", "data.cache_dir=" + str(tmp_path / "cache"), *TINY]
    )
    assert rc == 0
    assert (run / "checkpoints" / "last.pt").exists()
    history = (run / "history.csv").read_text().splitlines()
    assert len(history) == 3
    assert ",teacher," in history[1] and ",student," in history[2]
    header = history[0].split(",")
    row2 = dict(zip(header, history[2].split(",")))
    assert float(row2["b_u"]) == 1.0 and float(row2["lr_teacher"]) == 0.0


def test_cli_train_on_sparse_synth(tmp_path):
    """Smoke run on `mnseg synth --sparse-every 4` (labels kept on every 4th axial slice, the rest ignore)."""
    from mnseg.cli import main

    data = tmp_path / "synth"
    assert main(["synth", str(data), "--n-labeled", "2", "--n-unlabeled", "2", "--n-test", "1",
                 "--sparse-every", "4", "--spacing", "6"]) == 0
    run = tmp_path / "run"
    rc = main(
        ["train", str(data), "--method", "sparse2dense", "--epochs", "2", "--iters-per-epoch", "2",
         "--batch-size", "2", "--patch-size", "16,16,16", "--run-dir", str(run), "--no-progress",
         "data.cache_dir=" + str(tmp_path / "cache"), *TINY]
    )
    assert rc == 0
    assert (run / "checkpoints" / "last.pt").exists()
    assert (run / "history.csv").exists()
