"""train.cpu_amp: bf16 autocast on a CPU only where bf16 is native, in training and in the sliding window."""

from __future__ import annotations

import torch
from torch import nn

from mnseg.config.schema import TrainConfig
from mnseg.engine import build
from mnseg.inference.window import sliding_window_probabilities
from mnseg.utils import precision

CPU = torch.device("cpu")


def test_bf16_needs_amp_and_on_a_cpu_also_cpu_amp_and_native_bf16(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert precision.uses_bf16("cuda", amp=True) and not precision.uses_bf16("cuda", amp=False, cpu_amp=True)
    assert not precision.uses_bf16(CPU, amp=True)  # cpu_amp is off by default
    assert precision.uses_bf16(CPU, amp=True, cpu_amp=True)
    assert not precision.uses_bf16(CPU, amp=False, cpu_amp=True)
    assert build.uses_bf16_autocast(TrainConfig(cpu_amp=True), CPU) and not build.uses_bf16_autocast(TrainConfig(), CPU)
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)  # emulated bf16 would be slower: fp32
    assert not precision.uses_bf16(CPU, amp=True, cpu_amp=True)
    assert TrainConfig().cpu_amp is False


class _RecordsDtype(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(1, 3, 3, padding=1)
        self.dtypes: list[torch.dtype] = []

    def forward(self, x):
        out = self.conv(x)
        self.dtypes.append(out.dtype)
        return out


def test_the_window_runs_in_bf16_with_cpu_amp_and_returns_close_fp32_probabilities(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    torch.manual_seed(0)
    model, image = _RecordsDtype(), torch.randn(1, 12, 12, 12)
    plain = sliding_window_probabilities(model, image, (8, 8, 8), amp=True)
    assert set(model.dtypes) == {torch.float32}  # amp alone does nothing on a CPU
    model.dtypes.clear()
    fast = sliding_window_probabilities(model, image, (8, 8, 8), amp=True, cpu_amp=True)
    assert set(model.dtypes) == {torch.bfloat16} and fast.dtype == torch.float32
    torch.testing.assert_close(fast, plain, atol=2e-2, rtol=0)
    assert not torch.equal(fast, plain)  # it did run in bf16


def test_a_trainer_step_runs_under_cpu_bf16_with_cpu_amp(toy_dataset, tmp_path, monkeypatch):
    import argparse

    from mnseg.commands.train import add_arguments, build_config
    from mnseg.engine.trainer import Trainer

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([str(toy_dataset), "--num-labeled", "3", "--epochs", "1", "--iters-per-epoch", "2",
                              "--patch-size", "32,32,16", "--num-val", "1", "--device", "cpu"])
    args.overrides = ["models.net.name=unet3d", "models.net.kwargs={depth: 3, base_filters: 4}",
                      f"data.cache_dir={tmp_path / 'cache'}", "train.cpu_amp=true", "train.val_every=1"]
    trainer = Trainer(build_config(args), tmp_path / "run", progress=False, log=lambda *a: None)
    trainer.setup()
    seen = []
    conv = next(m for m in trainer.models["net"].modules() if isinstance(m, nn.Conv3d))
    conv.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    row = trainer.fit()
    assert torch.bfloat16 in seen and torch.isfinite(torch.tensor(row["loss"])) and 0.0 <= row["val_dice"] <= 1.0
    assert all(p.dtype == torch.float32 for p in trainer.models["net"].parameters())  # weights stay fp32
