"""evaluate_folders and ``mnseg evaluate`` end to end on small label maps written to tmp_path."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from mnseg.cli import main
from mnseg.data.io import load_nifti, save_nifti
from mnseg.errors import InputFileError, MnsegError
from mnseg.evaluation.folders import evaluate_folders, format_summary_table
from mnseg.evaluation.metrics import evaluate_case

LABELS = {"background": 0, "liver": 1, "tumour": 2}
AFFINE = np.diag([0.8, 1.2, 2.5, 1.0])
SHAPE = (20, 22, 18)


def _ball(centre, radius, shape=SHAPE):
    grid = np.indices(shape)
    return sum((grid[i] - centre[i]) ** 2 for i in range(3)) <= radius**2


def _case(seed: int, missing_tumour: bool = False) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ref = np.zeros(SHAPE, dtype=np.uint8)
    ref[_ball((10, 11, 9), 7)] = 1
    ref[_ball((10, 11, 9), 3)] = 2
    shift = rng.integers(-2, 3, size=3)
    pred = np.zeros_like(ref)
    pred[_ball(tuple(np.array((10, 11, 9)) + shift), 6 + seed % 2)] = 1
    if not missing_tumour:
        pred[_ball(tuple(np.array((10, 11, 9)) + shift), 3)] = 2
    return pred, ref


@pytest.fixture
def folders(tmp_path):
    pred_dir, ref_dir = tmp_path / "pred", tmp_path / "ref"
    arrays = {}
    for i, case in enumerate(["case_a", "case_b", "case_c"]):
        pred, ref = _case(i, missing_tumour=case == "case_c")
        save_nifti(pred, AFFINE, pred_dir / f"{case}.nii.gz", dtype=np.uint8)
        save_nifti(ref, AFFINE, ref_dir / f"{case}.nii.gz", dtype=np.uint8)
        arrays[case] = (pred, ref)
    dataset_json = tmp_path / "dataset.json"
    meta = {"labels": LABELS, "file_ending": ".nii.gz", "channel_names": {"0": "CT"}}
    dataset_json.write_text(json.dumps(meta))
    return pred_dir, ref_dir, dataset_json, arrays


def test_cli_writes_csv_summary_and_prints_table(folders, tmp_path, capsys):
    pred_dir, ref_dir, dataset_json, arrays = folders
    out_dir = tmp_path / "scores"
    rc = main(["evaluate", str(pred_dir), str(ref_dir), "--dataset-json", str(dataset_json), "--mm",
               "-o", str(out_dir)])
    assert rc == 0
    printed = capsys.readouterr().out
    for text in ["liver", "tumour", "foreground mean", "HD95 (mm)", "± "]:
        assert text in printed
    assert "distances undefined (one mask empty)" in printed  # case_c has no predicted tumour

    rows = list(csv.DictReader((out_dir / "metrics.csv").open()))
    assert [(r["case"], r["class"]) for r in rows] == [
        (c, k) for c in ["case_a", "case_b", "case_c"] for k in ["liver", "tumour"]
    ]
    assert list(rows[0]) == ["case", "class", "dice", "jaccard", "hd95", "asd", "assd"]
    spacing = load_nifti(ref_dir / "case_a.nii.gz").spacing  # as stored (float32 header), ~(0.8, 1.2, 2.5)
    assert spacing == pytest.approx((0.8, 1.2, 2.5))
    for row in rows:
        expected = evaluate_case(*arrays[row["case"]], LABELS, spacing=spacing)[row["class"]]
        for metric in ["dice", "jaccard", "hd95", "asd", "assd"]:
            value = float(row[metric])
            if math.isnan(expected[metric]):
                assert math.isnan(value)
            else:
                assert value == pytest.approx(expected[metric], rel=1e-12)

    summary = json.loads((out_dir / "summary.json").read_text())
    keys = {"metric_per_case", "mean", "std", "foreground_mean", "n_undefined", "units", "conventions"}
    assert keys <= set(summary)
    assert summary["units"] == "mm"
    assert summary["n_undefined"]["tumour"]["hd95"] == 1 and summary["n_undefined"]["liver"]["hd95"] == 0
    liver_dice = [evaluate_case(*arrays[c], LABELS)["liver"]["dice"] for c in arrays]
    assert summary["mean"]["liver"]["dice"] == pytest.approx(np.mean(liver_dice))
    assert summary["std"]["liver"]["dice"] == pytest.approx(np.std(liver_dice))
    tumour_hd95 = [evaluate_case(*arrays[c], LABELS, spacing)["tumour"]["hd95"] for c in ["case_a", "case_b"]]
    assert summary["mean"]["tumour"]["hd95"] == pytest.approx(np.mean(tumour_hd95))
    per_case = {item["case"]: item for item in summary["metric_per_case"]}
    assert per_case["case_c"]["metrics"]["tumour"]["hd95"] is None
    assert per_case["case_a"]["prediction_file"].endswith("case_a.nii.gz")
    assert not (pred_dir / "summary.json").exists()  # -o respected; inputs folder untouched


def test_voxel_units_by_default_and_workers_give_same_result(folders, tmp_path):
    pred_dir, ref_dir, dataset_json, arrays = folders
    one = evaluate_folders(pred_dir, ref_dir, dataset_json=dataset_json, out_dir=tmp_path / "w1")
    two = evaluate_folders(pred_dir, ref_dir, dataset_json=dataset_json, out_dir=tmp_path / "w2", workers=2)
    assert one["units"] == "voxel"
    assert one == two
    expected = evaluate_case(*arrays["case_a"], LABELS)["liver"]["hd95"]
    assert one["metric_per_case"][0]["metrics"]["liver"]["hd95"] == pytest.approx(expected)
    assert (tmp_path / "w1" / "metrics.csv").read_text() == (tmp_path / "w2" / "metrics.csv").read_text()


def test_default_output_is_prediction_folder_and_labels_from_values(folders):
    pred_dir, ref_dir, _, _ = folders
    summary = evaluate_folders(pred_dir, ref_dir)
    assert list(summary["mean"]) == ["1", "2"]
    assert (pred_dir / "summary.json").exists() and (pred_dir / "metrics.csv").exists()
    # a second run skips the files it wrote itself
    assert evaluate_folders(pred_dir, ref_dir)["mean"] == summary["mean"]
    table = format_summary_table(summary)
    assert table.splitlines()[0].split()[:3] == ["Class", "Dice", "Jaccard"]


def test_missing_prediction_is_an_error_listing_cases(folders, capsys):
    pred_dir, ref_dir, dataset_json, _ = folders
    (pred_dir / "case_b.nii.gz").unlink()
    rc = main(["evaluate", str(pred_dir), str(ref_dir), "--dataset-json", str(dataset_json)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "case_b" in err and "no prediction" in err and "Traceback" not in err
    assert not (pred_dir / "summary.json").exists()


def test_shape_mismatch_names_both_files(folders):
    pred_dir, ref_dir, dataset_json, _ = folders
    save_nifti(np.zeros((20, 22, 17), np.uint8), AFFINE, pred_dir / "case_a.nii.gz")
    both_files = r"pred/case_a\.nii\.gz: shape .* the reference .*ref/case_a\.nii\.gz"
    with pytest.raises(InputFileError, match=both_files):
        evaluate_folders(pred_dir, ref_dir, dataset_json=dataset_json)


def test_affine_mismatch_is_refused(folders):
    pred_dir, ref_dir, dataset_json, arrays = folders
    save_nifti(arrays["case_a"][0], np.diag([0.8, 1.2, 2.6, 1.0]), pred_dir / "case_a.nii.gz")
    with pytest.raises(InputFileError, match="affine"):
        evaluate_folders(pred_dir, ref_dir, dataset_json=dataset_json)


def test_unknown_label_value_and_probabilities_refused(folders):
    pred_dir, ref_dir, dataset_json, arrays = folders
    bad = arrays["case_a"][0].copy()
    bad[0, 0, 0] = 7
    save_nifti(bad, AFFINE, pred_dir / "case_a.nii.gz", dtype=np.uint8)
    with pytest.raises(InputFileError, match=r"case_a\.nii\.gz: label values \[7\]"):
        evaluate_folders(pred_dir, ref_dir, dataset_json=dataset_json)
    save_nifti(arrays["case_a"][0] * 0.5, AFFINE, pred_dir / "case_a.nii.gz", dtype=np.float32)
    with pytest.raises(InputFileError, match="non-integer"):
        evaluate_folders(pred_dir, ref_dir, dataset_json=dataset_json)


def test_prediction_without_reference_warns_and_is_ignored(folders):
    pred_dir, ref_dir, dataset_json, arrays = folders
    save_nifti(arrays["case_a"][0], AFFINE, pred_dir / "stray.nii.gz", dtype=np.uint8)
    with pytest.warns(UserWarning, match="stray"):
        summary = evaluate_folders(pred_dir, ref_dir, dataset_json=dataset_json)
    assert [c["case"] for c in summary["metric_per_case"]] == ["case_a", "case_b", "case_c"]


def test_bad_dataset_json_and_folders(folders, tmp_path):
    pred_dir, ref_dir, _, _ = folders
    regions = tmp_path / "regions.json"
    regions.write_text(json.dumps({"labels": {"background": 0, "whole": [1, 2]}}))
    with pytest.raises(InputFileError, match="regions.json: label 'whole'"):
        evaluate_folders(pred_dir, ref_dir, dataset_json=regions)
    with pytest.raises(InputFileError, match="nope.json: file not found"):
        evaluate_folders(pred_dir, ref_dir, dataset_json=tmp_path / "nope.json")
    with pytest.raises(MnsegError, match="missing: prediction folder not found"):
        evaluate_folders(tmp_path / "missing", ref_dir)
