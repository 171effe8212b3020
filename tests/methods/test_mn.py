"""M&N: LR-guided sampling against a real scheduler, phase order, loss weighting, no gradient to the generator,
ablation switches, and a tiny end-to-end run."""

import json
import math

import pytest
import torch

from mnseg.config.schema import Config
from mnseg.engine.build import build_model
from mnseg.engine.schedules import make_scheduler
from mnseg.losses import pseudo_label_loss, supervised_loss
from mnseg.methods.base import Batch, MethodContext
from mnseg.methods.mn import MN
from tests.helpers.interrupted import train_then_die

EPOCHS, ITERS, SUP, B = 10, 3, 4, 5


def _cfg(**params):
    return Config.from_dict({
        "method": {"name": "mn", "params": {"sup_epochs": SUP, **params}},
        "models": {
            "net2d": {"name": "unet2d", "kwargs": {"depth": 3, "base_filters": 4},
                      "optim": {"lr": 1e-3, "final_lr": 1e-5, "warmup_epochs": 1}},
            "net3d": {"name": "unet3d", "kwargs": {"depth": 3, "base_filters": 4},
                      "optim": {"lr": 1e-4, "final_lr": 0.0, "warmup_epochs": 1}},
        },
        "train": {"epochs": EPOCHS, "iters_per_epoch": ITERS, "batch_size": B},
    })


def _method(n_unlabeled=6, **params):
    torch.manual_seed(0)
    cfg = _cfg(**params)
    ctx = MethodContext(num_classes=2, in_channels=1, ignore_index=None, batch_size=B, epochs=EPOCHS,
                        iters_per_epoch=ITERS, n_labeled=2, n_unlabeled=n_unlabeled)
    method = MN(cfg, ctx)
    models = {r: build_model(cfg.models[r], 1, 2) for r in ("net2d", "net3d")}
    opts = {r: torch.optim.AdamW(m.parameters(), lr=1.0) for r, m in models.items()}
    scheds = {r: make_scheduler(opts[r], method.schedule_segments(r)) for r in models}
    method.attach(models, {}, opts)
    return method, scheds


def _steps(scheds):
    """(epoch, iteration) over the whole run, every scheduler stepped after each, as the trainer does."""
    for epoch in range(EPOCHS):
        for it in range(ITERS):
            yield epoch, it
            for s in scheds.values():
                s.step()


def _paper_b_u(method, role):
    """b_u = floor((lr_init - lr_now) / (lr_init - lr_final) * B), lr_now read from the role's optimiser."""
    lr_now = method.optimizers[role].param_groups[0]["lr"]
    optim = method.cfg.models[role].optim
    return math.floor((optim.lr - lr_now) / (optim.lr - optim.final_lr) * B + 1e-9)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step")  # a role idle in its stage, as the trainer
def test_lr_guided_sampling_follows_the_formula_over_a_whole_run():
    method, scheds = _method()
    seen = []
    for epoch, it in _steps(scheds):
        b_l, b_u = method.batch_split(epoch, it)
        role = method.trained_role(epoch)
        if role is None:
            assert (b_l, b_u) == (B, 0)
        else:
            expected = _paper_b_u(method, role)
            assert b_u == expected and b_l == B - b_u
            seen.append(b_u)
    assert seen[0] == 0  # start of stage 2
    assert seen[-1] == B  # lr_final reached at the last step
    assert seen == sorted(seen)  # non-decreasing as the learning rate falls


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step")
def test_single_schedule_does_not_restart_so_unlabelled_items_come_from_the_first_cotraining_step():
    method, scheds = _method(schedule="single")
    lrs, seen = [], []
    for epoch, it in _steps(scheds):
        lrs.append(method.optimizers["net3d"].param_groups[0]["lr"])
        role = method.trained_role(epoch)
        if role is not None:
            expected = _paper_b_u(method, role)
            assert method.batch_split(epoch, it) == (B - expected, expected)
            seen.append(expected)
    after_warmup = lrs[ITERS:]
    assert after_warmup == sorted(after_warmup, reverse=True)  # one cosine: the rate never rises again
    assert seen[0] >= 1 and seen == sorted(seen)  # a third of the run has passed: b_u is already 1 at stage 2


def test_epochs_alternate_in_the_papers_order():
    method, _ = _method()
    phases = [method.phase(e) for e in range(EPOCHS)]
    assert phases[:SUP] == ["supervised"] * SUP
    assert phases[SUP:] == ["cotrain-3d", "cotrain-2d"] * ((EPOCHS - SUP) // 2)
    assert method.active_roles(0) == ["net2d", "net3d"]
    assert method.active_roles(SUP) == ["net3d"] and method.active_roles(SUP + 1) == ["net2d"]


def _batch(b_l, b_u, size=16):
    g = torch.Generator().manual_seed(1)
    return Batch(torch.randn(b_l, 1, size, size, size, generator=g),
                 (torch.rand(b_l, size, size, size, generator=g) > 0.7).long(),
                 torch.randn(b_u, 1, size, size, size, generator=g))


@pytest.mark.parametrize("epoch,role", [(SUP, "net3d"), (SUP + 1, "net2d")])
def test_loss_weighting_and_no_gradient_to_the_generator(epoch, role):
    method, _ = _method()
    other = "net2d" if role == "net3d" else "net3d"
    for r, m in method.models.items():
        m.train(r == role)
    batch = _batch(2, 3)
    out = method.training_step(batch, epoch, 0)
    out.loss.backward()
    assert all(p.grad is None for p in method.models[other].parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.models[role].parameters())

    # Hand computation with the same models: L_c = b_l/B L_l + b_u/B L_u.
    with torch.no_grad():
        logits = method.models[role](torch.cat([batch.image_l, batch.image_u]))
        pseudo = torch.softmax(method.models[other](batch.image_u), 1)
        l_l = supervised_loss(logits[:2], batch.label_l)
        l_u = pseudo_label_loss(logits[2:], pseudo)
    assert float(out.loss.detach()) == pytest.approx(float(2 / 5 * l_l + 3 / 5 * l_u), rel=1e-5)
    assert float(out.logs["loss_l"]) == pytest.approx(float(l_l), rel=1e-5)
    assert float(out.logs["loss_u"]) == pytest.approx(float(l_u), rel=1e-5)
    # the class shares of the pseudo-masks and of the labels, for telling a generator that misses a class
    assert float(out.logs["pseudo_share_1"]) == pytest.approx(float((pseudo.argmax(1) == 1).float().mean()))
    assert float(out.logs["label_share_1"]) == pytest.approx(float((batch.label_l == 1).float().mean()))
    assert not any(k.endswith("_share_0") for k in out.logs)


def test_fixed_pseudo_masks_come_from_the_stage1_models():
    method, _ = _method(fixed_pseudo=True)
    method.on_epoch_start(SUP)
    gen = method.generator_for("net3d")
    assert gen is not method.models["net2d"]
    with torch.no_grad():
        for p in method.models["net2d"].parameters():
            p.add_(1.0)  # the live 2D model moves on ...
    x = torch.randn(1, 1, 16, 16, 16)
    assert not torch.allclose(gen.eval()(x), method.models["net2d"].eval()(x))  # ... the generator does not
    state = method.extra_state()
    fresh, _ = _method(fixed_pseudo=True)
    fresh.load_extra_state(state)
    torch.testing.assert_close(fresh.generator_for("net3d")(x), gen(x))

    iterative, _ = _method()
    iterative.on_epoch_start(SUP)
    assert iterative.generator_for("net3d") is iterative.models["net2d"]


def test_sampling_switches():
    import numpy as np

    lin, _ = _method(lrg="epoch-linear")
    # 3 co-training epochs per model, b_u = floor(e / 3 * B) for each model's own e = 0, 1, 2 (the authors' code)
    assert [lin.batch_split(e, 0)[1] for e in range(SUP, EPOCHS)] == [0, 0, 1, 1, 3, 3]
    uni, _ = _method(lrg="uniform")
    counts = [uni.batch_split(SUP, 0)[1] for _ in range(400)]
    assert abs(np.mean(counts) - B * 6 / 8) < 0.3  # 6 of 8 cases are unlabelled
    fixed, _ = _method(lrg="fixed", fixed_ratio=0.4)
    assert fixed.batch_split(SUP, 0) == (3, 2)
    none, _ = _method(n_unlabeled=0)
    assert none.batch_split(EPOCHS - 1, ITERS - 1) == (B, 0)
    with pytest.raises(Exception, match="lrg"):
        _method(lrg="bogus")


def test_predict_switch():
    method, _ = _method()
    assert method.predictor() is method.models["net3d"]
    assert method.predictor("2d") is method.models["net2d"]
    assert method.predictor("average") == [method.models["net3d"], method.models["net2d"]]


@pytest.mark.parametrize("role,name,kwargs,finetune", [
    ("net2d", "effunet", {"variant": "lite0"}, "lora"),
    ("net2d", "effunet", {"variant": "lite0"}, "decoder"),
    ("net2d", "effunet", {"variant": "lite0"}, "whole"),
    ("net3d", "unet3d", {"depth": 3, "base_filters": 4}, None),
])
def test_model_switches_build(role, name, kwargs, finetune):
    from mnseg.config.schema import ModelConfig
    from mnseg.models import count_parameters

    model = build_model(ModelConfig(name=name, kwargs=kwargs, finetune=finetune), 1, 3)
    trainable, total = count_parameters(model)
    if finetune == "whole" or finetune is None:
        assert trainable == total
    else:
        assert 0 < trainable < total
    assert model(torch.randn(2, 1, 32, 32, 8)).shape == (2, 3, 32, 32, 8)


def test_tiny_end_to_end(toy_dataset, tmp_path):
    from mnseg.cli import main

    rc = main(["train", str(toy_dataset), "--method", "mn", "--num-labeled", "2", "--epochs", "4",
               "--iters-per-epoch", "2", "--batch-size", "2", "--patch-size", "32,32,16", "--run-dir",
               str(tmp_path / "run"), "--no-progress", f"data.cache_dir={tmp_path / 'cache'}", "--test",
               "models.net3d.name=unet3d", "models.net3d.kwargs={depth: 3, base_filters: 4}",
               "method.params.sup_epochs=2"])
    assert rc == 0
    rows = (tmp_path / "run" / "history.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert {"lr_net2d", "lr_net3d", "b_l", "b_u", "phase"} <= set(header)
    phases = [r.split(",")[header.index("phase")] for r in rows[1:]]
    assert phases == ["supervised", "supervised", "cotrain-3d", "cotrain-2d"]
    assert json.loads((tmp_path / "run" / "test_predictions" / "summary.json").read_text())["n_cases"] == 2


def test_slices_2d_trains_the_2d_model_on_a_subset_of_slices():
    method, _ = _method(slices_2d=3)
    seen = {"net2d": [], "net3d": []}
    for role in seen:
        method.models[role].register_forward_hook(lambda m, inp, out, r=role: seen[r].append(tuple(inp[0].shape)))
    batch = _batch(2, 3)
    method.training_step(batch, 0, 0)  # stage 1: both train; 2D on 3 slices, 3D on whole patches
    assert seen["net2d"] == [(2, 1, 16, 16, 3)] and seen["net3d"] == [(2, 1, 16, 16, 16)]
    seen["net2d"].clear(), seen["net3d"].clear()
    method.training_step(batch, SUP + 1, 0)  # 2D trains on 3D pseudo-masks computed on whole patches
    assert seen["net3d"] == [(3, 1, 16, 16, 16)] and seen["net2d"] == [(5, 1, 16, 16, 3)]
    seen["net2d"].clear(), seen["net3d"].clear()
    method.training_step(batch, SUP, 0)  # the 3D model's epochs are unaffected
    assert seen["net2d"] == [(3, 1, 16, 16, 16)] and seen["net3d"] == [(5, 1, 16, 16, 16)]


def test_resume_restores_lr_guided_sampling_state(toy_dataset, tmp_path):
    """An M&N run stopped in co-training and resumed ends where an uninterrupted one does (weights, b_u, lrs)."""
    import csv

    from mnseg.cli import main
    from mnseg.commands.train import build_config

    common = ["--method", "mn", "--num-labeled", "2", "--epochs", "5", "--iters-per-epoch", "3", "--batch-size", "3",
              "--patch-size", "16,16,16"]
    over = [f"data.cache_dir={tmp_path / 'cache'}", "train.deterministic=true", "method.params.sup_epochs=2",
            "models.net2d.name=unet2d", "models.net2d.finetune=null", "models.net2d.kwargs={depth: 3, base_filters: 4}",
            "models.net3d.name=unet3d", "models.net3d.kwargs={depth: 3, base_filters: 4}",
            "method.params.fixed_pseudo=true", "method.params.lrg=uniform"]
    assert main(["train", str(toy_dataset), *common, "--run-dir", str(tmp_path / "full"), "--no-progress", *over]) == 0

    import argparse

    from mnseg.commands.train import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args([str(toy_dataset), *common])
    args.overrides = over
    # stops after the first co-training epoch (fixed generators exist, uniform rng used)
    train_then_die(build_config(args), tmp_path / "part", epochs=3)
    assert main(["train", "--resume", str(tmp_path / "part"), "--no-progress"]) == 0

    a = torch.load(tmp_path / "full" / "checkpoints" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "part" / "checkpoints" / "last.pt", weights_only=False)
    for role in ("net2d", "net3d"):
        for key, value in a["models"][role].items():
            torch.testing.assert_close(value, b["models"][role][key], rtol=1e-5, atol=1e-6, msg=f"{role}.{key}")
    rows_a = list(csv.DictReader(open(tmp_path / "full" / "history.csv")))
    rows_b = list(csv.DictReader(open(tmp_path / "part" / "history.csv")))
    assert [r["b_u"] for r in rows_a] == [r["b_u"] for r in rows_b]
    assert [r["lr_net3d"] for r in rows_a] == [r["lr_net3d"] for r in rows_b]
    assert [float(r["loss"]) for r in rows_a] == pytest.approx([float(r["loss"]) for r in rows_b], rel=1e-4)


def test_class_shares_leave_out_background_and_the_ignore_label():
    method, _ = _method()
    shares = method._class_shares("label", torch.tensor([[0, 1, 1, 2, 5]]), 3)  # 5: an ignore label
    assert sorted(shares) == ["label_share_1", "label_share_2"]
    assert float(shares["label_share_1"]) == pytest.approx(0.5)
    assert float(shares["label_share_2"]) == pytest.approx(0.25)
