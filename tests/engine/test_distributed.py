"""Several processes (torchrun, gloo on CPU) train exactly as one process with the same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from mnseg.data.loader import shard_batch
from mnseg.engine import distributed
from mnseg.errors import ConfigError

# Two processes sum their gradients in another order than one process does: float32 rounding only, so the runs
# use SGD (about 3e-8 in the weights). Adam divides by sqrt(v) + eps, which magnifies that rounding on near-zero
# gradient components by up to lr per step (2e-5 seen at lr 1e-3 with batch Dice), hiding real differences.
RTOL = 1e-4
ATOL = 1e-6


def _batch(b_l: int, b_u: int) -> dict[str, np.ndarray]:
    return {
        "image_l": np.arange(b_l, dtype=np.float32).reshape(b_l, 1, 1, 1, 1),
        "label_l": np.arange(b_l, dtype=np.int64).reshape(b_l, 1, 1, 1),
        "image_u": 100 + np.arange(b_u, dtype=np.float32).reshape(b_u, 1, 1, 1, 1),
    }


@pytest.mark.parametrize("b_l,b_u,world", [(2, 2, 2), (4, 0, 2), (1, 1, 2), (3, 1, 2), (6, 3, 3)])
def test_shards_partition_the_global_batch_evenly(b_l, b_u, world):
    batch = _batch(b_l, b_u)
    shards = [shard_batch(batch, r, world) for r in range(world)]
    sizes = [len(s["image_l"]) + len(s["image_u"]) for s in shards]
    assert sizes == [(b_l + b_u) // world] * world
    got_l = sorted(float(v) for s in shards for v in s["image_l"].ravel())
    got_u = sorted(float(v) for s in shards for v in s["image_u"].ravel())
    assert got_l == sorted(batch["image_l"].ravel().tolist())
    assert got_u == sorted(batch["image_u"].ravel().tolist())
    for s in shards:  # labels travel with their images
        np.testing.assert_array_equal(s["image_l"].ravel(), s["label_l"].ravel())


def test_one_process_is_untouched(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx = distributed.init_from_env(torch.device("cpu"))
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.enabled) == (0, 1, True, False)
    assert not torch.distributed.is_initialized()
    model = torch.nn.Linear(2, 2)
    assert distributed.wrap_ddp(model, ctx) is model
    assert distributed.merge_sums({"loss": 3.0}, {"loss": 2}, ctx) == {"loss": 1.5}
    assert distributed.mean_over_ranks(0.25, ctx) == 0.25
    assert distributed.loss_sums(ctx) is None  # batch Dice stays this process's own


def test_global_batch_must_split_evenly():
    ctx = distributed.DistContext(rank=0, world_size=3)
    with pytest.raises(ConfigError, match="divisible"):
        distributed.check_batch_divisible(4, ctx)
    distributed.check_batch_divisible(6, ctx)


def test_bad_torchrun_environment_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ConfigError, match="WORLD_SIZE"):
        distributed.init_from_env(torch.device("cpu"))


# ----------------------------------------------------------------------------------- 2 processes vs 1
TINY = ["unet3d", "{depth: 3, base_filters: 4}"]
# CE is a mean over voxels, and equal item counts make the mean of the per-process means the global mean;
# batch Dice pools its sums over the processes (docs/distributed.md), so the full CE + Dice loss is compared.
# No augmentation, no input noise: those draw from per-process random streams by design.
# supervised also recomputes its UNet's activations in backward (activation checkpointing under DDP).
CASES = {
    "supervised": ["models.net.activation_checkpoint=true"],
    "mean_teacher": ["method.params.noise_std=0", "method.params.rampup=0", "method.params.consistency=1"],
}
# Domain adaptation on top (a dataset with imagesTarget): DANN's classifier is one more DDP-wrapped role, and each
# process takes its share of the target crops like the others.
CASES["supervised+dann"] = [*CASES["supervised"], "domain.dann_weight=0.5", "domain.target_entropy_weight=0.1",
                            "domain.grl_schedule=constant"]


def _method(case):
    return case.partition("+")[0]


def _method_roles(case):
    return ["net"] if _method(case) == "supervised" else ["student", "teacher"]


def _roles(case):
    """Every trained or checkpointed role: the method's, and DANN's classifier (its optimiser is the net's)."""
    return _method_roles(case) + (["domain_classifier"] if "+dann" in case else [])


def _argv(case, ds, run, cache):
    argv = [
        "train", str(ds), "--method", _method(case), "--num-labeled", "3", "--epochs", "3", "--iters-per-epoch", "2",
        "--batch-size", "2", "--patch-size", "16,16,16", "--run-dir", str(run), "--no-progress",
        f"data.cache_dir={cache}", "train.deterministic=true", "train.amp=false", "train.device=cpu", *CASES[case],
    ]
    for role in _method_roles(case):
        argv += [f"models.{role}.name={TINY[0]}", f"models.{role}.kwargs={TINY[1]}",
                 f"models.{role}.augment.preset=none", f"models.{role}.optim.name=sgd", f"models.{role}.optim.lr=1e-2",
                 f"models.{role}.optim.warmup_epochs=0"]
    return argv


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _history(run) -> list[dict]:
    from mnseg.engine.run_dir import RunDir

    return RunDir(run).history_rows()


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(CASES))
def test_two_processes_follow_the_one_process_trajectory(toy_dataset, tmp_path, method):
    from mnseg.cli import main
    from mnseg.data.toy import make_toy_dataset

    if "+dann" in method:
        toy_dataset = make_toy_dataset(tmp_path / "Dataset003_Shift", n_target=2)
    cache = tmp_path / "cache"
    assert main(_argv(method, toy_dataset, tmp_path / "one", cache)) == 0

    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", "-m", "mnseg", *_argv(method, toy_dataset, tmp_path / "two", cache),
           "--test"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "x 2 processes" in done.stdout  # it really ran distributed
    # --test: rank 0 alone predicts imagesTs and scores it, after the process group is gone
    assert done.stdout.count("done: ") == 1
    summary = json.loads((tmp_path / "two" / "test_predictions" / "summary.json").read_text())
    assert summary["n_cases"] == len(list((toy_dataset / "imagesTs").glob("*.nii.gz")))

    one, two = _history(tmp_path / "one"), _history(tmp_path / "two")
    assert len(one) == len(two) == 3
    keys = [k for k in one[0] if k.startswith("loss")]
    for a, b in zip(one, two):
        np.testing.assert_allclose([float(b[k]) for k in keys], [float(a[k]) for k in keys], rtol=RTOL, atol=1e-6)
    losses = [float(r["loss"]) for r in one]
    assert len(set(losses)) > 1  # the model did learn something, so equality is not trivial

    ck_one = torch.load(tmp_path / "one" / "checkpoints" / "last.pt", weights_only=False)
    ck_two = torch.load(tmp_path / "two" / "checkpoints" / "last.pt", weights_only=False)
    assert ck_two["rng_ranks"] is not None and len(ck_two["rng_ranks"]) == 2
    for role in _roles(method):
        sd_one, sd_two = ck_one["models"][role], ck_two["models"][role]
        assert sd_one.keys() == sd_two.keys()  # unwrapped: no "module." prefix
        for name, w in sd_one.items():
            torch.testing.assert_close(sd_two[name], w, rtol=RTOL, atol=ATOL)
    assert ck_one["epoch"] == ck_two["epoch"] == 3


# ----------------------------------------------------------------------------------- batch Dice over processes
def _pooled_dice_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """One of two processes: its half of a fixed batch, batch Dice pooled over both; saves value and gradient."""
    import torch.distributed as dist

    from mnseg.losses import soft_dice_loss

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        logits, labels = _dice_batch()
        mine = slice(rank * 2, rank * 2 + 2)
        local = logits[mine].clone().requires_grad_(True)
        pooled = distributed.SumOverRanks(dist.new_group())
        loss = soft_dice_loss(local, labels[mine], ignore_index=3, reduce_sums=pooled)
        loss.backward()
        torch.save({"loss": loss.detach(), "grad": local.grad}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _dice_batch():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 3, 6, 5, 4, generator=gen)
    labels = torch.randint(0, 4, (4, 6, 5, 4), generator=gen)  # 3 is the ignore label
    labels[2:] = torch.where(labels[2:] == 2, 0, labels[2:])  # the two halves differ in class make-up
    return logits, labels


def test_batch_dice_pooled_over_two_processes_is_the_whole_batch_dice(tmp_path):
    """Each process's loss is the Dice of the whole batch; its gradient, averaged as DDP averages (divided by the
    number of processes), is its slice of the one-process gradient. Without pooling both would differ."""
    import torch.multiprocessing as mp

    from mnseg.losses import soft_dice_loss

    mp.spawn(_pooled_dice_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    logits, labels = _dice_batch()
    whole = logits.clone().requires_grad_(True)
    expected = soft_dice_loss(whole, labels, ignore_index=3)
    expected.backward()
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(got["loss"], expected.detach(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(got["grad"] / 2, whole.grad[rank * 2: rank * 2 + 2], rtol=1e-5, atol=1e-8)
    unpooled = soft_dice_loss(logits[:2], labels[:2], ignore_index=3)
    assert abs(float(unpooled) - float(expected.detach())) > 1e-3  # the check above could fail
