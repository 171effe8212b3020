"""Activation checkpointing (issue 8, memory): less kept for backward, the same values, gradients and statistics."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from mnseg.config.schema import ModelConfig
from mnseg.engine.build import build_model
from mnseg.errors import ConfigError
from mnseg.models.checkpointing import enable_activation_checkpointing, saved_activation_bytes

# Batch norm everywhere: the recompute must not count a batch twice in the running statistics; dropout: the
# recompute must replay the same masks.
UNET3D_BN = ModelConfig(name="unet3d", kwargs={"depth": 3, "base_filters": 4, "norm": "batch", "dropout": 0.2})
UNET2D_SLICES = ModelConfig(name="unet2d", kwargs={"depth": 3, "base_filters": 4, "norm": "batch"}, slice_batch=8)
EFFUNET_LORA = ModelConfig(name="effunet", kwargs={"variant": "lite0"}, finetune="lora", lora_rank=4, slice_batch=8)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _train_once(model: torch.nn.Module, x: torch.Tensor):
    """One training forward/backward from a fixed RNG state: (saved bytes, output, grads, float buffers)."""
    model.train()
    torch.manual_seed(1)
    saved, out = saved_activation_bytes(lambda: model(x))
    out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n: b.clone() for n, b in model.named_buffers() if b.is_floating_point()}
    return saved, out.detach(), grads, buffers


@pytest.mark.parametrize("mcfg", [UNET3D_BN, UNET2D_SLICES, EFFUNET_LORA], ids=["unet3d", "unet2d", "effunet_lora"])
def test_checkpointing_keeps_values_gradients_and_norm_statistics_and_saves_activations(mcfg):
    torch.manual_seed(0)
    plain = build_model(mcfg, 1, 3)
    checkpointed = build_model(dataclasses.replace(mcfg, activation_checkpoint=True), 1, 3)
    assert list(checkpointed.state_dict()) == list(plain.state_dict())  # checkpoints load either way
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.randn(2, 1, 32, 32, 16)

    saved_plain, out_plain, grads_plain, buffers_plain = _train_once(plain, x)
    saved_ckpt, out_ckpt, grads_ckpt, buffers_ckpt = _train_once(checkpointed, x)

    torch.testing.assert_close(out_ckpt, out_plain, rtol=0, atol=0)
    assert grads_ckpt.keys() == grads_plain.keys() and grads_plain
    for name in grads_plain:
        torch.testing.assert_close(grads_ckpt[name], grads_plain[name], rtol=1e-6, atol=1e-7, msg=name)
    for name in buffers_plain:  # batch-norm running statistics: updated once, as without checkpointing
        torch.testing.assert_close(buffers_ckpt[name], buffers_plain[name], rtol=0, atol=0, msg=name)
    assert saved_ckpt < saved_plain / 4, (saved_ckpt, saved_plain)


def test_without_gradients_nothing_is_recomputed_and_copies_stay_independent():
    model = build_model(dataclasses.replace(UNET3D_BN, activation_checkpoint=True), 1, 3).eval()
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        before = model(x)
    teacher = copy.deepcopy(model)  # as an EMA teacher or M&N's frozen pseudo-mask generator is made
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(1.0)
        torch.testing.assert_close(model(x), before)
        assert not torch.allclose(teacher(x), before)
    assert type(teacher.net.input_block) is type(model.net.input_block)


def test_unsupported_models_and_a_2d_model_without_slice_batch_are_config_errors():
    with pytest.raises(ConfigError, match="slice_batch"):
        build_model(dataclasses.replace(UNET2D_SLICES, slice_batch=None, activation_checkpoint=True), 1, 3)
    with pytest.raises(ConfigError, match="not for Conv3d"):
        enable_activation_checkpointing(torch.nn.Conv3d(1, 2, 3), "conv")


def test_enabling_twice_is_harmless():
    model = build_model(dataclasses.replace(UNET3D_BN, activation_checkpoint=True), 1, 3)
    cls = type(model.net.bottleneck)
    enable_activation_checkpointing(model)
    assert type(model.net.bottleneck) is cls and cls.__mro__.count(cls.__mro__[1]) == 1


def test_mn_trains_with_both_roles_checkpointed(toy_dataset, tmp_path):
    """The option as users set it: M&N's pretrained 2D model (LoRA) per 8-slice chunk and its 3D UNet per level."""
    from mnseg.cli import main

    rc = main(["train", str(toy_dataset), "--method", "mn", "--num-labeled", "2", "--epochs", "2",
               "--iters-per-epoch", "2", "--batch-size", "2", "--patch-size", "32,32,16", "--run-dir",
               str(tmp_path / "run"), "--no-progress", f"data.cache_dir={tmp_path / 'cache'}",
               "models.net3d.name=unet3d", "models.net3d.kwargs={depth: 3, base_filters: 4}",
               "method.params.sup_epochs=1", "models.net2d.slice_batch=8",
               "models.net2d.activation_checkpoint=true", "models.net3d.activation_checkpoint=true"])
    assert rc == 0
    rows = (tmp_path / "run" / "history.csv").read_text().splitlines()
    header = rows[0].split(",")
    losses = [float(r.split(",")[header.index("loss")]) for r in rows[1:]]
    assert len(losses) == 2 and all(0 < v < 10 for v in losses)
    assert "activation_checkpoint: true" in (tmp_path / "run" / "config.yaml").read_text()
