"""Adding a method is one file plus one registry line, and that file sees the engine only through its contract."""

from __future__ import annotations

import ast
import sys
import textwrap
from pathlib import Path

import mnseg.methods
from mnseg.cli import main

METHODS_DIR = Path(mnseg.methods.__file__).resolve().parent
# what a method file may import from mnseg: the contract, its siblings, losses, data, models, config and errors
ALLOWED = ("mnseg.engine.contract", "mnseg.methods", "mnseg.losses", "mnseg.data", "mnseg.models", "mnseg.config",
           "mnseg.errors")

TOY = '''
"""A toy method: the labelled loss of a plain UNet, written against the contract alone."""

from mnseg.losses import supervised_loss
from mnseg.methods.base import Batch, Method, StepOutput


class Toy(Method):
    name = "toy"
    default_models = {"net": {"name": "unet3d"}}

    def training_step(self, batch: Batch, epoch: int, iteration: int) -> StepOutput:
        logits = self.models["net"](batch.image_l)
        loss = supervised_loss(logits, batch.label_l, ignore_index=self.ctx.ignore_index)
        return StepOutput(loss, {"loss_toy": loss.detach()})
'''


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
    return [n for n in names if n.startswith("mnseg")]


def test_method_files_import_only_the_contract_of_the_engine():
    bad = {p.name: [n for n in _imports(p) if not n.startswith(ALLOWED)] for p in sorted(METHODS_DIR.glob("*.py"))}
    assert not {k: v for k, v in bad.items() if v}


def test_a_toy_method_from_its_own_module_trains_with_one_registry_line(toy_dataset, tmp_path, monkeypatch):
    (tmp_path / "toy_method.py").write_text(textwrap.dedent(TOY))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(mnseg.methods.METHODS, "toy", ("toy_method", "Toy", "a toy: labelled loss only"))
    run = tmp_path / "run"
    assert main(["train", str(toy_dataset), "--method", "toy", "--run-dir", str(run), "--epochs", "1",
                 "--iters-per-epoch", "2", "--patch-size", "32,32,32", "--no-progress",
                 "models.net.kwargs={depth: 3, base_filters: 4}", f"data.cache_dir={tmp_path / 'cache'}"]) == 0
    assert "loss_toy" in (run / "history.csv").read_text()
    assert (run / "checkpoints" / "last.safetensors").is_file()
    sys.modules.pop("toy_method", None)


def test_a_misspelled_method_parameter_fails_at_start_naming_the_closest_one(toy_dataset, tmp_path, capsys):
    import pytest

    from mnseg.config.schema import load_config
    from mnseg.errors import ConfigError
    from mnseg.methods import method_class
    from mnseg.methods.base import MethodContext

    cfg = load_config("mean_teacher", ["method.params.ema_decy=0.9"])
    with pytest.raises(ConfigError, match=r"method.params.ema_decy: .*did you mean 'ema_decay'"):
        method_class("mean_teacher")(cfg, MethodContext(2, 1, None, 2, 2, 2, 1, 1))
    run = tmp_path / "run"
    assert main(["train", str(toy_dataset), "--method", "supervised", "--run-dir", str(run), "--no-progress",
                 "method.params.w_dise=1", f"data.cache_dir={tmp_path / 'cache'}"]) == 2
    assert "did you mean 'w_dice'" in capsys.readouterr().err
    assert not run.exists()


def test_presets_hold_only_what_differs_from_the_method_defaults():
    import dataclasses

    import yaml

    from mnseg.config.schema import PRESET_DIR, load_config
    from mnseg.methods import method_class

    for path in PRESET_DIR.glob("*.yaml"):
        own = (yaml.safe_load(path.read_text()).get("method") or {}).get("params") or {}
        cls = method_class(load_config(path.stem).method.name)
        defaults = {f.name: f.default for f in dataclasses.fields(cls.params_class)}
        same = [k for k, v in own.items() if k in defaults and defaults[k] == v]
        assert not same, f"{path.name}: {same} repeat the defaults"


# the losses whose batch Dice pools its sums over the shards of the global batch (``losses.ReduceSums``)
POOLING_LOSSES = {"soft_dice_loss", "supervised_loss", "pseudo_label_loss"}


def test_every_method_hands_its_batch_dice_the_shards_sums():
    """A call without ``reduce_sums`` would take batch Dice over this process's items alone under torchrun, silently
    (each process a different loss than one process on the global batch): every such call in a method file passes
    it, ``batch.reduce_sums`` or a value derived from it (None only where Dice is taken per item)."""
    missing = []
    for path in sorted(METHODS_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
                if name in POOLING_LOSSES and "reduce_sums" not in {k.arg for k in node.keywords}:
                    missing.append(f"{path.name}:{node.lineno} {name}")
    assert not missing, missing
