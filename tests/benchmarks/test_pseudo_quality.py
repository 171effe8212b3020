"""benchmarks/pseudo_quality.py scores a run's predictors on its unlabelled subjects as medpy does."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from pseudo_quality import score, table  # noqa: E402

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
    last = score(run, toy_dataset, "last", ["3d"])
    name = next(iter(last["3d"]))
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
