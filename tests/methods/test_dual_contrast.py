"""dual_contrast: hand-computed loss (eq. 2's pseudo-supervision, L_reg), every term trains both subnets,
class-balanced anchors, the paper's SGD step preset, CLI run."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import mnseg.methods
from mnseg.config.schema import Config, load_config
from mnseg.errors import ConfigError
from mnseg.methods.base import Batch, MethodContext
from mnseg.methods.dual_contrast import (
    DualContrast,
    filtered_pseudo_supervision,
    gated_l1_consistency,
    lambda_c_at,
    sample_anchors,
)
from mnseg.methods.voxel_contrast import classifier_conv
from mnseg.models import create_model
from tests.helpers.cli_run import history_columns, train_tiny

REGISTRY_LINE = ("mnseg.methods.dual_contrast", "DualContrast")


def make_method(params=None, ignore_index=None, b=1, n_unlabeled=1, epochs=1, iters=1) -> DualContrast:
    cfg = Config.from_dict(
        {"method": {"name": "dual_contrast", "params": params or {}}, "models": {"net_a": {}, "net_b": {}}}
    )
    return DualContrast(cfg, MethodContext(2, 1, ignore_index, b, epochs, iters, 1, n_unlabeled))


def linear_net(width: int, seed: int) -> nn.Sequential:
    """features = W1 x + b1 (width channels), logits = W2 features + b2: both 1x1x1 convs."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv3d(1, width, 1), nn.Conv3d(width, 2, 1))
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(3.0)
    return net


# --- numpy reference ---------------------------------------------------------------------------------------
def np_params(net):
    w1, b1, w2, b2 = (p.detach().double().numpy() for p in net.parameters())
    return w1.reshape(w1.shape[0]), b1, w2.reshape(2, -1), b2


def softmax(z):
    e = np.exp(z - z.max(axis=0))
    return e / e.sum(axis=0)


def sup_loss(z, y, valid, smooth=1e-5):
    p = softmax(z)
    ce = (-np.log(p[y, np.arange(y.size)]) * valid).sum() / valid.sum()
    dice = [
        1 - (2 * (p[c] * valid * (y == c)).sum() + smooth) / ((p[c] * valid).sum() + ((y == c) * valid).sum() + smooth)
        for c in range(2)
    ]
    return ce + np.mean(dice)


def reference_loss(nets, x, y, valid, b_l_voxels, *, threshold, quantile, tau, lam_c, reg_form="pair", pseudo=True):
    feats, probs, sups = [], [], []
    for net in nets:
        w1, b1, w2, b2 = np_params(net)
        f = w1[:, None] * x[None] + b1[:, None]  # (D, N)
        z = w2 @ f + b2[:, None]
        feats.append(f)
        probs.append(softmax(z))
        sups.append(sup_loss(z[:, :b_l_voxels], y, valid))
    winner = probs[0] if sups[0] <= sups[1] else probs[1]
    use_pseudo, pseudo = pseudo, winner.argmax(0)
    u = slice(b_l_voxels, None)
    pa, pb = probs[0][:, u], probs[1][:, u]
    gate = (pa.max(0) > threshold) & (pb.max(0) > threshold) & (pa.argmax(0) != pb.argmax(0))
    entropy = -(winner[:, u] * np.log(winner[:, u])).sum(0) / np.log(2)
    kth = np.sort(entropy)[math.ceil(quantile * entropy.size) - 1]
    if reg_form == "pair":  # |M P_a - M P_b|, summed over classes, averaged over M
        loss_u = (np.abs(pa - pb).sum(0) * gate).sum() / max(gate.sum(), 1)
    else:
        onehot = np.eye(2)[pseudo[u]].T
        loss_u = sum((np.abs(p - onehot).sum(0) * gate).sum() / max(gate.sum(), 1) for p in (pa, pb))
    if use_pseudo:  # eq. 2: CE + Dice against the winner's argmax on the reliable (entropy <= kth) voxels
        reliable_u = (entropy <= kth).astype(float)
        assert 0 < reliable_u.sum() < reliable_u.size
        for net in nets:
            w1, b1, w2, b2 = np_params(net)
            z_u = w2 @ (w1[:, None] * x[None, u] + b1[:, None]) + b2[:, None]
            loss_u += sup_loss(z_u, pseudo[u], reliable_u)

    unreliable = np.concatenate([np.zeros(b_l_voxels, bool), entropy > kth])
    classes = np.concatenate([np.where(valid > 0, y, 0), pseudo[u]])
    reliable = np.concatenate([valid > 0, entropy <= kth])
    loss_c = 0.0
    for f in feats:
        z = f / np.linalg.norm(f, axis=0, keepdims=True)
        protos = {}
        for c in range(2):
            members = reliable & (classes == c)
            if members.any():
                s = z[:, members].sum(1)
                protos[c] = s / np.linalg.norm(s)
        pulls = []
        for i in np.flatnonzero(unreliable):
            if classes[i] not in protos:
                continue
            sims = {c: z[:, i] @ mu / tau for c, mu in protos.items()}
            pulls.append(-(sims[classes[i]] - np.log(sum(np.exp(v) for v in sims.values()))))
        pull = np.mean(pulls) if pulls else 0.0
        pairs = [(1 + protos[c] @ protos[k]) / 2 for c in protos for k in protos if c != k]
        loss_c += pull + (np.mean(pairs) if pairs else 0.0)
        assert pulls and pairs, "the example must exercise both contrast terms"
    assert gate.any(), "the example must exercise the consistency gate"
    return sups[0] + sups[1] + loss_u + lam_c * loss_c, loss_u, loss_c


@pytest.mark.parametrize("reg_form, pseudo", [("pair", True), ("winner", False), ("winner", True)])
def test_loss_matches_hand_computation(reg_form, pseudo):
    params = {
        "reg_form": reg_form,
        "pseudo_supervision": pseudo,
        "threshold_start": 0.55,
        "threshold_end": 0.55,
        "unreliable_quantile": 0.5,
        "temperature": 0.5,
        "anchors_per_class": 100,
        "lambda_c_form": "literal",
        "lambda_c": 0.1,
    }
    method = make_method(params, ignore_index=2, epochs=1, iters=2)
    nets = [linear_net(3, seed=4), linear_net(2, seed=5)]
    method.attach({"net_a": nets[0], "net_b": nets[1]}, {}, {})
    x_l = np.array([1.0, -0.5, 0.2, 2.0, -1.5])
    x_u = np.array([0.3, -2.0, 1.0, 0.05, -0.3])
    y = np.array([1, 0, 2, 1, 0])  # the third voxel nobody annotated
    batch = Batch(
        torch.tensor(x_l, dtype=torch.float32).view(1, 1, 5, 1, 1),
        torch.tensor(y).view(1, 5, 1, 1),
        torch.tensor(x_u, dtype=torch.float32).view(1, 1, 5, 1, 1),
    )
    out = method.training_step(batch, 0, 1)  # t = 1 of t_max = 2: literal lambda_c = 0.1 e^(4 * 0.25)
    lam_c = 0.1 * math.exp(1.0)
    total, loss_u, loss_c = reference_loss(
        nets, np.concatenate([x_l, x_u]), np.where(y == 2, 0, y), (y != 2).astype(float), 5,
        threshold=0.55, quantile=0.5, tau=0.5, lam_c=lam_c, reg_form=reg_form, pseudo=pseudo,
    )  # fmt: skip
    assert out.logs["lambda_c"] == pytest.approx(lam_c)
    assert float(out.logs["loss_u"]) == pytest.approx(loss_u, rel=1e-4)
    assert float(out.logs["loss_c"]) == pytest.approx(loss_c, rel=1e-4)
    assert float(out.loss.detach()) == pytest.approx(total, rel=1e-4)


def test_gated_l1_winner_form_small_example():
    probs_a = torch.tensor([[0.9, 0.2, 0.6, 0.3], [0.1, 0.8, 0.4, 0.7]]).view(1, 2, 4, 1, 1)
    probs_b = torch.tensor([[0.1, 0.1, 0.45, 0.75], [0.9, 0.9, 0.55, 0.25]]).view(1, 2, 4, 1, 1)
    pseudo = torch.tensor([0, 1, 0, 1]).view(1, 4, 1, 1)
    loss, gate = gated_l1_consistency(probs_a, probs_b, pseudo, threshold=0.65, form="winner")
    # reg_form winner (mnseg's earlier form): each subnet's L1 to onehot(pseudo).
    # voxel 0: both confident, disagree -> counted; 1: agree; 2: neither confident; 3: both confident, disagree
    assert gate.view(-1).tolist() == [True, False, False, True]
    a = (abs(0.9 - 1) + abs(0.1 - 0) + abs(0.3 - 0) + abs(0.7 - 1)) / 2
    b = (abs(0.1 - 1) + abs(0.9 - 0) + abs(0.75 - 0) + abs(0.25 - 1)) / 2
    assert float(loss) == pytest.approx(a + b)


def test_gated_l1_pair_form_is_the_papers_l_reg_and_trains_both_subnets():
    """L_reg = |M P_a - M P_b|: on the same example, mean over the gate of sum_c |P_a - P_b|, no pseudo-label."""
    probs_a = torch.tensor([[0.9, 0.2, 0.6, 0.3], [0.1, 0.8, 0.4, 0.7]]).view(1, 2, 4, 1, 1).requires_grad_()
    probs_b = torch.tensor([[0.1, 0.1, 0.45, 0.75], [0.9, 0.9, 0.55, 0.25]]).view(1, 2, 4, 1, 1).requires_grad_()
    pseudo = torch.tensor([0, 1, 0, 1]).view(1, 4, 1, 1)
    loss, gate = gated_l1_consistency(probs_a, probs_b, pseudo, threshold=0.65, form="pair")
    assert gate.view(-1).tolist() == [True, False, False, True]
    expected = ((0.8 + 0.8) + (0.45 + 0.45)) / 2  # voxel 0: |0.9-0.1| + |0.1-0.9|; voxel 3: |0.3-0.75| + |0.7-0.25|
    assert float(loss.detach()) == pytest.approx(expected)
    loss_flipped, _ = gated_l1_consistency(probs_a, probs_b, 1 - pseudo, threshold=0.65, form="pair")
    assert float(loss_flipped.detach()) == pytest.approx(expected)  # the pseudo-label plays no part
    loss.backward()
    # d/dP_a = sign(P_a - P_b) / |M| on gated voxels, the opposite for P_b: each moves towards the other
    want = torch.tensor([[0.5, 0, 0, -0.5], [-0.5, 0, 0, 0.5]]).view(1, 2, 4, 1, 1)
    torch.testing.assert_close(probs_a.grad, want)
    torch.testing.assert_close(probs_b.grad, -want)


def test_filtered_pseudo_supervision_small_example():
    """CE + Dice against the pseudo-label over the reliable voxels only; the pseudo-label gets no gradient."""
    logits = torch.tensor([[2.0, 0.0, -1.0, 0.5], [0.0, 1.0, 1.0, 0.5]]).view(1, 2, 4, 1, 1).requires_grad_()
    pseudo = torch.tensor([0, 1, 0, 1]).view(1, 4, 1, 1)
    unreliable = torch.tensor([False, False, True, False]).view(1, 4, 1, 1)
    loss = filtered_pseudo_supervision(logits, pseudo, unreliable)
    z = logits.detach().view(2, 4).double().numpy()
    keep = np.array([1.0, 1.0, 0.0, 1.0])
    assert float(loss.detach()) == pytest.approx(sup_loss(z, np.array([0, 1, 0, 1]), keep), rel=1e-6)
    p0 = np.exp(z[0]) / np.exp(z).sum(0)
    ce = -(np.log(p0[0]) + np.log(1 - p0[1]) + np.log(1 - p0[3])) / 3
    s = 1e-5
    dice0 = 1 - (2 * p0[0] + s) / (p0[0] + p0[1] + p0[3] + 1 + s)
    dice1 = 1 - (2 * ((1 - p0[1]) + (1 - p0[3])) + s) / ((1 - p0[0]) + (1 - p0[1]) + (1 - p0[3]) + 2 + s)
    assert float(loss.detach()) == pytest.approx(ce + (dice0 + dice1) / 2, rel=1e-6)  # written out by hand
    loss.backward()
    assert not logits.grad[..., 2, :, :].any(), "an unreliable voxel must not train"
    assert logits.grad[..., 0, :, :].abs().sum() > 0


def test_preset_follows_the_papers_optimiser_and_schedule():
    cfg = load_config("dual_contrast")
    assert cfg.train.epochs * cfg.train.iters_per_epoch == 6000 and cfg.train.batch_size == 2
    for role in ("net_a", "net_b"):
        o = cfg.models[role].optim
        assert (o.name, o.lr, o.momentum, o.nesterov, o.weight_decay) == ("sgd", 0.01, 0.9, False, 1e-4)
        assert (o.schedule, o.step_size, o.step_gamma, o.warmup_epochs) == ("step", 2500, 0.1, 0)
    assert not cfg.method.params  # reg_form pair and pseudo_supervision on by default
    method = DualContrast(cfg, MethodContext(2, 1, None, 2, 60, 100, 1, 1))
    assert (method.reg_form, method.pseudo_supervision) == ("pair", True)
    (seg,) = method.schedule_segments("net_a")
    assert [seg.lr_at(t) for t in (0, 2499, 2500, 5000, 5999)] == pytest.approx([1e-2, 1e-2, 1e-3, 1e-4, 1e-4])
    with pytest.raises(ConfigError):
        make_method({"reg_form": "towards_winner"})


def test_lambda_c_forms():
    assert lambda_c_at(0, 100, "rampup") == pytest.approx(0.1 * math.exp(-4))
    assert lambda_c_at(100, 100, "rampup") == pytest.approx(0.1)
    assert lambda_c_at(0, 100, "literal") == pytest.approx(0.1 * math.exp(4))  # about 5.46, as printed
    assert lambda_c_at(100, 100, "literal") == pytest.approx(0.1)
    assert lambda_c_at(50, 100, "rampup") < lambda_c_at(60, 100, "rampup")
    with pytest.raises(ConfigError):
        make_method({"lambda_c_form": "falling"})


def test_threshold_moves_from_start_to_end():
    method = make_method({"threshold_start": 0.6, "threshold_end": 0.9}, epochs=2, iters=3)
    assert method.threshold(0, 0) == pytest.approx(0.6)
    assert method.threshold(1, 2) == pytest.approx(0.9)
    assert 0.6 < method.threshold(1, 0) < 0.9


def test_class_balanced_sampling_picks_rare_class_anchors():
    classes = torch.zeros(2000, dtype=torch.long)
    rare = torch.tensor([3, 500, 999, 1500, 1999])
    classes[rare] = 1
    candidates = torch.ones(2000, dtype=torch.bool)
    candidates[::7] = False
    candidates[rare] = True
    balanced_rare, uniform_rare = [], []
    for seed in range(10):
        g = torch.Generator().manual_seed(seed)
        index, valid = sample_anchors(classes, candidates, 2, per_class=8, class_balanced=True, generator=g)
        chosen = index[valid]
        assert candidates[chosen].all() and len(set(chosen.tolist())) == chosen.numel()
        balanced_rare.append(int((classes[chosen] == 1).sum()))
        assert int((classes[chosen] == 0).sum()) == 8
        index, valid = sample_anchors(classes, candidates, 2, per_class=8, class_balanced=False, generator=g)
        assert int(valid.sum()) == 16 and candidates[index[valid]].all()
        uniform_rare.append(int((classes[index[valid]] == 1).sum()))
    assert balanced_rare == [5] * 10  # every rare voxel (fewer than 8) is an anchor, every time
    assert sum(uniform_rare) < 10  # uniform sampling expects 0.04 per draw


def tiny_unets():
    torch.manual_seed(0)
    net_a = create_model("unet3d", in_channels=1, num_classes=2, depth=3, base_filters=4)
    net_b = create_model("unet3d", in_channels=1, num_classes=2, depth=3, base_filters=2, norm="batch")
    return {"net_a": net_a, "net_b": net_b}


def forward_parts(method, models):
    torch.manual_seed(1)
    image = torch.randn(4, 1, 8, 8, 8)
    label = torch.zeros(4, 8, 8, 8, dtype=torch.long)
    label[:2, 2:6, 2:6, 2:6] = 1
    logits, feats = {}, {}
    for role in models:
        logits[role], feats[role] = method.forward_with_features(role, image)
    probs = {r: torch.softmax(v, 1) for r, v in logits.items()}
    winner = probs["net_a"].detach()
    return feats, logits, probs, winner, winner.argmax(1), label


@pytest.mark.parametrize("term", ["loss_u", "loss_reg", "loss_pl", "loss_c"])
def test_each_unlabelled_term_alone_trains_both_subnets(term):
    params = {"threshold_start": 0.5, "threshold_end": 0.5, "unreliable_quantile": 0.5, "anchors_per_class": 64}
    method = make_method(params, b=2)
    models = tiny_unets()
    method.attach(models, {}, {})
    feats, logits, probs, winner, pseudo, label = forward_parts(method, models)
    unreliable = method.unreliable_voxels(winner, 2)
    logs = {}
    if term in ("loss_u", "loss_reg", "loss_pl"):
        loss = method.unlabelled_loss(logits, probs, pseudo, unreliable, 2, 0, 0, logs)
        assert float(logs["gate_fraction"]) > 0
        if term == "loss_reg":  # L_reg alone
            method.pseudo_supervision = False
            loss = method.unlabelled_loss(logits, probs, pseudo, unreliable, 2, 0, 0, {})
            assert float(loss.detach()) == pytest.approx(float(logs["loss_reg"]))
        elif term == "loss_pl":  # eq. 2's CE + Dice alone
            loss = sum(filtered_pseudo_supervision(logits[r][2:], pseudo[2:], unreliable[2:]) for r in models)
            assert float(loss.detach()) == pytest.approx(float(logs["loss_pl"]), rel=1e-6)
    else:
        loss = method.contrastive_loss(feats, pseudo, label, unreliable, 2, logs)
        assert float(logs["contrast_pull_a"]) > 0 and float(logs["contrast_push_b"]) > 0
    loss.backward()
    for role, model in models.items():
        params_ = [p for p in model.parameters()]
        total = sum(p.grad.abs().sum() for p in params_ if p.grad is not None)
        assert total > 0, f"{term} gives no gradient to {role}"
        assert params_[0].grad is not None and params_[0].grad.abs().sum() > 0, f"{term}: {role}'s input layer"


def test_features_come_from_the_classifier_input_and_bad_models_are_refused():
    models = tiny_unets()
    conv = classifier_conv(models["net_a"], 2)
    assert conv is models["net_a"].net.output_block.conv.conv
    method = make_method(b=1)
    method.attach(models, {}, {})
    logits, feats = method.forward_with_features("net_b", torch.randn(1, 1, 5, 6, 7))  # padded inside the model
    assert logits.shape == (1, 2, 5, 6, 7) and feats.shape == (1, 2, 5, 6, 7)
    models["net_b"](torch.randn(1, 1, 8, 8, 8))
    assert not method.taps.kept, "features are kept only during the method's own forwards"
    with pytest.raises(ConfigError, match="net_b"):
        make_method().attach({"net_a": tiny_unets()["net_a"], "net_b": nn.Conv3d(1, 2, 3, padding=1)}, {}, {})


def test_no_unlabelled_items():
    method = make_method(b=2, n_unlabeled=0)
    assert method.batch_split(0, 0) == (2, 0)
    models = tiny_unets()
    method.attach(models, {}, {})
    torch.manual_seed(0)
    batch = Batch(torch.randn(2, 1, 8, 8, 8), torch.randint(0, 2, (2, 8, 8, 8)), torch.zeros(0, 1, 8, 8, 8))
    out = method.training_step(batch, 0, 0)
    assert float(out.logs["loss_u"]) == 0.0
    out.loss.backward()
    assert all(p.grad is not None for m in models.values() for p in m.parameters())


def test_cli_training_run(toy_dataset, tmp_path, monkeypatch):
    monkeypatch.setitem(mnseg.methods.METHODS, "dual_contrast", REGISTRY_LINE)
    run = train_tiny(toy_dataset, tmp_path, "dual_contrast",
                     "models.net_a.name=unet3d", "models.net_a.kwargs={depth: 3, base_filters: 4}",
                     "models.net_b.kwargs={depth: 3, base_filters: 2, norm: batch}")  # fmt: skip
    header = history_columns(run)
    for column in ("loss_u", "loss_reg", "loss_pl", "loss_c", "lambda_c", "lr_net_a", "lr_net_b"):
        assert column in header
