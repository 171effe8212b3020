"""A new user's first hour (issue 18): mistakes answer at once and leave nothing behind; predict takes files."""

import os
import subprocess
import sys
import time

import pytest

from mnseg.cli import main
from mnseg.errors import MnsegError

TINY = ["--epochs", "1", "--iters-per-epoch", "1", "--patch-size", "32,32,32", "--no-progress",
        "models.net.name=unet3d", "models.net.kwargs={depth: 3, base_filters: 4}"]


def test_default_run_name_reads_all_not_alll(toy_dataset):
    import argparse

    from mnseg.commands.train import add_arguments, build_config, default_run_dir

    p = argparse.ArgumentParser()
    add_arguments(p)
    cfg = build_config(p.parse_args([str(toy_dataset)]))
    assert default_run_dir(cfg).endswith(os.path.join("Dataset001_Toy", "supervised_all_seed0"))
    cfg = build_config(p.parse_args([str(toy_dataset), "--num-labeled", "3", "--seed", "2"]))
    assert default_run_dir(cfg).endswith("supervised_3l_seed2")


def test_failed_train_leaves_no_run_folder_and_the_corrected_command_works(toy_dataset, tmp_path, monkeypatch,
                                                                            capsys):
    from mnseg.engine.trainer import Trainer

    monkeypatch.chdir(tmp_path)
    cache = f"data.cache_dir={tmp_path / 'cache'}"
    # wrong path, folder without dataset.json: refused before anything is written
    assert main(["train", str(tmp_path / "Dataset001_Typo"), *TINY, cache]) == 2
    (tmp_path / "NoJson").mkdir()
    assert main(["train", str(tmp_path / "NoJson"), *TINY, cache]) == 2
    err = capsys.readouterr().err
    assert "Dataset001_Typo: dataset folder not found" in err and "dataset.json not found" in err
    assert not (tmp_path / "runs").exists()
    # a bad option found only once the run folder is made (the model is built after it)
    assert main(["train", str(toy_dataset), *TINY, cache, "models.net.kwargs.depth=2"]) == 2
    assert "depth must be" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()

    # a failure after the run folder was made, before the first checkpoint: the folder goes again
    def boom(self, epoch):
        raise MnsegError("boom in the first epoch")

    monkeypatch.setattr(Trainer, "_train_epoch", boom)
    assert main(["train", str(toy_dataset), *TINY, cache]) == 2
    assert not (tmp_path / "runs").exists()
    empty = tmp_path / "empty_run"
    empty.mkdir()
    assert main(["train", str(toy_dataset), "--run-dir", str(empty), *TINY, cache]) == 2
    assert empty.is_dir() and not list(empty.iterdir())  # the user's folder stays, empty as it was
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)

    # the corrected command just works, without --resume or --overwrite
    assert main(["train", str(toy_dataset), *TINY, cache]) == 0
    assert (tmp_path / "runs" / "Dataset001_Toy" / "supervised_all_seed0" / "checkpoints" / "last.pt").is_file()


def _timed_cli(cwd, *argv):
    """Run ``mnseg ARGV`` in a fresh interpreter in ``cwd``; (exit code, stderr, seconds, torch imported)."""
    code = ("import sys; from mnseg.cli import main; rc = main(sys.argv[1:]); "
            "print('torch' in sys.modules); sys.exit(rc)")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env,
                          timeout=120, cwd=cwd)
    return done.returncode, done.stderr, time.perf_counter() - t0, done.stdout.strip() == "True"


@pytest.mark.parametrize("argv", [
    ["train", "no/such/Dataset001"],
    ["predict", "-i", "no/such/imagesTs", "-o", "preds", "-m", "no/such/run"],
    ["predict", "-i", ".", "-o", "preds", "-m", "no/such/run"],
])
def test_path_errors_answer_before_torch_is_imported(tmp_path, argv):
    rc, err, seconds, torch_imported = _timed_cli(tmp_path, *argv)
    assert rc == 2 and "not found" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not torch_imported
    assert seconds < 5.0  # about 0.2 s by hand; generous for a busy machine


@pytest.fixture
def trained_without_validation(toy_dataset, tmp_path):
    run = tmp_path / "run"
    assert main(["train", str(toy_dataset), "--run-dir", str(run), *TINY, f"data.cache_dir={tmp_path / 'cache'}"]) == 0
    assert not (run / "checkpoints" / "best.pt").exists()
    return toy_dataset, run


def test_predict_a_single_file_and_best_falls_back_with_a_warning(trained_without_validation, tmp_path, capsys):
    from mnseg.data.io import load_nifti

    dataset, run = trained_without_validation
    image = dataset / "imagesTs" / "toyts_000_0000.nii.gz"
    capsys.readouterr()
    assert main(["predict", "-i", str(image), "-o", str(tmp_path / "one"), "-m", str(run), "--no-progress"]) == 0
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["toyts_000.nii.gz"]
    assert load_nifti(tmp_path / "one" / "toyts_000.nii.gz", dtype=None).shape == (32, 32, 32)
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "best.pt" in line]
    assert len(warnings) == 1 and "last.pt" in warnings[0] and warnings[0].startswith("warning:")

    # --checkpoint last: no warning; a folder still works
    assert main(["predict", "-i", str(dataset / "imagesTs"), "-o", str(tmp_path / "all"), "-m", str(run),
                 "--checkpoint", "last", "--no-progress"]) == 0
    assert "best.pt" not in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "all").glob("*.nii.gz")) == ["toyts_000.nii.gz", "toyts_001.nii.gz"]

    # a file whose prediction would replace it, and a file that is not NIfTI, are refused in one line
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "scan.nii.gz").write_bytes(image.read_bytes())
    assert main(["predict", "-i", str(plain / "scan.nii.gz"), "-o", str(plain), "-m", str(run)]) == 2
    (tmp_path / "notes.txt").write_text("x")
    assert main(["predict", "-i", str(tmp_path / "notes.txt"), "-o", str(tmp_path / "o"), "-m", str(run)]) == 2
    err = capsys.readouterr().err
    assert "would replace the input" in err and "not a NIfTI image" in err
    assert (plain / "scan.nii.gz").read_bytes() == image.read_bytes()


def _all_parsers(parser, name="mnseg"):
    import argparse

    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _all_parsers(sub, f"{name} {sub_name}")


def test_every_option_of_every_command_has_help():
    from mnseg.cli import build_parser

    missing = [f"{name} {action.option_strings or action.dest}" for name, parser in _all_parsers(build_parser())
               for action in parser._actions if not action.help and name != "mnseg"]  # its COMMANDs have help
    assert not missing


def test_progress_off_a_terminal_is_plain_lines(monkeypatch):
    import io

    from mnseg.utils import progress

    quiet = io.StringIO()
    bar = progress.progress_bar(range(3), desc="work", stream=quiet)
    for i in bar:
        bar.set_postfix(loss=i)  # waits for the next timed line
    assert quiet.getvalue() == ""  # shorter than one line interval: nothing in the log
    monkeypatch.setattr(progress, "LINE_INTERVAL", 0.0)
    stream = io.StringIO()
    for _ in progress.progress_bar(range(3), desc="work", stream=stream):
        pass
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue() and lines and all(line.startswith("work: ") for line in lines)
    assert lines[-1].startswith("work: 3/3")


def test_training_progress_in_a_log_has_no_carriage_returns(toy_dataset, tmp_path, capsys, monkeypatch):
    from mnseg.utils import progress

    monkeypatch.setattr(progress, "LINE_INTERVAL", 0.0)
    argv = ["train", str(toy_dataset), "--run-dir", str(tmp_path / "run"), *TINY, f"data.cache_dir={tmp_path / 'c'}"]
    argv.remove("--no-progress")
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and "epoch 1/1" in err
