"""benchmarks/pseudo_quality.py scores a run's predictors on its unlabelled subjects as medpy does."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from pseudo_quality import main as pseudo_quality_main  # noqa: E402
from pseudo_quality import ranked_dice, score, table  # noqa: E402

from tests.benchmarks.test_diagnose_mn import TINY_MN  # noqa: E402


def test_scores_are_medpy_dice_on_the_unlabelled_subjects(toy_dataset, tmp_path, capsys):
    import nibabel as nib
    from medpy.metric.binary import dc

    from mnseg.cli import main

    run = tmp_path / "run"
    assert main(["train", str(toy_dataset), *TINY_MN, "--epochs", "3", "--run-dir", str(run),
                 f"data.cache_dir={tmp_path / 'cache'}"]) == 0
    scores = score(run, toy_dataset, "epoch2")
    assert set(scores) == {"3d", "2d", "average"}
    assert "average" in table(scores)

    unlabelled = json.loads((run / "split.json").read_text())["unlabeled"]["imagesTr"]
    assert unlabelled  # the toy's other labelled cases: their labels exist but training never read them
    out = tmp_path / "pred"
    assert main(["predict", "-i", str(toy_dataset / "imagesTr"), "-o", str(out), "-m", str(run),
                 "--predict-with", "3d", "--checkpoint", "last", "--no-progress"]) == 0
    expected, volumes = [], np.zeros(2)
    for case in unlabelled:
        pred = np.asarray(nib.load(out / f"{case}.nii.gz").dataobj)
        ref = np.asarray(nib.load(next((toy_dataset / "labelsTr").glob(f"{case}.nii*"))).dataobj)
        expected.append(dc(pred == 1, ref == 1) if (pred == 1).any() or (ref == 1).any() else 1.0)
        volumes += [(pred == 1).sum(), (ref == 1).sum()]
    capsys.readouterr()  # a missing checkpoint: one message and exit 1, not a traceback
    assert pseudo_quality_main(["--run", str(run), "--dataset", str(toy_dataset), "--checkpoint", "epoch30"]) == 1
    said = capsys.readouterr().err
    assert "epoch30" in said and "Traceback" not in said
    last = score(run, toy_dataset, "last", ["3d"], ranked=True)
    name = next(iter(last["3d"]))
    assert 0.0 <= last["3d"][name]["ranked_dice"] <= 1.0 and "[ranked Dice]" in table(last)
    assert abs(last["3d"][name]["dice"] - float(np.mean(expected))) < 1e-9
    assert abs(last["3d"][name]["volume_ratio"] - volumes[0] / volumes[1]) < 1e-9
    # trained without flips: mirrored it would be predicted unmirrored, the same row again, so it is left out
    capsys.readouterr()
    assert score(run, toy_dataset, "last", ["3d"], tta=True) == {}
    said = capsys.readouterr().out
    assert "3d+tta: left out" in said and "warning: TTA" not in said  # one message for one fact
    flipped = tmp_path / "flipped"
    assert main(["train", str(toy_dataset), *TINY_MN, "--epochs", "3", "--run-dir", str(flipped),
                 "models.net3d.augment.overrides={flip_axes: [0, 1, 2]}", f"data.cache_dir={tmp_path / 'cache'}"]) == 0
    assert set(score(flipped, toy_dataset, "last", ["3d"], tta=True)) == {"3d+tta"}


def test_ranked_dice_finds_a_class_below_the_argmax():
    """A class never the argmax (probability 0.3 everywhere it is, 0.1 elsewhere) scores Dice 0 but ranked Dice 1:
    its k most probable voxels are exactly its k true ones; an unranked (flat) map scores its chance overlap."""
    ref = np.zeros((8, 8, 8), bool)
    ref[2:4, 2:4, 2:4] = True
    probs = np.where(ref, 0.3, 0.1)
    assert ranked_dice(probs, ref) == 1.0
    shifted = np.roll(probs, 4, axis=0)  # the same blob, elsewhere
    assert ranked_dice(shifted, ref) == 0.0
    assert np.isnan(ranked_dice(probs, np.zeros_like(ref)))
