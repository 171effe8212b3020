"""Adversarial training (Hung et al.; DAN): hand-computed losses, disjoint gradients of segmenter and discriminator,
DAN's targets and image input, CLI run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import mnseg.methods
from mnseg.config.schema import Config, load_config
from mnseg.errors import ConfigError
from mnseg.methods.adversarial import Adversarial
from mnseg.methods.base import Batch, MethodContext
from mnseg.models import create_model
from mnseg.models.discriminator import Discriminator3D
from tests.helpers.cli_run import TINY_NET, history_columns, train_tiny

REGISTRY_LINE = ("mnseg.methods.adversarial", "Adversarial")


def make_method(params=None, ignore_index=None, b=1, n_unlabeled=1) -> Adversarial:
    cfg = Config.from_dict(
        {"method": {"name": "adversarial", "params": params or {}}, "models": {"net": {}, "disc": {}}}
    )
    return Adversarial(cfg, MethodContext(2, 1, ignore_index, b, 4, 10, 1, n_unlabeled))


def conv(cin, cout, weight, bias):
    layer = nn.Conv3d(cin, cout, 1)
    with torch.no_grad():
        layer.weight[:] = torch.tensor(weight, dtype=torch.float32).view(cout, cin, 1, 1, 1)
        layer.bias[:] = torch.tensor(bias, dtype=torch.float32)
    return layer


# --- numpy reference ---------------------------------------------------------------------------------------
def softmax(z):
    e = np.exp(z - z.max(axis=0))
    return e / e.sum(axis=0)


def sigmoid(z):
    return 1 / (1 + np.exp(-z))


def bce(logit, target, weight=None):
    per = -(target * np.log(sigmoid(logit)) + (1 - target) * np.log(1 - sigmoid(logit)))
    weight = np.ones_like(per) if weight is None else weight
    return float((per * weight).sum() / max(weight.sum(), 1))


def ce(z, target, weight):
    nll = -np.log(softmax(z)[target, np.arange(target.size)])
    return float((nll * weight).sum() / max(weight.sum(), 1))


def dice_loss(z, target, valid, smooth=1e-5):
    p = softmax(z)
    out = []
    for c in range(p.shape[0]):
        t = (target == c) * valid
        out.append(1 - (2 * (p[c] * valid * t).sum() + smooth) / ((p[c] * valid).sum() + t.sum() + smooth))
    return float(np.mean(out))


def test_losses_match_hand_computation():
    lam_adv, lam_semi, t_semi = 0.01, 0.1, 0.45
    method = make_method(
        {"lambda_adv": lam_adv, "lambda_semi": lam_semi, "t_semi": t_semi, "semi_start": 0}, ignore_index=2
    )
    ws, bs = [1.5, -1.0], [0.0, 0.3]  # segmenter: logits_k = ws[k] x + bs[k]
    wd, bd = [2.0, -1.0], [0.1]  # discriminator: logit = wd . p + bd
    method.attach({"net": conv(1, 2, ws, bs), "disc": conv(2, 1, wd, bd)}, {}, {})
    x_l, x_u = np.array([1.0, -0.5, 0.2, 2.0]), np.array([0.3, -2.0, 1.0, 0.0])
    y = np.array([0, 1, 2, 0])  # third voxel ignored
    batch = Batch(
        torch.tensor(x_l, dtype=torch.float32).view(1, 1, 4, 1, 1),
        torch.tensor(y).view(1, 4, 1, 1),
        torch.tensor(x_u, dtype=torch.float32).view(1, 1, 4, 1, 1),
    )
    out = method.training_step(batch, 0, 0)

    seg = lambda x: np.stack([ws[0] * x + bs[0], ws[1] * x + bs[1]])  # noqa: E731
    disc = lambda p: wd[0] * p[0] + wd[1] * p[1] + bd[0]  # noqa: E731
    valid = (y != 2).astype(float)
    y0 = np.where(y == 2, 0, y)
    z_l, z_u = seg(x_l), seg(x_u)
    p_l, p_u = softmax(z_l), softmax(z_u)
    loss_sup = ce(z_l, y0, valid) + dice_loss(z_l, y0, valid)
    loss_adv = bce(disc(p_u), 1.0)
    confident = (sigmoid(disc(p_u)) > t_semi).astype(float)
    loss_semi = ce(z_u, p_u.argmax(0), confident)
    real = np.where(valid[None] > 0, np.eye(2)[y0].T, p_l)  # ignored voxel shows the prediction
    loss_disc = bce(disc(real), 1.0, valid) + bce(np.concatenate([disc(p_l), disc(p_u)]), 0.0)
    assert 0 < confident.sum() < confident.size, "the example should exercise the confidence mask"
    assert float(out.logs["loss_sup"]) == pytest.approx(loss_sup, rel=1e-5)
    assert float(out.logs["loss_adv"]) == pytest.approx(loss_adv, rel=1e-5)
    assert float(out.logs["loss_semi"]) == pytest.approx(loss_semi, rel=1e-5)
    assert float(out.logs["loss_disc"]) == pytest.approx(loss_disc, rel=1e-5)
    expected = loss_sup + lam_adv * loss_adv + lam_semi * loss_semi + loss_disc
    assert float(out.loss.detach()) == pytest.approx(expected, rel=1e-5)


def test_dan_losses_match_hand_computation():
    """DAN: D judges (prediction, image) pairs, labelled = real (1), unlabelled = fake (0); S fools it on x_u."""
    lam_adv = 0.01
    method = make_method({"formulation": "dan", "lambda_adv": lam_adv}, ignore_index=2)
    assert not method.self_training  # DAN has no confidence self-training
    ws, bs = [1.5, -1.0], [0.0, 0.3]
    wd, bd = [2.0, -1.0, 0.7], [0.1]  # discriminator: logit = wd . (p_0, p_1, x) + bd
    disc = conv(3, 1, wd, bd)
    disc.use_image = True
    method.attach({"net": conv(1, 2, ws, bs), "disc": disc}, {}, {})
    seen = []
    disc.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    x_l, x_u = np.array([1.0, -0.5, 0.2, 2.0]), np.array([0.3, -2.0, 1.0, 0.0])
    y = np.array([0, 1, 2, 0])  # the ignored voxel does not matter to D here: it sees predictions only
    batch = Batch(
        torch.tensor(x_l, dtype=torch.float32).view(1, 1, 4, 1, 1),
        torch.tensor(y).view(1, 4, 1, 1),
        torch.tensor(x_u, dtype=torch.float32).view(1, 1, 4, 1, 1),
    )
    out = method.training_step(batch, 0, 0)

    seg = lambda x: np.stack([ws[0] * x + bs[0], ws[1] * x + bs[1]])  # noqa: E731
    judge = lambda p, x: wd[0] * p[0] + wd[1] * p[1] + wd[2] * x + bd[0]  # noqa: E731
    valid = (y != 2).astype(float)
    y0 = np.where(y == 2, 0, y)
    z_l, z_u = seg(x_l), seg(x_u)
    p_l, p_u = softmax(z_l), softmax(z_u)
    loss_sup = ce(z_l, y0, valid) + dice_loss(z_l, y0, valid)
    loss_adv = bce(judge(p_u, x_u), 1.0)  # the segmenter wants its unlabelled pairs judged real
    loss_disc = bce(judge(p_l, x_l), 1.0) + bce(judge(p_u, x_u), 0.0)  # labelled real, unlabelled fake
    assert float(out.logs["loss_sup"]) == pytest.approx(loss_sup, rel=1e-5)
    assert float(out.logs["loss_adv"]) == pytest.approx(loss_adv, rel=1e-5)
    assert float(out.logs["loss_disc"]) == pytest.approx(loss_disc, rel=1e-5)
    assert "loss_semi" not in out.logs
    assert float(out.loss.detach()) == pytest.approx(loss_sup + lam_adv * loss_adv + loss_disc, rel=1e-5)
    # D's inputs: (fool x_u), real (x_l), fake (x_u); each the softmax prediction with the image as last channel
    fool, real, fake = (t.view(3, 4).numpy() for t in seen)
    np.testing.assert_allclose(real, np.concatenate([p_l, x_l[None]]), rtol=1e-5)
    np.testing.assert_allclose(fake, np.concatenate([p_u, x_u[None]]), rtol=1e-5)
    np.testing.assert_allclose(fool, fake, rtol=1e-5)


def test_dan_gradient_directions():
    """L_D pushes D's logits up on labelled pairs and down on unlabelled ones (D only); L_adv pushes D's judgement
    of the unlabelled pairs up through S alone, so a step of S makes them look more like labelled ones."""
    method = make_method({"formulation": "dan", "w_ce": 0.0, "w_dice": 0.0, "lambda_adv": 1.0}, b=2)
    models = tiny_models(use_image=True)
    method.attach(models, {}, {})
    batch = tiny_batch()
    image = torch.cat([batch.image_l, batch.image_u])
    label = torch.cat([batch.label_l, torch.zeros_like(batch.label_l)])
    outputs = []

    def keep(module, args, out):
        out.retain_grad()
        outputs.append(out)

    handle = models["disc"].register_forward_hook(keep)
    probs = torch.softmax(models["net"](image), 1)
    loss_d, _ = method.discriminator_loss(probs, image, label, 2)
    loss_d.backward()
    d_real, d_fake = outputs
    assert d_real.shape[0] == 2 and d_fake.shape[0] == 2
    assert (d_real.grad < 0).all() and (d_fake.grad > 0).all()  # descent: labelled -> real (1), unlabelled -> fake
    assert no_gradient(grads(models["net"])) and has_gradient(grads(models["disc"]))
    handle.remove()

    models["disc"].zero_grad()

    def fake_score():
        with torch.no_grad():
            p = torch.softmax(models["net"](image[2:]), 1)
            return float(models["disc"](method.disc_input(p, image[2:])).mean())

    before = fake_score()
    logits = models["net"](image)
    loss_s, _ = method.segmenter_loss(logits, torch.softmax(logits, 1), image, label, 2, step=0)
    loss_s.backward()
    assert no_gradient(grads(models["disc"])) and has_gradient(grads(models["net"]))
    torch.optim.SGD(models["net"].parameters(), lr=0.1).step()
    assert fake_score() > before


def test_dan_needs_the_image_and_labelled_reals():
    method = make_method({"formulation": "dan"})
    with pytest.raises(ConfigError, match="use_image"):
        method.attach(tiny_models(use_image=False), {}, {})
    with pytest.raises(ConfigError, match="unlabeled"):
        make_method({"formulation": "dan", "adv_on": "all"})
    with pytest.raises(ConfigError, match="formulation"):
        make_method({"formulation": "gan"})
    assert make_method({"formulation": "dan", "self_training": True}).self_training
    assert make_method().self_training and make_method().formulation == "hung"
    cfg = load_config("adversarial_dan")
    assert cfg.method.params["formulation"] == "dan" and cfg.models["disc"].kwargs["use_image"]
    no_unlabelled = make_method({"formulation": "dan"}, b=2, n_unlabeled=0)
    models = tiny_models(use_image=True)
    no_unlabelled.attach(models, {}, {})
    out = no_unlabelled.training_step(tiny_batch(b_u=0), 0, 0)
    assert float(out.logs["loss_disc"]) == 0.0 and "loss_adv" not in out.logs  # no fake: D learns nothing
    out.loss.backward()
    assert has_gradient(grads(models["net"]))


def tiny_models(use_image=False):
    torch.manual_seed(0)
    net = create_model("unet3d", in_channels=1, num_classes=2, depth=3, base_filters=2)
    disc = create_model(
        "discriminator3d", in_channels=1, num_classes=2, base_filters=2, num_layers=2, use_image=use_image
    )
    return {"net": net, "disc": disc}


def tiny_batch(b_u=2):
    torch.manual_seed(1)
    return Batch(torch.randn(2, 1, 8, 8, 8), torch.randint(0, 2, (2, 8, 8, 8)), torch.randn(b_u, 1, 8, 8, 8))


def grads(model):
    return [None if p.grad is None else p.grad.clone() for p in model.parameters()]


def has_gradient(gs):
    return all(g is not None and torch.isfinite(g).all() for g in gs) and sum(g.abs().sum() for g in gs) > 0


def no_gradient(gs):
    return all(g is None or not g.any() for g in gs)


@pytest.mark.parametrize("use_image, formulation", [(False, "hung"), (True, "hung"), (True, "dan")])
def test_segmenter_and_discriminator_gradients_are_disjoint(use_image, formulation):
    """L_S trains only the segmenter, L_D only the discriminator; one backward of L_S + L_D gives each its own."""
    method = make_method({"semi_start": 0, "lambda_adv": 0.01, "formulation": formulation, "self_training": True}, b=2)
    models = tiny_models(use_image)
    method.attach(models, {}, {})
    batch = tiny_batch()
    image = torch.cat([batch.image_l, batch.image_u])
    label = torch.cat([batch.label_l, torch.zeros_like(batch.label_l)])

    def parts():
        logits = models["net"](image)
        probs = torch.softmax(logits, dim=1)
        loss_s, logs = method.segmenter_loss(logits, probs, image, label, 2, step=0)
        assert "loss_adv" in logs and "loss_semi" in logs
        loss_d, _ = method.discriminator_loss(probs, image, label, 2)
        return loss_s, loss_d

    for m in models.values():
        m.zero_grad()
    loss_s, _ = parts()
    loss_s.backward()
    seg_only = grads(models["net"])
    assert has_gradient(seg_only)
    assert no_gradient(grads(models["disc"])), "the adversarial term must not update the discriminator"

    for m in models.values():
        m.zero_grad()
    _, loss_d = parts()
    loss_d.backward()
    disc_only = grads(models["disc"])
    assert has_gradient(disc_only)
    assert no_gradient(grads(models["net"])), "the discriminator loss must not reach the segmenter"

    for m in models.values():
        m.zero_grad()
    torch.manual_seed(3)
    out = method.training_step(batch, 0, 0)  # no augmenters: the same forward as parts()
    out.loss.backward()
    for got, want in zip(grads(models["net"]), seg_only):
        torch.testing.assert_close(got, want)
    for got, want in zip(grads(models["disc"]), disc_only):
        torch.testing.assert_close(got, want)


def test_adversarial_term_reaches_segmenter_through_the_discriminator():
    """Without supervision and self-training, the segmenter's gradient comes from D alone."""
    method = make_method({"w_ce": 0.0, "w_dice": 0.0, "self_training": False, "lambda_adv": 1.0}, b=2)
    models = tiny_models()
    method.attach(models, {}, {})
    batch = tiny_batch()
    image = torch.cat([batch.image_l, batch.image_u])
    label = torch.cat([batch.label_l, torch.zeros_like(batch.label_l)])
    logits = models["net"](image)
    loss_s, _ = method.segmenter_loss(logits, torch.softmax(logits, 1), image, label, 2, step=0)
    loss_s.backward()
    assert has_gradient(grads(models["net"]))
    assert no_gradient(grads(models["disc"]))


def test_no_unlabelled_items_and_semi_start():
    method = make_method({"semi_start": 5}, b=2, n_unlabeled=0)
    assert method.batch_split(0, 0) == (2, 0)
    models = tiny_models()
    method.attach(models, {}, {})
    out = method.training_step(tiny_batch(b_u=0), 0, 0)
    assert "loss_adv" not in out.logs and "loss_semi" not in out.logs
    out.loss.backward()
    assert has_gradient(grads(models["net"])) and has_gradient(grads(models["disc"]))

    method = make_method({"semi_start": 5}, b=2)
    method.attach(tiny_models(), {}, {})
    assert "loss_semi" not in method.training_step(tiny_batch(), 0, 4).logs
    assert "loss_semi" in method.training_step(tiny_batch(), 0, 5).logs
    all_items = make_method({"adv_on": "all"}, b=2, n_unlabeled=0)
    all_items.attach(tiny_models(), {}, {})
    assert "loss_adv" in all_items.training_step(tiny_batch(b_u=0), 0, 0).logs
    with pytest.raises(ConfigError):
        make_method({"adv_on": "sometimes"})


@pytest.mark.parametrize("size", [(16, 16, 16), (9, 5, 3)])
def test_discriminator_shapes(size):
    disc = create_model("discriminator3d", in_channels=2, num_classes=3, base_filters=2, num_layers=3)
    assert isinstance(disc, Discriminator3D) and disc.in_channels == 3
    assert disc(torch.rand(2, 3, *size)).shape == (2, 1, *size)
    patch = create_model("discriminator3d", num_classes=3, base_filters=2, num_layers=3, per_voxel=False)
    assert patch(torch.rand(1, 3, 16, 16, 16)).shape == (1, 1, 2, 2, 2)
    paired = create_model("discriminator3d", in_channels=2, num_classes=3, base_filters=2, use_image=True)
    assert paired.in_channels == 5 and paired.use_image
    with pytest.raises(ValueError, match="expects"):
        disc(torch.rand(1, 4, 8, 8, 8))
    with pytest.raises(ConfigError):
        create_model("discriminator3d", num_layers=0)


def test_cli_training_run(toy_dataset, tmp_path, monkeypatch):
    monkeypatch.setitem(mnseg.methods.METHODS, "adversarial", REGISTRY_LINE)
    run = train_tiny(toy_dataset, tmp_path, "adversarial", *TINY_NET,
                     "models.disc.kwargs={base_filters: 4, num_layers: 2}", "method.params.semi_start=1")
    header = history_columns(run)
    for column in ("loss_sup", "loss_adv", "loss_disc", "loss_semi", "lr_net", "lr_disc"):
        assert column in header
