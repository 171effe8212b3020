import math

import pytest
import torch

from mnseg.engine.schedules import Segment, current_lr, lr_at, make_scheduler
from mnseg.methods.mn_sampling import epoch_linear_unlabeled_count, lr_guided_unlabeled_count


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


def test_step_segment_multiplies_by_gamma_every_step_size_iterations():
    """The dual-network paper's SGD schedule: 0.01, x 0.1 every 2,500 iterations, 6,000 iterations."""
    seg = Segment(6000, 0.01, 0.0, 0, decay="step", step_size=2500, gamma=0.1)
    expected = {0: 0.01, 2499: 0.01, 2500: 1e-3, 4999: 1e-3, 5000: 1e-4, 5999: 1e-4}
    for t, lr in expected.items():
        assert seg.lr_at(t) == pytest.approx(lr)
    assert lr_at([seg], 6000) == pytest.approx(1e-4)  # past the end the decay goes on where it was
    warm = Segment(10, 1.0, 0.0, 2, decay="step", step_size=4, gamma=0.5)
    assert [warm.lr_at(t) for t in range(10)] == pytest.approx([0.5, 1, 1, 1, 0.5, 0.5, 0.5, 0.5, 0.25, 0.25])
    with pytest.raises(ValueError):
        Segment(10, 1.0, decay="step").lr_at(3)


def test_optim_config_selects_the_step_schedule_and_sgd_momentum():
    from mnseg.config.checks import check_config
    from mnseg.config.schema import Config
    from mnseg.engine.build import build_optimizer
    from mnseg.errors import ConfigError
    from mnseg.methods.base import MethodContext
    from mnseg.methods.supervised import Supervised

    optim = {"name": "sgd", "lr": 0.01, "momentum": 0.9, "nesterov": False, "weight_decay": 1e-4,
             "schedule": "step", "step_size": 3, "step_gamma": 0.1}
    cfg = Config.from_dict({"models": {"net": {"optim": optim}}, "train": {"epochs": 2, "iters_per_epoch": 4}})
    check_config(cfg)
    method = Supervised(cfg, MethodContext(2, 1, None, 2, 2, 4, 2, 0))
    (seg,) = method.schedule_segments("net")
    assert (seg.steps, seg.decay, seg.step_size, seg.gamma) == (8, "step", 3, 0.1)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = build_optimizer(torch.nn.Linear(1, 1), cfg.models["net"].optim, torch.device("cpu"))
    assert isinstance(opt, torch.optim.SGD)
    assert opt.defaults["momentum"] == 0.9 and not opt.defaults["nesterov"] and opt.defaults["weight_decay"] == 1e-4
    sched = make_scheduler(torch.optim.SGD([p], lr=1.0), [seg])
    seen = []
    for _ in range(8):
        seen.append(sched.get_last_lr()[0])
        sched.optimizer.step()
        sched.step()
    assert seen == pytest.approx([0.01] * 3 + [1e-3] * 3 + [1e-4] * 2)
    assert Config().models["net"].optim.schedule == "cosine"  # the default stays warm-up + cosine
    for bad in ({"schedule": "linear"}, {"schedule": "step", "step_size": 0}, {"step_gamma": 0.0},
                {"momentum": 1.0}, {"name": "sgd", "momentum": 0.0}):
        with pytest.raises(ConfigError):
            check_config(Config.from_dict({"models": {"net": {"optim": bad}}}))


def test_restart_epochs_start_the_schedule_again_at_lr():
    """SGDR-style warm restarts: the supervised control for M&N's restart at co-training."""
    from mnseg.config.checks import check_config
    from mnseg.config.schema import Config
    from mnseg.errors import ConfigError
    from mnseg.methods.base import MethodContext
    from mnseg.methods.supervised import Supervised

    optim = {"lr": 1.0, "final_lr": 0.0, "warmup_epochs": 1, "restart_epochs": [2]}
    cfg = Config.from_dict({"models": {"net": {"optim": optim}}, "train": {"epochs": 5, "iters_per_epoch": 3}})
    check_config(cfg)
    segments = Supervised(cfg, MethodContext(2, 1, None, 2, 5, 3, 2, 0)).schedule_segments("net")
    assert [(s.steps, s.warmup_steps) for s in segments] == [(6, 3), (9, 0)]
    lrs = [lr_at(segments, t) for t in range(15)]
    assert lrs[5] == pytest.approx(0.0) and lrs[6] == pytest.approx(1.0)  # the end of segment 1, then a restart
    assert lrs[14] == pytest.approx(0.0) and lrs[7] < 1.0
    (one,) = Supervised(Config.from_dict({"train": {"epochs": 5, "iters_per_epoch": 3}}),
                        MethodContext(2, 1, None, 2, 5, 3, 2, 0)).schedule_segments("net")
    assert one.steps == 15  # no restarts: one segment, as before
    for bad in ([0], [5], [3, 2], [2, 2], ["2"]):
        with pytest.raises(ConfigError, match="restart_epochs"):
            check_config(Config.from_dict({"models": {"net": {"optim": {"restart_epochs": bad}}},
                                           "train": {"epochs": 5}}))
