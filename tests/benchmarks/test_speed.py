"""The issue-8 speed harness in its tiny preset on the CPU: it runs, measures and compares like with like."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from mnseg.errors import ConfigError

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from speed_harness import (  # noqa: E402
    PRESETS,
    VARIANTS,
    MnsegSide,
    PlainSide,
    _guarded,
    _mean_foreground_dice,
    build_master_models,
    make_batch,
    make_config,
    parse_variants,
)

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "speed.py"


def _script():
    spec = importlib.util.spec_from_file_location("speed_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def one_thread():
    """One thread: on a shared, busy CPU, spinning OpenMP threads make timings (and test time) erratic."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_result(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("speed") / "speed.json"
    argv = [
        "--device",
        "cpu",
        "--preset",
        "tiny",
        "--warmup",
        "0",
        "--iters",
        "1",
        "--inference-repeats",
        "1",
        "--loader-batches",
        "2",
        "--profile",
        "--json",
        str(out),
    ]
    assert _script().main(argv) == 0
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def variants_run(tmp_path_factory, one_thread):
    """``--variants base,channels_last,checkpoint`` in one process: (JSON result, printed report, progress lines)."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("speed") / "variants.json"
    argv = ["--device", "cpu", "--preset", "tiny", "--warmup", "0", "--iters", "1", "--inference-repeats", "1",
            "--loader-batches", "2", "--variants", "base,channels_last,checkpoint", "--json", str(out)]
    printed, progress = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(progress):
        assert _script().main(argv) == 0
    return json.loads(out.read_text()), printed.getvalue(), progress.getvalue()


def test_each_variant_gets_a_row_against_one_plain_run(variants_run):
    result, printed, progress = variants_run
    assert list(result["variants"]) == ["base", "channels_last", "checkpoint"]
    plain = result["training"]["plain"]
    for name, variant in result["variants"].items():
        assert "error" not in variant["training"] and "error" not in variant["inference"], variant
        training = variant["training"]
        assert training["mnseg"]["ms_per_iter"] > 0
        assert training["speedup"] == pytest.approx(plain["ms_per_iter"] / training["mnseg"]["ms_per_iter"])
        # a memory layout changes no FLOPs and no mask; checkpointing adds the recomputed forwards
        if name == "checkpoint":
            assert training["mnseg"]["flops_per_iter"] > 1.1 * plain["flops_per_iter"]
        else:
            assert training["mnseg"]["flops_per_iter"] == pytest.approx(plain["flops_per_iter"], rel=0.05)
        assert variant["inference"]["mask_dice"] > 0.99 and variant["inference"]["foreground_fraction"] > 0
        assert variant["options"]["channels_last"] == (name == "channels_last")
        row = next(line for line in printed.splitlines() if line.strip().startswith(name))
        assert "x" in row and "failed" not in row
    assert result["variants"]["base"]["training"]["mnseg"] == result["training"]["mnseg"]  # first = top level
    assert sum(line.strip().startswith("plain fp32") for line in printed.splitlines()) == 1
    # checkpointing changes nothing at inference: base's timing is reused, not measured again
    assert result["variants"]["checkpoint"]["inference"]["same_as"] == "base"
    assert "not timed again" in printed
    # a line per measured side as it finishes (a run cut off by a time limit keeps them)
    for name in ("training plain fp32", "training base", "training checkpoint", "inference MONAI fp32",
                 "inference channels_last"):
        assert name in progress
    assert "inference checkpoint" not in progress


def test_variant_names_are_checked():
    assert [v.name for v in parse_variants("base, all")] == ["base", "all"]
    for bad in ("", "base,fast", "base,base"):
        with pytest.raises(ConfigError):
            parse_variants(bad)
    assert _script().main(["--device", "cpu", "--preset", "tiny", "--variants", "turbo"]) == 2


def test_frozen_bf16_variant_sets_frozen_dtype_only_where_weights_are_frozen():
    paper = make_config(PRESETS["paper"], VARIANTS["frozen_bf16"])
    assert paper.models["net2d"].frozen_dtype == "bfloat16"  # SegFormer + LoRA
    assert paper.models["net3d"].frozen_dtype is None  # trains every weight
    assert make_config(PRESETS["paper"]).models["net2d"].frozen_dtype is None
    assert make_config(PRESETS["tiny"], VARIANTS["all"]).train.channels_last


def test_checkpoint_variants_checkpoint_both_roles():
    preset = PRESETS["tiny"]
    for name in ("checkpoint", "memory"):
        cfg = make_config(preset, VARIANTS[name])
        assert cfg.models["net2d"].activation_checkpoint and cfg.models["net3d"].activation_checkpoint
        assert cfg.models["net2d"].slice_batch == preset.checkpoint_slice_batch
    side = MnsegSide(preset, build_master_models(preset), torch.device("cpu"), VARIANTS["checkpoint"])
    assert side.models["net2d"].checkpoint_chunks
    assert type(side.models["net3d"].net.bottleneck).__name__.startswith("Checkpointed")
    base = make_config(preset)
    assert not (base.models["net2d"].activation_checkpoint or base.models["net3d"].activation_checkpoint)


def test_training_sides_are_timed_and_counted(tiny_result):
    training = tiny_result["training"]
    for side in ("mnseg", "plain"):
        assert training[side]["ms_per_iter"] > 0
        assert training[side]["flops_per_iter"] > 0
        assert training[side]["tflops_per_s"] > 0
        assert training[side]["peak_memory_mib"] is None  # no CUDA memory on the CPU
        assert training[side]["peak_fraction"] is None  # no peak given on the CPU
        assert "aten::" in training[side]["profile"]
    # Same models, same shapes, same losses: the same matmuls and convolutions (within a few small extras).
    assert training["mnseg"]["flops_per_iter"] == pytest.approx(training["plain"]["flops_per_iter"], rel=0.05)
    assert training["speedup"] > 0
    b = tiny_result["batch"]
    assert b["b_l"] + b["b_u"] == b["B"] == PRESETS["tiny"].batch_size


def test_inference_matches_monai(tiny_result):
    inference = tiny_result["inference"]
    assert inference["mnseg"]["volumes_per_s"] > 0 and inference["monai"]["volumes_per_s"] > 0
    assert inference["foreground_fraction"] > 0  # the Dice below compares non-empty masks
    assert inference["mask_dice"] > 0.99


def test_loader_rate(tiny_result):
    loader = tiny_result["loader"]
    assert loader["samples_per_s"] > 0
    assert loader["training_samples_per_s"] > 0
    assert loader["keeps_up"] == (loader["samples_per_s"] >= loader["training_samples_per_s"])


@pytest.mark.parametrize("variant", ["base", "channels_last", "checkpoint"])
def test_both_sides_compute_the_same_first_loss(one_thread, variant):
    """The plain side is the same recipe: from the same weights its first (3D) loss equals mnseg's in fp32
    (under every variant that runs on a CPU: a memory layout or a recompute changes no numbers; the checkpointed
    gradients are compared in tests/models/test_checkpointing.py)."""
    preset, device = PRESETS["tiny"], torch.device("cpu")
    masters = build_master_models(preset, seed=1)
    batch = make_batch(preset, device, seed=1)
    mnseg, plain = MnsegSide(preset, masters, device, VARIANTS[variant]), PlainSide(preset, masters, device)
    before = {r: [p.detach().clone() for p in m.parameters() if p.requires_grad] for r, m in mnseg.models.items()}
    mnseg.step(batch)
    plain.step(batch)
    assert float(mnseg.losses[0]) == pytest.approx(plain.losses[0], rel=1e-4)
    for role, model in mnseg.models.items():  # each role's optimiser stepped once
        after = [p for p in model.parameters() if p.requires_grad]
        assert any(not torch.equal(a, b) for a, b in zip(after, before[role]))
    for role in masters:  # the sides trained their own copies; the masters are untouched
        assert all(p.device.type == "cpu" for p in masters[role].parameters())
        assert not any(p is q for p, q in zip(masters[role].parameters(), mnseg.models[role].parameters()))


def test_a_failing_variant_is_recorded_when_others_should_still_run():
    def fail():
        raise RuntimeError("compiler missing")

    assert _guarded(fail, True, torch.device("cpu")) == {"error": "RuntimeError: compiler missing"}
    with pytest.raises(RuntimeError):
        _guarded(fail, False, torch.device("cpu"))  # a single variant fails loudly


def test_mask_dice():
    a = torch.zeros(4, 4, 4, dtype=torch.int64)
    a[:2] = 1
    b = a.clone()
    assert _mean_foreground_dice(a, b, 3) == 1.0  # class 2 absent from both counts as 1
    b[:1] = 0  # class 1 in 16 of a's 32 voxels
    assert _mean_foreground_dice(a, b, 2) == pytest.approx(2 * 16 / (32 + 16))


def test_script_errors_are_clear(capsys):
    script = _script()
    with pytest.raises(SystemExit):
        script.main(["--preset", "huge"])
    if not torch.cuda.is_available():
        assert script.main(["--device", "cuda", "--preset", "tiny"]) == 2
        assert "no CUDA device" in capsys.readouterr().err
