"""Losses: hand-computed tiny cases, MONAI agreement, ignore/mask semantics, gradients."""

from __future__ import annotations

import math

import pytest
import torch

from mnseg.losses import (
    cross_entropy_loss,
    entropy_loss,
    hard_pseudo_label_ce,
    kl_loss,
    label_targets,
    one_hot_targets,
    pseudo_label_loss,
    soft_dice_loss,
    softmax_mse_loss,
    supervised_loss,
)

S = 1e-5  # smooth


def tiny_logits(requires_grad: bool = True) -> torch.Tensor:
    """(1, 2, 2, 2): softmax is (0.25, 0.75) on the first row and (0.5, 0.5) on the second."""
    logits = torch.zeros(1, 2, 2, 2)
    logits[0, 1, 0, :] = math.log(3.0)
    return logits.requires_grad_(requires_grad)


# labels with ignore index 2 on voxel (1, 1); valid voxels have p(label) = 0.75, 0.25, 0.5
TINY_LABELS = torch.tensor([[[1, 0], [1, 2]]])
UNIFORM = torch.full((1, 2, 2, 2), 0.5)


def approx(value: torch.Tensor, expected: float) -> bool:
    return math.isclose(float(value.detach()), expected, rel_tol=1e-5, abs_tol=1e-7)


def test_cross_entropy_hand_computed_with_ignore():
    loss = cross_entropy_loss(tiny_logits(), TINY_LABELS, ignore_index=2)
    expected = -(math.log(0.75) + math.log(0.25) + math.log(0.5)) / 3
    assert approx(loss, expected)


def test_dice_hand_computed_with_ignore():
    loss = soft_dice_loss(tiny_logits(), TINY_LABELS, ignore_index=2)
    dice_bg = (2 * 0.25 + S) / (1.0 + 1.0 + S)
    dice_fg = (2 * 1.25 + S) / (2.0 + 2.0 + S)
    assert approx(loss, 1 - (dice_bg + dice_fg) / 2)
    without_bg = soft_dice_loss(tiny_logits(), TINY_LABELS, ignore_index=2, include_background=False)
    assert approx(without_bg, 1 - dice_fg)


def test_mask_equals_ignore_index():
    labels = TINY_LABELS.clone()
    mask = labels != 2
    labels[~mask] = 0
    by_ignore = soft_dice_loss(tiny_logits(), TINY_LABELS, ignore_index=2)
    by_mask = soft_dice_loss(tiny_logits(), labels, mask=mask)
    assert torch.allclose(by_ignore, by_mask)


def test_ignored_voxels_do_not_change_the_loss():
    labels_a = TINY_LABELS.clone()
    labels_b = TINY_LABELS.clone()
    logits_b = tiny_logits(False).clone()
    logits_b[0, :, 1, 1] = torch.tensor([5.0, -5.0])  # change the prediction where the label is ignored
    assert torch.allclose(
        supervised_loss(tiny_logits(), labels_a, ignore_index=2),
        supervised_loss(logits_b, labels_b, ignore_index=2),
    )


def test_soft_dice_with_probability_targets():
    loss = soft_dice_loss(tiny_logits(), UNIFORM)
    dice_bg = (2 * 0.5 * 1.5 + S) / (1.5 + 2.0 + S)
    dice_fg = (2 * 0.5 * 2.5 + S) / (2.5 + 2.0 + S)
    assert approx(loss, 1 - (dice_bg + dice_fg) / 2)


def test_kl_hand_computed_and_masked():
    per_voxel_top = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert approx(kl_loss(tiny_logits(), UNIFORM), 2 * per_voxel_top / 4)
    top_row = torch.tensor([[[True, True], [False, False]]])
    assert approx(kl_loss(tiny_logits(), UNIFORM, mask=top_row), per_voxel_top)
    bottom_row = ~top_row
    assert approx(kl_loss(tiny_logits(), UNIFORM, mask=bottom_row), 0.0)


def test_pseudo_label_loss_combines_kl_and_dice():
    kl = kl_loss(tiny_logits(), UNIFORM)
    dice = soft_dice_loss(tiny_logits(), UNIFORM)
    assert torch.allclose(
        pseudo_label_loss(tiny_logits(), UNIFORM, w_kl=0.3, w_dice=2.0), 0.3 * kl + 2.0 * dice
    )


def test_supervised_loss_hand_computed():
    ce = -(math.log(0.75) + math.log(0.25) + math.log(0.5)) / 3
    dice = 1 - ((2 * 0.25 + S) / (2.0 + S) + (2 * 1.25 + S) / (4.0 + S)) / 2
    loss = supervised_loss(tiny_logits(), TINY_LABELS, w_ce=0.5, w_dice=2.0, ignore_index=2)
    assert approx(loss, 0.5 * ce + 2.0 * dice)


def test_softmax_mse_hand_computed():
    teacher_logits = torch.zeros(1, 2, 2, 2)
    assert approx(softmax_mse_loss(tiny_logits(), teacher_logits), (2 * 0.0625) / 4)
    assert approx(softmax_mse_loss(tiny_logits(), UNIFORM, target_is_logits=False), (2 * 0.0625) / 4)
    top_row = torch.tensor([[[True, True], [False, False]]])
    assert approx(softmax_mse_loss(tiny_logits(), teacher_logits, mask=top_row), 0.0625)


def test_entropy_hand_computed():
    top = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75)) / math.log(2)
    assert approx(entropy_loss(tiny_logits()), (2 * top + 2 * 1.0) / 4)
    bottom_row = torch.tensor([[[False, False], [True, True]]])
    assert approx(entropy_loss(tiny_logits(), mask=bottom_row), 1.0)


def test_hard_pseudo_label_ce_hand_computed_and_detached():
    other = torch.zeros(1, 2, 2, 2)
    other[0, 1] = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])  # argmax -> [[1, 0], [0, 1]]
    other.requires_grad_(True)
    logits = tiny_logits()
    loss = hard_pseudo_label_ce(logits, other)
    expected = -(math.log(0.75) + math.log(0.25) + math.log(0.5) + math.log(0.5)) / 4
    assert approx(loss, expected)
    loss.backward()
    assert other.grad is None
    assert logits.grad is not None and logits.grad.abs().sum() > 0


@pytest.mark.parametrize("batch_dice", [True, False])
@pytest.mark.parametrize("include_background", [True, False])
@pytest.mark.parametrize("spatial", [(6, 5), (6, 5, 4)])
def test_dice_agrees_with_monai(batch_dice, include_background, spatial):
    from monai.losses import DiceLoss

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, *spatial, generator=gen)
    labels = torch.randint(0, 3, (2, *spatial), generator=gen)
    reference = DiceLoss(
        softmax=True,
        to_onehot_y=True,
        batch=batch_dice,
        include_background=include_background,
        smooth_nr=S,
        smooth_dr=S,
    )(logits, labels.unsqueeze(1))
    ours = soft_dice_loss(logits, labels, batch_dice=batch_dice, include_background=include_background)
    assert torch.allclose(ours, reference, atol=1e-6)


def test_per_sample_dice_skips_fully_ignored_samples():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 2, 4, 4, 4, generator=gen)
    labels = torch.randint(0, 2, (2, 4, 4, 4), generator=gen)
    labels[1] = 2  # second sample unannotated
    both = soft_dice_loss(logits, labels, ignore_index=2, batch_dice=False)
    first_only = soft_dice_loss(logits[:1], labels[:1], batch_dice=False)
    assert torch.allclose(both, first_only)


def test_cross_entropy_agrees_with_torch_when_nothing_is_ignored():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 3, 4, 4, 4, generator=gen)
    labels = torch.randint(0, 3, (2, 4, 4, 4), generator=gen)
    assert torch.allclose(
        cross_entropy_loss(logits, labels), torch.nn.functional.cross_entropy(logits, labels)
    )


def _all_losses_with_nothing_valid(logits: torch.Tensor) -> dict[str, torch.Tensor]:
    labels = torch.full((logits.shape[0], *logits.shape[2:]), 3, dtype=torch.long)
    none = torch.zeros_like(labels, dtype=torch.bool)
    probs = torch.softmax(torch.randn_like(logits), dim=1)
    return {
        "dice": soft_dice_loss(logits, labels, ignore_index=3),
        "dice_per_sample": soft_dice_loss(logits, labels, ignore_index=3, batch_dice=False),
        "dice_soft_masked": soft_dice_loss(logits, probs, mask=none),
        "ce": cross_entropy_loss(logits, labels, ignore_index=3),
        "kl": kl_loss(logits, probs, mask=none),
        "supervised": supervised_loss(logits, labels, ignore_index=3),
        "pseudo": pseudo_label_loss(logits, probs, mask=none),
        "mse": softmax_mse_loss(logits, probs, mask=none, target_is_logits=False),
        "entropy": entropy_loss(logits, mask=none),
        "cps": hard_pseudo_label_ce(logits, torch.randn_like(logits), mask=none),
    }


def test_everything_ignored_gives_zero_with_gradient():
    logits = torch.randn(2, 3, 4, 4, 4, requires_grad=True)
    for name, loss in _all_losses_with_nothing_valid(logits).items():
        assert loss.dim() == 0, name
        assert loss.requires_grad, name
        assert float(loss.detach()) == 0.0, name
        (grad,) = torch.autograd.grad(loss, logits)
        assert torch.isfinite(grad).all() and float(grad.abs().sum()) == 0.0, name


def test_gradient_reaches_logits_but_not_target_probs():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 4, 4, 4, generator=gen, requires_grad=True)
    target = torch.softmax(torch.randn(2, 3, 4, 4, 4, generator=gen), dim=1).requires_grad_(True)
    losses = [
        soft_dice_loss(logits, target),
        kl_loss(logits, target),
        pseudo_label_loss(logits, target),
        softmax_mse_loss(logits, target, target_is_logits=False),
        softmax_mse_loss(logits, target, target_is_logits=True),
    ]
    sum(losses).backward()
    assert target.grad is None
    assert logits.grad is not None and float(logits.grad.abs().sum()) > 0


def test_kl_is_zero_when_prediction_matches_target():
    logits = torch.randn(1, 3, 4, 4)
    assert float(kl_loss(logits, torch.softmax(logits, dim=1))) == pytest.approx(0.0, abs=1e-6)


def test_shape_mismatches_are_reported():
    logits = torch.zeros(1, 2, 4, 4)
    with pytest.raises(ValueError, match="shape"):
        cross_entropy_loss(logits, torch.zeros(1, 4, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="shape"):
        kl_loss(logits, torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="mask"):
        entropy_loss(logits, mask=torch.ones(1, 4, 3, dtype=torch.bool))


def test_one_hot_targets_match_label_targets_and_zero_the_ignore_label():
    labels = torch.tensor([[[0, 2], [1, 3]]])  # (1, 2, 2); 3 is the ignore label
    one_hot, valid = one_hot_targets(labels, 3, ignore_index=3)
    assert one_hot.shape == (1, 3, 2, 2)
    assert valid.tolist() == [[[1.0, 1.0], [1.0, 0.0]]]
    assert one_hot[0, :, 0, 1].tolist() == [0.0, 0.0, 1.0]
    assert one_hot[0, :, 1, 1].tolist() == [1.0, 0.0, 0.0]  # ignored voxels become background, weight 0
    same, same_valid = label_targets(torch.zeros(1, 3, 2, 2), labels, ignore_index=3)
    assert torch.equal(one_hot, same) and torch.equal(valid, same_valid)
