"""Issue-8 speed options on the CPU: they change memory layout or storage dtype, never the numbers (beyond bf16)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from mnseg.config.schema import Config, ModelConfig, TrainConfig
from mnseg.engine import build
from mnseg.engine.build import build_model, place_model, to_channels_last
from mnseg.errors import ConfigError
from mnseg.inference.window import sliding_window_probabilities
from mnseg.models import create_model
from mnseg.models.finetune import cast_frozen_weights

CPU = torch.device("cpu")
TINY_UNET3D = ModelConfig(name="unet3d", kwargs={"depth": 3, "base_filters": 4})
SEGFORMER_LORA = ModelConfig(name="segformer", kwargs={"size": "b0"}, finetune="lora", lora_rank=4)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------ channels_last
def test_channels_last_3d_unet_gives_the_same_loss_and_gradients():
    torch.manual_seed(0)
    model = create_model("unet3d", in_channels=2, num_classes=3, depth=3, base_filters=4)
    fast = to_channels_last(copy.deepcopy(model))
    conv_weights = [p for p in fast.parameters() if p.dim() == 5]
    assert conv_weights and all(p.is_contiguous(memory_format=torch.channels_last_3d) for p in conv_weights)
    assert not all(p.is_contiguous() for p in conv_weights)  # the layout really changed (1x1x1 kernels: same)

    x = torch.randn(2, 2, 16, 16, 8)  # two channels, so channels-last differs from contiguous
    y = torch.randint(0, 3, (2, 16, 16, 8))
    x_last = to_channels_last(x)
    assert x_last.is_contiguous(memory_format=torch.channels_last_3d) and not x_last.is_contiguous()
    loss = F.cross_entropy(model(x), y)
    loss_last = F.cross_entropy(fast(x_last), y)
    loss.backward()
    loss_last.backward()
    assert loss_last.item() == pytest.approx(loss.item(), abs=1e-5)
    for (name, p), q in zip(model.named_parameters(), fast.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-5, msg=name)


def test_channels_last_gives_4d_weights_of_a_slicewise_2d_model_their_own_format():
    model = build_model(ModelConfig(name="unet2d", kwargs={"depth": 3, "base_filters": 4}), 1, 2)
    to_channels_last(model)
    weights = [p for p in model.parameters() if p.dim() == 4]
    assert weights and all(p.is_contiguous(memory_format=torch.channels_last) for p in weights)
    x = torch.randn(1, 1, 16, 16, 4)
    assert model(to_channels_last(x)).shape == (1, 2, 16, 16, 4)
    labels = torch.zeros(3, 4, dtype=torch.int64)
    assert to_channels_last(labels) is labels  # other ranks pass through


def test_place_model_applies_channels_last_from_the_train_config():
    model = place_model(build_model(TINY_UNET3D, 1, 2), TINY_UNET3D, TrainConfig(channels_last=True), CPU)
    assert all(p.is_contiguous(memory_format=torch.channels_last_3d) for p in model.parameters() if p.dim() == 5)
    default = place_model(build_model(TINY_UNET3D, 1, 2), TINY_UNET3D, TrainConfig(), CPU)
    assert all(p.is_contiguous() for p in default.parameters())  # off by default


def test_sliding_window_with_channels_last_gives_the_same_probabilities():
    torch.manual_seed(0)
    model = create_model("unet3d", in_channels=2, num_classes=3, depth=3, base_filters=4)
    image = torch.randn(2, 40, 36, 20)
    reference = sliding_window_probabilities(model, image, (32, 32, 16), sw_batch_size=3)
    to_channels_last(model)
    fast = sliding_window_probabilities(model, image, (32, 32, 16), sw_batch_size=3, channels_last=True)
    torch.testing.assert_close(fast, reference, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------ frozen_dtype
def _segformer_lora():
    torch.manual_seed(0)
    return build_model(SEGFORMER_LORA, 1, 3)


def test_cast_frozen_weights_keeps_trainable_params_fp32_and_lora_close_to_fp32():
    model = _segformer_lora().eval()
    reference_model = copy.deepcopy(model)
    trainable_before = {n for n, p in model.named_parameters() if p.requires_grad}
    assert cast_frozen_weights(model) > 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.dtype == torch.float32, name  # LoRA adapters, decoder, head
    frozen = {n: p.dtype for n, p in model.named_parameters() if not p.requires_grad}
    assert any(d == torch.bfloat16 for d in frozen.values())
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm | torch.nn.BatchNorm2d)]
    assert norms and all(p.dtype == torch.float32 for m in norms for p in m.parameters())  # autocast: fp32 norms
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable_before

    x = torch.randn(2, 1, 32, 32, 2)
    with torch.no_grad():
        fp32 = reference_model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast_only = reference_model(x).float()
            cast = model(x).float()
    torch.testing.assert_close(cast, autocast_only)  # the cast autocast would do each call, done once
    torch.testing.assert_close(cast, fp32, atol=0.05 * fp32.abs().max().item(), rtol=0.05)  # bf16 tolerance


def test_gradients_reach_the_lora_adapters_of_a_bf16_frozen_backbone():
    model = _segformer_lora().train()
    cast_frozen_weights(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(torch.randn(1, 1, 32, 32, 2)).float().square().mean()
    loss.backward()
    lora = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    assert lora
    for name, p in lora.items():
        assert p.grad is not None and p.grad.dtype == torch.float32, name
    assert any(p.grad.abs().sum() > 0 for p in lora.values())
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_place_model_casts_only_under_bf16_autocast(monkeypatch):
    mcfg = copy.deepcopy(SEGFORMER_LORA)
    mcfg.frozen_dtype = "bfloat16"
    on_cpu = place_model(_segformer_lora(), mcfg, TrainConfig(), CPU)
    assert all(p.dtype == torch.float32 for p in on_cpu.parameters())  # ignored without autocast: still runs
    assert on_cpu(torch.randn(1, 1, 32, 32, 1)).dtype == torch.float32
    monkeypatch.setattr(build, "uses_bf16_autocast", lambda tcfg, device: True)  # as on CUDA with train.amp
    assert any(p.dtype == torch.bfloat16 for p in place_model(_segformer_lora(), mcfg, TrainConfig(), CPU).parameters())
    unset = place_model(_segformer_lora(), SEGFORMER_LORA, TrainConfig(), CPU)
    assert all(p.dtype == torch.float32 for p in unset.parameters())  # off by default


def test_uses_bf16_autocast_follows_device_and_amp():
    assert not build.uses_bf16_autocast(TrainConfig(), CPU)
    assert build.uses_bf16_autocast(TrainConfig(), torch.device("cuda"))
    assert not build.uses_bf16_autocast(TrainConfig(amp=False), torch.device("cuda"))


def test_checkpoints_of_a_bf16_frozen_model_load_into_fp32_and_bf16_models(tmp_path):
    from mnseg.utils.atomic import atomic_torch_save

    model = _segformer_lora()
    with torch.no_grad():  # trained-looking adapters, so a wrong load would show
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    cast_frozen_weights(model)
    atomic_torch_save(model.state_dict(), tmp_path / "model.pt")
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    assert any(v.dtype == torch.bfloat16 for v in state.values())

    fp32 = build_model(SEGFORMER_LORA, 1, 3)  # e.g. predict on a CPU: a plain fp32 model
    fp32.load_state_dict(state)
    assert all(p.dtype == torch.float32 for p in fp32.parameters())
    for name, p in fp32.named_parameters():
        torch.testing.assert_close(p, state[name].float(), msg=name)
    x = torch.randn(1, 1, 32, 32, 1)
    fp32.eval()
    assert torch.isfinite(fp32(x)).all()

    resumed = build_model(SEGFORMER_LORA, 1, 3)
    cast_frozen_weights(resumed)
    resumed.load_state_dict(state)  # resuming on the GPU: the dtypes stay as placed
    assert {n: v.dtype for n, v in resumed.state_dict().items()} == {n: v.dtype for n, v in state.items()}


def test_frozen_dtype_errors_are_config_errors():
    with pytest.raises(ConfigError, match="needs frozen parameters"):
        build_model(ModelConfig(name="unet3d", kwargs={"depth": 3, "base_filters": 4}, frozen_dtype="bfloat16"), 1, 2)
    with pytest.raises(ConfigError, match="not supported"):
        build_model(ModelConfig(name="segformer", finetune="lora", frozen_dtype="float8"), 1, 2)


def test_config_defaults_keep_every_option_off():
    cfg = Config.from_dict({"train": {"channels_last": True}, "models": {"net": {"frozen_dtype": "bfloat16"}}})
    assert cfg.train.channels_last and cfg.models["net"].frozen_dtype == "bfloat16"
    assert TrainConfig().channels_last is False and ModelConfig().frozen_dtype is None


# ------------------------------------------------------------------ the trainer
def test_trainer_with_channels_last_trains_validates_and_predicts(toy_dataset, tmp_path):
    import argparse

    from mnseg.commands.train import add_arguments, build_config
    from mnseg.engine.trainer import Trainer
    from mnseg.inference.predict import load_run, predict_probabilities
    from mnseg.inference.window import WindowSettings

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([str(toy_dataset), "--num-labeled", "3", "--epochs", "1", "--iters-per-epoch", "2",
                              "--patch-size", "32,32,16", "--num-val", "1"])
    args.overrides = ["models.net.name=unet3d", "models.net.kwargs={depth: 3, base_filters: 4}",
                      f"data.cache_dir={tmp_path / 'cache'}", "train.channels_last=true", "train.val_every=1"]
    trainer = Trainer(build_config(args), tmp_path / "run", progress=False, log=lambda *a: None)
    trainer.setup()
    weights = [p for p in trainer.models["net"].parameters() if p.dim() == 5]
    assert weights and all(p.is_contiguous(memory_format=torch.channels_last_3d) for p in weights)
    row = trainer.fit()
    assert row["epoch"] == 0 and torch.isfinite(torch.tensor(row["loss"])) and 0.0 <= row["val_dice"] <= 1.0

    run = load_run(tmp_path / "run", device="cpu")
    loaded = [p for p in run.models[0].parameters() if p.dim() == 5]
    assert all(p.is_contiguous(memory_format=torch.channels_last_3d) for p in loaded)  # as trained
    image = torch.from_numpy(trainer.data.val[0].image)
    probs = predict_probabilities(run.models, image, WindowSettings.from_config(run.cfg), run.device)
    torch.testing.assert_close(probs.sum(0), torch.ones_like(probs[0]))

