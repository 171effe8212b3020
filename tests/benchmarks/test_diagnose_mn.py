"""benchmarks/diagnose_mn.py: a base that only branches need stops after stage 1, and its branches lose nothing."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from diagnose_mn import STAGE1, base_dir, full_epochs  # noqa: E402

TINY_MN = ["--method", "mn", "--num-labeled", "2", "--iters-per-epoch", "2", "--batch-size", "2",
           "--patch-size", "16,16,16", "--no-progress", "models.net3d.name=unet3d",
           "models.net3d.kwargs={depth: 3, base_filters: 4}", "models.net2d.name=unet2d",
           "models.net2d.kwargs={depth: 3, base_filters: 4}", "models.net2d.finetune=null",
           "method.params.sup_epochs=2", "train.keep_epochs=[2]", "train.deterministic=true", "train.amp=false",
           "models.net3d.optim.warmup_epochs=1", "models.net2d.optim.warmup_epochs=1"]  # a cosine within stage 1


def test_the_stage_one_snapshot_does_not_depend_on_how_long_the_run_is(toy_dataset, tmp_path):
    from mnseg.cli import main

    for name, epochs in (("short", 3), ("full", 6)):  # stage 1 + one co-training epoch, against the whole run
        assert main(["train", str(toy_dataset), *TINY_MN, "--epochs", str(epochs), "--run-dir", str(tmp_path / name),
                     f"data.cache_dir={tmp_path / 'cache'}"]) == 0
    short, full = (torch.load(tmp_path / n / "checkpoints" / "epoch2.pt", weights_only=False)
                   for n in ("short", "full"))
    assert short["epoch"] == full["epoch"] == 2
    for role in ("net2d", "net3d"):
        for key, value in full["models"][role].items():
            torch.testing.assert_close(short["models"][role][key], value, rtol=0, atol=0, msg=f"{role}.{key}")


def test_branches_prefer_a_full_base_and_get_back_the_full_length(tmp_path):
    stage1 = tmp_path / "runs" / f"mn{STAGE1}" / "n4_seed1"
    assert base_dir(tmp_path, "mn", 4, 1, 30) == stage1
    full = tmp_path / "runs" / "mn" / "n4_seed1"
    (full / "checkpoints").mkdir(parents=True)
    (full / "checkpoints" / "epoch30.pt").write_bytes(b"")
    assert base_dir(tmp_path, "mn", 4, 1, 30) == full
    assert full_epochs("cpu_grid_mn", []) == 120  # the preset's own length
    assert full_epochs("cpu_grid_mn", ["train.epochs=40", "method.params.sup_epochs=10"]) == 40  # the short budget


def test_threads_reach_the_training_jobs(tmp_path, monkeypatch):
    import diagnose_mn

    seen = []
    monkeypatch.setattr(diagnose_mn.subprocess, "run",
                        lambda cmd, env, **kw: seen.append(env["OMP_NUM_THREADS"]) or type("R", (), {"returncode": 0}))
    monkeypatch.setitem(diagnose_mn.THREADS, "n", 2)
    assert diagnose_mn._train(["x"], tmp_path / "log.txt") == 0
    assert seen == ["2"]


def test_a_second_call_sharing_out_keeps_the_first_calls_rows(tmp_path):
    from diagnose_mn import write_tables

    def row(variant, n, seed, val):
        return {"variant": variant, "n": n, "seed": seed, "val_dice": val, "best_val": val, "best_epoch": 15,
                "test_white_matter": 0.7, "test_grey_matter": 0.8, "test_lesion": 0.2, "test_fg_mean": 0.5,
                "pseudo_share_3": float("nan"), "label_share_3": float("nan"), "b_u": float("nan")}

    write_tables(tmp_path, [row("mn", 4, 0, 0.51), row("sup", 4, 0, 0.52)])
    write_tables(tmp_path, [row("mn", 4, 0, 0.55), row("mn", 2, 0, 0.53)])  # mn n4 seed 0 again: replaced
    table = (tmp_path / "diagnosis.md").read_text().splitlines()[2:]
    assert [line.split(" | ")[:4] for line in table] == [["| sup", "4", "0", "0.5200"], ["| mn", "4", "0", "0.5500"],
                                                        ["| mn", "2", "0", "0.5300"]]
