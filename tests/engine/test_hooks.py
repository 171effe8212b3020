"""The trainer's loop is an outline of hook calls; callers add hooks without subclassing it."""

from __future__ import annotations

import argparse
import json

from mnseg.commands.train import add_arguments, build_config
from mnseg.engine.hooks import Hook, TimingHook
from mnseg.engine.trainer import Trainer


class Recorder(Hook):
    def __init__(self):
        self.events = []

    def before_train(self):
        self.events.append("before_train")

    def before_epoch(self, epoch):
        self.events.append(f"before_epoch {epoch}")

    def after_step(self, epoch, iteration):
        self.events.append(f"after_step {epoch}.{iteration}")

    def after_epoch(self, epoch, row):
        # the default hooks ran first: validation added its Dice, the history has the row, last.pt is written
        assert "val_dice" in row and self.trainer.history[-1] is row
        assert self.trainer.run.checkpoint("last").is_file()
        self.events.append(f"after_epoch {epoch}")

    def after_train(self):
        self.events.append("after_train")


def test_hooks_run_in_order_around_the_steps_and_timing_is_a_hook(toy_dataset, tmp_path):
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args([str(toy_dataset), "--num-labeled", "3", "--num-val", "1", "--epochs", "2",
                         "--iters-per-epoch", "2", "--patch-size", "32,32,32"])
    args.overrides = ["models.net.name=unet3d", "models.net.kwargs={depth: 3, base_filters: 4}",
                      f"data.cache_dir={tmp_path / 'cache'}", "train.val_every=1"]
    recorder = Recorder()
    trainer = Trainer(build_config(args), tmp_path / "run", progress=False, hooks=[recorder, TimingHook()])
    trainer.fit()
    assert recorder.events == ["before_train", "before_epoch 0", "after_step 0.0", "after_step 0.1", "after_epoch 0",
                               "before_epoch 1", "after_step 1.0", "after_step 1.1", "after_epoch 1", "after_train"]
    timing = json.loads(trainer.run.timing.read_text())
    assert timing["iterations"] == 4 and timing["train_seconds"] > 0
    assert trainer.run.checkpoint("best").is_file() and trainer.tb is not None
    # validation Dice per foreground class beside the mean (one validation case: the mean is theirs)
    row = trainer.history[-1]
    names = trainer.data.plans["class_names"][1:]
    per_class = [row[f"val_dice_{name}"] for name in names]
    assert len(names) >= 1 and all(0.0 <= v <= 1.0 for v in per_class)
    assert abs(row["val_dice"] - sum(per_class) / len(per_class)) < 1e-9
