"""``mnseg predict``: segment a NIfTI image, or a folder of them, with a trained run."""

import contextlib

HELP = "predict NIfTI masks (in each input's original geometry) with a trained run"
DESCRIPTION = """Predict an image, or every image in a folder, with a trained run directory or a model zip
from mnseg export. Only safe files are read (safetensors weights, config, plans), never a pickle.

Outputs are label maps CASE.nii.gz in each input's original grid and affine
(inputs CASE_0000.nii.gz, ... as in imagesTs). Existing outputs are kept unless --overwrite.
A corrupt input is reported and skipped; the others are still predicted (exit code 1).

  mnseg predict -i Dataset001_Brain/imagesTs -o preds -m runs/Dataset001_Brain/mn_4l_seed0
  mnseg predict -i scan_0000.nii.gz -o preds -m runs/Dataset001_Brain/mn_4l_seed0   # writes preds/scan.nii.gz

--tta mirrors each input only along the axes its model was flipped along in training (read from the
run's config); a model trained without flips is predicted unmirrored, with a warning. --tta-axes 0,1,2
mirrors along the axes given instead.

--adapt adapts the model to each scan before predicting it (test-time adaptation; docs/test_time_adaptation.md):
norm replaces BatchNorm statistics by the scan's (BN adapt), entropy minimises the scan's mean voxel entropy
over the norm layers' affine parameters (TENT, --adapt-steps Adam steps at --adapt-lr). Only the model in
memory changes, never the run's files, and each scan starts from the loaded model unless --adapt-continual.
"""


def add_arguments(p):
    p.add_argument("-i", "--input", required=True,
                   help="an image file, or a folder of images (CASE_0000.nii.gz ...); output CASE.nii.gz")
    p.add_argument("-o", "--output", required=True, help="folder for the predicted masks (not the input folder)")
    p.add_argument("-m", "--model", required=True, metavar="RUN_DIR|ZIP",
                   help="run directory from mnseg train, or a model zip from mnseg export")
    p.add_argument("--checkpoint", default="best", choices=["best", "last"],
                   help="best.pt (best validation Dice; runs without validation have only last.pt, used with a "
                        "warning) or last.pt (default: best)")
    p.add_argument(
        "--predict-with", default=None, help="which of the run's models predicts, e.g. M&N: 3d (default), 2d, average"
    )
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:1")
    p.add_argument(
        "--save-probabilities", action="store_true", help="also write probabilities/CASE.nii.gz (channels last)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing predictions")
    p.add_argument(
        "--tta",
        action="store_true",
        help="mirror test-time augmentation: average the predictions of the input flipped along the axes each "
        "model was flipped along in training (its models.<role>.augment preset/overrides in the run's config). "
        "A model trained without flips (e.g. the conservative_3d preset) is predicted unmirrored, with a warning: "
        "flipped inputs are out of its training distribution (all 8 flips cost 0.06 WM Dice on the demo)",
    )
    p.add_argument(
        "--tta-axes",
        type=parse_axes,
        metavar="AXES",
        help="mirror over these spatial axes instead (comma-separated, e.g. 0,1,2 = all 8 flips; implies --tta)",
    )
    p.add_argument(
        "--adapt",
        choices=["none", "norm", "entropy"],
        default="none",
        help="test-time adaptation on each scan: none (default: the model as trained), norm (BatchNorm running "
        "statistics from the scan's windows; InstanceNorm models are left unchanged, with a note) or entropy "
        "(TENT: Adam steps on the scan's mean voxel entropy, norm layers' affine parameters only)",
    )
    p.add_argument("--adapt-steps", type=positive_int, metavar="N",
                   help="--adapt entropy: Adam steps per scan, each a pass over the scan's windows (default 10)")
    p.add_argument("--adapt-lr", type=positive_float, metavar="LR",
                   help="--adapt entropy: Adam learning rate (default 0.001)")
    p.add_argument("--adapt-continual", action="store_true",
                   help="carry the adaptation over from scan to scan (default: reset to the loaded model per scan)")
    p.add_argument("--sw-batch-size", type=int, help="windows per forward pass (lower it if out of GPU memory)")
    p.add_argument("--gaussian", action="store_true", help="Gaussian-weighted window blending")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    import sys
    from pathlib import Path

    from mnseg.engine.run_dir import RunDir
    from mnseg.errors import MnsegError

    if not Path(args.input).exists():  # before torch is imported: a typo answers at once
        raise MnsegError(f"{args.input}: input file or folder not found")
    if not Path(args.model).exists():
        raise MnsegError(f"{args.model}: run directory or model zip not found")
    run = RunDir(args.model)
    if args.checkpoint == "best" and run.can_resume() and not run.checkpoint("best").is_file():
        print(f"warning: {args.model} has no {run.relative(run.checkpoint('best'))} (trained without validation "
              f"cases); using {run.relative(run.checkpoint('last'))}", file=sys.stderr)
    if Path(args.input).is_file():
        with single_file_folder(args.input, args.output) as folder:
            return predict(args, folder)
    return predict(args, args.input)


def predict(args, in_dir) -> int:
    import sys
    from pathlib import Path

    import torch

    from mnseg.errors import ConfigError, MnsegError
    from mnseg.inference.adapt import configure_adaptation
    from mnseg.inference.predict import configure_tta, load_run, predict_folder
    from mnseg.utils.preflight import check_writable

    settings = adapt_settings(args)  # before loading: a misused option answers at once
    run = load_run(args.model, args.checkpoint, args.device, args.predict_with)
    if args.tta or args.tta_axes is not None or run.cfg.infer.mirror_tta:
        axes = configure_tta(run, args.tta_axes, log=lambda message: print(message, file=sys.stderr))
        described = ", ".join(f"{role}: {list(a) if a else 'none'}" for role, a in zip(run.roles, axes))
        print(f"mirror TTA axes ({described})", file=sys.stderr)
    if configure_adaptation(run, settings, log=lambda message: print(message, file=sys.stderr)) is not None:
        print(run.adapter.describe(), file=sys.stderr)
    if args.gaussian:
        run.cfg.infer.blend = "gaussian"
    if args.sw_batch_size is not None:
        if args.sw_batch_size < 1:
            raise ConfigError(f"--sw-batch-size must be at least 1, got {args.sw_batch_size}")
        run.cfg.infer.sw_batch_size = args.sw_batch_size
    check_writable(
        args.output, estimated_output_bytes(Path(in_dir), args.save_probabilities, run.plans), what="output folder"
    )
    try:
        failures = predict_folder(
            run,
            in_dir,
            args.output,
            overwrite=args.overwrite,
            save_probabilities=args.save_probabilities,
            progress=not args.no_progress,
        )
    except torch.OutOfMemoryError:
        patch = "x".join(str(v) for v in run.cfg.data.patch_size)
        raise MnsegError(
            f"out of GPU memory while predicting with window (patch) size {patch}, sw_batch_size "
            f"{run.cfg.infer.sw_batch_size}{' and mirror TTA' if any(run.mirror_axes) else ''}"
            f"{' and --adapt ' + settings.mode if run.adapter is not None else ''} on {run.device} "
            f"(the training batch size {run.cfg.train.batch_size} plays no part here). Try --sw-batch-size 1, "
            f"no --tta or --adapt, or --device cpu. Predictions already written to {args.output} are complete; "
            f"rerun with --overwrite (or another -o) after the change."
        ) from None
    if failures:
        print(f"{len(failures)} case(s) failed:", file=sys.stderr)
        for case, msg in failures:
            print(f"  {case}: {msg}", file=sys.stderr)
        return 1
    print(f"wrote predictions to {args.output}")
    return 0


@contextlib.contextmanager
def single_file_folder(image, output):
    """``-i FILE``: a temporary folder holding only a link to it, so the file is predicted as a folder of one."""
    import os
    import shutil
    import tempfile
    from pathlib import Path

    from mnseg.errors import MnsegError

    source = Path(image).resolve()
    ending = next((e for e in (".nii.gz", ".nii") if source.name.endswith(e)), None)
    if ending is None:
        raise MnsegError(f"{image}: not a NIfTI image (.nii.gz or .nii)")
    stem = source.name[: -len(ending)]
    if Path(output).resolve() == source.parent and not (stem[-5:-4] == "_" and stem[-4:].isdigit()):
        raise MnsegError(f"{output}: the prediction {source.name} would replace the input {source}; choose another -o")
    with tempfile.TemporaryDirectory(prefix="mnseg_predict_") as tmp:
        try:
            os.symlink(source, Path(tmp) / source.name)
        except OSError:
            shutil.copy2(source, Path(tmp) / source.name)
        yield tmp


def estimated_output_bytes(in_dir, save_probabilities: bool, plans: dict) -> int:
    """Label maps compress far below their inputs; probabilities (float32 per class) can exceed them."""
    if not in_dir.is_dir():
        return 0
    total = sum(p.stat().st_size for p in in_dir.iterdir() if p.is_file())
    per_channel = total // max(int(plans.get("in_channels", 1)), 1)
    return per_channel * (1 + 4 * int(plans.get("num_classes", 2))) if save_probabilities else per_channel


def parse_axes(text: str) -> tuple[int, ...]:
    """'0,1,2' -> (0, 1, 2); the range is checked against the run's patch dimensions later."""
    import argparse

    try:
        axes = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated axis numbers like 0,1,2, got {text!r}") from None
    if not axes:
        raise argparse.ArgumentTypeError("give at least one axis, e.g. 0,1,2 (leave out --tta for no mirroring)")
    return axes


def adapt_settings(args):
    """The ``--adapt*`` options as ``AdaptSettings``; an option that the chosen mode would ignore is an error."""
    from mnseg.errors import ConfigError
    from mnseg.inference.adapt import DEFAULT_LR, DEFAULT_STEPS, AdaptSettings

    if args.adapt != "entropy":
        given = [name for name, value in (("--adapt-steps", args.adapt_steps), ("--adapt-lr", args.adapt_lr))
                 if value is not None]
        if given:
            verb = "apply" if len(given) > 1 else "applies"
            raise ConfigError(f"{' and '.join(given)} {verb} only to --adapt entropy (got --adapt {args.adapt})")
    if args.adapt == "none" and args.adapt_continual:
        raise ConfigError("--adapt-continual needs --adapt norm or --adapt entropy")
    steps = DEFAULT_STEPS if args.adapt_steps is None else args.adapt_steps
    lr = DEFAULT_LR if args.adapt_lr is None else args.adapt_lr
    return AdaptSettings(args.adapt, steps, lr, episodic=not args.adapt_continual)


def positive_int(text: str) -> int:
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return value


def positive_float(text: str) -> float:
    import argparse
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number such as 1e-3, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number such as 1e-3, got {text!r}")
    return value
