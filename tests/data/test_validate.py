import gzip
import json

import nibabel as nib
import numpy as np
import pytest

from mnseg.data.dataset import write_dataset_json
from mnseg.data.io import load_nifti, save_nifti
from mnseg.data.toy import make_toy_dataset
from mnseg.data.validate import validate_dataset, validate_inputs
from mnseg.errors import DatasetError

SHAPE = (12, 12, 12)


@pytest.fixture
def ds(tmp_path):
    """A tiny valid dataset: 3 labelled, 1 unlabelled, 1 test case."""
    return make_toy_dataset(tmp_path / "D", n_train=3, n_unlabeled=1, n_test=1, shape=SHAPE)


def _problems(report, severity="error"):
    return [(p.path.name, p.message) for p in report.problems if p.severity == severity]


def _has(report, filename, text, severity="error"):
    return any(name == filename and text in msg for name, msg in _problems(report, severity))


def test_valid_dataset_has_no_problems(ds):
    report = validate_dataset(ds)
    assert report.problems == [] and report.ok
    report.raise_if_invalid()
    assert report.case_counts == {"imagesTr": 3, "imagesUnlabeled": 1, "imagesTs": 1}


def test_statistics_match_the_files(tmp_path):
    root = make_toy_dataset(tmp_path / "D", n_train=3, n_unlabeled=1, n_test=0, shape=SHAPE, num_foreground=2,
                            spacing=(0.5, 1.0, 3.0))
    report = validate_dataset(root)
    expected = sum(np.bincount(load_nifti(p, dtype=None).data.astype(int).ravel(), minlength=3)
                   for p in sorted((root / "labelsTr").iterdir()))
    assert report.class_voxels == dict(zip(["background", "outer", "inner"], expected.tolist()))
    assert sum(report.class_fractions.values()) == pytest.approx(1.0)
    assert report.spacing_stats["median"] == pytest.approx([0.5, 1.0, 3.0])
    assert report.shape_stats["max"] == list(SHAPE)
    images = np.concatenate([load_nifti(p).data.ravel() for p in sorted((root / "imagesTr").iterdir())]
                            + [load_nifti(p).data.ravel() for p in (root / "imagesUnlabeled").iterdir()])
    stats = report.intensity["channel 0 (MRI) all"]
    assert stats["p50"] == pytest.approx(np.median(images), abs=0.05)
    fg = report.intensity["channel 0 (MRI) foreground"]
    assert fg["p50"] > stats["p50"]  # toy foreground is brighter


def test_dataset_json_missing(ds):
    (ds / "dataset.json").unlink()
    report = validate_dataset(ds)
    assert _has(report, "dataset.json", "not found")


def test_dataset_json_not_json(ds):
    (ds / "dataset.json").write_text('{"labels": ')
    assert _has(validate_dataset(ds), "dataset.json", "not valid JSON")


def test_dataset_json_missing_keys(ds):
    meta = json.loads((ds / "dataset.json").read_text())
    del meta["labels"], meta["channel_names"]
    (ds / "dataset.json").write_text(json.dumps(meta))
    report = validate_dataset(ds)
    assert _has(report, "dataset.json", "missing key 'labels'")
    assert _has(report, "dataset.json", "missing key 'channel_names'")


def test_file_ending_disagrees_with_files(ds):
    meta = json.loads((ds / "dataset.json").read_text())
    (ds / "dataset.json").write_text(json.dumps({**meta, "file_ending": ".nii"}))
    report = validate_dataset(ds)
    assert _has(report, "toytr_000_0000.nii.gz", "file_ending '.nii'")
    assert _has(report, "imagesTr", "no training images")


def test_empty_imagestr(ds):
    for p in (ds / "imagesTr").iterdir():
        p.unlink()
    report = validate_dataset(ds)
    assert _has(report, "imagesTr", "no training images")
    with pytest.raises(DatasetError, match="imagesTr"):
        report.raise_if_invalid()


def test_image_without_label_and_label_without_image(ds):
    (ds / "labelsTr" / "toytr_001.nii.gz").unlink()
    (ds / "imagesTr" / "toytr_002_0000.nii.gz").unlink()
    report = validate_dataset(ds)
    assert _has(report, "toytr_001_0000.nii.gz", "image without label")
    assert _has(report, "toytr_002.nii.gz", "label without image")
    assert report.case_counts["imagesTr"] == 1


def test_label_named_like_an_image_gets_a_hint(ds):
    (ds / "labelsTr" / "toytr_000.nii.gz").rename(ds / "labelsTr" / "toytr_000_0000.nii.gz")
    report = validate_dataset(ds)
    assert _has(report, "toytr_000_0000.nii.gz", "rename it to toytr_000.nii.gz")


def test_missing_channel_file(tmp_path):
    root = tmp_path / "D"
    write_dataset_json(root, "Two", {0: "T1", 1: "T2"}, {"background": 0, "a": 1}, 2)
    img = np.zeros(SHAPE, np.float32)
    for case in ("a", "b"):
        save_nifti(img, np.eye(4), root / "imagesTr" / f"{case}_0000.nii.gz")
        save_nifti(img.astype(np.uint8), np.eye(4), root / "labelsTr" / f"{case}.nii.gz")
    save_nifti(img, np.eye(4), root / "imagesTr" / "a_0001.nii.gz")
    save_nifti(img, np.eye(4), root / "imagesTr" / "a_0002.nii.gz")
    report = validate_dataset(root)
    assert _has(report, "b_0001.nii.gz", "missing channel file for case 'b' (T2)")
    assert _has(report, "a_0002.nii.gz", "declares 2 channel(s)")
    assert report.case_counts["imagesTr"] == 1


def test_wrong_ending_and_stray_files(ds):
    vol = load_nifti(ds / "imagesUnlabeled" / "toyunlabeled_000_0000.nii.gz")
    save_nifti(vol.data, vol.affine, ds / "imagesUnlabeled" / "extra_0000.nii")
    (ds / "imagesTr" / "notes.txt").write_text("hello")
    (ds / "imagesTr" / ".DS_Store").write_bytes(b"\0")
    report = validate_dataset(ds)
    assert _has(report, "extra_0000.nii", "file ending does not match")
    assert _has(report, "notes.txt", "stray file", "warning")
    assert not any(p.path.name == ".DS_Store" for p in report.problems)


def test_truncated_file(ds):
    path = ds / "imagesTr" / "toytr_001_0000.nii.gz"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    report = validate_dataset(ds)
    assert _has(report, "toytr_001_0000.nii.gz", "truncated or corrupt")
    assert len(report.errors) == 1


def test_garbage_label_file(ds):
    (ds / "labelsTr" / "toytr_000.nii.gz").write_bytes(gzip.compress(b"garbage" * 50))
    assert _has(validate_dataset(ds), "toytr_000.nii.gz", "cannot read")


def test_shape_mismatch(ds):
    save_nifti(np.zeros((12, 12, 10), np.uint8), np.eye(4), ds / "labelsTr" / "toytr_000.nii.gz")
    report = validate_dataset(ds)
    assert _has(report, "toytr_000.nii.gz", "shape (12, 12, 10) differs")
    # the header-only mode sees it too
    assert _has(validate_dataset(ds, check_voxels=False), "toytr_000.nii.gz", "shape (12, 12, 10) differs")


def test_affine_mismatch_with_tolerance(ds):
    label_path = ds / "labelsTr" / "toytr_000.nii.gz"
    label = load_nifti(label_path, dtype=None)
    nudged = label.affine.copy()
    nudged[0, 3] += 5e-4
    save_nifti(label.data, nudged, label_path)
    assert validate_dataset(ds).problems == []
    nudged[0, 3] += 0.5
    save_nifti(label.data, nudged, label_path)
    assert _has(validate_dataset(ds), "toytr_000.nii.gz", "label affine")


def test_affine_mismatch_between_channels(tmp_path):
    root = tmp_path / "D"
    write_dataset_json(root, "Two", {0: "T1", 1: "T2"}, {"background": 0, "a": 1}, 1)
    img = np.zeros(SHAPE, np.float32)
    save_nifti(img, np.eye(4), root / "imagesTr" / "a_0000.nii.gz")
    save_nifti(img, np.diag([2.0, 1, 1, 1]), root / "imagesTr" / "a_0001.nii.gz")
    save_nifti(img.astype(np.uint8), np.eye(4), root / "labelsTr" / "a.nii.gz")
    assert _has(validate_dataset(root), "a_0001.nii.gz", "channel affine")


def test_undeclared_label_values_are_listed(ds):
    path = ds / "labelsTr" / "toytr_002.nii.gz"
    label = load_nifti(path, dtype=None)
    data = label.data.copy()
    data[0, 0, :3] = [7, 9, 7]
    save_nifti(data, label.affine, path)
    report = validate_dataset(ds)
    assert _has(report, "toytr_002.nii.gz", "not declared in dataset.json: 7, 9")


def test_non_integer_label_values(ds):
    path = ds / "labelsTr" / "toytr_002.nii.gz"
    label = load_nifti(path)
    data = label.data.astype(np.float32)
    data[1, 1, 1] = 0.5
    save_nifti(data, label.affine, path, dtype=np.float32)
    assert _has(validate_dataset(ds), "toytr_002.nii.gz", "non-integer values, e.g. [0.5]")


def test_float_label_with_integer_values_is_fine(ds):
    path = ds / "labelsTr" / "toytr_002.nii.gz"
    label = load_nifti(path)
    save_nifti(label.data, label.affine, path, dtype=np.float32)
    assert validate_dataset(ds).problems == []


def test_nan_and_inf_in_image(ds):
    path = ds / "imagesTs" / "toyts_000_0000.nii.gz"
    vol = load_nifti(path)
    data = vol.data.copy()
    data[0, 0, 0] = np.nan
    data[0, 0, 1:3] = np.inf
    save_nifti(data, vol.affine, path)
    assert _has(validate_dataset(ds), "toyts_000_0000.nii.gz", "1 NaN and 2 Inf")
    assert validate_dataset(ds, check_voxels=False).problems == []  # voxels not read


def test_4d_image(ds):
    path = ds / "imagesUnlabeled" / "toyunlabeled_000_0000.nii.gz"
    save_nifti(np.zeros((*SHAPE, 2), np.float32), np.eye(4), path)
    assert _has(validate_dataset(ds), path.name, "expected a 3D volume")
    assert _has(validate_dataset(ds, check_voxels=False), path.name, "expected a 3D volume")


def test_num_training_mismatch_is_a_warning(ds):
    meta = json.loads((ds / "dataset.json").read_text())
    (ds / "dataset.json").write_text(json.dumps({**meta, "numTraining": 10}))
    report = validate_dataset(ds)
    assert report.ok
    assert _has(report, "dataset.json", "numTraining is 10 but imagesTr holds 3", "warning")
    report.raise_if_invalid()  # warnings alone don't fail


def test_raise_lists_every_problem_one_per_line(ds):
    (ds / "labelsTr" / "toytr_001.nii.gz").unlink()
    (ds / "imagesTr" / "toytr_000_0000.nii.gz").write_bytes(b"junk")
    with pytest.raises(DatasetError) as info:
        validate_dataset(ds).raise_if_invalid()
    lines = str(info.value).splitlines()
    assert any("toytr_001_0000.nii.gz" in line and "without label" in line for line in lines)
    assert any("toytr_000_0000.nii.gz" in line and "cannot read" in line for line in lines)


def test_ignore_label_counts_but_is_not_foreground(tmp_path):
    root = tmp_path / "D"
    write_dataset_json(root, "Sparse", ["MRI"], {"background": 0, "a": 1, "ignore": 2}, 1)
    image = np.zeros(SHAPE, np.float32)
    image[:4] = 10.0  # class a
    image[4:8] = 50.0  # ignore region
    label = np.zeros(SHAPE, np.uint8)
    label[:4], label[4:8] = 1, 2
    save_nifti(image, np.eye(4), root / "imagesTr" / "s_0000.nii.gz")
    save_nifti(label, np.eye(4), root / "labelsTr" / "s.nii.gz")
    report = validate_dataset(root)
    assert report.ok
    assert report.class_voxels["ignore"] == 4 * 12 * 12
    assert report.intensity["channel 0 (MRI) foreground"]["p99.5"] == pytest.approx(10.0)


def test_report_text_names_counts_and_problems(ds):
    (ds / "labelsTr" / "toytr_001.nii.gz").unlink()
    text = validate_dataset(ds).to_text()
    assert "imagesTr 2" in text and "toytr_001_0000.nii.gz" in text and "ERROR" in text


def test_validate_inputs(tmp_path):
    good = save_nifti(np.ones(SHAPE, np.float32), np.eye(4), tmp_path / "in" / "good.nii.gz")
    bad = np.ones(SHAPE, np.float32)
    bad[2, 2, 2] = np.nan
    save_nifti(bad, np.eye(4), tmp_path / "in" / "nan.nii.gz")
    save_nifti(np.ones((*SHAPE, 3), np.float32), np.eye(4), tmp_path / "in" / "four.nii.gz")
    img = nib.Nifti1Image(np.ones(SHAPE, np.float32), np.eye(4))
    nib.save(img, str(tmp_path / "cut.nii"))
    raw = (tmp_path / "cut.nii").read_bytes()
    (tmp_path / "cut.nii").write_bytes(raw[: len(raw) // 2])
    report = validate_inputs([tmp_path / "in", tmp_path / "cut.nii", tmp_path / "missing.nii.gz"])
    assert report.case_counts["inputs"] == 5
    assert _has(report, "nan.nii.gz", "1 NaN/Inf")
    assert _has(report, "four.nii.gz", "expected a 3D volume")
    assert _has(report, "cut.nii", "cannot read")
    assert _has(report, "missing.nii.gz", "not found")
    assert not any(p.path == good for p in report.problems)
    assert validate_inputs([good]).ok
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _has(validate_inputs([empty]), "empty", "no .nii.gz or .nii files")
