"""How good are M&N's pseudo-masks? Score a run's 3D model, 2D model and their mean softmax on its unlabelled subjects.

M&N's 3D model learns its unlabelled loss from the 2D partner's softmax, or (``pseudo: ensemble``) from the mean of
both models'. If that target is worse on a class than the 3D model alone, fitting it can only cost the 3D model that
class. This reads the answer without training: each predictor of a run's checkpoint (``best``, ``last`` or a kept
``epoch<N>``, e.g. the end of stage 1) segments the run's unlabelled imagesTr subjects (split.json) and is scored
per class against their labels; ``--ranked`` also asks whether a class is there below the argmax: the Dice of
each subject's k most probable voxels of the class, k its true volume (an oracle k: a ceiling for any rule that
picks a class's voxels by their probability, such as a class-prior threshold). Only synthesized data
(``mnseg synth``, benchmarks/diagnose_mn.py's) has labels for the unlabelled subjects; the method never reads them.

    python benchmarks/pseudo_quality.py --run /tmp/d4/runs/mn_stage1/n4_seed0 --checkpoint epoch30 \\
        --dataset /tmp/d4/data/Dataset921_MNIStrong3mm

Whole-volume sliding-window predictions stand in for the crops co-training scores (the same models, eval mode).
Prints a markdown table per class and predictor: the mean Dice over the subjects and, in brackets, the predicted
volume over the true one (summed over the subjects; above 1: the class is over-predicted, e.g. a lesion that spreads
into the white matter around it), and the foreground-mean Dice.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from mnseg.data.io import load_nifti
from mnseg.errors import MnsegError
from mnseg.evaluation.metrics import dice
from mnseg.inference.predict import configure_tta, load_run, predict_case

PREDICTORS = {"3d": "the 3D model", "2d": "the 2D partner", "average": "their mean softmax (pseudo: ensemble)"}


def ranked_dice(probs: np.ndarray, ref: np.ndarray) -> float:
    """Dice of the ``ref.sum()`` voxels with the highest ``probs`` against ``ref`` (nan where ``ref`` is empty)."""
    k = int(ref.sum())
    if k == 0:
        return float("nan")
    top = np.argpartition(probs.ravel(), -k)[-k:]
    return float(ref.ravel()[top].sum() / k)


def score(run_dir: Path, dataset: Path, checkpoint: str, predictors=tuple(PREDICTORS),
          tta: bool = False, ranked: bool = False) -> dict[str, dict[str, dict]]:
    """{predictor: {class name: {"dice": mean Dice, "volume_ratio": predicted / true voxels}}} over the run's
    unlabelled imagesTr subjects; ``tta``: each predictor mirrored over its training flips (a candidate target that
    may be better than the model itself), keyed ``<predictor>+tta``, left out where no model of the predictor was
    trained with flips (unmirrored, it would score exactly as the predictor itself); ``ranked``: each class also
    gets "ranked_dice", the mean of ``ranked_dice`` over the subjects that have the class."""
    split = json.loads((run_dir / "split.json").read_text())
    cases = split["unlabeled"]["imagesTr"]
    labels = {int(v): k for k, v in json.loads((dataset / "dataset.json").read_text())["labels"].items()}
    classes = {i: name for i, name in sorted(labels.items()) if i > 0}
    out = {}
    for which in predictors:
        run = load_run(run_dir, checkpoint, device="cpu", model=which)
        if tta:
            warnings: list[str] = []  # configure_tta's, printed only where some model of the predictor is mirrored
            if not any(configure_tta(run, log=warnings.append)):
                print(f"{which}+tta: left out, its models were trained without flips (it would score as '{which}')")
                continue
            for line in warnings:
                print(line)
        per_class = {name: [] for name in classes.values()}
        volumes = {name: [0, 0] for name in classes.values()}
        ranks = {name: [] for name in classes.values()}
        for case in cases:
            images = sorted((dataset / "imagesTr").glob(f"{case}_[0-9][0-9][0-9][0-9].nii*"))
            pred, probs, _ = predict_case(run, case, images)
            ref = np.asarray(load_nifti(next((dataset / "labelsTr").glob(f"{case}.nii*"))).data)
            for i, name in classes.items():
                per_class[name].append(dice(pred == i, ref == i))
                volumes[name][0] += int((pred == i).sum())
                volumes[name][1] += int((ref == i).sum())
                if ranked:
                    ranks[name].append(ranked_dice(probs[i], ref == i))
        key = f"{which}+tta" if tta else which
        out[key] = {name: {"dice": float(np.mean(v)), "volume_ratio": volumes[name][0] / max(volumes[name][1], 1)}
                    for name, v in per_class.items()}
        if ranked:
            for name, v in ranks.items():
                out[key][name]["ranked_dice"] = float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")
    return out


def table(scores: dict[str, dict[str, dict]]) -> str:
    names = list(next(iter(scores.values())))
    ranked = "ranked_dice" in next(iter(scores.values()))[names[0]]
    head = " Dice (volume ratio) [ranked Dice]" if ranked else " Dice (volume ratio)"
    lines = ["| predictor | " + " | ".join(f"{n}{head}" for n in names) + " | fg mean Dice |",
             "|---|" + "---|" * (len(names) + 1)]
    for which, per_class in scores.items():
        cells = [f"{per_class[n]['dice']:.4f} ({per_class[n]['volume_ratio']:.2f})"
                 + (f" [{per_class[n]['ranked_dice']:.4f}]" if ranked else "") for n in names]
        mean = np.mean([per_class[n]["dice"] for n in names])
        lines.append(f"| {which} | " + " | ".join(cells) + f" | {mean:.4f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="an M&N run directory")
    parser.add_argument("--dataset", type=Path, required=True, help="its dataset (with labels for every imagesTr)")
    parser.add_argument("--checkpoint", default="best", help="best, last or a kept epoch<N> (default best)")
    parser.add_argument("--predictors", default=",".join(PREDICTORS))
    parser.add_argument("--tta", action="store_true", help="also score each predictor mirrored over its training flips")
    parser.add_argument("--ranked", action="store_true",
                        help="also score each class's k most probable voxels per subject, k its true volume")
    args = parser.parse_args(argv)
    predictors = args.predictors.split(",")
    try:
        scores = score(args.run, args.dataset, args.checkpoint, predictors, ranked=args.ranked)
        if args.tta:
            scores.update(score(args.run, args.dataset, args.checkpoint, predictors, tta=True, ranked=args.ranked))
    except MnsegError as err:  # a missing checkpoint or file: its message, not a traceback
        print(f"pseudo_quality: {err}", file=sys.stderr)
        return 1
    print(table(scores))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
