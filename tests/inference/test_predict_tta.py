"""Mirror TTA at prediction follows the flips each model was trained with; --tta-axes overrides."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import mnseg.inference.predict as engine_predict
from mnseg.cli import build_parser, main
from mnseg.config.schema import Config
from mnseg.data.toy import make_toy_dataset
from mnseg.errors import ConfigError
from mnseg.inference.predict import MirrorAveraged, configure_tta, load_run, training_flip_axes

TINY_3D = ["models.net.name=unet3d", "models.net.kwargs={depth: 3, base_filters: 4}"]


def _train(ds, run, cache, *extra):
    argv = ["train", str(ds), "--num-labeled", "2", "--epochs", "1", "--iters-per-epoch", "1", "--patch-size",
            "32,32,32", "--run-dir", str(run), "--no-progress", f"data.cache_dir={cache}", "train.batch_size=1",
            *TINY_3D, *extra]
    assert main(argv) == 0


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny trained runs: the default conservative_3d preset (no flips) and one flipping axes 0 and 2."""
    root = tmp_path_factory.mktemp("tta")
    ds = make_toy_dataset(root / "Dataset001_Toy", n_test=1)
    _train(ds, root / "noflip", root / "cache")
    _train(ds, root / "flip02", root / "cache", "models.net.augment.overrides={flip_axes: [0, 2]}")
    return {"dataset": ds, "noflip": root / "noflip", "flip02": root / "flip02"}


def test_training_flip_axes_follow_presets_and_overrides():
    cfg = Config()
    assert training_flip_axes(cfg, "net") == ()  # conservative_3d: zoom + gamma only
    cfg.models["net"].augment.preset = "strong_2d"
    assert training_flip_axes(cfg, "net") == (0, 1)
    cfg.models["net"].augment.overrides = {"flip_axes": [2, 0]}
    assert training_flip_axes(cfg, "net") == (0, 2)


def test_a_teacher_augmented_on_its_slices_is_mirrored_in_its_slice_plane():
    """sparse2dense flips the teacher's 2D slices: axes 0 and 1 of a slice are the volume axes beside slice_axis."""
    from mnseg.methods import method_class

    in_slices = method_class("sparse2dense").slice_augmented
    cfg = Config.from_dict({"models": {"teacher": {"augment": {"preset": "strong_2d"}, "slice_axis": 0},
                                       "student": {}}})
    assert training_flip_axes(cfg, "teacher", slice_augmented=in_slices) == (1, 2)
    cfg.models["teacher"].slice_axis = -1
    assert training_flip_axes(cfg, "teacher", slice_augmented=in_slices) == (0, 1)
    cfg.models["teacher"].slice_axis = 1
    cfg.models["teacher"].augment.overrides = {"flip_axes": [1]}
    assert training_flip_axes(cfg, "teacher", slice_augmented=in_slices) == (2,)
    assert training_flip_axes(cfg, "student", slice_augmented=in_slices) == ()


def test_frozen_teacher_gets_the_flips_of_the_trained_roles():
    cfg = Config.from_dict({"models": {"student": {"augment": {"preset": "strong_2d"}},
                                       "teacher": {"augment": {"preset": "none"}}}})
    assert training_flip_axes(cfg, "teacher", frozen_roles=("teacher",)) == (0, 1)
    assert training_flip_axes(cfg, "teacher") == ()


def test_a_network_fed_another_roles_augmented_batch_gets_that_roles_flips():
    from mnseg.methods import method_class

    cfg = Config.from_dict({"models": {"net_a": {"augment": {"preset": "strong_2d"}},
                                       "net_b": {"augment": {"preset": "none"}}}})
    for name in ("cps", "dual_contrast"):  # both networks train on net_a's augmented batch
        augmented_as = method_class(name).augmented_as
        assert training_flip_axes(cfg, "net_b", augmented_as=augmented_as) == (0, 1)
    assert training_flip_axes(cfg, "net_b") == ()


def test_tta_axes_follow_the_run_config(runs):
    run = load_run(runs["flip02"], device="cpu")
    assert run.roles == ["net"] and run.mirror_axes == [()]  # off until asked for
    messages = []
    assert configure_tta(run, log=messages.append) == [(0, 2)]
    assert run.mirror_axes == [(0, 2)] and not messages


def test_model_trained_without_flips_warns_and_falls_back_to_no_mirroring(runs):
    run = load_run(runs["noflip"], device="cpu")
    messages = []
    assert configure_tta(run, log=messages.append) == [()]
    assert len(messages) == 1
    assert "without flips" in messages[0] and "conservative_3d" in messages[0] and "--tta-axes" in messages[0]


def test_explicit_axes_are_honoured_and_checked(runs):
    run = load_run(runs["noflip"], device="cpu")
    messages = []
    assert configure_tta(run, (2, 0, 2), log=messages.append) == [(0, 2)]
    assert not messages
    with pytest.raises(ConfigError, match="axes \\[3\\]"):
        configure_tta(run, (0, 3))


def test_mirror_averaged_model_gives_the_mean_of_flipped_softmaxes():
    torch.manual_seed(0)
    model = torch.nn.Conv3d(1, 3, 3, padding=1)
    x = torch.randn(2, 1, 6, 5, 4)
    expected = torch.zeros(2, 3, 6, 5, 4)
    subsets = [s for r in range(3) for s in itertools.combinations((2, 4), r)]
    for dims in subsets:
        expected += torch.softmax(model(x.flip(dims)), 1).flip(dims) / len(subsets)
    with torch.no_grad():
        got = torch.softmax(MirrorAveraged(model, (0, 2))(x), 1)
        torch.testing.assert_close(got, expected.detach(), rtol=1e-5, atol=1e-6)
        plain = torch.softmax(model(x), 1)
    assert not torch.allclose(got, plain, atol=1e-4)  # the flips did change something


def _predict(runs, run_name, out, *extra, monkeypatch, capsys):
    seen = []
    real = engine_predict.predict_probabilities

    def spy(*args, **kwargs):
        seen.append(kwargs.get("mirror_axes"))
        return real(*args, **kwargs)

    monkeypatch.setattr(engine_predict, "predict_probabilities", spy)
    rc = main(["predict", "-i", str(runs["dataset"] / "imagesTs"), "-o", str(out), "-m", str(runs[run_name]),
               "--device", "cpu", "--no-progress", "--save-probabilities", "--checkpoint", "last", *extra])
    assert rc == 0
    return seen, capsys.readouterr().err


def _probabilities(out):
    import nibabel as nib

    (path,) = sorted((out / "probabilities").iterdir())
    return np.asarray(nib.load(path).dataobj, dtype=np.float32)


def test_cli_tta_uses_training_flips_or_warns(runs, tmp_path, monkeypatch, capsys):
    seen, err = _predict(runs, "flip02", tmp_path / "a", "--tta", monkeypatch=monkeypatch, capsys=capsys)
    assert seen == [[(0, 2)]]
    assert "warning" not in err

    seen, err = _predict(runs, "noflip", tmp_path / "b", "--tta", monkeypatch=monkeypatch, capsys=capsys)
    assert seen == [[()]]
    assert "trained without flips" in err
    seen, _ = _predict(runs, "noflip", tmp_path / "c", monkeypatch=monkeypatch, capsys=capsys)
    assert seen == [[()]]
    np.testing.assert_allclose(_probabilities(tmp_path / "b"), _probabilities(tmp_path / "c"), atol=1e-6)


def test_cli_explicit_tta_axes_mirror_even_without_training_flips(runs, tmp_path, monkeypatch, capsys):
    seen, err = _predict(runs, "noflip", tmp_path / "a", "--tta-axes", "0,1,2", monkeypatch=monkeypatch,
                         capsys=capsys)
    assert seen == [[(0, 1, 2)]]
    assert "warning" not in err
    _predict(runs, "noflip", tmp_path / "b", monkeypatch=monkeypatch, capsys=capsys)
    assert not np.allclose(_probabilities(tmp_path / "a"), _probabilities(tmp_path / "b"), atol=1e-6)


def test_cli_rejects_malformed_axes(runs, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["predict", "-i", "x", "-o", str(tmp_path / "o"), "-m", str(runs["noflip"]), "--tta-axes", "0,z"])
    assert "0,1,2" in capsys.readouterr().err


def test_help_explains_tta_axes(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["predict", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--tta-axes" in text
    assert "flipped along in training" in text and "models.<role>.augment" in text
    assert "trained without flips" in text and "predicted unmirrored" in text
