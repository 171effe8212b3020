"""Learning-rate schedules (warm-up + cosine or step decay, in segments) and the ramp of consistency weights.

Schedules are stepped once per iteration. A schedule is a list of segments;
M&N uses two (supervised stage, then co-training restarting at ``lr_init``),
every other method one. A cosine segment ends exactly at its ``lr_final`` on its
last step, so M&N's LR-guided sampling (``methods/mn.py``) reaches ``b_u = B`` there.
A step segment (``decay="step"``) multiplies ``lr_init`` by ``gamma`` every ``step_size``
steps (the SGD schedules of UA-MT-era code, e.g. x 0.1 every 2,500 iterations); its
``lr_final`` is not used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Segment:
    steps: int
    lr_init: float
    lr_final: float = 0.0
    warmup_steps: int = 0
    decay: str = "cosine"  # cosine | step
    step_size: int = 0  # step: steps between two decays
    gamma: float = 0.1  # step: the factor of each decay

    def lr_at(self, t: int) -> float:
        """Linear warm-up from lr_init/steps to lr_init, then cosine to lr_final at the last step; or, for
        ``decay="step"``, lr_init * gamma ** floor(t / step_size) (t counted from the segment's start)."""
        if self.warmup_steps > 0 and t < self.warmup_steps:
            return self.lr_init * (t + 1) / self.warmup_steps
        if self.decay == "step":
            if self.step_size < 1:
                raise ValueError(f"a step segment needs step_size >= 1, got {self.step_size}")
            return self.lr_init * self.gamma ** (max(t, 0) // self.step_size)
        span = self.steps - self.warmup_steps - 1
        if span <= 0:
            return self.lr_final
        progress = min(max((t - self.warmup_steps) / span, 0.0), 1.0)
        return self.lr_final + (self.lr_init - self.lr_final) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_at(segments: list[Segment], step: int) -> float:
    for seg in segments:
        if step < seg.steps:
            return seg.lr_at(step)
        step -= seg.steps
    last = segments[-1]
    return last.lr_at(last.steps + step)  # past the end: cosine stays at lr_final, step decay goes on


def segment(optim, steps: int, warmup_steps: int) -> Segment:
    """The segment of ``steps`` iterations a model's ``OptimConfig`` asks for (cosine or step decay)."""
    if optim.schedule == "step":
        return Segment(steps, optim.lr, optim.final_lr, warmup_steps, "step", optim.step_size, optim.step_gamma)
    return Segment(steps, optim.lr, optim.final_lr, warmup_steps)


def make_scheduler(optimizer: torch.optim.Optimizer, segments: list[Segment]) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR whose learning rate is ``lr_at(segments, step)`` (base lr set to 1 so the lambda is the lr)."""
    for group in optimizer.param_groups:
        group["lr"] = 1.0
        group["initial_lr"] = 1.0
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(segments, step))


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])


def sigmoid_rampup(step: float, length: float) -> float:
    """Laine & Aila's ramp exp(-5 (1 - t/L)^2) for t in [0, L], 1 after; 1 when L <= 0 (no ramp).

    The weight schedule of consistency terms (mean teacher, UA-MT, CPS, ...), in whatever unit step and length share.
    """
    if length <= 0:
        return 1.0
    phase = 1.0 - min(max(step, 0.0), length) / length
    return math.exp(-5.0 * phase * phase)
