"""The trainer: runs any method's steps with devices, AMP, optimisers, schedules, logs and checkpoints.

Hooks in the order they run (as nnU-Net's trainer): ``setup`` -> per epoch
``method.on_epoch_start`` -> steps (``method.batch_split``, ``method.training_step``,
optimiser steps for ``method.active_roles``, ``method.after_optimizer_step``) ->
``_end_epoch`` (history, TensorBoard, validation, checkpoints).

Under torchrun (WORLD_SIZE > 1, see ``engine/distributed.py``) every rank draws the same global batch
and trains on its slice; trained roles are wrapped in DistributedDataParallel (frozen roles such as EMA
teachers never are); rank 0 alone prepares the cache, writes the run directory, validates and logs.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from mnseg.config.checks import check_config
from mnseg.config.schema import Config
from mnseg.engine import distributed
from mnseg.engine.build import (
    build_augmenter,
    build_model,
    build_optimizer,
    place_model,
    resolve_device,
    resolve_input_ranges,
    to_channels_last,
)
from mnseg.engine.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state, unwrap
from mnseg.engine.run_dir import RunDir
from mnseg.engine.schedules import current_lr, make_scheduler
from mnseg.engine.weights import save_weights, weights_path
from mnseg.errors import ConfigError, MnsegError
from mnseg.losses import batch_dice_over_ranks
from mnseg.methods import method_class
from mnseg.methods.base import Batch, MethodContext
from mnseg.models.compiled import compile_forward
from mnseg.utils.atomic import atomic_write_text


class NonFiniteLossError(MnsegError):
    pass


def _quiet(*args, **kwargs) -> None:
    """The log function of ranks other than 0."""


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


class Trainer:
    def __init__(
        self,
        cfg: Config,
        run_dir: str | Path,
        resume: bool = False,
        overwrite: bool = False,
        progress: bool = True,
        log=print,
    ):
        self.cfg, self.run, self.resume, self.progress, self.log = cfg, RunDir(run_dir), resume, progress, log
        self.overwrite = overwrite
        self.history: list[dict] = []
        self.start_epoch = 0
        self.best_metric = -math.inf
        self.tb = None
        self.dist = distributed.DistContext()

    @property
    def is_main(self) -> bool:
        """True for the one process that writes files and prints (always, without torchrun)."""
        return self.dist.is_main

    # ------------------------------------------------------------------ set-up
    def setup(self) -> None:
        from mnseg.data.loader import PatchBatcher, to_memory_case
        from mnseg.engine.data_setup import prepare_data

        cfg = self.cfg
        check_config(cfg)  # before anything is written
        self.dist = distributed.init_from_env(resolve_device(cfg.train.device))
        self.device = self.dist.device
        distributed.check_batch_divisible(cfg.train.batch_size, self.dist)
        if not self.is_main:
            self.progress, self.log = False, _quiet
        if self.resume:
            if not self.run.checkpoint("last").exists():
                raise MnsegError(f"{self.run.path}: nothing to resume (no checkpoints/last.pt)")
            split_dict, plans = self.run.read_json("split.json"), self.run.read_json("plans.json")
        else:
            if self.is_main:
                self.run.create(overwrite=self.overwrite)
            split_dict, plans = None, None
        seed_everything(cfg.train.seed, cfg.train.deterministic)
        # Rank 0 fills the preprocessing cache and writes the split; the others then read both.
        if self.is_main:
            self.data = prepare_data(cfg, split_dict, plans, progress=self.progress)
            if not self.resume:
                resolve_input_ranges(cfg, self.data.plans)
                atomic_write_text(self.run.path / "config.yaml", cfg.to_yaml())
                self.run.write_json("plans.json", self.data.plans)
                self.run.write_json("split.json", self.data.split.to_json_dict())
                env = f"{self.device}" + (f" x {self.dist.world_size} processes (DDP)" if self.dist.enabled else "")
                self.run.write_env(env)
        distributed.barrier(self.dist)
        if not self.is_main:
            split_dict, plans = self.run.read_json("split.json"), self.run.read_json("plans.json")
            self.data = prepare_data(cfg, split_dict, plans, progress=False)
            if not self.resume:
                resolve_input_ranges(cfg, self.data.plans)
        plans = self.data.plans

        cls = method_class(cfg.method.name)
        missing = set(cls.default_models) - set(cfg.models)
        if missing:
            raise ConfigError(
                f"method '{cls.name}' needs model roles {sorted(cls.default_models)}; config has "
                f"{sorted(cfg.models)} (start from its preset: --config {cls.name})"
            )
        self.ctx = MethodContext(
            num_classes=plans["num_classes"],
            in_channels=plans["in_channels"],
            ignore_index=plans["ignore_label"],
            batch_size=cfg.train.batch_size,
            epochs=cfg.train.epochs,
            iters_per_epoch=cfg.train.iters_per_epoch,
            n_labeled=len(self.data.labeled),
            n_unlabeled=len(self.data.unlabeled),
            device=self.device,
        )
        self.method = cls(cfg, self.ctx)
        self.models = {
            role: place_model(
                build_model(cfg.models[role], plans["in_channels"], plans["num_classes"]),
                cfg.models[role],
                cfg.train,
                self.device,
            )
            for role in cls.default_models
        }
        if cfg.train.compile:
            for model in self.models.values():
                compile_forward(model, cfg.train.compile_mode)
        self.optimizers, self.schedulers = {}, {}
        for role, model in self.models.items():
            if role in cls.frozen_roles:
                model.requires_grad_(False)
                continue
            self.optimizers[role] = build_optimizer(model, cfg.models[role].optim, self.device)
            self.schedulers[role] = make_scheduler(self.optimizers[role], self.method.schedule_segments(role))
            self.models[role] = distributed.wrap_ddp(model, self.dist)
        augmenters = {role: build_augmenter(cfg.models[role]) for role in self.models}
        self.method.attach(self.models, augmenters, self.optimizers)

        rng = np.random.default_rng(cfg.train.seed)
        ignore = plans["ignore_label"]
        self.batcher = PatchBatcher(
            [to_memory_case(c, ignore, rng) for c in self.data.labeled],
            [to_memory_case(c, ignore, rng, aim=False) for c in self.data.unlabeled],
            cfg.data.patch_size,
            cfg.data.fg_prob,
            ignore,
            cfg.train.seed + 1,
            cfg.data.class_balanced,
        )
        self.method.batcher = self.batcher
        if self.dist.enabled:
            self._seed_rank(0)
        if self.resume:
            self._load("last")
        self.history = [r for r in self.run.history_rows() if int(r["epoch"]) < self.start_epoch]
        self.log(
            f"run {self.run.path}: method {cls.name}, {len(self.data.labeled)} labelled / "
            f"{len(self.data.unlabeled)} unlabelled / {len(self.data.val)} validation cases, device {self.device}"
            + (f" x {self.dist.world_size} processes" if self.dist.enabled else "")
            + (f", resuming at epoch {self.start_epoch + 1}" if self.resume else "")
        )

    def _seed_rank(self, epoch: int) -> None:
        """Different torch streams per rank (augmentation, noise); the patch batcher stays shared."""
        torch.manual_seed(self.cfg.train.seed + 104729 * (self.dist.rank + 1) + 7919 * epoch)

    # ------------------------------------------------------------------ loop
    def fit(self) -> dict:
        if not hasattr(self, "method"):
            self.setup()
        cfg = self.cfg
        from torch.utils.tensorboard import SummaryWriter

        if self.is_main:
            self.tb = SummaryWriter(str(self.run.path / "tb"), purge_step=self.start_epoch)
        try:
            for epoch in range(self.start_epoch, cfg.train.epochs):
                self._train_epoch(epoch)
        finally:
            if self.tb is not None:
                self.tb.close()
            distributed.shutdown(self.dist)
        return self.history[-1] if self.history else {}

    def _autocast(self):
        if self.device.type == "cuda" and self.cfg.train.amp:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _train_epoch(self, epoch: int) -> None:
        from mnseg.data.loader import batch_to_device, shard_batch
        from mnseg.utils.progress import progress_bar

        cfg, method = self.cfg, self.method
        method.on_epoch_start(epoch)
        active = method.active_roles(epoch)
        for role, model in self.models.items():
            model.train(role in active)
        sums: dict[str, torch.Tensor | float] = {}
        seen: dict[str, int] = {}
        counts = {"b_l": 0, "b_u": 0}
        skipped = 0
        check_every = max(int(cfg.train.check_every), 1)
        per_step_check = check_every == 1 or cfg.train.on_nan == "skip"
        window, window_start = torch.zeros((), device=self.device), 0
        t0 = time.time()
        bar = progress_bar(
            range(cfg.train.iters_per_epoch),
            desc=f"epoch {epoch + 1}/{cfg.train.epochs} [{method.phase(epoch)}]",
            leave=False,
            disable=not self.progress,
            dynamic_ncols=True,
        )
        for it in bar:
            b_l, b_u = method.batch_split(epoch, it)
            counts["b_l"] += b_l
            counts["b_u"] += b_u
            arrays = shard_batch(self.batcher.next_batch(b_l, b_u), self.dist.rank, self.dist.world_size)
            t = batch_to_device(arrays, self.device)
            batch = Batch(t["image_l"], t["label_l"], t["image_u"], t.get("label_u"))
            if cfg.train.channels_last:
                batch = Batch(to_channels_last(batch.image_l), batch.label_l, to_channels_last(batch.image_u),
                              batch.label_u)
            for role in active:
                self.optimizers[role].zero_grad(set_to_none=True)
            # Equal shards on every process: batch Dice pools over them all, as one process with the whole batch.
            even = b_l % self.dist.world_size == 0 and b_u % self.dist.world_size == 0
            with self._autocast(), batch_dice_over_ranks(self.dist.loss_group if even else None):
                out = method.training_step(batch, epoch, it)
            loss = out.loss.detach().float()
            check_now = per_step_check or (it + 1) % check_every == 0 or it == cfg.train.iters_per_epoch - 1
            if per_step_check:
                # The global mean (every rank holds equally many items), so all ranks take the same decision.
                loss_value = distributed.mean_over_ranks(float(loss), self.dist)
                if not math.isfinite(loss_value):
                    if cfg.train.on_nan == "skip":
                        skipped += 1
                        self._step_schedulers()
                        continue
                    raise self._non_finite(loss_value, epoch, f"iteration {it + 1}")
            out.loss.backward()
            for role in active:
                clip = cfg.models[role].optim.grad_clip
                if clip:
                    torch.nn.utils.clip_grad_norm_(self.models[role].parameters(), clip)
                self.optimizers[role].step()
            self._step_schedulers()
            method.after_optimizer_step(epoch, it)
            window = window + loss  # stays on the device: no host sync between checks
            sums["loss"] = sums.get("loss", 0.0) + loss
            seen["loss"] = seen.get("loss", 0) + 1
            for k, v in out.logs.items():
                sums[k] = sums.get(k, 0.0) + (v.detach() if torch.is_tensor(v) else v)
                seen[k] = seen.get(k, 0) + 1  # a log present in some steps only is averaged over those
            if check_now and not per_step_check:
                # Deferred check (train.check_every > 1): one sync per window; a non-finite window stops the run
                # before anything is saved, so the checkpoint on disk stays the last good one.
                value = distributed.mean_over_ranks(float(window), self.dist)
                if not math.isfinite(value):
                    raise self._non_finite(value, epoch, f"iterations {window_start + 1}-{it + 1}")
                window, window_start = torch.zeros((), device=self.device), it + 1
            if check_now and self.progress:
                bar.set_postfix(loss=f"{float(loss):.4f}", b_u=b_u)
        bar.close()
        if skipped == cfg.train.iters_per_epoch:
            raise NonFiniteLossError(
                f"every step of epoch {epoch + 1} had a non-finite loss and was skipped; the run stops here and keeps "
                f"its last good checkpoint ({self.run.checkpoint('last')}). Try a lower learning rate."
            )
        row = {"epoch": epoch, "phase": method.phase(epoch)}
        row.update({k: round(v, 6) for k, v in distributed.merge_sums(sums, seen, self.dist).items()})
        for role, opt in self.optimizers.items():
            row[f"lr_{role}"] = current_lr(opt)
        row["b_l"] = round(counts["b_l"] / cfg.train.iters_per_epoch, 3)
        row["b_u"] = round(counts["b_u"] / cfg.train.iters_per_epoch, 3)
        row["skipped_steps"] = skipped
        row["seconds"] = round(time.time() - t0, 2)
        self._end_epoch(epoch, row)

    def _step_schedulers(self) -> None:
        """Every role's schedule follows the global step, including roles whose optimiser did not step (their stage
        has not begun, or the step was skipped); PyTorch's warning about that order is expected here."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
            for sched in self.schedulers.values():
                sched.step()

    def _non_finite(self, value: float, epoch: int, where: str) -> NonFiniteLossError:
        return NonFiniteLossError(
            f"loss became {value} at epoch {epoch + 1}, {where}; the run stops here and keeps its last good "
            f"checkpoint ({self.run.checkpoint('last')}). Try a lower learning rate, or train.on_nan=skip to skip "
            f"such steps."
        )

    def _end_epoch(self, epoch: int, row: dict) -> None:
        cfg = self.cfg
        last = epoch == cfg.train.epochs - 1
        is_best = False
        if self.data.val and cfg.train.val_every > 0 and ((epoch + 1) % cfg.train.val_every == 0 or last):
            # Rank 0 validates; the others wait in the broadcast, so every rank agrees on the best checkpoint.
            row["val_dice"] = distributed.broadcast_object(self.validate(epoch) if self.is_main else None, self.dist)
            if row["val_dice"] > self.best_metric:
                self.best_metric, is_best = row["val_dice"], True
        self.history.append(row)
        if self.is_main:
            self.run.write_history(self.history)
            for k, v in row.items():
                if isinstance(v, int | float) and k != "epoch":
                    self.tb.add_scalar(f"train/{k}" if not k.startswith("val") else f"val/{k}", v, epoch + 1)
        lrs = " ".join(f"{k}={v:.2e}" for k, v in row.items() if k.startswith("lr_"))
        val = f" val_dice={row['val_dice']:.4f}" if "val_dice" in row else ""
        self.log(
            f"epoch {epoch + 1}/{cfg.train.epochs} [{row['phase']}] loss={row['loss']:.4f} {lrs} "
            f"b_l={row['b_l']:g} b_u={row['b_u']:g}{val} ({row['seconds']:.1f}s)"
        )
        self.start_epoch = epoch + 1
        if (epoch + 1) % max(cfg.train.checkpoint_every, 1) == 0 or last:
            self._save("last")
        if is_best:
            self._save("best")
        if epoch + 1 in cfg.train.keep_epochs:  # e.g. the end of a warm-up stage, to branch ablations from
            self._save(f"epoch{epoch + 1}")

    # ------------------------------------------------------------------ validation
    @torch.no_grad()
    def validate(self, epoch: int) -> float:
        from mnseg.evaluation.metrics import dice
        from mnseg.inference.predict import predict_probabilities

        cfg = self.cfg
        predictor = self.method.predictor(cfg.infer.model)
        # The bare modules: a DDP wrapper's forward on rank 0 alone must not wait for the other ranks.
        # (The window loop puts each model in eval mode for the call and restores its mode.)
        models = [unwrap(m) for m in (predictor if isinstance(predictor, list) else [predictor])]
        scores = []
        for i, case in enumerate(self.data.val):
            probs = predict_probabilities(models, torch.from_numpy(case.image), cfg, self.device)
            pred = probs.argmax(0).cpu().numpy()
            ref = case.label
            scored = pred if self.ctx.ignore_index is None else np.where(ref == self.ctx.ignore_index, 0, pred)
            for c in range(1, self.ctx.num_classes):  # unannotated voxels count for nothing
                scores.append(dice(scored == c, ref == c))
            if i == 0 and self.tb is not None:
                self._log_overlay(case, pred, epoch)
        return float(np.mean(scores)) if scores else float("nan")

    def _log_overlay(self, case, pred, epoch: int) -> None:
        try:
            from mnseg.reporting.report import overlay_rgb
        except ImportError:
            return
        z = int(np.argmax((case.label > 0).sum(axis=(0, 1)))) if case.label is not None else case.image.shape[-1] // 2
        img = case.image[0, :, :, z]
        truth = overlay_rgb(img, case.label[:, :, z], self.ctx.num_classes)
        guess = overlay_rgb(img, pred[:, :, z], self.ctx.num_classes)
        picture = np.concatenate([truth, guess], axis=1)
        self.tb.add_image("val/truth_vs_prediction", picture, epoch + 1, dataformats="HWC")

    # ------------------------------------------------------------------ checkpoints
    def _save(self, tag: str) -> None:
        """Called on every rank (their RNG states are gathered); rank 0 writes."""
        rngs = distributed.gather_objects(rng_state(), self.dist)
        if not self.is_main:
            return
        models = {r: unwrap(m).state_dict() for r, m in self.models.items()}
        save_weights(weights_path(self.run.path, tag), models, self.start_epoch)  # what predict and export read
        save_checkpoint(
            self.run.checkpoint(tag),
            epoch=self.start_epoch,
            models=models,
            optimizers={r: o.state_dict() for r, o in self.optimizers.items()},
            schedulers={r: s.state_dict() for r, s in self.schedulers.items()},
            method=self.method.extra_state(),
            batcher=self.batcher.state(),
            rng=rngs[0],
            rng_ranks=rngs if self.dist.enabled else None,
            best_metric=self.best_metric,
            config=self.cfg.to_dict(),
        )

    def _load(self, tag: str) -> None:
        ckpt = load_checkpoint(self.run.checkpoint(tag), map_location=self.device)
        for role, model in self.models.items():
            unwrap(model).load_state_dict(ckpt["models"][role])
        for role, opt in self.optimizers.items():
            opt.load_state_dict(ckpt["optimizers"][role])
        for role, sched in self.schedulers.items():
            sched.load_state_dict(ckpt["schedulers"][role])
        self.method.load_extra_state(ckpt.get("method", {}))
        self.batcher.load_state(ckpt["batcher"])
        self.start_epoch = int(ckpt["epoch"])
        per_rank = ckpt.get("rng_ranks")
        if per_rank and len(per_rank) == self.dist.world_size:
            set_rng_state(per_rank[self.dist.rank])
        else:
            set_rng_state(ckpt["rng"])
            if self.dist.enabled:  # saved by a different number of processes: fresh per-rank streams
                self._seed_rank(self.start_epoch)
        self.best_metric = float(ckpt["best_metric"])
