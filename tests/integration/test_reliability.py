"""Faults a long run meets in practice: kill -9, corrupt checkpoints, NaN losses, GPU out of memory,
full or read-only disks, bad inputs. Each must end in a clear message with earlier work intact.

Real processes and real files throughout; faults that cannot be caused for real in CI (OOM, ENOSPC, a
permission denied to root) are injected at the lowest level (torch.save, nibabel.save, a conv forward).
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from mnseg.cli import main
from mnseg.errors import MnsegError

TINY = ["models.net.name=unet3d", "models.net.kwargs={depth: 3, base_filters: 4}"]
DETERMINISTIC = ["train.deterministic=true", "train.amp=false"]


def train_argv(ds, run, cache, *extra, epochs=2, iters=2):
    return ["train", str(ds), "--method", "supervised", "--num-labeled", "3", "--epochs", str(epochs),
            "--iters-per-epoch", str(iters), "--patch-size", "16,16,16", "--batch-size", "2", "--run-dir", str(run),
            "--no-progress", f"data.cache_dir={cache}", *TINY, *extra]


def finite_weights(ckpt: dict) -> bool:
    return all(torch.isfinite(v).all() for m in ckpt["models"].values() for v in m.values() if v.is_floating_point())


def leftover_temp_files(folder: Path) -> list[Path]:
    return [p for p in Path(folder).rglob(".*") if p.is_file()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A toy dataset and a tiny 2-epoch run trained on it (read-only: copy it before breaking it)."""
    from mnseg.data.toy import make_toy_dataset

    root = tmp_path_factory.mktemp("reliability")
    ds = make_toy_dataset(root / "Dataset001_Toy")
    assert main(train_argv(ds, root / "run", root / "cache", "--num-val", "1")) == 0
    return ds, root / "run", root / "cache"


def load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


# ------------------------------------------------------------------------------------------ kill -9 and resume


def test_run_killed_with_sigkill_resumes_to_the_uninterrupted_result(toy_dataset, tmp_path):
    cache = tmp_path / "cache"
    argv = train_argv(toy_dataset, tmp_path / "full", cache, "--num-val", "1", "train.val_every=1",
                      *DETERMINISTIC, epochs=4, iters=3)
    assert main(argv) == 0

    part = tmp_path / "part"
    argv[argv.index("--run-dir") + 1] = str(part)
    proc = subprocess.Popen([sys.executable, "-m", "mnseg", *argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    history = part / "history.csv"
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            if history.exists() and len(history.read_text().splitlines()) >= 3:  # header + 2 epochs
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"training ended before it could be killed: {proc.stderr.read().decode()}"
        proc.send_signal(signal.SIGKILL)  # mid-epoch 3, or mid-way through saving epoch 2
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert load(part / "checkpoints" / "last.pt")["epoch"] in (1, 2)

    assert main(["train", "--resume", str(part), "--no-progress"]) == 0

    a, b = load(tmp_path / "full" / "checkpoints" / "last.pt"), load(part / "checkpoints" / "last.pt")
    assert a["epoch"] == b["epoch"] == 4
    for key, value in a["models"]["net"].items():
        torch.testing.assert_close(value, b["models"]["net"][key], rtol=1e-5, atol=1e-6, msg=key)
    for key in ("optimizers", "schedulers"):
        assert str(a[key]["net"].keys()) == str(b[key]["net"].keys())
    assert a["schedulers"]["net"]["last_epoch"] == b["schedulers"]["net"]["last_epoch"]
    assert a["batcher"] == b["batcher"]
    rows_a = (tmp_path / "full" / "history.csv").read_text().splitlines()
    rows_b = (part / "history.csv").read_text().splitlines()
    assert len(rows_a) == len(rows_b) == 5
    header = rows_a[0].split(",")
    for col in ("loss", "val_dice", "lr_net"):
        i = header.index(col)
        for ra, rb in zip(rows_a[1:], rows_b[1:]):
            assert float(ra.split(",")[i]) == pytest.approx(float(rb.split(",")[i]), rel=1e-4, abs=1e-6), col


def test_kill_during_a_checkpoint_write_keeps_the_previous_file(tmp_path):
    """A process killed half-way through writing a checkpoint leaves the old one readable."""
    target = tmp_path / "last.pt"
    script = textwrap.dedent(f"""
        import os, signal, torch
        from mnseg.utils.atomic import atomic_torch_save
        atomic_torch_save({{"epoch": 1, "w": torch.ones(1000)}}, {str(target)!r})
        real_save = torch.save
        def dying_save(obj, f):
            real_save(obj, f)
            with open(f, "r+b") as fh:
                fh.truncate(100)  # half-written
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save = dying_save
        atomic_torch_save({{"epoch": 2, "w": torch.zeros(1000)}}, {str(target)!r})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    ckpt = load(target)
    assert ckpt["epoch"] == 1 and torch.equal(ckpt["w"], torch.ones(1000))


# ------------------------------------------------------------------------------------------ corrupt checkpoint


@pytest.mark.parametrize("keep_bytes", [0, 1000])
def test_truncated_checkpoint_gives_a_clear_error_on_resume_and_predict(trained, tmp_path, capsys, keep_bytes):
    ds, run, cache = trained
    broken = tmp_path / "run"
    shutil.copytree(run, broken)
    last, weights = broken / "checkpoints" / "last.pt", broken / "checkpoints" / "last.safetensors"
    for path in (last, weights):  # resume reads the first, predict the second
        path.write_bytes(path.read_bytes()[:keep_bytes])
        (broken / "checkpoints" / path.name.replace("last", "best")).unlink()
    capsys.readouterr()
    assert main(["train", "--resume", str(broken), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert str(last) in err and "cannot read checkpoint" in err and "Traceback" not in err
    rc = main(["predict", "-i", str(ds / "imagesTs"), "-o", str(tmp_path / "out"), "-m", str(broken), "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert str(weights) in err and "cannot read weights" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_window_batch_of_zero_is_refused_not_ignored(trained, tmp_path, capsys):
    ds, run, _ = trained
    out = tmp_path / "out"
    rc = main(["predict", "-i", str(ds / "imagesTs"), "-o", str(out), "-m", str(run), "--no-progress",
               "--sw-batch-size", "0"])
    assert rc == 2 and "--sw-batch-size must be at least 1" in capsys.readouterr().err
    assert not out.exists()


# ------------------------------------------------------------------------------------------ NaN / Inf loss


def nan_after(monkeypatch, bad_call):
    """Make the supervised loss NaN on the calls for which ``bad_call(n)`` is true (n counts from 1)."""
    import mnseg.methods.supervised as supervised

    real = supervised.supervised_loss
    calls = {"n": 0}

    def loss(*args, **kwargs):
        calls["n"] += 1
        value = real(*args, **kwargs)
        return value * float("nan") if bad_call(calls["n"]) else value

    monkeypatch.setattr(supervised, "supervised_loss", loss)
    return calls


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(trained, tmp_path, monkeypatch, capsys):
    ds, _, cache = trained
    nan_after(monkeypatch, lambda n: n > 2)  # epoch 1 (2 steps) is fine, epoch 2 goes NaN
    run = tmp_path / "run"
    rc = main(train_argv(ds, run, cache, "--num-val", "1", "train.val_every=1", "train.check_every=1", epochs=3,
                         iters=2))
    assert rc == 2
    err = capsys.readouterr().err
    assert "loss became nan at epoch 2, iteration 1" in err and "on_nan=skip" in err and "Traceback" not in err
    last, best = load(run / "checkpoints" / "last.pt"), load(run / "checkpoints" / "best.pt")
    assert last["epoch"] == 1 and best["epoch"] == 1
    assert finite_weights(last) and finite_weights(best)
    assert len((run / "history.csv").read_text().splitlines()) == 2  # header + epoch 1


def test_nan_loss_with_deferred_checks_still_keeps_the_last_good_checkpoint(trained, tmp_path, monkeypatch, capsys):
    """The default (train.check_every=10) syncs once per ten steps and at each epoch's end; a NaN in such a window
    still stops before anything is saved."""
    ds, _, cache = trained
    nan_after(monkeypatch, lambda n: n > 3)
    run = tmp_path / "run"
    rc = main(train_argv(ds, run, cache, epochs=3, iters=3))
    assert rc == 2
    assert "loss became nan at epoch 2, iterations 1-3" in capsys.readouterr().err
    last = load(run / "checkpoints" / "last.pt")
    assert last["epoch"] == 1 and finite_weights(last)


def test_nan_loss_skipped_when_asked(trained, tmp_path, monkeypatch):
    ds, _, cache = trained
    calls = nan_after(monkeypatch, lambda n: n % 2 == 0)  # every second step
    run = tmp_path / "run"
    assert main(train_argv(ds, run, cache, "train.on_nan=skip", epochs=2, iters=2)) == 0
    assert calls["n"] == 4
    last = load(run / "checkpoints" / "last.pt")
    assert last["epoch"] == 2 and finite_weights(last)
    rows = (run / "history.csv").read_text().splitlines()
    skipped = rows[0].split(",").index("skipped_steps")
    assert [int(r.split(",")[skipped]) for r in rows[1:]] == [1, 1]


# ------------------------------------------------------------------------------------------ out of memory


def oom_after(monkeypatch, n_ok: int):
    """Conv3d forwards beyond the first ``n_ok`` raise the error PyTorch gives when the GPU is full."""
    real = torch.nn.Conv3d.forward
    calls = {"n": 0}

    def forward(self, x):
        calls["n"] += 1
        if calls["n"] > n_ok:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, x)

    monkeypatch.setattr(torch.nn.Conv3d, "forward", forward)


def test_out_of_memory_in_training_names_the_sizes_and_keeps_the_checkpoint(trained, tmp_path, monkeypatch, capsys):
    ds, _, cache = trained
    run = tmp_path / "run"
    assert main(train_argv(ds, run, cache, epochs=1, iters=1)) == 0  # epoch 1 done and saved
    before = (run / "checkpoints" / "last.pt").read_bytes()
    oom_after(monkeypatch, 0)
    capsys.readouterr()
    rc = main(["train", "--resume", str(run), "--no-progress", "train.epochs=2"])
    assert rc == 2
    err = capsys.readouterr().err
    for part in ("out of GPU memory", "patch size 16x16x16", "batch size 2", "sw_batch_size", "--device cpu",
                 f"mnseg train --resume {run}"):
        assert part in err, part
    assert "Traceback" not in err
    assert (run / "checkpoints" / "last.pt").read_bytes() == before
    assert leftover_temp_files(run) == []


def test_out_of_memory_in_predict_names_the_window_and_leaves_no_partial_output(trained, tmp_path, monkeypatch,
                                                                                 capsys):
    ds, run, _ = trained
    import mnseg.inference.predict as engine_predict

    real = engine_predict.predict_probabilities
    calls = {"n": 0}

    def predict_probabilities(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine_predict, "predict_probabilities", predict_probabilities)
    out = tmp_path / "out"
    rc = main(["predict", "-i", str(ds / "imagesTs"), "-o", str(out), "-m", str(run), "--no-progress",
               "--sw-batch-size", "3"])
    assert rc == 2
    err = capsys.readouterr().err
    for part in ("out of GPU memory", "16x16x16", "sw_batch_size 3", "--sw-batch-size 1", "--device cpu"):
        assert part in err, part
    written = sorted(p.name for p in out.iterdir())
    assert written == ["toyts_000.nii.gz"]  # the first case is complete, the second not started
    from mnseg.data.io import load_nifti

    assert load_nifti(out / "toyts_000.nii.gz").shape == (32, 32, 32)


# ------------------------------------------------------------------------------------------ disks


def test_check_writable_refuses_a_path_under_a_regular_file(tmp_path):
    from mnseg.utils.preflight import check_writable

    (tmp_path / "file").write_text("x")
    with pytest.raises(MnsegError, match="is a file, not a folder"):
        check_writable(tmp_path / "file" / "run")
    check_writable(tmp_path / "new" / "deeper", need_bytes=1024)  # a missing folder under a writable one is fine
    assert not (tmp_path / "new").exists()  # the check creates nothing


def test_check_writable_refuses_without_permission(tmp_path, monkeypatch):
    import mnseg.utils.preflight as preflight

    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        if os.geteuid() != 0:  # root ignores permission bits, so a real refusal is only testable as a user
            with pytest.raises(MnsegError, match="no write permission"):
                preflight.check_writable(folder / "out")
        monkeypatch.setattr(preflight.os, "access", lambda *a, **k: False)
        with pytest.raises(MnsegError, match=f"{folder}.*no write permission"):
            preflight.check_writable(folder / "out")
    finally:
        folder.chmod(0o700)


def test_predict_into_unwritable_or_full_folder_fails_before_any_work(trained, tmp_path, monkeypatch, capsys):
    ds, run, _ = trained
    import mnseg.inference.predict as engine_predict
    import mnseg.utils.preflight as preflight

    monkeypatch.setattr(engine_predict, "predict_case", lambda *a: pytest.fail("predicted before the check"))
    (tmp_path / "file").write_text("x")
    argv = ["predict", "-i", str(ds / "imagesTs"), "-m", str(run), "--no-progress", "-o"]
    assert main([*argv, str(tmp_path / "file" / "out")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: usage._replace(free=1000))
    assert main([*argv, str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "not enough free disk space" in err and str(tmp_path / "out") in err
    assert not (tmp_path / "out").exists()


def test_train_refuses_a_full_disk_before_starting(trained, tmp_path, monkeypatch, capsys):
    ds, _, cache = trained
    import mnseg.utils.preflight as preflight

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: usage._replace(free=10 * 2**20))
    assert main(train_argv(ds, tmp_path / "run", cache)) == 2
    assert "not enough free disk space for the run directory" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(trained, tmp_path, monkeypatch, capsys):
    ds, _, cache = trained
    real_save = torch.save
    calls = {"n": 0}

    def save(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 1:  # the second checkpoint hits a full disk half-way through
            Path(f).write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    run = tmp_path / "run"
    assert main(train_argv(ds, run, cache, epochs=3, iters=1)) == 2
    err = capsys.readouterr().err
    assert "disk full" in err and f"mnseg train --resume {run}" in err and "Traceback" not in err
    monkeypatch.undo()
    last = load(run / "checkpoints" / "last.pt")
    assert last["epoch"] == 1 and finite_weights(last)
    assert leftover_temp_files(run / "checkpoints") == []


def test_disk_full_during_predict_keeps_finished_outputs(trained, tmp_path, monkeypatch, capsys):
    ds, run, _ = trained
    import nibabel as nib

    from mnseg.data.io import load_nifti

    real_save = nib.save
    calls = {"n": 0}

    def save(img, filename, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 1:
            Path(filename).write_bytes(b"\x1f\x8b" + b"\0" * 50)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(img, filename, *args, **kwargs)

    monkeypatch.setattr(nib, "save", save)
    out = tmp_path / "out"
    rc = main(["predict", "-i", str(ds / "imagesTs"), "-o", str(out), "-m", str(run), "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "disk full" in err and "toyts_001" in err and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == ["toyts_000.nii.gz"]  # no partial case_001, no temp file
    assert load_nifti(out / "toyts_000.nii.gz").shape == (32, 32, 32)


# ------------------------------------------------------------------------------------------ bad inputs in predict


def test_predict_skips_mismatched_and_corrupt_cases_and_lists_them(trained, tmp_path, capsys):
    ds, run, _ = trained
    good = ds / "imagesTs" / "toyts_000_0000.nii.gz"
    inp = tmp_path / "in"
    inp.mkdir()
    shutil.copy(good, inp / "ok_0000.nii.gz")
    shutil.copy(good, inp / "extra_0000.nii.gz")
    shutil.copy(good, inp / "extra_0001.nii.gz")  # two channels for a one-channel model
    shutil.copy(good, inp / "nochan0_0001.nii.gz")  # channel 0 missing
    (inp / "corrupt_0000.nii.gz").write_bytes(good.read_bytes()[:400])
    out = tmp_path / "out"
    rc = main(["predict", "-i", str(inp), "-o", str(out), "-m", str(run), "--no-progress"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "3 case(s) failed" in err
    assert "extra: " in err and "channel(s) [0, 1]" in err
    assert "nochan0: " in err and "channel(s) [1]" in err
    assert "corrupt: " in err and "corrupt_0000.nii.gz" in err
    assert sorted(p.name for p in out.iterdir()) == ["ok.nii.gz"]


# ------------------------------------------------------------------------------------------ inputs untouched


def digest_tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_no_command_modifies_its_inputs(toy_dataset, tmp_path):
    before = digest_tree(toy_dataset)
    mtimes = {p: p.stat().st_mtime_ns for p in toy_dataset.rglob("*") if p.is_file()}
    run, preds = tmp_path / "run", tmp_path / "preds"
    assert main(["check", str(toy_dataset)]) == 0
    assert main(train_argv(toy_dataset, run, tmp_path / "cache", "--test", epochs=1, iters=1)) == 0
    assert main(["predict", "-i", str(toy_dataset / "imagesTs"), "-o", str(preds), "-m", str(run),
                 "--no-progress"]) == 0
    assert main(["evaluate", str(preds), str(toy_dataset / "labelsTs"), "-o", str(tmp_path / "eval")]) == 0
    # outputs aimed at input folders are refused, even where file names would collide
    for target in ("labelsTs", "imagesTs"):
        assert main(["predict", "-i", str(toy_dataset / "imagesTs"), "-o", str(toy_dataset / target), "-m",
                     str(run), "--no-progress"]) == 2
    assert main(train_argv(toy_dataset, toy_dataset, tmp_path / "cache")) == 2  # a run dir on the dataset
    assert digest_tree(toy_dataset) == before
    assert {p: p.stat().st_mtime_ns for p in toy_dataset.rglob("*") if p.is_file()} == mtimes
