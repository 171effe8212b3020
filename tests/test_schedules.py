import math

import pytest
import torch

from mnseg.engine.schedules import Segment, current_lr, lr_at, make_scheduler
from mnseg.methods.mn import epoch_linear_unlabeled_count, lr_guided_unlabeled_count


def test_segment_warmup_then_cosine_reaches_final_at_last_step():
    seg = Segment(steps=100, lr_init=1e-3, lr_final=1e-5, warmup_steps=10)
    assert seg.lr_at(0) == pytest.approx(1e-4)
    assert seg.lr_at(9) == pytest.approx(1e-3)
    assert seg.lr_at(10) == pytest.approx(1e-3)
    assert seg.lr_at(99) == pytest.approx(1e-5)
    lrs = [seg.lr_at(t) for t in range(10, 100)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_scheduler_follows_segments_and_restarts():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=123.0)
    segs = [Segment(5, 1e-2, 0.0, 2), Segment(4, 1e-2, 0.0, 0)]
    sched = make_scheduler(opt, segs)
    seen = []
    for _ in range(9):
        seen.append(current_lr(opt))
        opt.step()
        sched.step()
    assert seen == pytest.approx([lr_at(segs, t) for t in range(9)])
    assert seen[5] == pytest.approx(1e-2)  # restart at the second segment
    assert seen[-1] == pytest.approx(0.0)


@pytest.mark.parametrize("B", [1, 2, 5])
def test_lr_guided_count_matches_formula(B):
    lr_init, lr_final = 1e-3, 1e-5
    for lr_now in [1e-3, 9e-4, 5.05e-4, 2e-4, 1e-5]:
        expected = math.floor((lr_init - lr_now) / (lr_init - lr_final) * B + 1e-9)
        assert lr_guided_unlabeled_count(lr_now, lr_init, lr_final, B) == expected
    assert lr_guided_unlabeled_count(lr_init, lr_init, lr_final, B) == 0
    assert lr_guided_unlabeled_count(lr_final, lr_init, lr_final, B) == B


def test_epoch_linear_count():
    # floor(e / N * B): 0, 0.8, 1.6, 2.4, 3.2 -> peaks at B - 1, as the authors' create_loaders
    assert [epoch_linear_unlabeled_count(e, 5, 4) for e in range(5)] == [0, 0, 1, 2, 3]
