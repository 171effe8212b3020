"""Prediction from a run directory: load the trained model(s), predict volumes, write NIfTI in original geometry."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mnseg.config import Config, read_yaml
from mnseg.engine.build import build_model, resolve_device
from mnseg.engine.checkpoint import load_checkpoint
from mnseg.errors import InputFileError, MnsegError


def predict_probabilities(models, image: torch.Tensor, cfg: Config, device: torch.device) -> torch.Tensor:
    """Sliding-window softmax probabilities (K, X, Y, Z) of one preprocessed image (C, X, Y, Z); several models
    (an ensemble, e.g. M&N's 2D and 3D models) are averaged."""
    from mnseg.inference import average_probabilities, sliding_window_probabilities

    models = models if isinstance(models, list | tuple) else [models]
    probs = [
        sliding_window_probabilities(
            m,
            image,
            tuple(cfg.data.patch_size),
            overlap=cfg.infer.overlap,
            blend=cfg.infer.blend,
            mirror_tta=cfg.infer.mirror_tta,
            sw_batch_size=cfg.infer.sw_batch_size,
            amp=cfg.train.amp and device.type == "cuda",
            device=device,
        )
        for m in models
    ]
    return probs[0] if len(probs) == 1 else average_probabilities(probs)


@dataclass
class LoadedRun:
    cfg: Config
    plans: dict
    method: object
    models: list
    device: torch.device


def load_run(
    run_dir: str | Path, checkpoint: str = "best", device: str = "auto", model: str | None = None
) -> LoadedRun:
    """Rebuild the method's models from the run's config and load a checkpoint ('best' falls back to 'last')."""
    from mnseg.methods import method_class
    from mnseg.methods.base import MethodContext

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise MnsegError(f"{run_dir}: not an mnseg run directory (no config.yaml)")
    cfg = Config.from_dict(read_yaml(run_dir / "config.yaml"))
    plans = json.loads((run_dir / "plans.json").read_text())
    path = run_dir / "checkpoints" / f"{checkpoint}.pt"
    if checkpoint == "best" and not path.exists():
        path = run_dir / "checkpoints" / "last.pt"
    dev = resolve_device(device)
    ckpt = load_checkpoint(path, map_location="cpu")
    cls = method_class(cfg.method.name)
    ctx = MethodContext(
        plans["num_classes"],
        plans["in_channels"],
        plans["ignore_label"],
        cfg.train.batch_size,
        cfg.train.epochs,
        cfg.train.iters_per_epoch,
        0,
        0,
        dev,
    )
    method = cls(cfg, ctx)
    models = {r: build_model(cfg.models[r], plans["in_channels"], plans["num_classes"]) for r in cls.default_models}
    method.attach(models, {}, {})  # before loading weights, so a method's setup() cannot overwrite them
    for role, m in models.items():
        m.load_state_dict(ckpt["models"][role])
        m.to(dev).eval()
    method.load_extra_state(ckpt.get("method", {}))
    predictor = method.predictor(model or cfg.infer.model)
    return LoadedRun(cfg, plans, method, predictor if isinstance(predictor, list) else [predictor], dev)


def predict_case(run: LoadedRun, case_id: str, image_paths: list[Path]) -> tuple[np.ndarray, np.ndarray, object]:
    """Returns (labels in the original grid, probabilities in the original grid (K, ...), the source Volume)."""
    from mnseg.data.io import load_nifti
    from mnseg.data.preprocess import PreprocessSettings, preprocess_case, restore_probabilities

    settings = PreprocessSettings.from_dict(run.plans["preprocess"])
    target = tuple(run.plans["target_spacing"]) if run.plans["target_spacing"] else None
    pre = preprocess_case(case_id, image_paths, None, settings, run.plans["modality"], target)
    with torch.no_grad():
        probs = predict_probabilities(run.models, torch.from_numpy(pre.image), run.cfg, run.device)
    probs_orig = restore_probabilities(probs.float().cpu().numpy(), pre.geometry)
    labels = probs_orig.argmax(0).astype(np.uint8 if run.plans["num_classes"] < 256 else np.int16)
    return labels, probs_orig, load_nifti(image_paths[0], dtype=None)


def group_input_images(
    in_dir: Path, file_ending: str, num_channels: int, problems: list[tuple[str, str]] | None = None
) -> dict[str, list[Path]]:
    """CASE_0000.nii.gz (+ _0001, ...) -> {CASE: [paths]}; plain CASE.nii.gz accepted for one channel.

    A case with missing or extra channels raises ``InputFileError``, or, when a ``problems`` list is given,
    is left out and recorded there as (case, message) so the other cases can still be predicted.
    """
    groups: dict[str, dict[int, Path]] = {}
    for path in sorted(in_dir.iterdir()):
        if not path.name.endswith(file_ending) or path.name.startswith("."):
            continue
        stem = path.name[: -len(file_ending)]
        if len(stem) > 5 and stem[-5] == "_" and stem[-4:].isdigit():
            groups.setdefault(stem[:-5], {})[int(stem[-4:])] = path
        elif num_channels == 1:
            groups.setdefault(stem, {})[0] = path
    out = {}
    for case, chans in groups.items():
        if sorted(chans) != list(range(num_channels)):
            names = ", ".join(chans[c].name for c in sorted(chans))
            msg = (f"{in_dir}: case {case} has channel(s) {sorted(chans)} ({names}); the model expects "
                   f"{num_channels} channel(s) numbered 0..{num_channels - 1}")
            if problems is None:
                raise InputFileError(msg)
            problems.append((case, msg))
            continue
        out[case] = [chans[i] for i in range(num_channels)]
    return out


def predict_folder(
    run: LoadedRun,
    in_dir: str | Path,
    out_dir: str | Path,
    overwrite: bool = False,
    save_probabilities: bool = False,
    progress: bool = True,
    log=print,
) -> list[tuple[str, str]]:
    """Predict every case in ``in_dir`` into ``out_dir``; returns the failures (case, message), others still done."""
    from tqdm import tqdm

    from mnseg.data.io import save_nifti

    in_dir, out_dir = Path(in_dir).resolve(), Path(out_dir).resolve()
    if not in_dir.is_dir():
        raise MnsegError(f"{in_dir}: input folder not found")
    if out_dir == in_dir or in_dir in out_dir.parents:
        raise MnsegError(f"{out_dir}: refusing to write predictions into the input folder {in_dir}")
    ending = run.plans.get("file_ending", ".nii.gz")
    failures: list[tuple[str, str]] = []
    cases = group_input_images(in_dir, ending, run.plans["in_channels"], problems=failures)
    for case_id, msg in failures:
        log(f"failed: {case_id}: {msg}")
    if not cases and not failures:
        raise MnsegError(f"{in_dir}: no images ending in {ending}")
    if not overwrite:
        existing = [c for c in cases if (out_dir / f"{c}{ending}").exists()]
        if existing:
            raise MnsegError(
                f"{out_dir}: predictions exist for {', '.join(existing[:5])}"
                f"{' ...' if len(existing) > 5 else ''}; use --overwrite to replace them"
            )
    out_dir.mkdir(parents=True, exist_ok=True)
    for case_id, paths in tqdm(cases.items(), desc="predict", disable=not progress, file=__import__("sys").stderr):
        try:
            labels, probs, source = predict_case(run, case_id, paths)
            save_nifti(labels, source.affine, out_dir / f"{case_id}{ending}", header=source.header, dtype=labels.dtype)
            if save_probabilities:
                save_nifti(
                    np.moveaxis(probs, 0, -1).astype(np.float32),
                    source.affine,
                    out_dir / "probabilities" / f"{case_id}{ending}",  # beside, not among, the masks
                )
        except MnsegError as exc:
            failures.append((case_id, str(exc)))
            log(f"failed: {case_id}: {exc}")
        except OSError as exc:  # disk full, read-only: every later case would fail too, so stop here
            from mnseg.utils.preflight import describe_os_error

            raise MnsegError(
                f"{out_dir}: cannot write the prediction of case {case_id} ({describe_os_error(exc)}); "
                f"predictions already written are complete and kept"
            ) from None
    return failures
