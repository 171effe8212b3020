"""What the methods' end-to-end tests share: one tiny ``mnseg train`` run through the CLI, so each test says only
what is particular to its method (its model options, the history columns it must write)."""

from __future__ import annotations

from pathlib import Path

from mnseg.cli import main

TINY_RUN = "--num-labeled 2 --epochs 2 --iters-per-epoch 2 --batch-size 2 --patch-size 16,16,16 --no-progress".split()
TINY_NET = ["models.net.name=unet3d", "models.net.kwargs={depth: 3, base_filters: 4}"]


def train_tiny(dataset: Path, tmp_path: Path, method: str, *overrides: str) -> Path:
    """``mnseg train DATASET --method METHOD`` with ``TINY_RUN`` (2 labelled cases, B = 2, 2 epochs of 2 iterations,
    16^3 patches), the cache under ``tmp_path``, then ``overrides``; asserts that it succeeded and left its last
    checkpoint, and returns the run directory."""
    run = tmp_path / "run"
    rc = main(["train", str(dataset), "--method", method, *TINY_RUN, "--run-dir", str(run),
               f"data.cache_dir={tmp_path / 'cache'}", *overrides])
    assert rc == 0
    assert (run / "checkpoints" / "last.pt").exists()
    return run


def history_columns(run: Path) -> list[str]:
    """The column names of a run's history.csv."""
    return (run / "history.csv").read_text().splitlines()[0].split(",")
