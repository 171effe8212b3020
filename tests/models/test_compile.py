"""train.compile: models keep their names and copies stay apart; a compiled run learns what an eager one does."""

from __future__ import annotations

import copy

import pytest
import torch

from mnseg.errors import ConfigError
from mnseg.models import create_model
from mnseg.models.compiled import compile_forward, is_compiled

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tiny():
    torch.manual_seed(0)
    return create_model("unet3d", 1, 3, depth=3, base_filters=4)


def test_compiling_keeps_the_module_its_names_and_copies_apart_without_compiling_yet():
    model = _tiny()
    names, cls = list(model.state_dict()), type(model)
    compile_forward(model)
    assert is_compiled(model) and isinstance(model, cls) and list(model.state_dict()) == names
    compile_forward(model, "max-autotune")  # again: same class, new mode
    assert type(model).__mro__.count(cls) == 1 and model._compile_mode == "max-autotune"
    copied = copy.deepcopy(model)
    assert is_compiled(copied) and "_compiled_forward" not in copied.__dict__
    with pytest.raises(ConfigError, match="compile mode"):
        compile_forward(_tiny(), "fastest")


def test_a_compiled_forward_gives_the_eager_values_and_a_copy_runs_its_own_weights():
    eager, compiled = _tiny(), compile_forward(_tiny())
    x = torch.randn(2, 1, 32, 32, 16)
    out_eager, out_compiled = eager(x), compiled(x)
    out_eager.square().mean().backward()
    out_compiled.square().mean().backward()
    torch.testing.assert_close(out_compiled, out_eager, rtol=1e-4, atol=1e-5)
    for p, q in zip(compiled.parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-6)
    teacher = copy.deepcopy(compiled)  # as M&N's fixed pseudo-mask generators are made
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(1.0)
        torch.testing.assert_close(compiled(x), out_compiled.detach(), rtol=1e-4, atol=1e-5)
        assert not torch.allclose(teacher(x), out_compiled, atol=1e-3)


@pytest.mark.slow
def test_trainer_with_compile_follows_the_eager_run(toy_dataset, tmp_path):
    """Mean teacher: the student is compiled and the EMA teacher too, whose weights the method copies from the
    student and updates in place; prediction after training loads the checkpoint eagerly."""
    from mnseg.cli import main
    from mnseg.engine.run_dir import RunDir

    def train(name, *extra):
        argv = ["train", str(toy_dataset), "--method", "mean_teacher", "--num-labeled", "2", "--epochs", "2",
                "--iters-per-epoch", "2", "--batch-size", "2", "--patch-size", "32,32,16", "--run-dir",
                str(tmp_path / name), "--no-progress", f"data.cache_dir={tmp_path / 'cache'}",
                "train.deterministic=true", "method.params.noise_std=0"]
        for role in ("student", "teacher"):
            argv += [f"models.{role}.name=unet3d", f"models.{role}.kwargs={{depth: 3, base_filters: 4}}",
                     f"models.{role}.augment.preset=none"]
        assert main(argv + list(extra)) == 0
        return [float(r["loss"]) for r in RunDir(tmp_path / name).history_rows()]

    eager = train("eager")
    compiled = train("compiled", "train.compile=true", "--test")
    assert compiled == pytest.approx(eager, rel=1e-3)
    assert (tmp_path / "compiled" / "test_predictions" / "summary.json").exists()
    assert "compile: true" in (tmp_path / "compiled" / "config.yaml").read_text()
