"""Trainer hooks (as detectron2's ``HookBase``): everything the loop does besides training steps.

The trainer calls, on every hook in order: ``before_train`` -> per epoch ``before_epoch(epoch)``, after every
optimiser step ``after_step(epoch, iteration)``, ``after_epoch(epoch, row)`` -> ``after_train`` (also when training
fails). ``row`` is the epoch's history row; a hook may add to it (validation adds ``val_dice``) for the hooks after
it. The default hooks, in their order: validation, history and log line, TensorBoard scalars, checkpoints. Others
(benchmark timing, TensorBoard overlay pictures) are passed to the trainer by whoever runs it.
"""

from __future__ import annotations

import json
import time

import numpy as np
import torch

from mnseg.engine import distributed
from mnseg.engine.checkpoint import unwrap


class Hook:
    """Base class: every event does nothing. ``self.trainer`` is set when the trainer takes the hook."""

    trainer = None

    def before_train(self) -> None:
        pass

    def before_epoch(self, epoch: int) -> None:
        pass

    def after_step(self, epoch: int, iteration: int) -> None:
        pass

    def after_epoch(self, epoch: int, row: dict) -> None:
        pass

    def after_train(self) -> None:
        pass


def is_last_epoch(trainer, epoch: int) -> bool:
    return epoch == trainer.cfg.train.epochs - 1


class ValidationHook(Hook):
    """Validation Dice on the held-out cases every ``train.val_every`` epochs and at the end; tracks the best.

    Rank 0 validates; the others wait in the broadcast, so every rank agrees on the best checkpoint. Leaves
    ``trainer.improved`` (this epoch's Dice is the best so far) and ``trainer.val_example`` (the first validation
    case and its prediction, for pictures; None when not validated) for the hooks after it.
    """

    def after_epoch(self, epoch: int, row: dict) -> None:
        t = self.trainer
        t.improved, t.val_example = False, None
        every = t.cfg.train.val_every
        if not t.data.val or every <= 0 or not ((epoch + 1) % every == 0 or is_last_epoch(t, epoch)):
            return
        mean, per_class = distributed.broadcast_object(self.validate() if t.is_main else None, t.dist)
        row["val_dice"] = mean
        row.update({f"val_dice_{name}": value for name, value in per_class.items()})
        if row["val_dice"] > t.best_metric:
            t.best_metric, t.improved = row["val_dice"], True

    @torch.no_grad()
    def validate(self) -> tuple[float, dict[str, float]]:
        """The mean Dice over validation cases and foreground classes, and each class's mean over the cases
        (in history.csv as ``val_dice_<class>``: a rare class's swing is told apart from the large classes')."""
        from mnseg.evaluation.metrics import dice
        from mnseg.inference.predict import predict_probabilities
        from mnseg.inference.window import WindowSettings

        t = self.trainer
        predictor = t.method.predictor(t.cfg.infer.model)
        # The bare modules: a DDP wrapper's forward on rank 0 alone must not wait for the other ranks.
        # (The window loop puts each model in eval mode for the call and restores its mode.)
        models = [unwrap(m) for m in (predictor if isinstance(predictor, list) else [predictor])]
        names = t.data.plans.get("class_names") or []
        scores: dict[str, list[float]] = {}
        window = WindowSettings.from_config(t.cfg)
        for i, case in enumerate(t.data.val):
            probs = predict_probabilities(models, torch.from_numpy(case.image), window, t.device)
            pred = probs.argmax(0).cpu().numpy()
            ref = case.label
            scored = pred if t.ctx.ignore_index is None else np.where(ref == t.ctx.ignore_index, 0, pred)
            for c in range(1, t.ctx.num_classes):  # unannotated voxels count for nothing
                name = names[c] if len(names) == t.ctx.num_classes else str(c)
                scores.setdefault(name, []).append(dice(scored == c, ref == c))
            if i == 0:
                t.val_example = (case, pred)
        every = [s for per_case in scores.values() for s in per_case]
        return (float(np.mean(every)) if every else float("nan"),
                {name: float(np.mean(v)) for name, v in scores.items()})


class HistoryHook(Hook):
    """One history row per epoch (``history.csv``, rewritten atomically) and the epoch's log line."""

    def after_epoch(self, epoch: int, row: dict) -> None:
        t = self.trainer
        t.history.append(row)
        if t.is_main:
            t.run.write_history(t.history)
        lrs = " ".join(f"{k}={v:.2e}" for k, v in row.items() if k.startswith("lr_"))
        val = f" val_dice={row['val_dice']:.4f}" if "val_dice" in row else ""
        t.log(
            f"epoch {epoch + 1}/{t.cfg.train.epochs} [{row['phase']}] loss={row['loss']:.4f} {lrs} "
            f"b_l={row['b_l']:g} b_u={row['b_u']:g}{val} ({row['seconds']:.1f}s)"
        )


class TensorBoardHook(Hook):
    """The run's TensorBoard writer (``trainer.tb``, rank 0 only) and every numeric column of the history row."""

    def before_train(self) -> None:
        from torch.utils.tensorboard import SummaryWriter

        t = self.trainer
        if t.is_main:
            t.tb = SummaryWriter(str(t.run.tensorboard), purge_step=t.start_epoch)

    def after_epoch(self, epoch: int, row: dict) -> None:
        tb = self.trainer.tb
        if tb is None:
            return
        for k, v in row.items():
            if isinstance(v, int | float) and k != "epoch":
                tb.add_scalar(f"train/{k}" if not k.startswith("val") else f"val/{k}", v, epoch + 1)

    def after_train(self) -> None:
        if self.trainer.tb is not None:
            self.trainer.tb.close()


class CheckpointHook(Hook):
    """``last`` every ``train.checkpoint_every`` epochs and at the end, ``best`` when validation improved, and the
    epochs in ``train.keep_epochs`` (e.g. the end of a warm-up stage, to branch ablations from)."""

    def after_epoch(self, epoch: int, row: dict) -> None:
        t = self.trainer
        if (epoch + 1) % max(t.cfg.train.checkpoint_every, 1) == 0 or is_last_epoch(t, epoch):
            t.save("last")
        if getattr(t, "improved", False):
            t.save("best")
        if epoch + 1 in t.cfg.train.keep_epochs:
            t.save(f"epoch{epoch + 1}")


class TimingHook(Hook):
    """``timing.json``: wall-clock, iterations and peak GPU memory after every epoch, added to those recorded by
    earlier sessions of a resumed run (so an interrupted run's earlier sessions still count). ``sharing``: how many
    runs train on the device at once (the timings are shared ones)."""

    def __init__(self, sharing: int = 1):
        self.sharing = sharing

    def before_train(self) -> None:
        t = self.trainer
        self.before = {"train_seconds": 0.0, "iterations": 0, "peak_gpu_memory_mb": None, "runs_sharing_device": 1}
        if t.resume and t.run.timing.exists():
            recorded = json.loads(t.run.timing.read_text())
            self.before.update({k: v for k, v in recorded.items() if k in self.before})
        if t.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(t.device)
        self.first_epoch, self.started = t.start_epoch, time.perf_counter()

    def after_epoch(self, epoch: int, row: dict) -> None:
        from mnseg.utils.atomic import atomic_write_json

        t, before = self.trainer, self.before
        seconds = before["train_seconds"] + (time.perf_counter() - self.started)
        iterations = before["iterations"] + (t.start_epoch - self.first_epoch) * t.cfg.train.iters_per_epoch
        peak = before["peak_gpu_memory_mb"]
        if t.device.type == "cuda":
            peak = max(peak or 0.0, torch.cuda.max_memory_allocated(t.device) / 2**20)
        if not t.is_main:
            return
        atomic_write_json(t.run.timing, {
            "train_seconds": round(seconds, 3),
            "iterations": iterations,
            "iterations_per_second": round(iterations / seconds, 4) if seconds > 0 else None,
            "peak_gpu_memory_mb": None if peak is None else round(peak, 1),
            "device": str(t.device),
            "runs_sharing_device": max(before["runs_sharing_device"], self.sharing),
        })


def default_hooks() -> list[Hook]:
    return [ValidationHook(), HistoryHook(), TensorBoardHook(), CheckpointHook()]
