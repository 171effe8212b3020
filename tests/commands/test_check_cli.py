import json

from mnseg.cli import main


def test_check_valid_dataset(toy_dataset_multiclass, capsys):
    rc = main(["check", str(toy_dataset_multiclass)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "imagesTr 4, imagesUnlabeled 4, imagesTs 2" in out
    assert "Spacing (mm)" in out and "32 x 32 x 32" in out
    assert "outer" in out and "inner" in out
    assert "No problems found." in out


def test_check_broken_dataset_exits_2_and_names_files(toy_dataset, capsys):
    (toy_dataset / "labelsTr" / "toytr_001.nii.gz").unlink()
    path = toy_dataset / "imagesTs" / "toyts_000_0000.nii.gz"
    path.write_bytes(path.read_bytes()[:100])
    rc = main(["check", str(toy_dataset)])
    captured = capsys.readouterr()
    assert rc == 2
    warning = next(ln for ln in captured.out.splitlines() if "toytr_001_0000.nii.gz" in ln)
    assert "WARNING" in warning and "image without label" in warning and "unlabelled" in warning
    assert "toyts_000_0000.nii.gz" in captured.out
    assert "1 error(s)" in captured.err  # the truncated file; the label-less imagesTr case can still be unlabelled
    assert "Traceback" not in captured.out + captured.err


def test_check_warnings_do_not_fail(toy_dataset, capsys):
    meta = json.loads((toy_dataset / "dataset.json").read_text())
    (toy_dataset / "dataset.json").write_text(json.dumps({**meta, "numTraining": 99}))
    rc = main(["check", str(toy_dataset)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "WARNING" in out and "numTraining is 99" in out


def test_check_no_voxels_skips_statistics(toy_dataset, capsys):
    rc = main(["check", str(toy_dataset), "--no-voxels"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "voxel checks skipped" in out and "Intensity" not in out


def test_check_missing_folder(tmp_path, capsys):
    rc = main(["check", str(tmp_path / "nowhere")])
    out = capsys.readouterr().out
    assert rc == 2 and "dataset folder not found" in out


def test_check_counts_and_validates_the_target_domain(tmp_path, capsys):
    from mnseg.data.toy import make_toy_dataset

    ds = make_toy_dataset(tmp_path / "Dataset006_Shift", n_target=3)
    assert main(["check", str(ds)]) == 0
    assert "imagesTs 2, imagesTarget 3, labelsTarget 3" in capsys.readouterr().out

    (ds / "labelsTarget" / "toytgt_001.nii.gz").write_bytes(b"garbage")  # checked like every other label
    (ds / "labelsTarget" / "toytgt_002.nii.gz").unlink()
    assert main(["check", str(ds)]) == 2
    out = capsys.readouterr().out
    assert "imagesTarget 3, labelsTarget 2" in out
    assert any("ERROR" in ln and "toytgt_001.nii.gz" in ln for ln in out.splitlines())
    warning = next(ln for ln in out.splitlines() if "toytgt_002_0000.nii.gz" in ln)
    assert "WARNING" in warning and "target case 'toytgt_002' has no label in labelsTarget" in warning


def test_check_leaves_out_an_absent_target_domain(toy_dataset, capsys):
    assert main(["check", str(toy_dataset), "--no-voxels"]) == 0
    assert "imagesTarget" not in capsys.readouterr().out
