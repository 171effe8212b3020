"""methods/voxel_contrast.py: ARCO's stratified group sampling (counts, quotas, pairs, seeds, variance) and the
prototype InfoNCE on a hand-computed example."""

from __future__ import annotations

import math

import pytest
import torch

from mnseg.methods.voxel_contrast import prototype_info_nce, sample_by_class, stratified_group_sample


def ranks(candidates: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Each index's rank among the candidates (0-based, raster order)."""
    return torch.cumsum(candidates.long(), 0)[index] - 1


def test_every_group_gets_its_share_and_draws_stay_in_their_group():
    candidates = torch.zeros(3000, dtype=torch.bool)
    candidates[::3] = True  # 1000 candidates: 16 groups of 62 or 63
    for count, sizes in ((64, {4}), (70, {4, 5})):
        index, valid, group = stratified_group_sample(candidates, count, 16, generator=torch.Generator().manual_seed(0))
        assert valid.all() and candidates[index].all()
        per_group = torch.bincount(group, minlength=16)
        assert set(per_group.tolist()) == sizes and int(per_group.sum()) == count
        r = ranks(candidates, index)
        assert ((r >= group * 1000 // 16) & (r < (group + 1) * 1000 // 16)).all()
    assert int((per_group == 5).sum()) == 70 - 64


def test_antithetic_pairs_mirror_each_other_in_their_group():
    candidates = torch.ones(800, dtype=torch.bool)  # 8 groups of 100
    index, valid, group = stratified_group_sample(candidates, 64, 8, antithetic=True,
                                                  generator=torch.Generator().manual_seed(1))  # fmt: skip
    assert torch.equal(group[0::2], group[1::2])
    lo, hi = group[0::2] * 100, group[0::2] * 100 + 100
    assert torch.equal(index[0::2] + index[1::2], lo + hi - 1)  # p and size - 1 - p
    assert set(torch.bincount(group, minlength=8).tolist()) == {8}


def test_a_tail_class_gets_its_quota_spread_over_all_its_voxels():
    classes = torch.zeros(2000, dtype=torch.long)
    tail = torch.tensor([3, 500, 999, 1500, 1999])
    classes[tail] = 1
    valid = torch.ones(2000, dtype=torch.bool)
    draws = sample_by_class(classes, valid, 2, anchors=256, negatives=4, groups=16,
                            generator=torch.Generator().manual_seed(2))  # fmt: skip
    assert draws["anchor"].shape == (2, 256) and draws["negative"].shape == (2, 256, 4)
    assert draws["anchor_valid"].all() and draws["negative_valid"].all()
    assert (classes[draws["anchor"][1]] == 1).all() and (classes[draws["anchor"][0]] == 0).all()
    hits = torch.bincount(draws["anchor"][1], minlength=2000)[tail]
    assert set(hits.tolist()) <= {51, 52} and int(hits.sum()) == 256  # 5 groups of one voxel each: 256/5 apiece
    assert (classes[draws["negative"][1]] == 0).all() and (classes[draws["negative"][0]] == 1).all()
    uniform = torch.randint(2000, (256,), generator=torch.Generator().manual_seed(2))
    assert int((classes[uniform] == 1).sum()) < 5  # naive sampling over the patch expects 0.64 tail anchors


def test_an_absent_class_has_no_valid_draws():
    classes = torch.zeros(50, dtype=torch.long)
    draws = sample_by_class(classes, torch.ones(50, dtype=torch.bool), 3, anchors=4, negatives=2, groups=4)
    assert draws["anchor_valid"][0].all() and not draws["anchor_valid"][1:].any()
    assert not draws["negative_valid"][0].any()  # class 0 has nothing to be contrasted with
    assert ((draws["anchor"] >= 0) & (draws["anchor"] < 50)).all()
    index, valid, _ = stratified_group_sample(torch.zeros(0, dtype=torch.bool), 3, 4)
    assert index.tolist() == [0, 0, 0] and not valid.any()


def test_the_same_seed_draws_the_same_voxels():
    candidates = torch.rand(5000, generator=torch.Generator().manual_seed(0)) > 0.7

    def draw(seed):
        return stratified_group_sample(candidates, 100, 16, True, torch.Generator().manual_seed(seed))[0]

    assert torch.equal(draw(3), draw(3)) and not torch.equal(draw(3), draw(4))


def test_stratified_means_vary_less_than_naive_ones():
    """The point of SG/SAG: the mean of a quantity that changes across the region, estimated from the draws."""
    candidates = torch.ones(4096, dtype=torch.bool)
    value = torch.linspace(0.0, 1.0, 4096) ** 2
    estimates = {"naive": [], "sg": [], "sag": []}
    for seed in range(200):
        for name, (groups, antithetic) in {"naive": (1, False), "sg": (16, False), "sag": (16, True)}.items():
            g = torch.Generator().manual_seed(seed)
            index, _, _ = stratified_group_sample(candidates, 32, groups, antithetic, g)
            estimates[name].append(float(value[index].mean()))
    var = {k: torch.tensor(v).var().item() for k, v in estimates.items()}
    assert abs(torch.tensor(estimates["sg"]).mean() - value.mean()) < 0.01  # unbiased
    assert var["sg"] < var["naive"] / 10 and var["sag"] < var["sg"]


def test_prototype_info_nce_on_a_two_anchor_example():
    tau = 0.5
    anchor = torch.tensor([[[1.0, 0.0], [0.0, 2.0]], [[5.0, 5.0], [1.0, 1.0]]])  # (K=2, m=2, D=2)
    positive = torch.tensor([[3.0, 0.0], [0.0, 1.0]])  # mu_0 along x (length does not matter)
    negative = torch.tensor([[[[0.0, 1.0]], [[1.0, 1.0]]], [[[1.0, 0.0]], [[1.0, 0.0]]]])  # (K, m, n=1, D)
    use = torch.tensor([True, False])  # class 1 is left out
    # anchor 1: s+ = 1, s- = 0;  anchor 2: s+ = 0, s- = 1/sqrt(2)
    first = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + math.exp(0.0)))
    second = -math.log(1.0 / (1.0 + math.exp(1 / math.sqrt(2) / tau)))
    assert float(prototype_info_nce(anchor, positive, negative, use, tau)) == pytest.approx((first + second) / 2)
    anchor.requires_grad_(True)
    none = prototype_info_nce(anchor, positive, negative, torch.tensor([False, False]), tau)
    none.backward()
    assert float(none.detach()) == 0.0 and anchor.grad is not None and float(anchor.grad.abs().sum()) == 0.0
