"""The one pipeline: train -> predict the test cases -> evaluate them, with one resume rule.

``mnseg train``, the benchmark (one call per grid cell) and the demo (one call per method) all run it. The resume
rule is the run directory's (``RunDir.can_resume``): a run with ``checkpoints/last.pt`` continues from it, and one
that has trained all its epochs is not set up again (only tested); anything else starts (again). ``mnseg train``
says itself whether it resumes (``--resume``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from mnseg.engine.run_dir import RunDir, is_rank_zero
from mnseg.errors import MnsegError


@dataclass
class PipelineResult:
    run_dir: Path
    trained: bool = False  # False: nothing was left to train
    tested: bool = False  # False: no test asked for, no imagesTs, or not rank 0 under torchrun
    summary: dict | None = None  # the test summary (None: no labelsTs to score against)
    failures: list[tuple[str, str]] = field(default_factory=list)  # test cases whose prediction failed
    test_seconds: float = 0.0  # predicting and scoring the test cases


def train_run(cfg, run_dir: str | Path, resume: bool | None = None, overwrite: bool | None = None, hooks=(),
              progress: bool = True, log=print):
    """Train (or continue) one run; returns the trainer, or None when the run had nothing left to train.

    ``resume`` None: by the resume rule (a run that trained all its epochs is not set up again); True: continue
    from last.pt, which is read even when no epoch is left. ``overwrite`` None: a run that does not resume may
    replace what a run that died before its first checkpoint left (nothing worth keeping)."""
    from mnseg.engine.trainer import Trainer
    from mnseg.reporting.tensorboard import OverlayHook

    run = RunDir(run_dir)
    if resume is None:  # the resume rule; an explicit resume (mnseg train --resume) always loads last.pt
        resume = run.can_resume()
        if resume and run.trained(cfg.train.epochs):
            return None
    overwrite = not resume if overwrite is None else overwrite
    from mnseg.engine.hooks import TimingHook

    if not any(isinstance(h, TimingHook) for h in hooks):  # every run records its time (the benchmark: shared)
        hooks = [TimingHook(), *hooks]
    trainer = Trainer(cfg, run_dir, resume=resume, overwrite=overwrite, progress=progress, log=log,
                      hooks=[OverlayHook(), *hooks])
    trainer.fit()
    return trainer


def test_run(run_dir: str | Path, dataset: str | Path, device: str = "auto", checkpoint: str = "best",
             progress: bool = True, log=print) -> PipelineResult:
    """Predict the dataset's imagesTs with the run's model into ``test_predictions/`` and score them against
    labelsTs when it exists (``metrics.csv``, ``summary.json`` beside the masks)."""
    from mnseg.data.dataset import DatasetFolder
    from mnseg.evaluation.folders import evaluate_folders
    from mnseg.inference.predict import load_run, predict_folder

    root = DatasetFolder(dataset).root
    result = PipelineResult(Path(run_dir))
    images, labels = root / "imagesTs", root / "labelsTs"
    if not images.is_dir():
        log("no imagesTs: nothing to test")
        return result
    out = RunDir(run_dir).test_predictions
    run = load_run(run_dir, checkpoint, device)
    result.failures = predict_folder(run, images, out, overwrite=True, progress=progress, log=log)
    result.tested = True
    if labels.is_dir():
        result.summary = evaluate_folders(out, labels, dataset_json=root / "dataset.json", out_dir=out)
    return result


def run_pipeline(cfg, run_dir: str | Path, test: bool = True, checkpoint: str = "best", resume: bool | None = None,
                 overwrite: bool | None = None, hooks=(), strict: bool = True, show_summary: bool = True,
                 progress: bool = True, log=print) -> PipelineResult:
    """Train -> predict -> evaluate. ``strict``: a test case whose prediction failed is an error (else it is in
    ``failures``); ``show_summary``: log the test table."""
    from mnseg.evaluation.folders import format_summary_table

    trainer = train_run(cfg, run_dir, resume=resume, overwrite=overwrite, hooks=hooks, progress=progress, log=log)
    result = PipelineResult(Path(run_dir), trained=trainer is not None)
    if not (trainer.is_main if trainer is not None else is_rank_zero()):  # under torchrun rank 0 alone tests
        return result
    log(f"done: {run_dir}")
    if not test:
        return result
    started = time.time()
    tested = test_run(run_dir, cfg.data.dataset, cfg.train.device, checkpoint, progress=progress, log=log)
    tested.trained, tested.test_seconds = result.trained, time.time() - started
    if strict and tested.failures:
        raise MnsegError(f"prediction failed for {len(tested.failures)} test case(s): "
                         + "; ".join(f"{case}: {msg}" for case, msg in tested.failures))
    if show_summary and tested.summary is not None:
        log(format_summary_table(tested.summary))
    return tested
