"""A shared model cannot run code: predict, resume, export and pretrained weights never unpickle code.

A crafted checkpoint whose pickle writes a marker file stands in for a malicious one; the marker must never appear.
"""

from __future__ import annotations

import json
import random
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from mnseg.cli import main
from mnseg.errors import MnsegError

TINY = ["models.net.name=unet3d", "models.net.kwargs={depth: 3, base_filters: 4}"]


def train_argv(ds, run, cache, *extra):
    return ["train", str(ds), "--method", "supervised", "--num-labeled", "3", "--num-val", "1", "--epochs", "2",
            "--iters-per-epoch", "2", "--patch-size", "16,16,16", "--batch-size", "2", "--run-dir", str(run),
            "--no-progress", f"data.cache_dir={cache}", *TINY, *extra]


class RunsCode:
    """Unpickling this writes the marker file: what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('code ran')",))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from mnseg.data.toy import make_toy_dataset

    root = tmp_path_factory.mktemp("safe")
    ds = make_toy_dataset(root / "Dataset001_Toy")
    assert main(train_argv(ds, root / "run", root / "cache")) == 0
    return ds, root / "run", root / "cache"


def copy_run(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


def plant_code(source: Path, run: Path, marker: Path, version: int = 2) -> None:
    """Replace both training checkpoints of ``run`` with pickles that would run code (mnseg-looking otherwise)."""
    from mnseg.engine.checkpoint import load_checkpoint

    ckpt = load_checkpoint(source / "checkpoints" / "last.pt")
    for tag in ("last", "best"):
        torch.save({**ckpt, "format_version": version, "method": {"x": RunsCode(marker)}}, run / "checkpoints" /
                   f"{tag}.pt")


def predict(ds, model, out, *extra):
    return main(["predict", "-i", str(ds / "imagesTs"), "-o", str(out), "-m", str(model), "--no-progress", *extra])


def masks(folder: Path) -> dict[str, np.ndarray]:
    import nibabel as nib

    return {p.name: np.asarray(nib.load(str(p)).dataobj) for p in sorted(folder.glob("*.nii.gz"))}


def one_clear_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.startswith("mnseg ")]
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


# ------------------------------------------------------------------------------------------ formats


def test_a_run_writes_safe_weights_and_checkpoints_that_load_weights_only(trained):
    from safetensors.torch import load_file

    _, run, _ = trained
    for tag in ("last", "best"):
        ckpt = torch.load(run / "checkpoints" / f"{tag}.pt", weights_only=True)  # no safe globals needed
        weights = load_file(run / "checkpoints" / f"{tag}.safetensors")
        assert set(weights) == {f"net/{k}" for k in ckpt["models"]["net"]}
        for key, value in ckpt["models"]["net"].items():
            assert torch.equal(weights[f"net/{key}"], value), key


def test_numpy_and_python_states_survive_the_safe_encoding_bit_for_bit():
    from mnseg.engine.checkpoint import from_safe, rng_state, to_safe

    rng = np.random.default_rng(3)
    rng.random(5)
    state = {
        "rng": rng_state(),
        "pcg": rng.bit_generator.state,
        "fg": {"case": {1: np.arange(12, dtype=np.int32).reshape(4, 3)}},
        "u32": np.array([0, 2**32 - 1], np.uint32),
        "u64": np.array([2**64 - 1], np.uint64),
        "scalar": np.float64(0.25),
    }
    back = from_safe(torch.load(_saved(to_safe(state)), weights_only=True))
    assert back["rng"]["python"] == random.getstate()
    ours, theirs = back["rng"]["numpy"], np.random.get_state()
    assert ours[0] == theirs[0] and np.array_equal(ours[1], theirs[1]) and ours[1].dtype == theirs[1].dtype
    assert ours[2:] == theirs[2:]
    assert back["pcg"] == rng.bit_generator.state
    assert back["fg"]["case"][1].dtype == np.int32 and np.array_equal(back["fg"]["case"][1], state["fg"]["case"][1])
    for key in ("u32", "u64"):
        assert back[key].dtype == state[key].dtype and np.array_equal(back[key], state[key])
    assert type(back["scalar"]) is np.float64 and back["scalar"] == 0.25
    np.random.set_state(back["rng"]["numpy"])  # accepted as NumPy's own state


def _saved(obj):
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def test_state_that_cannot_be_stored_safely_is_refused_at_save_naming_it():
    from mnseg.engine.checkpoint import to_safe

    with pytest.raises(MnsegError, match=r"last.pt\['method'\]\['sampler'\]: a builtins.object cannot be stored"):
        to_safe({"method": {"sampler": object()}}, "last.pt")


# ------------------------------------------------------------------------------------------ code never runs


def test_crafted_checkpoint_never_runs_in_predict_resume_export_or_convert(trained, tmp_path, capsys):
    ds, run, _ = trained
    marker = tmp_path / "marker"
    evil = copy_run(run, tmp_path / "evil")
    plant_code(run, evil, marker)

    # predict and export read only the safetensors weights: the pickles are never opened
    assert predict(ds, evil, tmp_path / "out") == 0
    assert main(["export", str(evil), str(tmp_path / "evil.zip")]) == 0
    # resume refuses the pickle, naming the file and the risk
    capsys.readouterr()
    assert main(["train", "--resume", str(evil), "--no-progress"]) == 2
    line = one_clear_line(capsys.readouterr().err)
    assert str(evil / "checkpoints" / "last.pt") in line and "arbitrary code" in line and "builtins.exec" in line
    # the explicit conversion refuses it too, unless trusted
    assert main(["convert-checkpoint", str(evil)]) == 2
    line = one_clear_line(capsys.readouterr().err)
    assert "builtins.exec" in line and "--trust" in line
    # without the safe weights, predict and export point to the conversion instead of reading the pickle
    for tag in ("last", "best"):
        (evil / "checkpoints" / f"{tag}.safetensors").unlink()
    assert predict(ds, evil, tmp_path / "out2") == 2
    assert "mnseg convert-checkpoint" in one_clear_line(capsys.readouterr().err)
    assert main(["export", str(evil), str(tmp_path / "evil2.zip")]) == 2
    assert "mnseg convert-checkpoint" in one_clear_line(capsys.readouterr().err)
    assert not (tmp_path / "evil2.zip").exists()
    # an old-format (version 1) crafted file is refused the same way
    plant_code(run, evil, marker, version=1)
    assert main(["train", "--resume", str(evil), "--no-progress"]) == 2
    assert "arbitrary code" in one_clear_line(capsys.readouterr().err)
    assert not marker.exists()


def test_a_zip_with_a_pickle_for_weights_is_refused(trained, tmp_path, capsys):
    ds, run, _ = trained
    marker = tmp_path / "marker"
    good = tmp_path / "good.zip"
    assert main(["export", str(run), str(good)]) == 0
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bad, "w") as dst:
        for name in src.namelist():
            if name == "weights.safetensors":
                dst.writestr(name, _saved({"net": RunsCode(marker)}).getvalue())
            else:
                dst.writestr(name, src.read(name))
    capsys.readouterr()
    assert predict(ds, bad, tmp_path / "out") == 2
    line = one_clear_line(capsys.readouterr().err)
    assert f"{bad}:weights.safetensors: cannot read weights" in line
    assert not marker.exists()


def test_pretrained_weights_holding_code_are_refused(tmp_path):
    from transformers import SegformerConfig

    from mnseg.errors import ConfigError
    from mnseg.models.segformer import load_segformer

    folder, marker = tmp_path / "segformer", tmp_path / "marker"
    SegformerConfig(num_labels=2, hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1], decoder_hidden_size=16,
                    num_attention_heads=[1, 2, 2, 4]).save_pretrained(folder)
    torch.save({"weight": RunsCode(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(ConfigError, match="could run code"):
        load_segformer(str(folder), "b0", 2)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------ sharing and old runs


def test_exported_zip_predicts_voxel_for_voxel_like_the_run_directory(trained, tmp_path):
    ds, run, _ = trained
    model = tmp_path / "model.zip"
    assert main(["export", str(run), str(model)]) == 0
    assert main(["export", str(run), str(model)]) == 2  # kept unless --overwrite
    with zipfile.ZipFile(model) as zf:
        assert sorted(zf.namelist()) == ["config.yaml", "model.json", "plans.json", "weights.safetensors"]
        description = json.loads(zf.read("model.json"))
    import mnseg

    plans = json.loads((run / "plans.json").read_text())
    assert description["mnseg_version"] == mnseg.__version__ and description["method"] == "supervised"
    assert description["labels"] == plans["labels"] and description["roles"] == ["net"]
    assert description["checkpoint"] == "best"

    assert predict(ds, run, tmp_path / "from_run", "--save-probabilities") == 0
    assert predict(ds, model, tmp_path / "from_zip", "--save-probabilities") == 0
    a, b = masks(tmp_path / "from_run"), masks(tmp_path / "from_zip")
    assert a and a.keys() == b.keys()
    for name in a:
        assert np.array_equal(a[name], b[name]), name
    pa, pb = masks(tmp_path / "from_run" / "probabilities"), masks(tmp_path / "from_zip" / "probabilities")
    assert all(np.array_equal(pa[n], pb[n]) for n in pa)


def test_a_corrupt_or_foreign_zip_gives_one_line(trained, tmp_path, capsys):
    ds, _, _ = trained
    not_zip = tmp_path / "model.zip"
    not_zip.write_bytes(b"not a zip")
    capsys.readouterr()
    assert predict(ds, not_zip, tmp_path / "out") == 2
    assert str(not_zip) in one_clear_line(capsys.readouterr().err)
    other = tmp_path / "other.zip"
    with zipfile.ZipFile(other, "w") as zf:
        zf.writestr("readme.txt", "hello")
    assert predict(ds, other, tmp_path / "out") == 2
    assert "missing model.json" in one_clear_line(capsys.readouterr().err)


def make_old_run(run: Path, dest: Path) -> Path:
    """A run directory as an earlier mnseg left it: full pickles with NumPy RNG state, no safetensors."""
    from mnseg.engine.checkpoint import load_checkpoint

    old = copy_run(run, dest)
    for tag in ("last", "best"):
        ckpt = load_checkpoint(old / "checkpoints" / f"{tag}.pt")  # NumPy states decoded back to arrays
        torch.save({**ckpt, "format_version": 1}, old / "checkpoints" / f"{tag}.pt")
        (old / "checkpoints" / f"{tag}.safetensors").unlink()
    return old


def test_an_old_run_is_converted_once_then_predicts_and_resumes(trained, tmp_path, capsys):
    from mnseg.engine.checkpoint import load_checkpoint

    ds, run, _ = trained
    old = make_old_run(run, tmp_path / "old")
    with pytest.raises(torch.serialization.pickle.UnpicklingError):
        torch.load(old / "checkpoints" / "last.pt", weights_only=True)  # the old file really is unsafe to load
    capsys.readouterr()
    assert predict(ds, old, tmp_path / "out") == 2
    assert f"mnseg convert-checkpoint {old}" in one_clear_line(capsys.readouterr().err)
    assert main(["train", "--resume", str(old), "--no-progress"]) == 2
    line = one_clear_line(capsys.readouterr().err)
    assert "earlier mnseg" in line and f"mnseg convert-checkpoint {old}" in line

    assert main(["convert-checkpoint", str(old)]) == 0
    before, after = load_checkpoint(run / "checkpoints" / "last.pt"), load_checkpoint(old / "checkpoints" / "last.pt")
    assert before["batcher"] == after["batcher"] and before["rng"]["python"] == after["rng"]["python"]
    assert np.array_equal(before["rng"]["numpy"][1], after["rng"]["numpy"][1])
    assert all(torch.equal(v, after["models"]["net"][k]) for k, v in before["models"]["net"].items())
    assert main(["convert-checkpoint", str(old)]) == 0  # a second time: nothing left to do
    assert predict(ds, run, tmp_path / "ref") == 0 and predict(ds, old, tmp_path / "out") == 0
    ref, got = masks(tmp_path / "ref"), masks(tmp_path / "out")
    assert ref.keys() == got.keys() and all(np.array_equal(ref[n], got[n]) for n in ref)
    assert main(["train", "--resume", str(old), "--no-progress", "train.epochs=3"]) == 0
