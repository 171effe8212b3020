"""``models.<role>.init``: weights matched by name, every missing or mismatched one listed, bad files one-line errors,
nothing unpickled that could run code (engine/pretrained.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mnseg.config.schema import load_config
from mnseg.engine.pretrained import init_models, load_by_name, model_weights, read_states
from mnseg.errors import ConfigError
from mnseg.models import create_model

OUT_W, OUT_B = "net.output_block.conv.conv.weight", "net.output_block.conv.conv.bias"


def tiny(num_classes=2, seed=0):
    torch.manual_seed(seed)
    return create_model("unet3d", in_channels=1, num_classes=num_classes, depth=3, base_filters=4)


def config(path, role="net", **extra):
    sets = [f"models.{role}.init={path}"] + [f"models.{role}.{k}={v}" for k, v in extra.items()]
    return load_config(None, sets)


def test_weights_load_by_name_and_mismatches_are_listed_exactly():
    source, target = tiny(2, seed=0), tiny(3, seed=1)
    state = source.state_dict()
    first = "net.input_block.conv1.conv.weight"
    del state[first]  # missing from the file (under both of its names: DynUNet's skip layers share the block)
    state.pop("net.skip_layers.downsample.conv1.conv.weight")
    state["extra.weight"] = torch.zeros(3)
    before = {n: t.clone() for n, t in model_weights(target).items()}
    report = load_by_name(target, state, "file.pt")
    assert report.missing == [first]
    assert report.mismatched == [(OUT_W, (2, 4, 1, 1, 1), (3, 4, 1, 1, 1)), (OUT_B, (2,), (3,))]
    assert report.unused == ["extra.weight"]
    weights = model_weights(target)
    assert len(report.loaded) == len(weights) - 3
    for name in report.loaded:
        assert torch.equal(weights[name], source.state_dict()[name]), name
    for name in (first, OUT_W, OUT_B):  # left as initialised
        assert torch.equal(weights[name], before[name]), name
    line = report.line("models.net")
    assert line.startswith("warning: models.net.init: ")
    assert f"not in the file, left as initialised: {first}" in line
    assert f"shape differs, left as initialised: {OUT_W} (file 2x4x1x1x1, model 3x4x1x1x1), {OUT_B} (file 2, model 3)" \
        in line
    assert "in the file but not in the model: extra.weight" in line


def test_a_plain_state_dict_pt_and_safetensors_load(tmp_path):
    from safetensors.torch import save_file

    source = tiny(seed=0)
    pt, st = tmp_path / "plain.pt", tmp_path / "plain.safetensors"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, pt)
    save_file({k: v.contiguous() for k, v in model_weights(source).items()}, str(st))
    for path in (pt, st):
        target = tiny(seed=1)
        lines = []
        reports = init_models(config(path), {"net": target}, lines.append)
        assert reports["net"].complete and not reports["net"].unused, reports["net"]
        assert lines == [f"models.net.init: {len(model_weights(target))} of {len(model_weights(target))} weights "
                         f"from {path}"]
        for k, v in source.state_dict().items():
            assert torch.equal(target.state_dict()[k], v), k


def test_a_file_with_several_roles_gives_the_best_matching_one(tmp_path):
    from mnseg.engine.checkpoint import save_checkpoint
    from mnseg.models.pretext_head import pretext_head

    net, head = tiny(seed=0), pretext_head(task="rotation", encoder_width=16, classes=8)
    path = tmp_path / "last.pt"
    save_checkpoint(path, epoch=1, models={"net": net.state_dict(), "head": head.state_dict()})
    target = tiny(seed=1)
    reports = init_models(config(path, role="student"), {"student": target}, lambda line: None)
    assert reports["student"].role == "net" and reports["student"].complete
    with pytest.raises(ConfigError, match=r"init_role: the file holds no role 'teacher' \(its roles: head, net\)"):
        init_models(config(path, role="student", init_role="teacher"), {"student": tiny()}, print)
    with pytest.raises(ConfigError, match="no weight matches models.student"):
        init_models(config(path, role="student", init_role="head"), {"student": tiny()}, print)


def test_missing_and_unreadable_files_are_one_line_errors(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(ConfigError) as err:
        read_states(missing, "models.net")
    assert str(err.value) == f"models.net.init: {missing}: no such file or run directory"
    for name, data in (("garbage.pt", b"not a checkpoint"), ("garbage.safetensors", b"\x01\x02"),
                       ("list.pt", None)):
        path = tmp_path / name
        if data is None:
            torch.save([1, 2, 3], path)
        else:
            path.write_bytes(data)
        with pytest.raises(ConfigError) as err:
            read_states(path, "models.net")
        message = str(err.value)
        assert "\n" not in message and str(path) in message and message.startswith("models.net.init: "), message


class RunsCode:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('code ran')",))


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    marker, path = tmp_path / "marker", tmp_path / "evil.pt"
    torch.save({"weight": RunsCode(marker)}, path)
    with pytest.raises(ConfigError, match="holds pickled Python objects") as err:
        read_states(path, "models.net")
    assert "\n" not in str(err.value)
    assert not marker.exists()


def test_a_missing_init_file_stops_the_run_before_anything_is_written(toy_dataset, tmp_path, capsys):
    from mnseg.cli import main

    run = tmp_path / "run"
    rc = main(["train", str(toy_dataset), "--num-labeled", "2", "--epochs", "1", "--run-dir", str(run),
               "--no-progress", f"models.net.init={tmp_path / 'nope.pt'}"])
    assert rc == 2
    assert f"models.net.init: {tmp_path / 'nope.pt'}: no such file or run directory" in capsys.readouterr().err
    assert not run.exists()
