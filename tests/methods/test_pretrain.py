"""``mnseg pretrain``: each pretext task's loss falls on toy data, no label (nor imagesTs) is opened, a run resumes,
and ``mnseg train`` starts from the pretrained network (``models.net.init``)."""

from __future__ import annotations

import csv
import re

import pytest
import torch

from mnseg.cli import main
from tests.helpers.interrupted import train_then_die

TINY = ["models.net.name=unet3d", "models.net.kwargs={depth: 3, base_filters: 8}"]
FAST = ["models.net.optim.lr=3e-3", "models.head.optim.lr=3e-3", "models.net.optim.warmup_epochs=0",
        "models.head.optim.warmup_epochs=0", "method.params.local_voxels=64", "train.deterministic=true",
        "train.amp=false"]


@pytest.fixture
def ramp_dataset(tmp_path):
    """32^3 toy scans, little noise, an intensity ramp along x and z: a crop shows its orientation."""
    from mnseg.data.toy import make_toy_dataset

    return make_toy_dataset(tmp_path / "Dataset003_Ramp", noise=0.1, ramp=2.0)


def pretrain(ds, run, cache, task, *extra, epochs=4, iters=8):
    return main(["pretrain", str(ds), "--task", task, "-o", str(run), "--epochs", str(epochs), "--iters-per-epoch",
                 str(iters), "--patch-size", "16,16,16", "--batch-size", "2", "--no-progress",
                 f"data.cache_dir={cache}", *TINY, *FAST, *extra])


def losses(run) -> list[float]:
    with open(run / "history.csv") as f:
        return [float(row["loss"]) for row in csv.DictReader(f)]


@pytest.mark.parametrize("task, falls_by", [("rotation", 0.4), ("contrastive", 0.5), ("reconstruction", 0.04),
                                            ("clustering", 0.03)])  # IIC starts near I = 0 (an even softmax)
def test_the_pretext_loss_falls(ramp_dataset, tmp_path, task, falls_by):
    run = tmp_path / "run"
    assert pretrain(ramp_dataset, run, tmp_path / "cache", task) == 0
    curve = losses(run)
    assert len(curve) == 4
    assert curve[-1] < curve[0] - falls_by, curve
    assert (run / "checkpoints" / "last.pt").exists() and (run / "checkpoints" / "last.safetensors").exists()
    assert any((run / "tb").iterdir())


def test_pretrain_never_opens_labels_or_test_scans(ramp_dataset, tmp_path, monkeypatch):
    import nibabel

    for label in (ramp_dataset / "labelsTr").iterdir():
        label.write_bytes(b"not a NIfTI file")  # unreadable: a run that opened one would fail
    opened = []
    real_load = nibabel.load

    def recording_load(path, *args, **kwargs):
        opened.append(str(path))
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(nibabel, "load", recording_load)
    assert pretrain(ramp_dataset, tmp_path / "run", tmp_path / "cache", "rotation", epochs=1, iters=1) == 0
    assert opened and all("/imagesTr/" in p or "/imagesUnlabeled/" in p for p in opened), opened
    assert {p.split("/")[-2] for p in opened} == {"imagesTr", "imagesUnlabeled"}

    opened.clear()
    assert pretrain(ramp_dataset, tmp_path / "run_t", tmp_path / "cache_t", "rotation", "--transductive", epochs=1,
                    iters=1) == 0
    assert {p.split("/")[-2] for p in opened} == {"imagesTr", "imagesUnlabeled", "imagesTs"}


def test_pretrain_split_has_no_labelled_case(ramp_dataset, tmp_path):
    import json

    run = tmp_path / "run"
    assert pretrain(ramp_dataset, run, tmp_path / "cache", "reconstruction", epochs=1, iters=1) == 0
    split = json.loads((run / "split.json").read_text())
    assert split["labeled"] == [] and split["val"] == [] and split["num_labeled"] == 0
    assert len(split["unlabeled"]["imagesTr"]) == 4 and len(split["unlabeled"]["imagesUnlabeled"]) == 4
    assert split["unlabeled"]["imagesTs"] == []


def test_a_labelled_method_refuses_no_labels_and_pretrain_refuses_labels(ramp_dataset, tmp_path, capsys):
    argv = ["train", str(ramp_dataset), "--run-dir", str(tmp_path / "r"), "--epochs", "1", "--no-progress", *TINY]
    assert main([*argv, "--num-labeled", "0"]) == 2
    assert "trains on labelled cases; data.num_labeled=0 leaves none" in capsys.readouterr().err
    assert main([*argv, "--method", "pretrain", "--num-labeled", "2"]) == 2
    assert "reads no label: it needs data.num_labeled=0" in capsys.readouterr().err


def test_resumed_pretraining_ends_where_an_uninterrupted_one_does(ramp_dataset, tmp_path):
    import argparse

    from mnseg.commands.pretrain import add_arguments, build_config

    cache = tmp_path / "cache"
    assert pretrain(ramp_dataset, tmp_path / "full", cache, "contrastive", epochs=2, iters=3) == 0

    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args([str(ramp_dataset), "--task", "contrastive", "--epochs", "2", "--iters-per-epoch", "3",
                         "--patch-size", "16,16,16", "--batch-size", "2"])
    args.overrides = [f"data.cache_dir={cache}", *TINY, *FAST]
    train_then_die(build_config(args), tmp_path / "part", epochs=1)
    assert main(["pretrain", "--resume", str(tmp_path / "part"), "--no-progress"]) == 0

    a = torch.load(tmp_path / "full" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "part" / "checkpoints" / "last.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    for role in ("net", "head"):
        for key, value in a["models"][role].items():
            torch.testing.assert_close(value, b["models"][role][key], rtol=1e-5, atol=1e-6, msg=key)
    assert losses(tmp_path / "full") == pytest.approx(losses(tmp_path / "part"), rel=1e-4)


def test_train_starts_from_the_pretrained_network(ramp_dataset, tmp_path, capsys):
    import argparse

    from mnseg.commands.train import add_arguments, build_config
    from mnseg.engine.trainer import Trainer

    cache, pre = tmp_path / "cache", tmp_path / "pre"
    assert pretrain(ramp_dataset, pre, cache, "reconstruction", epochs=1, iters=2) == 0
    saved = torch.load(pre / "checkpoints" / "last.pt", weights_only=True)["models"]["net"]

    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args([str(ramp_dataset), "--method", "mean_teacher", "--num-labeled", "2", "--epochs", "1",
                         "--iters-per-epoch", "1", "--patch-size", "16,16,16"])
    args.overrides = [f"data.cache_dir={cache}", "models.student.name=unet3d", "models.teacher.name=unet3d",
                      "models.student.kwargs={depth: 3, base_filters: 8}",
                      "models.teacher.kwargs={depth: 3, base_filters: 8}",
                      f"models.student.init={pre / 'checkpoints' / 'last.pt'}"]
    trainer = Trainer(build_config(args), tmp_path / "mt", progress=False)
    trainer.setup()  # before the first step
    out = capsys.readouterr().out
    assert re.search(r"models.student.init: 34 of 34 weights from \S+last.pt \(role net\)", out), out
    assert "warning" not in out
    for role in ("student", "teacher"):  # the teacher starts as the student's copy
        state = trainer.models[role].state_dict()
        for key, value in saved.items():
            torch.testing.assert_close(state[key], value, rtol=0, atol=0, msg=f"{role} {key}")

    # and through the command line, from the run directory
    rc = main(["train", str(ramp_dataset), "--num-labeled", "2", "--epochs", "1", "--iters-per-epoch", "1",
               "--patch-size", "16,16,16", "--run-dir", str(tmp_path / "sup"), "--no-progress",
               f"data.cache_dir={cache}", *TINY, f"models.net.init={pre}"])
    assert rc == 0
    assert "models.net.init: 34 of 34 weights from" in capsys.readouterr().out


def test_orientations_are_distinct_and_undone_exactly():
    from mnseg.methods.pretext import allowed_orientations, orient, unorient

    x = torch.randn(1, 4, 4, 3)
    seen = [orient(x, k) for k in range(8)]
    assert all(not torch.equal(seen[i], seen[j]) for i in range(8) for j in range(i))
    assert all(torch.equal(unorient(orient(x, k), k), x) for k in range(8))
    assert allowed_orientations([16, 16, 8]) == tuple(range(8)) and allowed_orientations([16, 8, 8]) == (0, 2, 4, 6)
    assert all(orient(torch.randn(1, 6, 4, 2), k).shape == (1, 6, 4, 2) for k in (0, 2, 4, 6))


def test_block_mask_covers_the_asked_fraction_of_cells():
    from mnseg.methods.pretext import block_mask

    mask = block_mask(3, (16, 16, 8), 4, 0.25, "cpu")
    assert mask.shape == (3, 1, 16, 16, 8) and mask.dtype == torch.bool
    cells = mask[:, 0, ::4, ::4, ::4]
    assert cells.flatten(1).sum(1).tolist() == [8, 8, 8]  # 0.25 of the 4 x 4 x 2 cells, each item
    assert torch.equal(mask, cells.repeat_interleave(4, 1).repeat_interleave(4, 2).repeat_interleave(4, 3)
                       .unsqueeze(1))


def test_nt_xent_matches_its_definition():
    import math

    from mnseg.methods.pretext import nt_xent

    torch.manual_seed(0)
    a, b, tau = torch.randn(3, 5), torch.randn(3, 5), 0.5
    z = torch.nn.functional.normalize(torch.cat([a, b]), dim=1)
    total = 0.0
    for i in range(6):
        pos = (i + 3) % 6
        denom = sum(math.exp(float(z[i] @ z[j]) / tau) for j in range(6) if j != i)
        total += -(float(z[i] @ z[pos]) / tau - math.log(denom))
    assert float(nt_xent(a, b, tau)) == pytest.approx(total / 6, rel=1e-5)


def _assignments(clusters: list[int], k: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(clusters), k).float()


def test_iic_loss_is_least_for_confident_balanced_consistent_clusters_and_zero_for_one():
    """-I(z, z') reaches -log K exactly when every voxel is sure of its cluster, the clusters are equally full and
    both views agree; one cluster for everything (a collapse) and an even spread both carry no information."""
    import math

    from mnseg.methods.pretext import iic_loss

    k = 4
    best = _assignments([0, 1, 2, 3] * 6, k)
    loss, joint = iic_loss(best, best)
    assert float(loss) == pytest.approx(-math.log(k), abs=1e-6)
    torch.testing.assert_close(joint, torch.eye(k) / k)
    constant = _assignments([2] * 24, k)
    assert float(iic_loss(constant, constant)[0]) == 0.0
    uniform = torch.full((24, k), 1.0 / k)
    assert float(iic_loss(uniform, uniform)[0]) == pytest.approx(0.0, abs=1e-7)
    unbalanced = _assignments([0] * 18 + [1, 2, 3] * 2, k)
    assert -math.log(k) + 0.1 < float(iic_loss(unbalanced, unbalanced)[0]) < 0
    inconsistent = _assignments([1, 2, 3, 0] * 6, k)  # every voxel moves cluster between the views
    torch.manual_seed(0)
    soft = torch.softmax(3 * torch.randn(24, k), dim=1)
    for other in (iic_loss(best, inconsistent)[0], iic_loss(soft, soft)[0], iic_loss(soft, best)[0]):
        assert float(other) > float(loss) + 1e-3


def test_iic_loss_matches_its_definition_and_has_finite_gradients_for_empty_clusters():
    import math

    from mnseg.methods.pretext import iic_loss

    torch.manual_seed(1)
    a = torch.softmax(3 * torch.randn(10, 3), dim=1)
    b = torch.softmax(a.log() + torch.randn(10, 3), dim=1)  # related views: I well above 0
    joint = sum(torch.outer(a[n], b[n]) for n in range(10)) / 10
    joint = (joint + joint.t()) / 2
    pi, pj = joint.sum(1), joint.sum(0)
    mi = sum(float(joint[i, j]) * math.log(float(joint[i, j] / (pi[i] * pj[j]))) for i in range(3) for j in range(3))
    assert mi > 0.1 and float(iic_loss(a, b)[0]) == pytest.approx(-mi, rel=1e-5)
    logits = torch.tensor([[9.0, -9.0, -30.0]] * 4 + [[-9.0, 9.0, -30.0]] * 4, requires_grad=True)  # cluster 2 empty
    p = torch.softmax(logits, dim=1)
    iic_loss(p, p)[0].backward()
    assert torch.isfinite(logits.grad).all()


def test_the_clustering_head_has_k_outputs_per_voxel():
    from mnseg.errors import ConfigError
    from mnseg.models import create_model

    head = create_model("pretext_head", task="clustering", local_width=6, classes=5)
    assert head(voxels=torch.randn(7, 6))[1].shape == (7, 5)
    with pytest.raises(ConfigError, match="classes"):
        create_model("pretext_head", task="clustering", local_width=6)


def test_pretrain_accepts_the_clustering_task_and_its_cluster_count():
    import argparse

    from mnseg.commands import pretrain as command
    from mnseg.commands.pretrain import build_config
    from mnseg.methods.pretrain import Pretrain
    from mnseg.models import create_model
    from tests.helpers.method_scaffold import tiny_context

    p = argparse.ArgumentParser()
    command.add_arguments(p)
    args = p.parse_args(["Dataset_X", "--task", "clustering", "--patch-size", "16,16,16"])
    args.overrides = ["method.params.clusters=5"]
    cfg = build_config(args)
    assert cfg.method.params["task"] == "clustering"
    net = create_model("unet3d", depth=3, base_filters=4)
    kwargs = Pretrain(cfg, tiny_context()).derived_kwargs("head", {"net": net})
    assert (kwargs["task"], kwargs["classes"], kwargs["local_width"]) == ("clustering", 5, 4)  # the decoder's width
    assert create_model("pretext_head", **kwargs).cluster.out_features == 5
    with pytest.raises(SystemExit):
        p.parse_args(["Dataset_X", "--task", "clusters"])
