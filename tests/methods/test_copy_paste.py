"""M&N's ``copy_paste: labels``: a labelled cube pasted into each unlabelled item, its true labels the target there."""

import dataclasses

import numpy as np
import pytest
import torch

from mnseg.errors import ConfigError
from mnseg.losses import pseudo_label_loss, supervised_loss
from mnseg.methods.copy_paste import cube_masks, paste_labelled
from tests.methods.test_mn import SUP, _batch, _method


def _pair(n_u=3, n_l=2, size=9, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    image_u, image_l = torch.randn(n_u, 1, size, size, size, generator=g), torch.randn(n_l, 1, size, size, size,
                                                                                       generator=g)
    pseudo = torch.softmax(torch.randn(n_u, classes, size, size, size, generator=g), 1)
    label = torch.randint(0, classes, (n_l, size, size, size), generator=g)
    return image_u, pseudo, image_l, label


def test_cube_masks_hold_one_cube_of_the_asked_side_per_item():
    masks = cube_masks(4, (9, 12, 6), 2 / 3, np.random.default_rng(0))
    for m in masks[:, 0]:
        idx = m.nonzero()
        extent = (idx.max(0).values - idx.min(0).values + 1).tolist()
        assert extent == [6, 8, 4] and int(m.sum()) == 6 * 8 * 4  # one solid box of round(2/3 * side)


def test_paste_puts_the_labelled_cube_and_its_one_hot_labels_in_and_leaves_the_rest():
    image_u, pseudo, image_l, label = _pair()
    image, target, weight = paste_labelled(image_u, pseudo, image_l, label, ratio=2 / 3, rng=np.random.default_rng(1))
    cube = cube_masks(3, (9, 9, 9), 2 / 3, np.random.default_rng(1))[:, 0]  # the same draws
    assert weight is None  # no ignored voxel, no weights given
    for i in range(3):
        j = i % 2  # unlabelled item i takes labelled item i mod b_l
        inside = cube[i]
        assert torch.equal(image[i, 0][inside], image_l[j, 0][inside])
        assert torch.equal(image[i, 0][~inside], image_u[i, 0][~inside])
        assert torch.equal(target[i].argmax(0)[inside], label[j][inside])
        assert torch.equal(target[i].amax(0)[inside], torch.ones(int(inside.sum())))  # one-hot there
        assert torch.equal(target[i][:, ~inside], pseudo[i][:, ~inside])
    assert torch.allclose(target.sum(1), torch.ones(3, 9, 9, 9))


def test_ignored_labels_inside_the_cube_weigh_nothing_and_given_weights_stay_outside():
    image_u, pseudo, image_l, label = _pair()
    label[:, :, :, :4] = 255  # sparse annotation: half of every labelled crop unannotated
    given = torch.full((3, 9, 9, 9), 0.3)
    _, target, weight = paste_labelled(image_u, pseudo, image_l, label, ratio=2 / 3, rng=np.random.default_rng(2),
                                       ignore_index=255, weight=given)
    cube = cube_masks(3, (9, 9, 9), 2 / 3, np.random.default_rng(2))[:, 0]
    ignored = (label[torch.arange(3) % 2] == 255) & cube
    assert ignored.any() and (cube & ~ignored).any()
    assert torch.all(weight[ignored] == 0) and torch.all(weight[cube & ~ignored] == 1)
    assert torch.all(weight[~cube] == 0.3)
    assert torch.isfinite(target).all() and torch.allclose(target.sum(1), torch.ones(3, 9, 9, 9))


def test_the_step_trains_on_the_pasted_items_and_the_switch_is_checked():
    batch = _batch(2, 3)
    # paste_ratio 1: every unlabelled item becomes labelled item i mod 2, its labels the whole target
    method, _ = _method(copy_paste="labels", paste_ratio=1.0)
    for r, m in method.models.items():
        m.train(r == "net3d")
    got = float(method.training_step(batch, SUP, 0).loss.detach())
    src = torch.arange(3) % 2
    with torch.no_grad():
        logits = method.models["net3d"](torch.cat([batch.image_l, batch.image_l[src]]))
        one_hot = torch.nn.functional.one_hot(batch.label_l[src], 2).movedim(-1, 1).float()
        expected = 2 / 5 * supervised_loss(logits[:2], batch.label_l) + 3 / 5 * pseudo_label_loss(logits[2:], one_hot)
    assert got == pytest.approx(float(expected), rel=1e-4)
    plain, _ = _method()
    for r, m in plain.models.items():
        m.train(r == "net3d")
    assert float(plain.training_step(batch, SUP, 0).loss.detach()) != pytest.approx(got, rel=1e-3)
    for bad, match in (({"copy_paste": "both"}, "copy_paste"), ({"copy_paste": "labels", "paste_ratio": 0.0},
                                                                  "paste_ratio")):
        with pytest.raises(ConfigError, match=match):
            _method(**bad)


def test_pasted_ignored_voxels_stay_out_of_a_confidence_weighted_loss():
    batch = _batch(2, 3)
    batch.label_l[:, :, :, :8] = 255  # half of each labelled crop unannotated
    method, _ = _method(copy_paste="labels", paste_ratio=1.0, pseudo_weight="confidence")
    method.ctx = dataclasses.replace(method.ctx, ignore_index=255)
    for r, m in method.models.items():
        m.train(r == "net3d")
    out = method.training_step(batch, SUP, 0)
    src = torch.arange(3) % 2
    label_u = batch.label_l[src]
    valid = label_u != 255
    with torch.no_grad():
        logits = method.models["net3d"](torch.cat([batch.image_l, batch.image_l[src]]))
        one_hot = torch.nn.functional.one_hot(torch.where(valid, label_u, 0), 2).movedim(-1, 1).float()
        expected = (2 / 5 * supervised_loss(logits[:2], batch.label_l, ignore_index=255)
                    + 3 / 5 * pseudo_label_loss(logits[2:], one_hot, mask=valid.float()))
    assert float(out.loss.detach()) == pytest.approx(float(expected), rel=1e-4)
    # the logged pseudo-mask shares are the generator's, not the pasted labels'
    assert float(out.logs["pseudo_share_1"]) != pytest.approx(float((label_u == 1).float().mean()), abs=1e-3)


def test_a_paste_ratio_without_copy_paste_is_refused():
    with pytest.raises(ConfigError, match="paste_ratio only tunes copy_paste=labels"):
        _method(paste_ratio=0.5)
