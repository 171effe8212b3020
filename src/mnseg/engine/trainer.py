"""The trainer: runs any method's steps with devices, AMP, optimisers, schedules; the rest is hooks.

``fit`` is an outline of hook calls (``engine/hooks.py``): ``before_train`` -> per epoch ``before_epoch``,
``method.on_epoch_start``, steps (``method.batch_split``, ``method.training_step``, optimiser steps for
``method.active_roles``, ``method.after_optimizer_step``, ``after_step``), ``after_epoch`` -> ``after_train``.
History, TensorBoard, validation with the best checkpoint and checkpoints are the default hooks; callers add
others (timing, pictures) with ``hooks=``.

Under torchrun (WORLD_SIZE > 1, see ``engine/distributed.py``) every rank draws the same global batch
and trains on its slice; trained roles are wrapped in DistributedDataParallel (frozen roles such as EMA
teachers never are); rank 0 alone prepares the cache, writes the run directory, validates and logs.
"""

from __future__ import annotations

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
    add_method_roles,
    build_augmenter,
    build_method,
    build_optimizer,
    labelled_class_shares,
    place_model,
    resolve_device,
    resolve_input_ranges,
    to_channels_last,
)
from mnseg.engine.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state, unwrap
from mnseg.engine.hooks import Hook, default_hooks
from mnseg.engine.pretrained import check_init_files, init_models
from mnseg.engine.run_dir import RunDir
from mnseg.engine.schedules import current_lr, make_scheduler
from mnseg.engine.weights import save_weights
from mnseg.errors import MnsegError
from mnseg.methods.base import Batch
from mnseg.models.compiled import compile_forward
from mnseg.utils.precision import bf16_autocast


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


def backward_and_step(loss: torch.Tensor, models: dict, optimizers: dict, roles, model_cfgs: dict) -> None:
    """The optimiser half of a training step: backward, each role's gradient clipping (``optim.grad_clip``) and
    optimiser step. The trainer's step and the speed harness (``benchmarks/speed_harness.py``) both use it."""
    loss.backward()
    for role in roles:
        clip = model_cfgs[role].optim.grad_clip
        if clip:
            torch.nn.utils.clip_grad_norm_(models[role].parameters(), clip)
        optimizers[role].step()


class EpochStats:
    """What one epoch adds up: losses and logs (kept on the device: no host sync per step), the batch split,
    skipped steps, and the window of losses not yet checked for finiteness."""

    def __init__(self, device: torch.device):
        self.sums: dict[str, torch.Tensor | float] = {}
        self.seen: dict[str, int] = {}
        self.b_l = self.b_u = self.skipped = 0
        self.device = device
        self.reset_window(0)
        self.t0 = time.time()

    def reset_window(self, start: int) -> None:
        self.window, self.window_start = torch.zeros((), device=self.device), start

    def add(self, loss: torch.Tensor, logs: dict) -> None:
        self.window = self.window + loss
        self.sums["loss"] = self.sums.get("loss", 0.0) + loss
        self.seen["loss"] = self.seen.get("loss", 0) + 1
        for k, v in logs.items():
            self.sums[k] = self.sums.get(k, 0.0) + (v.detach() if torch.is_tensor(v) else v)
            self.seen[k] = self.seen.get(k, 0) + 1  # a log present in some steps only is averaged over those


class Trainer:
    def __init__(
        self,
        cfg: Config,
        run_dir: str | Path,
        resume: bool = False,
        overwrite: bool = False,
        progress: bool = True,
        log=print,
        hooks: list[Hook] = (),
    ):
        self.cfg, self.run, self.resume, self.progress, self.log = cfg, RunDir(run_dir), resume, progress, log
        self.overwrite = overwrite
        self.history: list[dict] = []
        self.start_epoch = 0
        self.best_metric = -math.inf
        self.tb = None
        self.dist = distributed.DistContext()
        self.hooks: list[Hook] = []
        for hook in [*default_hooks(), *hooks]:
            hook.trainer = self
            self.hooks.append(hook)

    @property
    def is_main(self) -> bool:
        """True for the one process that writes files and prints (always, without torchrun)."""
        return self.dist.is_main

    def _call(self, event: str, *args) -> None:
        for hook in self.hooks:
            getattr(hook, event)(*args)

    # ------------------------------------------------------------------ set-up
    def setup(self) -> None:
        cfg = self.cfg
        check_config(cfg)  # before anything is written
        if not self.resume:
            check_init_files(cfg)
        self.dist = distributed.init_from_env(resolve_device(cfg.train.device))
        self.device = self.dist.device
        distributed.check_batch_divisible(cfg.train.batch_size, self.dist)
        if not self.is_main:
            self.progress, self.log = False, _quiet
        self._prepare_data()
        self._build_method()
        self._build_batcher()
        if self.dist.enabled:
            self._seed_rank(0)
        if self.resume:
            self._load("last")
        self.history = [r for r in self.run.history_rows() if int(r["epoch"]) < self.start_epoch]
        self.log(
            f"run {self.run.path}: method {self.method.name}, {len(self.data.labeled)} labelled / "
            f"{len(self.data.unlabeled)} unlabelled / {len(self.data.val)} validation cases"
            + (f" / {len(self.data.target)} target-domain cases" if self.data.target else "")
            + f", device {self.device}"
            + (f" x {self.dist.world_size} processes" if self.dist.enabled else "")
            + (f", resuming at epoch {self.start_epoch + 1}" if self.resume else "")
        )

    def _prepare_data(self) -> None:
        """The run directory (new, or the resumed one's split and plans) and the preprocessed cases. Rank 0 fills
        the preprocessing cache and writes the split; the others then read both."""
        from mnseg.engine.data_setup import prepare_data

        cfg, run = self.cfg, self.run
        if self.resume:
            run.require_resumable()
            split_dict, plans = run.read_split(), run.read_plans()
        else:
            if self.is_main:
                run.create(overwrite=self.overwrite)
            split_dict, plans = None, None
        seed_everything(cfg.train.seed, cfg.train.deterministic)
        if self.is_main:
            self.data = prepare_data(cfg, split_dict, plans, progress=self.progress)
            if not self.resume:
                resolve_input_ranges(cfg, self.data.plans)
                add_method_roles(cfg)
                run.write_start(cfg.to_yaml(), self.data.plans, self.data.split.to_json_dict())
                env = f"{self.device}" + (f" x {self.dist.world_size} processes (DDP)" if self.dist.enabled else "")
                run.write_env(env)
        distributed.barrier(self.dist)
        if not self.is_main:
            self.data = prepare_data(cfg, run.read_split(), run.read_plans(), progress=False)
            if not self.resume:
                resolve_input_ranges(cfg, self.data.plans)

    def _build_method(self) -> None:
        """The method, its models on the device (compiled if asked), one optimiser and schedule per trained role."""
        cfg = self.cfg
        plans = self.data.plans
        shares = labelled_class_shares([c.label for c in self.data.labeled], plans["num_classes"],
                                       plans["ignore_label"])
        self.method, models = build_method(cfg, plans, self.device, len(self.data.labeled),
                                           len(self.data.unlabeled), shares)
        self.ctx = self.method.ctx
        if not self.resume:  # a resumed run has its own weights in last.pt
            init_models(cfg, models, self.log)
        self.models = {role: place_model(m, cfg.models[role], cfg.train, self.device) for role, m in models.items()}
        if cfg.train.compile:
            for model in self.models.values():
                compile_forward(model, cfg.train.compile_mode)
        self.optimizers, self.schedulers = {}, {}
        for role, model in self.models.items():
            if role in self.method.frozen_roles:
                model.requires_grad_(False)
                continue
            self.optimizers[role] = build_optimizer(model, cfg.models[role].optim, self.device)
            self.schedulers[role] = make_scheduler(self.optimizers[role], self.method.schedule_segments(role))
            self.models[role] = distributed.wrap_ddp(model, self.dist)
        augmenters = {role: build_augmenter(cfg.models[role]) for role in self.models}
        self.method.attach(self.models, augmenters, self.optimizers)

    def _build_batcher(self) -> None:
        from mnseg.data.loader import PatchBatcher, to_memory_case

        cfg = self.cfg
        rng = np.random.default_rng(cfg.train.seed)
        ignore = self.data.plans["ignore_label"]
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
        # domain adaptation: imagesTarget crops from a batcher of their own (a stream of its own, so the source
        # patches are those of the same run without adaptation); no target case carries a label
        self.target_batcher = PatchBatcher(
            [], [to_memory_case(c, ignore, rng, aim=False) for c in self.data.target], cfg.data.patch_size,
            cfg.data.fg_prob, ignore, cfg.train.seed + 2, cfg.data.class_balanced,
        ) if self.data.target else None

    def _seed_rank(self, epoch: int) -> None:
        """Different torch streams per rank (augmentation, noise); the patch batcher stays shared."""
        torch.manual_seed(self.cfg.train.seed + 104729 * (self.dist.rank + 1) + 7919 * epoch)

    # ------------------------------------------------------------------ loop
    def fit(self) -> dict:
        if not hasattr(self, "method"):
            self.setup()
        completed = False
        try:
            self._call("before_train")
            for epoch in range(self.start_epoch, self.cfg.train.epochs):
                self._train_epoch(epoch)
            completed = True
        finally:
            self._call("after_train")
            if completed:  # every rank done before any tears the group down (gloo's threads abort on a closed peer)
                distributed.barrier(self.dist)
            distributed.shutdown(self.dist)
        return self.history[-1] if self.history else {}

    def _autocast(self):
        return bf16_autocast(self.device, self.cfg.train.amp, self.cfg.train.cpu_amp)

    def _train_epoch(self, epoch: int) -> None:
        from mnseg.utils.progress import progress_bar

        cfg, method = self.cfg, self.method
        self._call("before_epoch", epoch)
        method.on_epoch_start(epoch)
        active = method.active_roles(epoch)
        for role, model in self.models.items():
            model.train(role in active)
        stats = EpochStats(self.device)
        bar = progress_bar(
            range(cfg.train.iters_per_epoch),
            desc=f"epoch {epoch + 1}/{cfg.train.epochs} [{method.phase(epoch)}]",
            leave=False,
            disable=not self.progress,
            dynamic_ncols=True,
        )
        for it in bar:
            self._step(epoch, it, active, stats, bar)
        bar.close()
        if stats.skipped == cfg.train.iters_per_epoch:
            raise NonFiniteLossError(
                f"every step of epoch {epoch + 1} had a non-finite loss and was skipped; the run stops here and keeps "
                f"its last good checkpoint ({self.run.checkpoint('last')}). Try a lower learning rate."
            )
        row = self._epoch_row(epoch, stats)
        self.start_epoch = epoch + 1
        self._call("after_epoch", epoch, row)

    def _next_batch(self, b_l: int, b_u: int) -> Batch:
        from mnseg.data.loader import batch_to_device, shard_batch

        arrays = shard_batch(self.batcher.next_batch(b_l, b_u), self.dist.rank, self.dist.world_size)
        t = batch_to_device(arrays, self.device)
        # Equal shards on every process (each then makes the same loss calls): batch Dice pools over them all, as
        # one process with the whole batch; otherwise each process pools its own items.
        even = b_l % self.dist.world_size == 0 and b_u % self.dist.world_size == 0
        reduce_sums = distributed.loss_sums(self.dist) if even else None
        image_t = None
        if self.target_batcher is not None:
            b_t = self.cfg.domain.target_batch_size or self.cfg.train.batch_size
            crops = shard_batch(self.target_batcher.next_batch(0, b_t), self.dist.rank, self.dist.world_size)
            image_t = batch_to_device({"image_t": crops["image_u"]}, self.device)["image_t"]
        image_l, image_u = t["image_l"], t["image_u"]
        if self.cfg.train.channels_last:
            image_l, image_u = to_channels_last(image_l), to_channels_last(image_u)
            image_t = None if image_t is None else to_channels_last(image_t)
        return Batch(image_l, t["label_l"], image_u, t.get("label_u"), image_t=image_t, reduce_sums=reduce_sums)

    def _step(self, epoch: int, it: int, active: list[str], stats: EpochStats, bar) -> None:
        """One training step: batch, the method's loss, backward, optimiser and schedule steps, NaN checks."""
        cfg, method = self.cfg, self.method
        b_l, b_u = method.batch_split(epoch, it)
        stats.b_l += b_l
        stats.b_u += b_u
        batch = self._next_batch(b_l, b_u)
        for role in active:
            self.optimizers[role].zero_grad(set_to_none=True)
        with self._autocast():
            out = method.training_step(batch, epoch, it)
        loss = out.loss.detach().float()
        check_every = max(int(cfg.train.check_every), 1)
        per_step_check = check_every == 1 or cfg.train.on_nan == "skip"
        check_now = per_step_check or (it + 1) % check_every == 0 or it == cfg.train.iters_per_epoch - 1
        if per_step_check:
            # The global mean (every rank holds equally many items), so all ranks take the same decision.
            loss_value = distributed.mean_over_ranks(float(loss), self.dist)
            if not math.isfinite(loss_value):
                if cfg.train.on_nan != "skip":
                    raise self._non_finite(loss_value, epoch, f"iteration {it + 1}")
                stats.skipped += 1
                self._step_schedulers()
                return
        backward_and_step(out.loss, self.models, self.optimizers, active, cfg.models)
        self._step_schedulers()
        method.after_optimizer_step(epoch, it)
        stats.add(loss, out.logs)
        if check_now and not per_step_check:
            # Deferred check (train.check_every > 1): one sync per window; a non-finite window stops the run
            # before anything is saved, so the checkpoint on disk stays the last good one.
            value = distributed.mean_over_ranks(float(stats.window), self.dist)
            if not math.isfinite(value):
                raise self._non_finite(value, epoch, f"iterations {stats.window_start + 1}-{it + 1}")
            stats.reset_window(it + 1)
        if check_now and self.progress:
            bar.set_postfix(loss=f"{float(loss):.4f}", b_u=b_u)
        self._call("after_step", epoch, it)

    def _epoch_row(self, epoch: int, stats: EpochStats) -> dict:
        iters = self.cfg.train.iters_per_epoch
        row = {"epoch": epoch, "phase": self.method.phase(epoch)}
        row.update({k: round(v, 6) for k, v in distributed.merge_sums(stats.sums, stats.seen, self.dist).items()})
        for role, opt in self.optimizers.items():
            row[f"lr_{role}"] = current_lr(opt)
        row["b_l"] = round(stats.b_l / iters, 3)
        row["b_u"] = round(stats.b_u / iters, 3)
        row["skipped_steps"] = stats.skipped
        row["seconds"] = round(time.time() - stats.t0, 2)
        return row

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

    # ------------------------------------------------------------------ checkpoints
    def save(self, tag: str) -> None:
        """Called on every rank (their RNG states are gathered); rank 0 writes."""
        rngs = distributed.gather_objects(rng_state(), self.dist)
        if not self.is_main:
            return
        models = {r: unwrap(m).state_dict() for r, m in self.models.items()}
        save_weights(self.run.weights(tag), models, self.start_epoch)  # what predict and export read
        save_checkpoint(
            self.run.checkpoint(tag),
            epoch=self.start_epoch,
            models=models,
            optimizers={r: o.state_dict() for r, o in self.optimizers.items()},
            schedulers={r: s.state_dict() for r, s in self.schedulers.items()},
            method=self.method.extra_state(),
            batcher=self.batcher.state(),
            **({"target_batcher": self.target_batcher.state()} if self.target_batcher is not None else {}),
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
        if self.target_batcher is not None and "target_batcher" in ckpt:
            self.target_batcher.load_state(ckpt["target_batcher"])
        self.start_epoch = int(ckpt["epoch"])
        per_rank = ckpt.get("rng_ranks")
        if per_rank and len(per_rank) == self.dist.world_size:
            set_rng_state(per_rank[self.dist.rank])
        else:
            set_rng_state(ckpt["rng"])
            if self.dist.enabled:  # saved by a different number of processes: fresh per-rank streams
                self._seed_rank(self.start_epoch)
        self.best_metric = float(ckpt["best_metric"])
