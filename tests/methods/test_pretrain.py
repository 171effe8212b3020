"""``mnseg pretrain``: each pretext task's loss falls on toy data, no label (nor imagesTs) is opened, a run resumes,
and ``mnseg train`` starts from the pretrained network (``models.net.init``)."""

from __future__ import annotations

import csv
import re

import pytest
import torch

from mnseg.cli import main

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


@pytest.mark.parametrize("task, falls_by", [("rotation", 0.4), ("contrastive", 0.5), ("reconstruction", 0.04)])
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

    from torch.utils.tensorboard import SummaryWriter

    from mnseg.commands.pretrain import add_arguments, build_config
    from mnseg.engine.trainer import Trainer

    cache = tmp_path / "cache"
    assert pretrain(ramp_dataset, tmp_path / "full", cache, "contrastive", epochs=2, iters=3) == 0

    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args([str(ramp_dataset), "--task", "contrastive", "--epochs", "2", "--iters-per-epoch", "3",
                         "--patch-size", "16,16,16", "--batch-size", "2"])
    args.overrides = [f"data.cache_dir={cache}", *TINY, *FAST]
    first = Trainer(build_config(args), tmp_path / "part", progress=False)
    first.setup()
    first.tb = SummaryWriter(str(tmp_path / "part" / "tb"))
    first._train_epoch(0)  # then the process "dies"
    first.tb.close()
    del first
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
