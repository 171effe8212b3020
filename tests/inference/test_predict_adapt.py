"""``mnseg predict --adapt``: the run's files never change, --adapt none is today's prediction, an episodic adaptation
does not reach the next scan, and bad options are refused with a clear message."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from mnseg.cli import build_parser, main
from mnseg.data.toy import make_toy_dataset
from mnseg.inference.adapt import AdaptSettings, configure_adaptation
from mnseg.inference.predict import load_run, predict_folder

TINY = "models.net.kwargs={depth: 3, base_filters: 4%s}"


def _train(ds, run, cache, norm):
    argv = ["train", str(ds), "--num-labeled", "2", "--epochs", "1", "--iters-per-epoch", "1", "--patch-size",
            "32,32,32", "--run-dir", str(run), "--no-progress", f"data.cache_dir={cache}", "train.batch_size=1",
            "models.net.name=unet3d", TINY % (", norm: batch" if norm == "batch" else "")]
    assert main(argv) == 0


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny trained 3D UNets, one with BatchNorm, one with the default InstanceNorm; two test scans."""
    root = tmp_path_factory.mktemp("adapt")
    ds = make_toy_dataset(root / "Dataset001_Toy", n_test=2)
    _train(ds, root / "batch", root / "cache", "batch")
    _train(ds, root / "instance", root / "cache", "instance")
    return {"images": ds / "imagesTs", "batch": root / "batch", "instance": root / "instance"}


def _predict(run, images, out, *extra):
    return main(["predict", "-i", str(images), "-o", str(out), "-m", str(run), "--device", "cpu", "--no-progress",
                 "--save-probabilities", "--checkpoint", "last", *extra])


def _arrays(out, case):
    import nibabel as nib

    mask = np.asarray(nib.load(out / f"{case}.nii.gz").dataobj)
    probabilities = np.asarray(nib.load(out / "probabilities" / f"{case}.nii.gz").dataobj, dtype=np.float32)
    return mask, probabilities


def _hashes(folder):
    return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_adapt_none_predicts_exactly_as_without_the_option(runs, tmp_path):
    assert _predict(runs["batch"], runs["images"], tmp_path / "plain") == 0
    assert _predict(runs["batch"], runs["images"], tmp_path / "none", "--adapt", "none") == 0
    for case in ("toyts_000", "toyts_001"):
        for plain, none in zip(_arrays(tmp_path / "plain", case), _arrays(tmp_path / "none", case)):
            np.testing.assert_array_equal(plain, none)


def test_adaptation_changes_the_prediction_but_never_the_runs_files(runs, tmp_path, capsys):
    before = _hashes(runs["batch"])
    assert _predict(runs["batch"], runs["images"], tmp_path / "plain") == 0
    assert _predict(runs["batch"], runs["images"], tmp_path / "tent", "--adapt", "entropy", "--adapt-steps", "3",
                    "--adapt-lr", "0.01") == 0
    assert "entropy minimisation (TENT), 3 Adam step(s) at lr 0.01" in capsys.readouterr().err
    assert _predict(runs["batch"], runs["images"], tmp_path / "norm", "--adapt", "norm") == 0
    assert "BatchNorm statistics (BN adapt), reset after every scan" in capsys.readouterr().err
    assert _hashes(runs["batch"]) == before
    plain = _arrays(tmp_path / "plain", "toyts_000")[1]
    for adapted in ("tent", "norm"):
        assert np.abs(_arrays(tmp_path / adapted, "toyts_000")[1] - plain).max() > 1e-4, adapted


def test_episodic_adaptation_does_not_reach_the_next_scan_and_continual_does(runs, tmp_path):
    tent = ["--adapt", "entropy", "--adapt-steps", "3", "--adapt-lr", "0.01"]
    second = runs["images"] / "toyts_001_0000.nii.gz"  # predicted after toyts_000 in the folder
    assert _predict(runs["batch"], second, tmp_path / "alone", *tent) == 0
    assert _predict(runs["batch"], runs["images"], tmp_path / "episodic", *tent) == 0
    assert _predict(runs["batch"], runs["images"], tmp_path / "continual", *tent, "--adapt-continual") == 0
    alone = _arrays(tmp_path / "alone", "toyts_001")[1]
    np.testing.assert_allclose(_arrays(tmp_path / "episodic", "toyts_001")[1], alone, rtol=0, atol=1e-6)
    assert np.abs(_arrays(tmp_path / "continual", "toyts_001")[1] - alone).max() > 1e-4


def test_predict_folder_gives_back_the_loaded_model_after_continual_adaptation(runs, tmp_path):
    run = load_run(runs["batch"], "last", "cpu")
    (model,) = run.models
    before = {k: v.clone() for k, v in model.state_dict().items()}
    configure_adaptation(run, AdaptSettings("entropy", steps=1, lr=1e-2, episodic=False))
    assert not predict_folder(run, runs["images"], tmp_path / "out", progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_norm_on_an_instance_norm_run_says_so_and_predicts_as_without(runs, tmp_path, capsys):
    assert _predict(runs["instance"], runs["images"], tmp_path / "plain") == 0
    assert _predict(runs["instance"], runs["images"], tmp_path / "norm", "--adapt", "norm") == 0
    err = capsys.readouterr().err
    assert "model 'net' has no BatchNorm layer" in err and "InstanceNorm3d" in err and "--adapt entropy" in err
    for plain, norm in zip(_arrays(tmp_path / "plain", "toyts_000"), _arrays(tmp_path / "norm", "toyts_000")):
        np.testing.assert_array_equal(plain, norm)


@pytest.mark.parametrize("extra, message", [
    (["--adapt", "tent"], "invalid choice: 'tent'"),
    (["--adapt", "entropy", "--adapt-steps", "0"], "expected a positive whole number, got '0'"),
    (["--adapt", "entropy", "--adapt-steps", "2.5"], "expected a positive whole number, got '2.5'"),
    (["--adapt", "entropy", "--adapt-lr=-1e-3"], "expected a positive number such as 1e-3, got '-1e-3'"),
    (["--adapt", "entropy", "--adapt-lr", "0"], "expected a positive number such as 1e-3, got '0'"),
    (["--adapt", "entropy", "--adapt-lr", "fast"], "expected a positive number such as 1e-3, got 'fast'"),
])
def test_cli_rejects_malformed_adapt_values(runs, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit):
        _predict(runs["batch"], runs["images"], tmp_path / "out", *extra)
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--adapt", "norm", "--adapt-steps", "3"], "--adapt-steps applies only to --adapt entropy (got --adapt norm)"),
    (["--adapt-lr", "0.1"], "--adapt-lr applies only to --adapt entropy (got --adapt none)"),
    (["--adapt-steps", "3", "--adapt-lr", "0.1"], "--adapt-steps and --adapt-lr apply only to --adapt entropy"),
    (["--adapt-continual"], "--adapt-continual needs --adapt norm or --adapt entropy"),
])
def test_cli_refuses_adapt_options_the_mode_would_ignore(runs, tmp_path, capsys, extra, message):
    assert _predict(runs["batch"], runs["images"], tmp_path / "out", *extra) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_help_explains_adapt(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["predict", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--adapt {none,norm,entropy}" in text and "--adapt-steps" in text and "--adapt-continual" in text
    assert "TENT" in text and "BN adapt" in text and "never the run's files" in text
