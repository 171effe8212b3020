"""End to end through the CLI on the toy dataset: train, test, predict, resume."""

import json

import numpy as np
import pytest
import torch

from mnseg.cli import main
from tests.helpers.interrupted import train_then_die

TINY_3D = ["models.net.name=unet3d", "models.net.kwargs={depth: 3, base_filters: 8}"]


def _train(ds, run, cache, *extra, method="supervised", epochs=8, iters=8, labeled=3):
    argv = ["train", str(ds), "--method", method, "--num-labeled", str(labeled), "--epochs", str(epochs),
            "--iters-per-epoch", str(iters), "--patch-size", "32,32,32", "--run-dir", str(run), "--no-progress",
            f"data.cache_dir={cache}", *extra]
    return main(argv)


def test_supervised_3d_reaches_high_test_dice(toy_dataset, tmp_path):
    rc = _train(toy_dataset, tmp_path / "run", tmp_path / "cache", "--test", *TINY_3D,
                "models.net.optim.lr=3e-3", "models.net.optim.warmup_epochs=1")
    assert rc == 0
    summary = json.loads((tmp_path / "run" / "test_predictions" / "summary.json").read_text())
    assert summary["mean"]["fg"]["dice"] > 0.9
    for name in ["config.yaml", "plans.json", "split.json", "env.json", "history.csv", "checkpoints/last.pt"]:
        assert (tmp_path / "run" / name).exists(), name
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    assert len(split["labeled"]) == 3
    timing = json.loads((tmp_path / "run" / "timing.json").read_text())  # a plain train records its time too
    assert timing["iterations"] == 8 * 8 and timing["train_seconds"] > 0


def test_supervised_2d_slicewise_reaches_high_test_dice(toy_dataset, tmp_path):
    rc = _train(toy_dataset, tmp_path / "run", tmp_path / "cache", "--test", "models.net.name=unet2d",
                "models.net.kwargs={}", "models.net.optim.lr=3e-3", "models.net.optim.warmup_epochs=1")
    assert rc == 0
    summary = json.loads((tmp_path / "run" / "test_predictions" / "summary.json").read_text())
    assert summary["mean"]["fg"]["dice"] > 0.9


def test_resume_continues_the_same_run(toy_dataset, tmp_path):
    from mnseg.commands.train import build_config

    common = [*TINY_3D, "train.deterministic=true", "train.amp=false", "--num-val", "1", "train.val_every=1"]
    assert _train(toy_dataset, tmp_path / "full", tmp_path / "cache", *common, epochs=4, iters=3) == 0

    # Interrupted run: two epochs, then the process "dies"; a new trainer resumes from last.pt.
    import argparse

    from mnseg.commands.train import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args([str(toy_dataset), "--num-labeled", "3", "--epochs", "4", "--iters-per-epoch", "3",
                         "--patch-size", "32,32,32", "--num-val", "1"])
    args.overrides = [*TINY_3D, f"data.cache_dir={tmp_path / 'cache'}", "train.deterministic=true",
                      "train.amp=false", "train.val_every=1"]
    train_then_die(build_config(args), tmp_path / "part", epochs=2)
    assert main(["train", "--resume", str(tmp_path / "part"), "--no-progress"]) == 0

    a = torch.load(tmp_path / "full" / "checkpoints" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "part" / "checkpoints" / "last.pt", weights_only=False)
    assert a["epoch"] == b["epoch"] == 4
    for key, value in a["models"]["net"].items():
        torch.testing.assert_close(value, b["models"]["net"][key], rtol=1e-5, atol=1e-6, msg=key)
    hist_a = (tmp_path / "full" / "history.csv").read_text().splitlines()
    hist_b = (tmp_path / "part" / "history.csv").read_text().splitlines()
    assert len(hist_a) == len(hist_b) == 5
    col = hist_a[0].split(",").index("loss")
    for ra, rb in zip(hist_a[1:], hist_b[1:]):
        assert float(ra.split(",")[col]) == pytest.approx(float(rb.split(",")[col]), rel=1e-4)


def test_resume_refuses_a_fresh_directory(tmp_path):
    (tmp_path / "run").mkdir()
    assert main(["train", "--resume", str(tmp_path / "run")]) == 2


def test_predict_lands_in_original_geometry(toy_dataset, tmp_path, capsys):
    """A test image stored LPS-oriented with other spacing comes back in exactly its own grid."""
    import nibabel as nib

    from mnseg.data.io import load_nifti, save_nifti
    from mnseg.data.toy import toy_case
    from mnseg.evaluation.metrics import dice

    assert _train(toy_dataset, tmp_path / "run", tmp_path / "cache", *TINY_3D, "models.net.optim.lr=3e-3",
                  "models.net.optim.warmup_epochs=1", "data.target_spacing=[1.0, 1.0, 1.0]") == 0
    image, label = toy_case((40, 36, 30), seed=999)
    # Store the case flipped along x and y (LPS) with 0.8 x 1.0 x 1.2 mm voxels.
    affine = np.diag([-0.8, -1.0, 1.2, 1.0])
    affine[:3, 3] = [30.0, 40.0, -5.0]
    inp = tmp_path / "in"
    save_nifti(image[::-1, ::-1], affine, inp / "odd_0000.nii.gz")
    out = tmp_path / "out"
    assert main(["predict", "-i", str(inp), "-o", str(out), "-m", str(tmp_path / "run"), "--no-progress"]) == 0
    pred = load_nifti(out / "odd.nii.gz", dtype=None)
    assert pred.shape == (40, 36, 30)
    np.testing.assert_allclose(pred.affine, affine)
    assert nib.load(str(out / "odd.nii.gz")).get_data_dtype() == np.uint8
    assert dice(pred.data == 1, label[::-1, ::-1] == 1) > 0.8

    # Refuses to overwrite, refuses the input folder, reports a corrupt file but predicts the rest.
    assert main(["predict", "-i", str(inp), "-o", str(out), "-m", str(tmp_path / "run"), "--no-progress"]) == 2
    assert main(["predict", "-i", str(inp), "-o", str(inp), "-m", str(tmp_path / "run"), "--no-progress"]) == 2
    (inp / "bad_0000.nii.gz").write_bytes((inp / "odd_0000.nii.gz").read_bytes()[:300])
    out2 = tmp_path / "out2"
    rc = main(["predict", "-i", str(inp), "-o", str(out2), "-m", str(tmp_path / "run"), "--no-progress"])
    assert rc == 1
    assert (out2 / "odd.nii.gz").exists() and not (out2 / "bad.nii.gz").exists()
    assert "bad_0000.nii.gz" in capsys.readouterr().err

    # Probabilities go to a subfolder (so `mnseg evaluate OUT` sees only masks), channels last, rows sum to 1.
    (inp / "bad_0000.nii.gz").unlink()
    out3 = tmp_path / "out3"
    assert main(["predict", "-i", str(inp), "-o", str(out3), "-m", str(tmp_path / "run"), "--no-progress",
                 "--save-probabilities"]) == 0
    assert sorted(p.name for p in out3.glob("*.nii.gz")) == ["odd.nii.gz"]
    probs = nib.load(str(out3 / "probabilities" / "odd.nii.gz"))
    assert probs.shape == (40, 36, 30, 2)
    np.testing.assert_allclose(probs.affine, affine)
    np.testing.assert_allclose(np.asarray(probs.dataobj).sum(-1), 1.0, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_resume_on_cuda(toy_dataset, tmp_path):
    """A checkpoint loaded onto the GPU carries its RNG states as CUDA tensors; resuming must still work."""
    run = tmp_path / "run"
    assert _train(toy_dataset, run, tmp_path / "cache", *TINY_3D, "--device", "cuda", epochs=2, iters=2) == 0
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    ckpt["epoch"] = 1  # as if the process died after its first epoch
    torch.save(ckpt, run / "checkpoints" / "last.pt")
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=False)["epoch"] == 2
