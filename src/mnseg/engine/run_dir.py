"""The run directory: everything needed to understand, resume and reuse a run.

RUN_DIR/
  config.yaml        resolved configuration
  plans.json         data facts fixed at the start (labels, spacing, preprocessing) that prediction needs
  split.json         which cases were labelled / unlabelled / validation / test, and the seed
  env.json           versions, command line, device
  history.csv        one row per epoch
  timing.json        wall-clock, iterations, peak GPU memory (every run of train, pretrain, benchmark, demo)
  tb/                TensorBoard scalars and prediction pictures
  checkpoints/       last.pt, best.pt, epoch<N>.pt (full training state) and a .safetensors beside each
                     (every role's weights), all written atomically
  test_predictions/  the test cases' predicted masks, metrics.csv and summary.json (``--test``, benchmark, demo)

``RunDir`` is the one place that spells these names; everything else asks it for a path.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import platform
import shutil
import sys
from pathlib import Path

from mnseg.errors import MnsegError
from mnseg.utils.atomic import atomic_write_json, atomic_write_text


def _in_run(name: str) -> property:
    """A read-only path property: the run directory / the class constant ``name``."""
    return property(lambda self: self.path / getattr(self, name), doc=f"RUN_DIR / {name}")


class RunDir:
    CONFIG, PLANS, SPLIT, ENV, HISTORY, TIMING = "config.yaml", "plans.json", "split.json", "env.json", "history.csv", \
        "timing.json"
    CHECKPOINTS, TENSORBOARD, TEST_PREDICTIONS, SUMMARY = "checkpoints", "tb", "test_predictions", "summary.json"

    def __init__(self, path: str | Path):
        self.path = Path(path)

    # --- paths ------------------------------------------------------------------------------------------
    checkpoints = _in_run("CHECKPOINTS")
    config = _in_run("CONFIG")
    history = _in_run("HISTORY")
    timing = _in_run("TIMING")
    tensorboard = _in_run("TENSORBOARD")
    test_predictions = _in_run("TEST_PREDICTIONS")

    def checkpoint(self, tag: str) -> Path:
        """The full training state of ``tag`` (last, best, epoch<N>), for ``--resume``."""
        return self.checkpoints / f"{tag}.pt"

    def weights(self, tag: str) -> Path:
        """Every role's weights of ``tag`` as safetensors: all that prediction and export read."""
        return self.checkpoints / f"{tag}.safetensors"

    @property
    def test_summary(self) -> Path:
        return self.test_predictions / self.SUMMARY

    def relative(self, path: Path) -> str:
        return str(Path(path).relative_to(self.path))

    @staticmethod
    def of_checkpoint(path: str | Path) -> Path:
        """The run directory of a checkpoint file (``RUN/checkpoints/x.pt``; a loose file: its folder)."""
        path = Path(path)
        return path.parent.parent if path.parent.name == RunDir.CHECKPOINTS else path.parent

    # --- state ------------------------------------------------------------------------------------------
    def can_resume(self) -> bool:
        """The one resume rule: a run with ``last.pt`` continues from it; anything else starts (again)."""
        return self.checkpoint("last").is_file()

    def require_resumable(self) -> None:
        if not self.can_resume():
            raise MnsegError(f"{self.path}: nothing to resume (no {self.relative(self.checkpoint('last'))})")

    def trained(self, epochs: int) -> bool:
        """Resumable and every one of ``epochs`` epochs in the history: nothing left to train."""
        return self.can_resume() and len(self.history_rows()) >= epochs

    def tested(self) -> bool:
        return self.test_summary.is_file()

    def check_new(self, overwrite: bool = False) -> None:
        """Refuse a non-empty folder unless ``overwrite``: a new run must not mix with another's files."""
        if self.path.exists() and not self.path.is_dir():
            raise MnsegError(f"{self.path}: run directory path is a file, not a folder")
        if self.path.is_dir() and any(self.path.iterdir()) and not overwrite:
            raise MnsegError(
                f"{self.path}: run directory exists and is not empty; use --resume to continue it, "
                f"or --overwrite to start again there"
            )

    def create(self, overwrite: bool = False) -> None:
        self.check_new(overwrite)
        self.checkpoints.mkdir(parents=True, exist_ok=True)

    def write_start(self, config_yaml: str, plans: dict, split: dict) -> None:
        """What a new run writes before training: the resolved config, the plans and the split."""
        atomic_write_text(self.config, config_yaml)
        self.write_json(self.PLANS, plans)
        self.write_json(self.SPLIT, split)

    def read_config(self) -> dict:
        from mnseg.config.schema import read_yaml

        if not self.config.exists():
            raise MnsegError(f"{self.path}: not an mnseg run directory (no {self.CONFIG})")
        return read_yaml(self.config)

    def read_plans(self) -> dict:
        return self.read_json(self.PLANS)

    def read_split(self) -> dict:
        return self.read_json(self.SPLIT)

    def write_json(self, name: str, obj) -> None:
        atomic_write_json(self.path / name, obj)

    def read_json(self, name: str) -> dict:
        path = self.path / name
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            raise MnsegError(f"{path}: missing; is {self.path} an mnseg run directory?") from None
        except json.JSONDecodeError as exc:
            raise MnsegError(f"{path}: corrupt JSON ({exc})") from None

    def write_env(self, device: str) -> None:
        import torch

        import mnseg

        versions = {"mnseg": mnseg.__version__, "python": platform.python_version(), "torch": torch.__version__}
        for mod in ("monai", "numpy", "nibabel", "transformers", "peft"):
            try:
                versions[mod] = __import__(mod).__version__
            except Exception:  # noqa: BLE001 - optional, informational only
                versions[mod] = None
        self.write_json(
            self.ENV, {"versions": versions, "argv": sys.argv, "device": device, "platform": platform.platform()}
        )

    # --- history ---------------------------------------------------------------------------------------
    def history_rows(self) -> list[dict]:
        path = self.history
        if not path.exists():
            return []
        with open(path, newline="") as fh:
            return list(csv.DictReader(fh))

    def write_history(self, rows: list[dict]) -> None:
        if not rows:
            return
        keys: list[str] = []
        for row in rows:
            keys += [k for k in row if k not in keys]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(self.history, buf.getvalue())


@contextlib.contextmanager
def removed_if_failed_early(path: str | Path):
    """Remove the folders a run created when it fails before its first checkpoint.

    Such a folder holds nothing to resume, yet would refuse the corrected command ("not empty"). A folder that
    already held files (--resume, --overwrite) is left alone; a folder that was empty is emptied again.
    """
    path = Path(path).absolute()
    top = path
    while not top.parent.exists() and top.parent != top:
        top = top.parent  # the outermost folder this run will create (runs/ for runs/<dataset>/<name>)
    was_empty = path.is_dir() and not any(path.iterdir())
    existed = path.exists()
    try:
        yield
    except BaseException:
        if is_rank_zero() and not RunDir(path).can_resume():
            if not existed:
                shutil.rmtree(path, ignore_errors=True)
                for parent in [path.parent, *path.parent.parents]:  # empty folders made for it (runs/<dataset>)
                    if not parent.is_relative_to(top) or (parent.is_dir() and any(parent.iterdir())):
                        break
                    with contextlib.suppress(OSError):
                        parent.rmdir()
            elif was_empty:
                for child in path.iterdir():
                    if child.is_dir():
                        shutil.rmtree(child, ignore_errors=True)
                    else:
                        child.unlink(missing_ok=True)
        raise


def is_rank_zero() -> bool:
    """True without torchrun, and in its rank 0: the one process that creates, checks and removes run folders."""
    return os.environ.get("RANK", "0") in ("", "0")
