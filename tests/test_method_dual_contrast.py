"""dual_contrast: hand-computed loss, every term trains both subnets, class-balanced anchors, CLI run."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import mnseg.methods
from mnseg.cli import main
from mnseg.config.schema import Config
from mnseg.errors import ConfigError
from mnseg.methods.base import Batch, MethodContext
from mnseg.methods.dual_contrast import DualContrast, gated_l1_consistency, lambda_c_at, sample_anchors
from mnseg.methods.voxel_contrast import classifier_conv
from mnseg.models import create_model

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


def reference_loss(nets, x, y, valid, b_l_voxels, *, threshold, quantile, tau, lam_c):
    feats, probs, sups = [], [], []
    for net in nets:
        w1, b1, w2, b2 = np_params(net)
        f = w1[:, None] * x[None] + b1[:, None]  # (D, N)
        z = w2 @ f + b2[:, None]
        feats.append(f)
        probs.append(softmax(z))
        sups.append(sup_loss(z[:, :b_l_voxels], y, valid))
    winner = probs[0] if sups[0] <= sups[1] else probs[1]
    pseudo = winner.argmax(0)
    u = slice(b_l_voxels, None)
    pa, pb = probs[0][:, u], probs[1][:, u]
    gate = (pa.max(0) > threshold) & (pb.max(0) > threshold) & (pa.argmax(0) != pb.argmax(0))
    onehot = np.eye(2)[pseudo[u]].T
    loss_u = sum((np.abs(p - onehot).sum(0) * gate).sum() / max(gate.sum(), 1) for p in (pa, pb))

    entropy = -(winner[:, u] * np.log(winner[:, u])).sum(0) / np.log(2)
    kth = np.sort(entropy)[math.ceil(quantile * entropy.size) - 1]
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


def test_loss_matches_hand_computation():
    params = {
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
        threshold=0.55, quantile=0.5, tau=0.5, lam_c=lam_c,
    )  # fmt: skip
    assert out.logs["lambda_c"] == pytest.approx(lam_c)
    assert float(out.logs["loss_u"]) == pytest.approx(loss_u, rel=1e-4)
    assert float(out.logs["loss_c"]) == pytest.approx(loss_c, rel=1e-4)
    assert float(out.loss.detach()) == pytest.approx(total, rel=1e-4)


def test_gated_l1_small_example():
    probs_a = torch.tensor([[0.9, 0.2, 0.6, 0.3], [0.1, 0.8, 0.4, 0.7]]).view(1, 2, 4, 1, 1)
    probs_b = torch.tensor([[0.1, 0.1, 0.45, 0.75], [0.9, 0.9, 0.55, 0.25]]).view(1, 2, 4, 1, 1)
    pseudo = torch.tensor([0, 1, 0, 1]).view(1, 4, 1, 1)
    loss, gate = gated_l1_consistency(probs_a, probs_b, pseudo, threshold=0.65)
    # voxel 0: both confident, disagree -> counted; 1: agree; 2: neither confident; 3: both confident, disagree
    assert gate.view(-1).tolist() == [True, False, False, True]
    a = (abs(0.9 - 1) + abs(0.1 - 0) + abs(0.3 - 0) + abs(0.7 - 1)) / 2
    b = (abs(0.1 - 1) + abs(0.9 - 0) + abs(0.75 - 0) + abs(0.25 - 1)) / 2
    assert float(loss) == pytest.approx(a + b)


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
    return feats, probs, winner, winner.argmax(1), label


@pytest.mark.parametrize("term", ["loss_u", "loss_c"])
def test_each_unlabelled_term_alone_trains_both_subnets(term):
    params = {"threshold_start": 0.5, "threshold_end": 0.5, "unreliable_quantile": 0.5, "anchors_per_class": 64}
    method = make_method(params, b=2)
    models = tiny_unets()
    method.attach(models, {}, {})
    feats, probs, winner, pseudo, label = forward_parts(method, models)
    logs = {}
    if term == "loss_u":
        loss = method.unlabelled_loss(probs, pseudo, 2, 0, 0, logs)
        assert float(logs["gate_fraction"]) > 0
    else:
        loss = method.contrastive_loss(feats, probs, winner, pseudo, label, 2, logs)
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
    run = tmp_path / "run"
    rc = main(
        [
            "train", str(toy_dataset), "--method", "dual_contrast", "--num-labeled", "2", "--epochs", "2",
            "--iters-per-epoch", "2", "--batch-size", "2", "--patch-size", "16,16,16", "--run-dir", str(run),
            "--no-progress", "data.cache_dir=" + str(tmp_path / "cache"),
            "models.net_a.name=unet3d", "models.net_a.kwargs={depth: 3, base_filters: 4}",
            "models.net_b.kwargs={depth: 3, base_filters: 2, norm: batch}",
        ]
    )  # fmt: skip
    assert rc == 0
    assert (run / "checkpoints" / "last.pt").exists()
    header = (run / "history.csv").read_text().splitlines()[0]
    for column in ("loss_u", "loss_c", "lambda_c", "lr_net_a", "lr_net_b"):
        assert column in header
