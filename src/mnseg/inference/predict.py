"""Prediction from a run directory: load the trained model(s), predict volumes, write NIfTI in original geometry."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mnseg.config.schema import Config
from mnseg.engine.build import build_augmenter, build_method, place_model, resolve_device
from mnseg.errors import ConfigError, InputFileError, MnsegError
from mnseg.inference.window import WindowSettings, average_probabilities, sliding_window_probabilities


def predict_probabilities(
    models, image: torch.Tensor, window: WindowSettings, device: torch.device, mirror_axes: Sequence | None = None
) -> torch.Tensor:
    """Sliding-window softmax probabilities (K, X, Y, Z) of one preprocessed image (C, X, Y, Z); several models
    (an ensemble, e.g. M&N's 2D and 3D models) are averaged.

    ``mirror_axes`` gives, per model, the spatial axes whose flips are averaged (``()``: no mirroring); without
    it ``window.mirror_tta`` mirrors over every axis.
    """

    models = list(models) if isinstance(models, list | tuple) else [models]
    if mirror_axes is not None:
        if len(mirror_axes) != len(models):
            raise ValueError(f"{len(mirror_axes)} mirror-axes entries given for {len(models)} model(s)")
        models = [MirrorAveraged(m, axes) if axes else m for m, axes in zip(models, mirror_axes)]
    probs = [
        sliding_window_probabilities(
            m,
            image,
            window.patch_size,
            overlap=window.overlap,
            blend=window.blend,
            mirror_tta=window.mirror_tta if mirror_axes is None else False,
            sw_batch_size=window.sw_batch_size,
            amp=window.amp,
            cpu_amp=window.cpu_amp,
            device=device,
            channels_last=window.channels_last,
        )
        for m in models
    ]
    return probs[0] if len(probs) == 1 else average_probabilities(probs)


class MirrorAveraged(nn.Module):
    """Mirror test-time augmentation over chosen spatial axes only (every subset of them is flipped).

    Returns the log of the flip-averaged softmax, so the window loop's softmax gives back exactly that average.
    """

    def __init__(self, model: nn.Module, axes: Sequence[int]):
        super().__init__()
        self.model = model
        self.axes = tuple(sorted(set(int(a) for a in axes)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = [a + 2 for a in self.axes]  # (B, C, *spatial)
        flips = [s for r in range(len(dims) + 1) for s in itertools.combinations(dims, r)]
        total = None
        for flip in flips:
            logits = self.model(x.flip(flip) if flip else x)
            if isinstance(logits, list | tuple):  # deep supervision: the full-resolution head comes first
                logits = logits[0]
            probs = torch.softmax(logits.float(), dim=1)
            probs = probs.flip(flip) if flip else probs
            total = probs if total is None else total + probs
        return torch.log((total / len(flips)).clamp_min(torch.finfo(torch.float32).tiny))


@dataclass
class LoadedRun:
    cfg: Config
    plans: dict
    method: object
    models: list
    device: torch.device
    roles: list = field(default_factory=list)  # the role of each model in ``models``
    mirror_axes: list = field(default_factory=list)  # per model: spatial axes mirrored at test time (() = none)
    adapter: object = None  # test-time adaptation on each scan (``inference/adapt.py``); None: the loaded model


def training_flip_axes(
    cfg: Config,
    role: str,
    frozen_roles: Sequence[str] = (),
    augmented_as: dict[str, str] | None = None,
    slice_augmented: Sequence[str] = (),
) -> tuple[int, ...]:
    """Spatial axes the model of ``role`` saw flipped in training (its augment preset plus overrides).

    A frozen role (an EMA teacher) is never augmented itself: its weights average the trained roles', so it
    gets the flips every trained role had. ``augmented_as`` maps a role to the role whose augmentation its
    inputs got (CPS: both networks see net_a's augmented batch). A role in ``slice_augmented`` (sparse2dense's
    teacher) is augmented on its 2D slices: its flip axes 0 and 1 are the slice's, i.e. the two volume axes
    other than its ``slice_axis``.
    """
    augmented_as = augmented_as or {}
    if role not in cfg.models:  # not one of the run's configured models: nothing known about its training
        return ()
    if role in frozen_roles:
        trained = [r for r in cfg.models if r not in frozen_roles]
        sets = [set(training_flip_axes(cfg, r, (), augmented_as, slice_augmented)) for r in trained]
        return tuple(sorted(set.intersection(*sets))) if sets else ()
    source = augmented_as.get(role, role)
    axes = build_augmenter(cfg.models[source]).config.flip_axes
    if role in slice_augmented:
        in_plane = [a for a in range(3) if a != cfg.models[role].slice_axis % 3]
        axes = [in_plane[a] for a in axes if a < 2]
    return tuple(sorted(set(axes)))


def configure_tta(
    run: LoadedRun, axes: Sequence[int] | None = None, log: Callable[[str], object] = print
) -> list[tuple[int, ...]]:
    """Turn mirror TTA on for ``run``: over ``axes`` if given, else over each model's own training flips.

    Mirroring over flips a model never saw in training feeds it out-of-distribution inputs and costs accuracy
    (0.06 white-matter Dice on the demo), so a model trained without flips is predicted unmirrored, with a
    warning through ``log``. Returns (and stores in ``run.mirror_axes``) the axes chosen per model.
    """
    spatial_dims = len(run.cfg.data.patch_size)
    if axes is not None:
        chosen = tuple(sorted(set(int(a) for a in axes)))
        bad = [a for a in chosen if not 0 <= a < spatial_dims]
        if bad:
            raise ConfigError(f"TTA axes {bad} do not exist: the volumes have spatial axes 0..{spatial_dims - 1}")
        run.mirror_axes = [chosen] * len(run.models)
        return run.mirror_axes
    frozen = tuple(getattr(run.method, "frozen_roles", ()))
    augmented_as = dict(getattr(run.method, "augmented_as", {}))
    in_slices = tuple(getattr(run.method, "slice_augmented", ()))
    run.mirror_axes = [training_flip_axes(run.cfg, role, frozen, augmented_as, in_slices) for role in run.roles]
    for role, chosen in zip(run.roles, run.mirror_axes):
        if not chosen:
            preset = run.cfg.models[role].augment.preset if role in run.cfg.models else "unknown"
            log(
                f"warning: TTA: model '{role}' was trained without flips (augment preset '{preset}'), so mirrored "
                f"inputs would be out of its training distribution and lower its accuracy; predicting it without "
                f"mirroring. Give --tta-axes 0,1,2 to mirror anyway."
            )
    return run.mirror_axes


def load_run(
    run_dir: str | Path, checkpoint: str = "best", device: str = "auto", model: str | None = None
) -> LoadedRun:
    """Rebuild the method's models from a run directory ('best' falls back to 'last') or an exported model zip.

    Only the safe files are read (config, plans, safetensors weights: ``engine/weights.py``), never a pickle.
    """
    from mnseg.engine.weights import open_model

    files = open_model(run_dir, checkpoint)
    cfg, plans = Config.from_dict(files.config), files.plans
    dev = resolve_device(device)
    method, models = build_method(cfg, plans, dev)
    method.attach(models, {}, {})  # before loading weights, so a method's setup() cannot overwrite them
    for role, m in models.items():
        if role not in files.weights:
            raise MnsegError(f"{files.source}: no weights for model '{role}' (has {', '.join(files.weights)})")
        try:
            m.load_state_dict(files.weights[role])
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()
            raise MnsegError(f"{files.source}: weights of model '{role}' do not fit its config ({first[0]})") from None
        place_model(m, cfg.models[role], cfg.train, dev).eval()  # the run's speed options, as in training
    predictor = method.predictor(model or cfg.infer.model)
    predictors = predictor if isinstance(predictor, list) else [predictor]
    roles = [next((r for r, m in models.items() if m is p), None) for p in predictors]
    run = LoadedRun(cfg, plans, method, predictors, dev, roles, [()] * len(predictors))
    if cfg.infer.mirror_tta:  # asked for in the run's config: mirror as the models were trained
        configure_tta(run, log=lambda message: None)
    return run


def predict_case(run: LoadedRun, case_id: str, image_paths: list[Path]) -> tuple[np.ndarray, np.ndarray, object]:
    """Returns (labels in the original grid, probabilities in the original grid (K, ...), the source Volume)."""
    from mnseg.data.io import load_nifti
    from mnseg.data.preprocess import PreprocessSettings, preprocess_case, restore_probabilities

    settings = PreprocessSettings.from_dict(run.plans["preprocess"])
    target = tuple(run.plans["target_spacing"]) if run.plans["target_spacing"] else None
    pre = preprocess_case(case_id, image_paths, None, settings, run.plans["modality"], target)
    image, window = torch.from_numpy(pre.image), WindowSettings.from_config(run.cfg)
    adapted = run.adapter.scan(image, window) if run.adapter is not None else contextlib.nullcontext()
    with adapted, torch.no_grad():  # adaptation runs on entering, outside no_grad
        probs = predict_probabilities(run.models, image, window, run.device, mirror_axes=run.mirror_axes)
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
    """Predict every case in ``in_dir`` into ``out_dir``; returns the failures (case, message), others still done.

    With ``run.adapter`` (``configure_adaptation``) each scan is adapted to first; the loaded model is restored at
    the end either way."""
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
    try:
        _predict_cases(run, cases, out_dir, ending, save_probabilities, progress, failures, log)
    finally:
        if run.adapter is not None:  # adaptation carried over from scan to scan ends with the folder
            run.adapter.restore()
    return failures


def _predict_cases(run, cases, out_dir, ending, save_probabilities, progress, failures, log) -> None:
    """Predict and write each case; a case's ``MnsegError`` is appended to ``failures``, an ``OSError`` stops all."""
    from mnseg.data.io import save_nifti
    from mnseg.utils.progress import progress_bar

    for case_id, paths in progress_bar(cases.items(), desc="predict", disable=not progress):
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
