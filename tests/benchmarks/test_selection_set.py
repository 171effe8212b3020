"""benchmarks/selection_set.py scores runs on fresh subjects drawn as their data was, never on their test subjects."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from selection_set import main as selection_main  # noqa: E402
from selection_set import make_selection_set  # noqa: E402

TINY_SUP = ["--method", "supervised", "--num-labeled", "2", "--num-val", "1", "--iters-per-epoch", "2",
            "--batch-size", "2", "--patch-size", "16,16,16", "--no-progress", "--test", "models.net.name=unet3d",
            "models.net.kwargs={depth: 3, base_filters: 4}", "train.val_every=1"]


@pytest.fixture(scope="module")
def synth_data(tmp_path_factory):
    from mnseg.data.synth import synthesize_dataset

    out = tmp_path_factory.mktemp("selection") / "Dataset950_MNISel"
    return synthesize_dataset(out, n_labeled=3, n_unlabeled=0, n_test=1, spacing=8.0, seed=3, progress=False,
                              variation="strong")


def test_selection_subjects_are_drawn_as_the_data_was_with_other_seeds(synth_data, tmp_path):
    folder = make_selection_set(synth_data, tmp_path, subjects=2, seed=4)
    ours = json.loads((synth_data / "dataset.json").read_text())["synthetic"]
    theirs = json.loads((folder / "dataset.json").read_text())["synthetic"]
    for key in ("spacing", "variation", "thick_slice_fraction", "sparse_every", "generator_version"):
        assert theirs["settings"][key] == ours["settings"][key]
    assert theirs["settings"]["seed"] == 4 and theirs["counts"]["test"] == 2
    assert not {s["seed"] for s in theirs["subjects"].values()} & {s["seed"] for s in ours["subjects"].values()}
    with pytest.raises(SystemExit, match="own base seed"):
        make_selection_set(synth_data, tmp_path / "again", subjects=2, seed=3)


def test_runs_are_scored_on_the_selection_subjects_as_medpy_does(synth_data, tmp_path):
    import nibabel as nib
    from medpy.metric.binary import dc

    from mnseg.cli import main

    for name, epochs in (("short", 1), ("longer", 2)):
        assert main(["train", str(synth_data), *TINY_SUP, "--epochs", str(epochs), "--seed", "0", "--run-dir",
                     str(tmp_path / name / "n2_seed0"), f"data.cache_dir={tmp_path / 'cache'}"]) == 0
    out = tmp_path / "sel"
    text = selection_main(["--out", str(out), "--baseline", f"short={tmp_path / 'short' / 'n2_seed*'}",
                           "--run", f"longer={tmp_path / 'longer' / 'n2_seed*'}", "--subjects", "2", "--seed", "9"])
    assert "selection fg Dice (2 subjects)" in text and (out / "selection.md").read_text().strip() == text
    assert "| longer | 2 | 1 |" in text  # paired with short by labelled count and seed: 2 subjects, 2 pairs

    selection = out / "data" / "Dataset950_MNISelSelection"
    preds = out / "predictions" / "longer" / "n2_seed0"
    summary = json.loads((preds / "summary.json").read_text())
    case = sorted(p.name.split(".")[0] for p in (selection / "labelsTs").glob("*.nii.gz"))[0]
    pred = np.asarray(nib.load(preds / f"{case}.nii.gz").dataobj)
    ref = np.asarray(nib.load(selection / "labelsTs" / f"{case}.nii.gz").dataobj)
    expected = dc(pred == 2, ref == 2) if (pred == 2).any() or (ref == 2).any() else 1.0
    per_case = next(c for c in summary["metric_per_case"] if c["case"] == case)
    assert per_case["metrics"]["grey_matter"]["dice"] == pytest.approx(expected)
