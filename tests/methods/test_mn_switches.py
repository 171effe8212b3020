"""M&N's switches beyond the paper: the Dice form for probability targets, the labelled floor, the loss factor on
unlabelled data, ensemble and confidence-weighted pseudo-masks, the agreement rule of the foreground refresh, and
the automatic input scale of the 2D encoder."""

import numpy as np
import pytest
import torch

from mnseg.losses import pseudo_label_loss, soft_dice_loss, supervised_loss
from mnseg.methods.alignment import align_distribution
from mnseg.methods.ensemble import agreed_labels
from mnseg.models import create_model
from tests.methods.test_mn import EPOCHS, ITERS, SUP, B, _batch, _method


def _soft_target(seed=0, shape=(2, 3, 6, 6, 6)):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(2.0 * torch.randn(shape, generator=g), dim=1)


def test_squared_dice_is_optimal_at_the_soft_target_and_linear_dice_is_not():
    target = _soft_target()
    logits = target.log().clone().requires_grad_(True)  # softmax(logits) == target
    squared = soft_dice_loss(logits, target, squared=True, smooth=0.0)
    (grad_sq,) = torch.autograd.grad(squared, logits)
    assert float(squared.detach()) == pytest.approx(0.0, abs=1e-6)  # Dice = 1 exactly at P = T
    assert float(grad_sq.abs().max()) < 1e-6  # a stationary point: nothing pushes P away from T

    linear = soft_dice_loss(logits, target, squared=False, smooth=0.0)
    (grad_lin,) = torch.autograd.grad(linear, logits)
    assert float(grad_lin.abs().max()) > 1e-4  # the linear form moves P away from T ...
    sharpened = torch.log(torch.nn.functional.one_hot(target.argmax(1), 3).movedim(-1, 1).float() * 0.98 + 0.01)
    assert float(soft_dice_loss(sharpened, target, smooth=0.0)) < float(linear.detach())  # ... towards a thresholded T
    assert float(soft_dice_loss(sharpened, target, squared=True, smooth=0.0)) > float(squared.detach())


def test_squared_dice_hand_computed_with_weights():
    g = torch.Generator().manual_seed(3)
    logits, target = torch.randn(1, 2, 3, 3, 3, generator=g), _soft_target(1, (1, 2, 3, 3, 3))
    weight = torch.rand(1, 3, 3, 3, generator=g)
    p = torch.softmax(logits, 1)
    w = weight[:, None]
    dims = (0, 2, 3, 4)
    dice = 2 * (w * p * target).sum(dims) / ((w * p * p).sum(dims) + (w * target**2).sum(dims))
    expected = 1 - dice.mean()
    got = soft_dice_loss(logits, target, mask=weight, squared=True, smooth=0.0)
    assert float(got) == pytest.approx(float(expected), rel=1e-5)
    # and pseudo_label_loss passes the form through
    kl_free = pseudo_label_loss(logits, target, w_kl=0.0, mask=weight, squared_dice=True)
    assert float(kl_free) == pytest.approx(float(soft_dice_loss(logits, target, mask=weight, squared=True)), rel=1e-6)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step")
@pytest.mark.parametrize("floor", [0, 1, 2])
def test_labelled_floor_caps_the_unlabelled_count(floor):
    method, scheds = _method(min_labeled=floor)
    splits = []
    for epoch in range(EPOCHS):
        for it in range(ITERS):
            splits.append(method.batch_split(epoch, it))
            for s in scheds.values():
                s.step()
    assert all(b_l + b_u == B and b_l >= floor for b_l, b_u in splits)
    assert max(b_u for _, b_u in splits) == B - floor  # the LR-guided count still reaches the cap at the end
    with pytest.raises(Exception, match="min_labeled"):
        _method(min_labeled=B + 1)


def test_unknown_switch_values_are_refused():
    for key in ("soft_dice", "pseudo", "pseudo_weight", "fg_refresh", "generator"):
        with pytest.raises(Exception, match=key):
            _method(**{key: "nonsense"})


def _step_loss(method, batch, role="net3d"):
    for r, m in method.models.items():
        m.train(r == role)
    return float(method.training_step(batch, SUP, 0).loss.detach())


def _expected_3d_loss(method, batch, target):
    """L_c by hand for the 3D model's step on _batch(2, 3): 2/5 L_l + 3/5 L_u against the pseudo-mask ``target``."""
    logits = method.models["net3d"].train()(torch.cat([batch.image_l, batch.image_u]))
    return 2 / 5 * supervised_loss(logits[:2], batch.label_l) + 3 / 5 * pseudo_label_loss(logits[2:], target)


def _ensemble_and_first_shares(method, batch):
    """By hand for the 3D model's first aligned step on ``batch``: the ensemble pseudo-mask P (eval-mode softmax
    of both models), the labelled crops' class frequencies and P's argmax shares (what the running means start at)."""
    partner = torch.softmax(method.models["net2d"].eval()(batch.image_u), 1)
    own = torch.softmax(method.models["net3d"].eval()(batch.image_u), 1)
    p = (partner + own) / 2
    label_freq = torch.stack([(batch.label_l == c).float().mean() for c in range(2)])
    hard_freq = torch.stack([(p.argmax(1) == c).float().mean() for c in range(2)])
    return p, label_freq, hard_freq


def test_unlabelled_weight_zero_leaves_only_the_labelled_share():
    batch = _batch(2, 3)
    starved, _ = _method(w_u=0.0)
    got = _step_loss(starved, batch)
    with torch.no_grad():
        logits = starved.models["net3d"](torch.cat([batch.image_l, batch.image_u]))
    assert got == pytest.approx(float(2 / 5 * supervised_loss(logits[:2], batch.label_l)), rel=1e-5)


def test_ensemble_and_confidence_pseudo_masks_by_hand():
    batch = _batch(2, 3)
    method, _ = _method(pseudo="ensemble", pseudo_weight="confidence", soft_dice="squared")
    got = _step_loss(method, batch)
    with torch.no_grad():
        own = method.models["net3d"].eval()
        p = (torch.softmax(method.models["net2d"].eval()(batch.image_u), 1) + torch.softmax(own(batch.image_u), 1)) / 2
        method.models["net3d"].train()
        logits = method.models["net3d"](torch.cat([batch.image_l, batch.image_u]))
        l_u = pseudo_label_loss(logits[2:], p, mask=p.amax(1), squared_dice=True)
        expected = 2 / 5 * supervised_loss(logits[:2], batch.label_l) + 3 / 5 * l_u
    assert got == pytest.approx(float(expected), rel=1e-4)
    assert method.models["net3d"].training  # the trained model's mode is restored after its eval pass


@pytest.mark.parametrize("pseudo", ["partner", "ensemble"])
def test_agreement_weights_keep_only_voxels_where_both_models_name_the_same_class(pseudo):
    batch = _batch(2, 3)
    method, _ = _method(pseudo=pseudo, pseudo_weight="agree")
    for r, m in method.models.items():
        m.train(r == "net3d")
    out = method.training_step(batch, SUP, 0)
    with torch.no_grad():
        partner = torch.softmax(method.models["net2d"].eval()(batch.image_u), 1)
        own = torch.softmax(method.models["net3d"].eval()(batch.image_u), 1)
        agree = (partner.argmax(1) == own.argmax(1)).float()
        p = partner if pseudo == "partner" else (partner + own) / 2
        method.models["net3d"].train()
        logits = method.models["net3d"](torch.cat([batch.image_l, batch.image_u]))
        expected = 2 / 5 * supervised_loss(logits[:2], batch.label_l) + 3 / 5 * pseudo_label_loss(
            logits[2:], p, mask=agree)
    assert 0.0 < float(agree.mean()) < 1.0  # the untrained models disagree somewhere, so the mask matters
    assert float(out.loss.detach()) == pytest.approx(float(expected), rel=1e-4)
    assert float(out.logs["agree_share"]) == pytest.approx(float(agree.mean()), rel=1e-6)
    unmasked = 2 / 5 * supervised_loss(logits[:2], batch.label_l) + 3 / 5 * pseudo_label_loss(logits[2:], p)
    assert float(out.loss.detach()) != pytest.approx(float(unmasked), rel=1e-4)


def test_partner_weight_sets_the_partners_share_in_the_ensemble_pseudo_mask():
    batch = _batch(2, 3)
    method, _ = _method(pseudo="ensemble", partner_weight=0.25)
    got = _step_loss(method, batch)
    with torch.no_grad():
        partner = torch.softmax(method.models["net2d"].eval()(batch.image_u), 1)
        own = torch.softmax(method.models["net3d"].eval()(batch.image_u), 1)
        p = 0.25 * partner + 0.75 * own
        expected = _expected_3d_loss(method, batch, p)
    assert got == pytest.approx(float(expected), rel=1e-4)
    for bad in (-0.1, 1.5):
        with pytest.raises(Exception, match="partner_weight"):
            _method(partner_weight=bad)


def test_refresh_agreement_keeps_only_voxels_where_both_models_name_the_class():
    a = np.array([[[0, 1, 2, 3]]])
    b = np.array([[[0, 1, 1, 3]]])
    c = np.array([[[0, 2, 1, 3]]])
    assert agreed_labels([a]).tolist() == a.tolist()
    assert agreed_labels([a, b]).tolist() == [[[0, 1, 0, 3]]]
    assert agreed_labels([a, b, c]).tolist() == [[[0, 0, 0, 3]]]


def test_refresh_rule_agree_uses_both_models(monkeypatch):
    import mnseg.inference.predict as predict

    method, _ = _method(fg_refresh="agree")
    calls = []

    def fake(model, image, window, device):
        calls.append(model)
        probs = torch.zeros(2, *image.shape[1:])
        probs[1 if model is method.models["net3d"] else 0] = 1.0  # 3D says foreground, 2D says background
        return probs

    class Case:
        case_id, image = "u0", np.zeros((1, 4, 4, 4), np.float32)

    class Batcher:
        unlabeled = [Case()]
        got = None

        def set_unlabeled_foreground(self, coords):
            Batcher.got = coords

    monkeypatch.setattr(predict, "predict_probabilities", fake)
    method.batcher = Batcher()
    method._refresh_unlabeled_foreground()
    assert calls == [method.models["net3d"], method.models["net2d"]]
    assert Batcher.got == {"u0": {}}  # no agreed foreground: no crop is aimed at a class the partner denies


def test_effunet_auto_input_scale_reaches_the_side_it_is_asked_for():
    model = create_model("effunet", pretrained=False, input_scale="auto", auto_side=96).eval()
    assert model.scale_for((48, 48)) == 2.0
    assert model.scale_for((48, 64)) == 2.0
    assert model.scale_for((200, 300)) == 1.0  # large slices are left alone
    assert model.scale_for((8, 8)) == 4.0  # at most 4x
    seen = []
    hook = model.encoder._conv_stem.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape[-2:])))
    with torch.no_grad():
        out = model(torch.randn(1, 1, 48, 40))
    hook.remove()
    assert out.shape == (1, 2, 48, 40) and seen == [(128, 96)]  # x2.4: 115x96, padded to multiples of 32
    with pytest.raises(Exception, match="input_scale"):
        create_model("effunet", pretrained=False, input_scale="big")


def test_oracle_pseudo_masks_are_the_one_hot_labels_of_the_unlabelled_items():
    from mnseg.methods.base import Batch

    base = _batch(2, 3)
    label_u = (torch.rand(3, 16, 16, 16, generator=torch.Generator().manual_seed(5)) > 0.5).long()
    batch = Batch(base.image_l, base.label_l, base.image_u, label_u)
    method, _ = _method(oracle_pseudo=True)
    got = _step_loss(method, batch)
    with torch.no_grad():
        logits = method.models["net3d"](torch.cat([batch.image_l, batch.image_u]))
        one_hot = torch.nn.functional.one_hot(label_u, 2).movedim(-1, 1).float()
        expected = 2 / 5 * supervised_loss(logits[:2], batch.label_l) + 3 / 5 * pseudo_label_loss(logits[2:], one_hot)
    assert got == pytest.approx(float(expected), rel=1e-5)
    plain, _ = _method()
    assert _step_loss(plain, batch) != pytest.approx(got)  # without the switch the labels are never used

    # sparse labels: the unlabelled items' ignored voxels (label 2 here) weigh 0 in the oracle's loss
    sparse_u = label_u.clone()
    sparse_u[:, :8] = 2
    method.ctx.ignore_index = 2
    got = _step_loss(method, Batch(base.image_l, base.label_l, base.image_u, sparse_u))
    with torch.no_grad():
        valid = (sparse_u != 2).float()
        expected = 2 / 5 * supervised_loss(logits[:2], batch.label_l, ignore_index=2) + 3 / 5 * pseudo_label_loss(
            logits[2:], one_hot * valid[:, None], mask=valid)
    assert got == pytest.approx(float(expected), rel=1e-5)


def test_batcher_gives_unlabelled_labels_only_when_every_unlabelled_case_has_one():
    from mnseg.data.loader import MemoryCase, PatchBatcher

    def case(name, with_label):
        image = np.random.default_rng(0).normal(size=(1, 8, 8, 8)).astype(np.float32)
        label = np.ones((8, 8, 8), np.int16) if with_label else None
        return MemoryCase(name, image, label, image.reshape(1, -1).min(1))

    labelled = [case("l0", True)]
    assert "label_u" not in PatchBatcher(labelled, [case("u0", False)], (4, 4, 4), 0.5, None, 0).next_batch(1, 2)
    batch = PatchBatcher(labelled, [case("u0", True)], (4, 4, 4), 0.5, None, 0).next_batch(1, 2)
    assert batch["label_u"].shape == (2, 4, 4, 4) and (batch["label_u"] == 1).all()


def test_oracle_refuses_unlabelled_cases_without_labels(toy_dataset):
    from mnseg.data.dataset import DatasetFolder
    from mnseg.engine.data_setup import oracle_label_cases

    folder = DatasetFolder(toy_dataset)
    with pytest.raises(Exception, match="oracle_pseudo needs a label"):
        oracle_label_cases(folder, folder.unlabeled_cases())
    train = folder.training_cases()
    assert [c.label for c in oracle_label_cases(folder, [type(c)(c.case_id, c.images) for c in train])] == [
        c.label for c in train]


def _tiny_mn_train(dataset, tmp_path, *overrides):
    """`mnseg train` arguments for a 3-epoch M&N run of tiny 2D and 3D UNets (2 supervised epochs) into tmp_path/run."""
    return ["train", str(dataset), "--method", "mn", "--num-labeled", "2", "--epochs", "3", "--iters-per-epoch", "1",
            "--batch-size", "2", "--patch-size", "16,16,16", "--run-dir", str(tmp_path / "run"), "--no-progress",
            f"data.cache_dir={tmp_path / 'cache'}", "models.net3d.name=unet3d",
            "models.net3d.kwargs={depth: 3, base_filters: 4}", "models.net2d.name=unet2d",
            "models.net2d.kwargs={depth: 3, base_filters: 4}", "models.net2d.finetune=null",
            "method.params.sup_epochs=2", *overrides]


def test_keep_epochs_keeps_a_checkpoint_of_the_end_of_stage_one(toy_dataset, tmp_path):
    from mnseg.cli import main

    rc = main(_tiny_mn_train(toy_dataset, tmp_path, "train.keep_epochs=[2]"))
    assert rc == 0
    kept = torch.load(tmp_path / "run" / "checkpoints" / "epoch2.pt", weights_only=False)
    assert kept["epoch"] == 2  # the state after the second (last supervised) epoch, to branch ablations from
    assert main(["train", str(toy_dataset), "--epochs", "2", "train.keep_epochs=[5]", "--run-dir",
                 str(tmp_path / "bad")]) == 2


def test_imagenet_input_mapping_knows_ct_from_mri():
    from mnseg.config.schema import Config
    from mnseg.engine.build import input_range, resolve_input_ranges
    from mnseg.models.effunet import IMAGENET_MEAN, IMAGENET_STD, ImageNetInput

    x = torch.full((1, 1, 2, 2), 0.6)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(ImageNetInput(1, "unit")(x), (0.6 - mean) / std * torch.ones(1, 3, 2, 2))
    torch.testing.assert_close(ImageNetInput(1, "zscore")(x), (0.6 / 6 + 0.5 - mean) / std * torch.ones(1, 3, 2, 2))
    ct = {"preprocess": {"normalization": "auto"}, "modality": "CT"}
    mri = {"preprocess": {"normalization": "auto"}, "modality": "MRI"}
    assert input_range(ct) == "unit" and input_range(mri) == "zscore"
    assert input_range({"preprocess": {"normalization": "ct"}, "modality": "MRI"}) == "unit"
    cfg = Config.from_dict({"method": {"name": "mn"}, "models": {
        "net2d": {"name": "effunet", "kwargs": {"pretrained": False}}, "net3d": {"name": "unet3d"},
        "other": {"name": "effunet", "kwargs": {"input_range": "zscore"}}}})
    resolve_input_ranges(cfg, ct)
    assert cfg.models["net2d"].kwargs == {"pretrained": False, "input_range": "unit"}
    assert "input_range" not in cfg.models["net3d"].kwargs  # a 3D UNet has no ImageNet input
    assert cfg.models["other"].kwargs["input_range"] == "zscore"  # an explicit choice is kept


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step")
def test_pre2d_epochs_train_the_2d_partner_alone_before_stage_one():
    method, scheds = _method(pre2d_epochs=2, sup_epochs=2)
    phases = [method.phase(e) for e in range(EPOCHS)]
    assert phases[:4] == ["supervised-2d"] * 2 + ["supervised"] * 2
    assert phases[4:] == ["cotrain-3d", "cotrain-2d"] * 3
    assert method.active_roles(0) == ["net2d"] and method.active_roles(2) == ["net2d", "net3d"]
    for role in ("net2d", "net3d"):
        assert sum(seg.steps for seg in method.schedule_segments(role)) == EPOCHS * ITERS
    batch = _batch(B, 0)
    out = method.training_step(batch, 0, 0)
    out.loss.backward()
    assert all(p.grad is None for p in method.models["net3d"].parameters())  # the 3D model waits
    assert set(out.logs) == {"loss_2d"}
    assert method.batch_split(1, 0) == (B, 0)
    with pytest.raises(Exception, match="sup_epochs"):
        _method(pre2d_epochs=6, sup_epochs=4)


def test_ema_generator_moves_each_copy_towards_its_model_and_makes_the_pseudo_masks():
    batch = _batch(2, 3)
    method, _ = _method(generator="ema", generator_decay=0.75, pseudo="ensemble")
    method.on_epoch_start(SUP)  # co-training starts: the copies are made
    assert set(method.generators) == {"net2d", "net3d"}
    live, ema = method.models["net3d"], method.generators["net3d"]
    before = [g.detach().clone() for g in ema.parameters()]
    with torch.no_grad():
        for p in live.parameters():
            p.add_(0.5)  # the trained model "steps"
    partner_before = [g.detach().clone() for g in method.generators["net2d"].parameters()]
    method.after_optimizer_step(SUP, 0)  # epoch SUP trains net3d: only its copy moves
    for g, b, p in zip(ema.parameters(), before, live.parameters()):
        assert torch.allclose(g, 0.75 * b + 0.25 * p.detach(), atol=1e-6)
    assert all(torch.equal(g, b) for g, b in zip(method.generators["net2d"].parameters(), partner_before))
    got = _step_loss(method, batch)
    with torch.no_grad():
        p = (torch.softmax(method.generators["net2d"](batch.image_u), 1)
             + torch.softmax(ema(batch.image_u), 1)) / 2  # both halves from the moving averages
        expected = _expected_3d_loss(method, batch, p)
    assert got == pytest.approx(float(expected), rel=1e-4)
    with pytest.raises(Exception, match="generator_decay"):
        _method(generator="ema", generator_decay=1.0)
    with pytest.raises(Exception, match="fixed_pseudo"):
        _method(generator="ema", fixed_pseudo=True)


def test_oracle_targets_refuse_agreement_weights():
    # the oracle's targets are labels: no two predictions to agree (the step would read a weight that is None)
    with pytest.raises(Exception, match="oracle_pseudo=true and pseudo_weight=agree"):
        _method(oracle_pseudo=True, pseudo_weight="agree")


def test_partner_weight_by_class_takes_each_class_from_its_own_mix_renormalised():
    batch = _batch(2, 3)
    method, _ = _method(pseudo="ensemble", partner_weight_by_class=[0.0, 1.0])  # class 1 from the partner only
    got = _step_loss(method, batch)
    with torch.no_grad():
        partner = torch.softmax(method.models["net2d"].eval()(batch.image_u), 1)
        own = torch.softmax(method.models["net3d"].eval()(batch.image_u), 1)
        mixed = torch.stack([own[:, 0], partner[:, 1]], dim=1)
        p = mixed / mixed.sum(1, keepdim=True)
        expected = _expected_3d_loss(method, batch, p)
    assert got == pytest.approx(float(expected), rel=1e-4)
    plain, _ = _method(pseudo="ensemble")
    assert got != pytest.approx(_step_loss(plain, batch), rel=1e-4)  # not the plain mean
    for bad in ([0.5], [0.0, 1.5]):
        with pytest.raises(Exception, match="partner_weight_by_class"):
            _method(pseudo="ensemble", partner_weight_by_class=bad)
    with pytest.raises(Exception, match="pseudo=ensemble"):
        _method(partner_weight_by_class=[0.0, 1.0])


def test_distribution_alignment_moves_the_class_frequencies_towards_the_target():
    g = torch.Generator().manual_seed(3)
    probs = torch.softmax(torch.randn(2, 3, 5, 5, 5, generator=g) * 2, dim=1)
    current = probs.mean(dim=(0, 2, 3, 4))
    target = torch.tensor([0.5, 0.45, 0.05])
    aligned, ratio = align_distribution(probs, target, current, max_ratio=100.0)
    assert torch.allclose(aligned.sum(1), torch.ones(2, 5, 5, 5), atol=1e-6)
    assert torch.allclose(ratio, target / current)
    # the rare class's mean share falls towards 0.05, every voxel's order of classes by P * r is kept
    new = aligned.mean(dim=(0, 2, 3, 4))
    assert abs(float(new[2]) - 0.05) < abs(float(current[2]) - 0.05)
    assert torch.equal(aligned.argmax(1), (probs * ratio.view(1, -1, 1, 1, 1)).argmax(1))
    # by hand for one voxel
    p = probs[0, :, 0, 0, 0] * ratio
    assert torch.allclose(aligned[0, :, 0, 0, 0], p / p.sum())
    # equal frequencies change nothing; a class never predicted is raised at most max_ratio times
    same, _ = align_distribution(probs, current, current)
    assert torch.allclose(same, probs, atol=1e-6)
    _, clipped = align_distribution(probs, torch.tensor([0.5, 0.0, 0.5]), torch.tensor([0.5, 0.5, 1e-9]), 10.0)
    assert torch.allclose(clipped, torch.tensor([1.0, 0.1, 10.0]))


def test_alignment_limited_to_chosen_classes_and_downwards_caps_a_runaway_class_only():
    g = torch.Generator().manual_seed(4)
    probs = torch.softmax(torch.randn(2, 3, 4, 4, 4, generator=g), dim=1)
    current = torch.tensor([0.5, 0.2, 0.3])  # class 2 over-predicted (target 0.03), class 1 under (target 0.47)
    target = torch.tensor([0.5, 0.47, 0.03])
    _, both = align_distribution(probs, target, current, max_ratio=100.0)
    assert float(both[1]) > 1.0 and float(both[2]) < 1.0
    _, down = align_distribution(probs, target, current, max_ratio=100.0, down_only=True)
    assert torch.allclose(down, torch.tensor([1.0, 1.0, 0.1]))  # nothing raised, the runaway class lowered
    _, only2 = align_distribution(probs, target, current, max_ratio=100.0, classes=[2])
    assert torch.allclose(only2, torch.tensor([1.0, 1.0, 0.1]))
    capped, r = align_distribution(probs, target, current, max_ratio=5.0, classes=[2], down_only=True)
    assert torch.allclose(r, torch.tensor([1.0, 1.0, 0.2]))  # still clipped by max_ratio
    q = probs * r.view(1, -1, 1, 1, 1)
    assert torch.allclose(capped, q / q.sum(1, keepdim=True))
    # a class predicted less than the labels show is left as it is under down_only
    same, r = align_distribution(probs, torch.tensor([0.2, 0.3, 0.5]), current, classes=[2], down_only=True)
    assert torch.allclose(r, torch.ones(3)) and torch.allclose(same, probs, atol=1e-6)


def test_pseudo_align_classes_and_down_only_reach_the_step_and_bad_classes_are_refused():
    batch = _batch(2, 3)
    method, _ = _method(pseudo="ensemble", pseudo_align="labels", align_classes=[1], align_down_only=True)
    got = _step_loss(method, batch)
    with torch.no_grad():
        p, label_freq, hard_freq = _ensemble_and_first_shares(method, batch)
        r = (label_freq / hard_freq).clamp(0.1, 10.0).clamp_max(1.0)
        r[0] = 1.0
        q = p * r.view(1, -1, 1, 1, 1)
        expected = _expected_3d_loss(method, batch, q / q.sum(1, keepdim=True))
    assert got == pytest.approx(float(expected), rel=1e-4)
    full, _ = _method(pseudo="ensemble", pseudo_align="labels")
    assert got != pytest.approx(_step_loss(full, batch), rel=1e-4)  # the switches changed the target
    with pytest.raises(Exception, match="align_classes"):
        _method(pseudo_align="labels", align_classes=[2])  # two classes here: 0 and 1
    for unused in ({"align_classes": [1]}, {"align_down_only": True}, {"align_max_ratio": 5.0}):
        with pytest.raises(Exception, match="only tunes pseudo_align=labels: set"):
            _method(pseudo="ensemble", **unused)  # set without the alignment they tune: refused, not ignored


def test_pseudo_align_labels_trains_on_the_aligned_ensemble_and_keeps_running_frequencies():
    batch = _batch(2, 3)
    method, _ = _method(pseudo="ensemble", pseudo_align="labels", align_decay=0.5)
    got = _step_loss(method, batch)
    priors = method.class_priors["net3d"]
    with torch.no_grad():
        p, label_freq, hard_freq = _ensemble_and_first_shares(method, batch)  # argmax shares, as labels
        assert torch.allclose(priors["labels"], label_freq)  # the first batch initialises the running means
        assert torch.allclose(priors["pseudo"], hard_freq, atol=1e-6)
        q = p * (label_freq / hard_freq).clamp(0.1, 10.0).view(1, -1, 1, 1, 1)
        q = q / q.sum(1, keepdim=True)
        expected = _expected_3d_loss(method, batch, q)
    assert got == pytest.approx(float(expected), rel=1e-4)
    plain, _ = _method(pseudo="ensemble")
    assert got != pytest.approx(_step_loss(plain, batch), rel=1e-4)
    # the second batch makes the plain mean of two (bias correction), the third moves it by (1 - decay) = 0.5 ...
    before = priors["labels"].clone()
    other = _batch(2, 3)
    other.label_l.fill_(1)
    _step_loss(method, other)
    assert torch.allclose(method.class_priors["net3d"]["labels"], 0.5 * before + 0.5 * torch.tensor([0.0, 1.0]))
    _step_loss(method, other)
    assert torch.allclose(method.class_priors["net3d"]["labels"], 0.25 * before + 0.75 * torch.tensor([0.0, 1.0]))
    slow, _ = _method(pseudo="ensemble", pseudo_align="labels", align_decay=0.99)
    for b in (batch, other, other):
        _step_loss(slow, b)
    assert torch.allclose(slow.class_priors["net3d"]["labels"], (before + 2 * torch.tensor([0.0, 1.0])) / 3)
    # ... and the state survives a checkpoint round trip
    restored, _ = _method(pseudo="ensemble", pseudo_align="labels", align_decay=0.5)
    restored.load_extra_state(method.extra_state())
    assert torch.allclose(restored.class_priors["net3d"]["pseudo"], method.class_priors["net3d"]["pseudo"])
    assert restored.align_batches == method.align_batches == {"net3d/labels": 3, "net3d/pseudo": 3}
    for bad in ({"align_decay": 1.0}, {"align_max_ratio": 0.5}):
        with pytest.raises(Exception, match=next(iter(bad))):
            _method(pseudo_align="labels", **bad)


def test_pseudo_align_leaves_ignored_voxels_out_and_refuses_several_processes(monkeypatch):
    method, _ = _method(pseudo="ensemble", pseudo_align="labels")
    pseudo = torch.softmax(torch.randn(3, 2, 4, 4, 4), dim=1)
    label = torch.ones(2, 4, 4, 4, dtype=torch.long)
    label[0] = 255  # one crop wholly ignore-labelled, the other all class 1
    method._align("net3d", pseudo, label, None, {})
    assert torch.allclose(method.class_priors["net3d"]["labels"], torch.tensor([0.0, 1.0]))
    method._align("net3d", pseudo, torch.full_like(label, 255), None, logs := {})  # nothing annotated: kept
    assert torch.allclose(method.class_priors["net3d"]["labels"], torch.tensor([0.0, 1.0]))
    assert set(logs) == {"align_ratio_1"}
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(Exception, match="one process"):
        _method(pseudo_align="labels")


def test_remainder_mix_keeps_the_mixed_class_mass_and_the_own_proportions_of_the_rest():
    from mnseg.methods.ensemble import mix_with_remainder

    partner = torch.tensor([0.1, 0.05, 0.05, 0.8]).view(1, 4, 1, 1, 1)
    own = torch.tensor([0.1, 0.6, 0.1, 0.2]).view(1, 4, 1, 1, 1)
    w = torch.tensor([0.0, 0.0, 0.0, 0.5]).view(1, 4, 1, 1, 1)
    mixed = w * partner + (1 - w) * own
    got = mix_with_remainder(mixed, own, w > 0).flatten()
    assert float(got[3]) == pytest.approx(0.5)  # the plain mean's lesion mass, not renormalised away
    assert float(got.sum()) == pytest.approx(1.0)
    assert got[:3].tolist() == pytest.approx((0.5 * own.flatten()[:3] / 0.8).tolist())  # the rest as own's ratios
    assert int(got.argmax()) == 3  # the lesion wins here; renormalised it loses to white matter
    renormalised = (mixed / mixed.sum(1, keepdim=True)).flatten()
    assert int(renormalised.argmax()) == 1 and float(renormalised[3]) < 0.4
    over = mix_with_remainder(torch.tensor([0.7, 0.6]).view(1, 2), torch.tensor([0.5, 0.5]).view(1, 2),
                              torch.tensor([True, True]).view(1, 2))
    assert over.sum().item() == pytest.approx(1.0)  # mixes summing past 1 are scaled back


def test_remainder_mix_in_the_step_and_its_guard():
    batch = _batch(2, 3)
    method, _ = _method(pseudo="ensemble", partner_weight_by_class=[0.0, 0.5], by_class_mix="remainder")
    got = _step_loss(method, batch)
    with torch.no_grad():
        partner = torch.softmax(method.models["net2d"].eval()(batch.image_u), 1)
        own = torch.softmax(method.models["net3d"].eval()(batch.image_u), 1)
        lesion = 0.5 * partner[:, 1] + 0.5 * own[:, 1]  # two classes: the rest is all background
        expected = _expected_3d_loss(method, batch, torch.stack([1 - lesion, lesion], dim=1))
    assert got == pytest.approx(float(expected), rel=1e-4)
    with pytest.raises(Exception, match="by_class_mix"):
        _method(pseudo="ensemble", by_class_mix="remainder")


def test_rare_class_weights_give_the_partner_only_the_rare_foreground_classes():
    from mnseg.methods.mn import rare_class_weights

    # background 66 %, white matter 12 %, grey matter 22 %, lesion 0.04 % (the strong synthetic data)
    assert rare_class_weights([0.66, 0.12, 0.2196, 0.0004], 0.01, 0.5) == [0.0, 0.0, 0.0, 0.5]
    assert rare_class_weights([0.005, 0.995], 0.01, 0.5) == [0.5, 0.5]  # a rare background is not picked
    assert rare_class_weights([0.7, 0.3], 0.01, 0.4) == [0.4, 0.4]  # no rare class: the plain mix


def test_partner_rare_share_mixes_as_the_weights_it_works_out_and_needs_the_labels():
    batch = _batch(2, 3)
    method, _ = _method(pseudo="ensemble", partner_rare_share=0.01, by_class_mix="remainder")
    method.ctx.class_shares = (0.995, 0.005)  # class 1 rare: as partner_weight_by_class [0, 0.5]
    by_hand, _ = _method(pseudo="ensemble", partner_weight_by_class=[0.0, 0.5], by_class_mix="remainder")
    assert method.partner_weights_by_class() == [0.0, 0.5]
    assert _step_loss(method, batch) == pytest.approx(_step_loss(by_hand, batch), rel=1e-6)
    common, _ = _method(pseudo="ensemble", partner_rare_share=0.01)
    common.ctx.class_shares = (0.6, 0.4)  # nothing rare: the plain mean
    plain, _ = _method(pseudo="ensemble")
    assert _step_loss(common, batch) == pytest.approx(_step_loss(plain, batch), rel=1e-6)
    unknown, _ = _method(pseudo="ensemble", partner_rare_share=0.01)
    with pytest.raises(Exception, match="class shares"):
        unknown.partner_weights_by_class()  # no labels read (as at prediction): refused, not guessed
    for params, message in (({"partner_rare_share": 0.01}, "pseudo=ensemble"),
                            ({"pseudo": "ensemble", "partner_rare_share": 1.5}, r"\(0, 1\)"),
                            ({"pseudo": "ensemble", "partner_rare_share": 0.01, "partner_weight_by_class": [0, 1]},
                             "exclude each other")):
        with pytest.raises(Exception, match=message):
            _method(**params)


def test_labelled_class_shares_leave_the_ignore_label_out():
    from mnseg.engine.build import labelled_class_shares

    labels = [np.array([0, 0, 1, 255]), np.array([[0, 2], [255, 255]])]
    assert labelled_class_shares(labels, 3, 255) == pytest.approx((3 / 5, 1 / 5, 1 / 5))
    assert labelled_class_shares([], 2, None) == (0.0, 0.0)


def test_training_gives_the_method_the_labelled_class_shares(toy_dataset, tmp_path):
    from mnseg.cli import main

    rc = main(_tiny_mn_train(toy_dataset, tmp_path, "method.params.lrg=fixed", "method.params.pseudo=ensemble",
                             "method.params.partner_rare_share=0.01", "method.params.by_class_mix=remainder"))
    assert rc == 0  # co-training made pseudo-masks (b_u = 1), so the rare classes were worked out from the labels
    history = (tmp_path / "run" / "history.csv").read_text()
    assert "loss_u" in history.splitlines()[0]
