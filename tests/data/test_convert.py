"""Importers: Decathlon task folders and UA-MT/MC-Net/SSL4MIS h5 files -> dataset folder."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest

from mnseg.cli import main
from mnseg.data.convert import convert_msd, safe_label_name
from mnseg.data.convert_h5 import convert_h5, h5_candidates
from mnseg.data.io import load_nifti
from mnseg.errors import InputFileError, MnsegError

SHAPE = (8, 9, 10)
# Values exact in float32, the precision NIfTI stores affines in.
AFFINE = np.array([[0.0, -0.75, 0.0, 10.0], [1.25, 0.0, 0.0, -5.0], [0.0, 0.0, 2.5, 3.0], [0, 0, 0, 1.0]])


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Bytes and mtime of every file, to prove the inputs were left alone."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _save(arr: np.ndarray, path: Path, affine=AFFINE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr, affine), str(path))


def _case_arrays(rng, channels: int = 1):
    shape = SHAPE if channels == 1 else (*SHAPE, channels)
    image = rng.normal(size=shape).astype(np.float32)
    label = rng.integers(0, 3, size=SHAPE).astype(np.uint8)
    return image, label


def _make_msd(root: Path, channels: int = 1, seed: int = 0) -> tuple[Path, dict]:
    """A tiny Decathlon task: two training cases, one test case, plus a macOS junk file."""
    rng = np.random.default_rng(seed)
    task = root / ("Task98_Multi" if channels > 1 else "Task99_Tiny")
    arrays = {}
    for name in ("tiny_001", "tiny_002"):
        image, label = _case_arrays(rng, channels)
        _save(image, task / "imagesTr" / f"{name}.nii.gz")
        _save(label, task / "labelsTr" / f"{name}.nii.gz")
        arrays[name] = (image, label)
    test_image, _ = _case_arrays(rng, channels)
    _save(test_image, task / "imagesTs" / "tiny_010.nii.gz")
    arrays["tiny_010"] = (test_image, None)
    (task / "imagesTr" / "._tiny_001.nii.gz").write_bytes(b"\x00\x05\x16\x07 mac junk")
    modality = {"0": "FLAIR", "1": "T1w"} if channels > 1 else {"0": "MRI"}
    meta = {
        "name": "Tiny",
        "licence": "CC-BY-SA 4.0",
        "modality": modality,
        "labels": {"0": "background", "1": "Left Atrium", "2": "scar tissue"},
        "numTraining": 2,
        "training": [{"image": f"./imagesTr/{n}.nii.gz", "label": f"./labelsTr/{n}.nii.gz"}
                     for n in ("tiny_001", "tiny_002")],
        "test": ["./imagesTs/tiny_010.nii.gz"],
    }
    (task / "dataset.json").write_text(json.dumps(meta))
    return task, arrays


def _read(path: Path):
    vol = load_nifti(path, dtype=None)
    return vol.data, vol.affine


# ----------------------------------------------------------------------------------------- MSD


def test_msd_single_modality_round_trip(tmp_path):
    task, arrays = _make_msd(tmp_path)
    before = _snapshot(task)
    out = convert_msd(task, tmp_path / "Dataset099_Tiny")

    for name in ("tiny_001", "tiny_002"):
        image, label = arrays[name]
        data, affine = _read(out / "imagesTr" / f"{name}_0000.nii.gz")
        np.testing.assert_array_equal(data, image)
        np.testing.assert_array_equal(affine, AFFINE)
        data, affine = _read(out / "labelsTr" / f"{name}.nii.gz")
        np.testing.assert_array_equal(data, label)
        np.testing.assert_array_equal(affine, AFFINE)
    data, _ = _read(out / "imagesTs" / "tiny_010_0000.nii.gz")
    np.testing.assert_array_equal(data, arrays["tiny_010"][0])
    assert not (out / "labelsTs").exists()
    written = sorted(p.name for p in (out / "imagesTr").iterdir())
    assert written == ["tiny_001_0000.nii.gz", "tiny_002_0000.nii.gz"]

    meta = json.loads((out / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "MRI"}
    assert meta["labels"] == {"background": 0, "left_atrium": 1, "scar_tissue": 2}
    assert meta["numTraining"] == 2
    assert meta["file_ending"] == ".nii.gz"
    assert meta["licence"] == "CC-BY-SA 4.0"
    assert meta["converted_from"]["format"] == "msd"
    assert meta["converted_from"]["source"] == str(task.resolve())
    assert _snapshot(task) == before


def test_msd_four_d_images_are_split_per_modality(tmp_path):
    task, arrays = _make_msd(tmp_path, channels=2)
    out = convert_msd(task, tmp_path / "out")
    for name in ("tiny_001", "tiny_002", "tiny_010"):
        image, _ = arrays[name]
        subset = "Ts" if name == "tiny_010" else "Tr"
        for c in range(2):
            data, affine = _read(out / f"images{subset}" / f"{name}_{c:04d}.nii.gz")
            assert data.shape == SHAPE
            np.testing.assert_array_equal(data, image[..., c])
            np.testing.assert_array_equal(affine, AFFINE)
    assert json.loads((out / "dataset.json").read_text())["channel_names"] == {"0": "FLAIR", "1": "T1w"}


def test_msd_missing_listed_file_is_named_and_nothing_written(tmp_path):
    task, _ = _make_msd(tmp_path)
    (task / "labelsTr" / "tiny_002.nii.gz").unlink()
    with pytest.raises(InputFileError, match=r"do not exist:\n.*labelsTr/tiny_002\.nii\.gz"):
        convert_msd(task, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_msd_channel_count_mismatch_is_refused(tmp_path):
    task, _ = _make_msd(tmp_path)
    meta = json.loads((task / "dataset.json").read_text())
    meta["modality"] = {"0": "T2", "1": "ADC"}
    (task / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(InputFileError, match=r"tiny_001\.nii\.gz: has 1 channel\(s\) but .* lists 2"):
        convert_msd(task, tmp_path / "out")


def test_msd_undeclared_label_value_is_refused(tmp_path):
    task, _ = _make_msd(tmp_path)
    meta = json.loads((task / "dataset.json").read_text())
    del meta["labels"]["2"]
    (task / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(InputFileError, match=r"labelsTr/tiny_001\.nii\.gz: label values \[2\]"):
        convert_msd(task, tmp_path / "out")


def test_safe_label_name():
    assert safe_label_name(" Left Atrium ") == "left_atrium"
    assert safe_label_name("non-enhancing tumor") == "non_enhancing_tumor"


# ----------------------------------------------------------------------------------------- output folder


def test_non_empty_output_needs_overwrite_and_stale_files_go(tmp_path):
    task, _ = _make_msd(tmp_path)
    out = tmp_path / "out"
    (out / "imagesTr").mkdir(parents=True)
    stale = out / "imagesTr" / "old_case_0000.nii.gz"
    stale.write_bytes(b"old")
    keep = out / "notes.txt"
    keep.write_text("mine")
    with pytest.raises(MnsegError, match="not empty"):
        convert_msd(task, out)
    assert stale.exists() and not (out / "dataset.json").exists()

    convert_msd(task, out, overwrite=True)
    assert not stale.exists()
    assert keep.read_text() == "mine"
    assert (out / "dataset.json").is_file()


def test_output_inside_input_is_refused(tmp_path):
    task, _ = _make_msd(tmp_path)
    before = _snapshot(task)
    with pytest.raises(MnsegError, match="inside the input folder"):
        convert_msd(task, task / "converted")
    assert _snapshot(task) == before


# ----------------------------------------------------------------------------------------- h5


def _write_h5(path: Path, image: np.ndarray, label: np.ndarray | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("image", data=image)
        if label is not None:
            f.create_dataset("label", data=label)


def _h5_case(rng):
    return rng.normal(size=SHAPE).astype(np.float32), rng.integers(0, 2, size=SHAPE).astype(np.uint8)


def test_h5_la_layout_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    h5_dir = tmp_path / "data" / "2018LA_Seg_Training Set"
    cases = {name: _h5_case(rng) for name in ("0RZDK210BSMWAA6467LU", "1D7CUD1955YZPGK8XHJX", "TEST0CASE")}
    for name, (image, label) in cases.items():
        _write_h5(h5_dir / name / "mri_norm2.h5", image, label)
    train = tmp_path / "data" / "train.list"
    prefixed = "../data/2018LA_Seg_Training Set/1D7CUD1955YZPGK8XHJX/mri_norm2.h5"
    train.write_text(f"0RZDK210BSMWAA6467LU\n\n  {prefixed}  \n")
    test = tmp_path / "data" / "test.list"
    test.write_text("TEST0CASE\n")
    before = _snapshot(tmp_path / "data")

    spacing = (0.625, 0.625, 1.25)
    out = convert_h5(h5_dir, tmp_path / "LA", train, test, spacing=spacing,
                     labels={"background": 0, "left_atrium": 1})
    expected_affine = np.diag([*spacing, 1.0])
    for name, (image, label) in cases.items():
        subset = "Ts" if name == "TEST0CASE" else "Tr"
        data, affine = _read(out / f"images{subset}" / f"{name}_0000.nii.gz")
        np.testing.assert_array_equal(data, image)
        np.testing.assert_array_equal(affine, expected_affine)
        data, affine = _read(out / f"labels{subset}" / f"{name}.nii.gz")
        np.testing.assert_array_equal(data, label)
        np.testing.assert_array_equal(affine, expected_affine)

    meta = json.loads((out / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "MRI"}
    assert meta["labels"] == {"background": 0, "left_atrium": 1}
    assert meta["numTraining"] == 2
    assert meta["converted_from"]["spacing"] == list(spacing)
    assert meta["converted_from"]["train_list"] == str(train.resolve())
    assert _snapshot(tmp_path / "data") == before


def test_h5_pancreas_layout_and_entry_spellings(tmp_path):
    rng = np.random.default_rng(2)
    h5_dir = tmp_path / "Pancreas_h5"
    cases = {f"image{i:04d}": _h5_case(rng) for i in (1, 2, 3)}
    for name, (image, label) in cases.items():
        _write_h5(h5_dir / f"{name}_norm.h5", image, label)
    out = convert_h5(h5_dir, tmp_path / "P", ["image0001", "image0002.h5", "Pancreas_h5/image0003_norm.h5"],
                     spacing=(1.0, 1.0, 1.0), modality="CT")
    for name, (image, _) in cases.items():
        data, _ = _read(out / "imagesTr" / f"{name}_0000.nii.gz")
        np.testing.assert_array_equal(data, image)
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "CT"} and meta["numTraining"] == 3
    assert not (out / "imagesTs").exists()


def test_h5_candidates_order():
    case, tried = h5_candidates(Path("/d"), "ABC")
    assert case == "ABC"
    d = Path("/d")
    assert tried == [d / "ABC", d / "ABC" / "mri_norm2.h5", d / "ABC.h5", d / "ABC_norm.h5"]
    case, tried = h5_candidates(d, "Pancreas_h5/image0003_norm.h5")
    assert case == "image0003"
    assert d / "image0003_norm.h5" in tried


def test_h5_bad_list_entry_names_line(tmp_path):
    rng = np.random.default_rng(3)
    h5_dir = tmp_path / "h5"
    _write_h5(h5_dir / "a.h5", *_h5_case(rng))
    train = tmp_path / "train.list"
    train.write_text("a\n\nnot_there\n")
    with pytest.raises(InputFileError, match=r"train\.list line 3: 'not_there' resolves to no h5 file"):
        convert_h5(h5_dir, tmp_path / "out", train, spacing=(1, 1, 1))
    assert not (tmp_path / "out").exists()


def test_h5_without_label_dataset_is_refused(tmp_path):
    h5_dir = tmp_path / "h5"
    _write_h5(h5_dir / "a.h5", np.zeros(SHAPE, np.float32), None)
    with pytest.raises(InputFileError, match=r"a\.h5: no dataset 'label'"):
        convert_h5(h5_dir, tmp_path / "out", ["a"], spacing=(1, 1, 1))


def test_h5_undeclared_or_fractional_labels_are_refused(tmp_path):
    h5_dir = tmp_path / "h5"
    label = np.zeros(SHAPE, np.uint8)
    label[0, 0, 0] = 3
    _write_h5(h5_dir / "a.h5", np.zeros(SHAPE, np.float32), label)
    _write_h5(h5_dir / "b.h5", np.zeros(SHAPE, np.float32), np.full(SHAPE, 0.5, np.float32))
    with pytest.raises(InputFileError, match=r"a\.h5: label values \[3\] are not among"):
        convert_h5(h5_dir, tmp_path / "out", ["a"], spacing=(1, 1, 1))
    with pytest.raises(InputFileError, match=r"b\.h5: label values must be integers"):
        convert_h5(h5_dir, tmp_path / "out2", ["b"], spacing=(1, 1, 1))


def test_h5_case_in_train_and_test_is_refused(tmp_path):
    h5_dir = tmp_path / "h5"
    _write_h5(h5_dir / "a.h5", *_h5_case(np.random.default_rng(4)))
    with pytest.raises(MnsegError, match="both the training and the test list"):
        convert_h5(h5_dir, tmp_path / "out", ["a"], ["a.h5"], spacing=(1, 1, 1))


# ----------------------------------------------------------------------------------------- CLI


def test_cli_h5_and_msd(tmp_path, capsys):
    rng = np.random.default_rng(5)
    h5_dir = tmp_path / "h5"
    image, label = _h5_case(rng)
    _write_h5(h5_dir / "case1" / "mri_norm2.h5", image, label)
    (tmp_path / "train.list").write_text("case1\n")
    rc = main(["convert", "h5", str(h5_dir), str(tmp_path / "out"),
               "--train-list", str(tmp_path / "train.list"), "--spacing", "0.5,0.5,2",
               "--labels", "background=0,left_atrium=1"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "imagesTr/" in printed and "1 training" in printed
    _, affine = _read(tmp_path / "out" / "imagesTr" / "case1_0000.nii.gz")
    np.testing.assert_array_equal(np.diag(affine), [0.5, 0.5, 2.0, 1.0])

    task, _ = _make_msd(tmp_path)
    assert main(["convert", "msd", str(task), str(tmp_path / "msd_out")]) == 0
    assert (tmp_path / "msd_out" / "dataset.json").is_file()


def test_cli_errors_exit_2_with_message(tmp_path, capsys):
    h5_dir = tmp_path / "h5"
    h5_dir.mkdir()
    (tmp_path / "train.list").write_text("x\n")
    base = ["convert", "h5", str(h5_dir), str(tmp_path / "out"), "--train-list", str(tmp_path / "train.list")]
    assert main([*base, "--spacing", "0.5,abc,1"]) == 2
    assert "--spacing" in capsys.readouterr().err
    assert main([*base, "--spacing", "1", "--labels", "background=0,fg"]) == 2
    assert "NAME=INT" in capsys.readouterr().err
    assert main([*base, "--spacing", "1"]) == 2
    assert "line 1: 'x' resolves to no h5 file" in capsys.readouterr().err
