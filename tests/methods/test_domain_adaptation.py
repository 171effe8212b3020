"""Domain adaptation mixed into any method (``methods/domain_adaptation.py``): the method stays itself, DANN's
classifier learns from source and target bottleneck features, entropy is taken on the target, a tiny training with
both logs its terms, and no target label is ever opened, not even listed."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from mnseg.cli import main
from mnseg.config.schema import Config, load_config
from mnseg.engine.build import build_method
from mnseg.errors import ConfigError
from mnseg.methods.base import Batch
from mnseg.methods.domain_adaptation import DOMAIN_ROLE, grl_lambda
from tests.helpers.interrupted import train_then_die
from tests.helpers.method_scaffold import attach_with_sgd

PLANS = {"num_classes": 2, "in_channels": 1, "ignore_label": None}
TINY_NET = "{depth: 3, base_filters: 4}"


def _built(method: str, roles: tuple[str, ...], *domain: str):
    tiny = [o for r in roles for o in (f"models.{r}.name=unet3d", f"models.{r}.kwargs={TINY_NET}")]
    cfg = load_config(method, [*tiny, "train.epochs=2", "train.iters_per_epoch=5", *domain])
    return cfg, *build_method(cfg, PLANS, torch.device("cpu"), n_labeled=2, n_unlabeled=2)


def _batch(b_t: int = 2) -> Batch:
    g = torch.Generator().manual_seed(0)
    image = torch.randn(4, 1, 16, 16, 16, generator=g)
    label = (image[:2, 0] > 0).long()
    return Batch(image[:2], label, image[2:], image_t=torch.randn(b_t, 1, 16, 16, 16, generator=g) * 2 + 1)


def test_grl_lambda_follows_the_dann_schedule():
    assert grl_lambda(0.0, 1.0, "dann") == 0.0
    assert grl_lambda(0.5, 2.0, "dann") == pytest.approx(2.0 * (2.0 / (1.0 + math.exp(-5.0)) - 1.0))
    assert grl_lambda(1.0, 1.0, "dann") == pytest.approx(0.99991, abs=1e-5)
    assert grl_lambda(0.0, 0.3, "constant") == 0.3


def test_mean_teacher_with_dann_and_entropy_stays_mean_teacher_and_trains_the_classifier():
    torch.manual_seed(0)
    cfg, method, models = _built("mean_teacher", ("student", "teacher"), "domain.dann_weight=1.0",
                                 "domain.target_entropy_weight=0.5", "domain.grl_schedule=constant")
    assert method.name == "mean_teacher" and method.predict_role == "student"
    assert set(models) == {"student", "teacher", DOMAIN_ROLE}
    assert models[DOMAIN_ROLE].features == models["student"].filters[-1]  # derived from the adapted network
    assert cfg.models[DOMAIN_ROLE].name == "domain_classifier3d"
    attach_with_sgd(method, models, trained=["student", DOMAIN_ROLE])
    assert method.active_roles(0) == ["student", DOMAIN_ROLE]

    out = method.training_step(_batch(), 0, 3)
    for key in ("loss_l", "loss_u", "loss_domain", "domain_acc", "loss_target_entropy"):
        assert key in out.logs, key
    assert float(out.logs["loss_domain"]) == pytest.approx(math.log(2), abs=0.1)  # an untrained classifier
    assert 0.0 <= float(out.logs["domain_acc"]) <= 1.0
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in models[DOMAIN_ROLE].parameters())
    assert all(p.grad is None for p in models["teacher"].parameters())


def test_the_encoder_gets_minus_lambda_times_the_domain_gradient():
    """With only the domain term (w_ce = w_dice = 0), the encoder's gradient at lambda = 1 is exactly the negative
    of its gradient at lambda = -1 (no reversal): the GRL sits between the features and the classifier."""
    grads = {}
    for lam in (1.0, -1.0):
        torch.manual_seed(0)
        _, method, models = _built("supervised", ("net",), "domain.dann_weight=1.0", "domain.grl_schedule=constant",
                                   f"domain.grl_lambda={abs(lam)}", "method.params.w_ce=0", "method.params.w_dice=0")
        attach_with_sgd(method, models)
        method.dom.grl_lambda = lam  # the check forbids a negative lambda; here it undoes the reversal
        method.training_step(_batch(), 0, 0).loss.backward()
        first = next(models["net"].parameters())
        grads[lam] = first.grad.clone()
    assert grads[1.0].abs().sum() > 0
    torch.testing.assert_close(grads[1.0], -grads[-1.0])


def test_entropy_alone_needs_no_classifier_and_any_network():
    _, method, models = _built("supervised", ("net",), "domain.target_entropy_weight=1.0")
    assert DOMAIN_ROLE not in models
    attach_with_sgd(method, models)
    out = method.training_step(_batch(), 0, 0)
    assert "loss_target_entropy" in out.logs and "loss_domain" not in out.logs
    assert 0.0 < float(out.logs["loss_target_entropy"]) <= 1.0


def test_bad_domain_settings_are_one_clear_error():
    with pytest.raises(ConfigError, match="domain.role: method supervised has no model role 'student'"):
        _built("supervised", ("net",), "domain.dann_weight=1", "domain.role=student")
    with pytest.raises(ConfigError, match="is not a 3D UNet with an encoder bottleneck"):
        _built("supervised", ("net",), "domain.dann_weight=1", "models.net.name=unet2d")


def _history(run: Path) -> list[dict]:
    with open(run / "history.csv") as f:
        return list(csv.DictReader(f))


def test_tiny_training_logs_the_domain_terms_and_never_reads_target_labels(tmp_path, monkeypatch):
    import nibabel

    from mnseg.data.toy import make_toy_dataset

    ds = make_toy_dataset(tmp_path / "Dataset005_Shift", n_target=2)
    for label in (ds / "labelsTarget").iterdir():
        label.write_bytes(b"not a NIfTI file")  # a run that opened one would fail
    opened, listed = [], []
    real_load, real_iterdir = nibabel.load, Path.iterdir

    def recording_load(path, *args, **kwargs):
        opened.append(str(path))
        return real_load(path, *args, **kwargs)

    def recording_iterdir(self):
        listed.append(str(self))
        return real_iterdir(self)

    monkeypatch.setattr(nibabel, "load", recording_load)
    monkeypatch.setattr(Path, "iterdir", recording_iterdir)
    run = tmp_path / "run"
    rc = main(["train", str(ds), "--num-labeled", "2", "--epochs", "1", "--iters-per-epoch", "2", "--patch-size",
               "16,16,16", "--run-dir", str(run), "--no-progress", f"data.cache_dir={tmp_path / 'cache'}",
               "models.net.name=unet3d", f"models.net.kwargs={TINY_NET}", "train.amp=false",
               "domain.dann_weight=0.5", "domain.target_entropy_weight=0.1"])
    assert rc == 0
    assert any("/imagesTarget/" in p for p in opened), "the target scans are trained on"
    assert not [p for p in opened + listed if "labelsTarget" in p]
    (row,) = _history(run)
    for key in ("loss_domain", "domain_acc", "grl_lambda", "loss_target_entropy"):
        assert math.isfinite(float(row[key])), key
    assert float(row["loss_domain"]) > 0 and float(row["loss_target_entropy"]) > 0
    assert "lr_domain_classifier" in row
    written = load_config(run / "config.yaml")  # the classifier the run trains is in its config.yaml
    assert written.models[DOMAIN_ROLE].name == "domain_classifier3d"
    assert written.models[DOMAIN_ROLE].optim.lr == written.models["net"].optim.lr

    # scoring on the target: predict imagesTarget (the run holds the classifier too), evaluate against labelsTarget
    monkeypatch.undo()
    same = make_toy_dataset(tmp_path / "same", n_target=2)  # the same seeds: the true target labels again
    for label in (same / "labelsTarget").iterdir():
        (ds / "labelsTarget" / label.name).write_bytes(label.read_bytes())
    assert main(["predict", "-i", str(ds / "imagesTarget"), "-o", str(tmp_path / "preds"), "-m", str(run),
                 "--no-progress"]) == 0
    assert main(["evaluate", str(tmp_path / "preds"), str(ds / "labelsTarget"), "--dataset-json",
                 str(ds / "dataset.json")]) == 0
    summary = json.loads((tmp_path / "preds" / "summary.json").read_text())
    assert len(summary["metric_per_case"]) == 2 and 0.0 <= summary["foreground_mean"]["dice"] <= 1.0


def test_adaptation_without_target_scans_stops_with_the_folder_named(toy_dataset, tmp_path, capsys):
    rc = main(["train", str(toy_dataset), "--num-labeled", "2", "--epochs", "1", "--run-dir", str(tmp_path / "r"),
               "--no-progress", f"data.cache_dir={tmp_path / 'cache'}", "models.net.name=unet3d",
               f"models.net.kwargs={TINY_NET}", "domain.target_entropy_weight=0.1"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "imagesTarget: domain adaptation" in err and "none found" in err and "Traceback" not in err


def test_a_resumed_adapted_run_ends_where_an_uninterrupted_one_does(tmp_path):
    """The target crops' batcher state is checkpointed with the rest."""
    import argparse

    from mnseg.commands.train import add_arguments, build_config
    from mnseg.data.toy import make_toy_dataset

    ds = make_toy_dataset(tmp_path / "Dataset009_Shift", n_target=2)
    argv = [str(ds), "--num-labeled", "2", "--epochs", "2", "--iters-per-epoch", "2", "--patch-size", "16,16,16"]
    overrides = [f"data.cache_dir={tmp_path / 'cache'}", "models.net.name=unet3d", f"models.net.kwargs={TINY_NET}",
                 "train.amp=false", "train.deterministic=true", "domain.dann_weight=0.5",
                 "domain.target_entropy_weight=0.1"]
    assert main(["train", *argv, "--run-dir", str(tmp_path / "full"), "--no-progress", *overrides]) == 0

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(argv)
    args.overrides = overrides
    train_then_die(build_config(args), tmp_path / "part", epochs=1)
    assert main(["train", "--resume", str(tmp_path / "part"), "--no-progress"]) == 0

    a = torch.load(tmp_path / "full" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "part" / "checkpoints" / "last.pt", weights_only=True)
    assert "target_batcher" in a and a["epoch"] == b["epoch"] == 2
    for role in ("net", DOMAIN_ROLE):
        for key, value in a["models"][role].items():
            torch.testing.assert_close(value, b["models"][role][key], rtol=1e-5, atol=1e-6, msg=f"{role} {key}")
    full, part = _history(tmp_path / "full"), _history(tmp_path / "part")
    assert [float(r["loss_domain"]) for r in full] == pytest.approx([float(r["loss_domain"]) for r in part], rel=1e-4)


def test_mn_with_dann_adapts_its_3d_model_only_in_the_epochs_that_train_it():
    """M&N alternates its models; the domain terms ride on the 3D model (its predicting role) and are left out of
    the 2D model's co-training epochs, whose step then trains neither G_d nor the 3D model."""
    torch.manual_seed(0)
    tiny = {"kwargs": {"depth": 3, "base_filters": 4}, "optim": {"lr": 1e-3, "warmup_epochs": 0}}
    cfg = Config.from_dict({
        "method": {"name": "mn", "params": {"sup_epochs": 1}},
        "models": {"net2d": {"name": "unet2d", **tiny}, "net3d": {"name": "unet3d", **tiny}},
        "train": {"epochs": 4, "iters_per_epoch": 5, "batch_size": 2},
        "domain": {"dann_weight": 1.0, "target_entropy_weight": 0.5, "grl_schedule": "constant"},
    })
    method, models = build_method(cfg, PLANS, torch.device("cpu"), n_labeled=2, n_unlabeled=2)
    assert method.name == "mn" and method.da_role == "net3d"
    assert set(models) == {"net2d", "net3d", DOMAIN_ROLE}
    assert models[DOMAIN_ROLE].features == models["net3d"].filters[-1]
    attach_with_sgd(method, models)
    assert method.trained_role(1) == "net3d" and method.trained_role(2) == "net2d"
    assert method.active_roles(1) == ["net3d", DOMAIN_ROLE] and DOMAIN_ROLE not in method.active_roles(2)

    out = method.training_step(_batch(), 1, 0)  # the 3D model's co-training epoch: its terms are there
    assert {"loss_domain", "domain_acc", "loss_target_entropy"} <= set(out.logs)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in models[DOMAIN_ROLE].parameters())
    assert all(p.grad is None for p in models["net2d"].parameters())  # the partner only generates pseudo-masks
    for m in models.values():
        m.zero_grad(set_to_none=True)

    out = method.training_step(_batch(), 2, 0)  # the 2D model's epoch: no domain term, nothing reaches G_d
    assert not {"loss_domain", "loss_target_entropy"} & set(out.logs)
    out.loss.backward()
    assert all(p.grad is None for p in models[DOMAIN_ROLE].parameters())
    assert all(p.grad is None for p in models["net3d"].parameters())
