"""An overall ETA for a sequence of runs (the demo's), from the finished runs' own recorded times.

Each run has a planned amount of work (model updates: training iterations, counted twice where two models train
in the same iteration). After each finished run, the finished runs' seconds per update times the updates still
planned gives the time left: "run 1 of 2 done, about 6 min left". The seconds come from the runs' records, so a
run reused from an earlier session counts with the time it took then, not the moment it took to skip it.
"""

from __future__ import annotations

import math


def planned_updates(cfg) -> float:
    """Model updates a run's config plans: epochs x iterations, plus the epochs in which a second model trains
    beside the first (M&N's stage 1, ``method.params.sup_epochs``)."""
    epochs, iters = cfg.train.epochs, cfg.train.iters_per_epoch
    both = min(int(cfg.method.params.get("sup_epochs", 0) or 0), epochs) if len(cfg.models) > 1 else 0
    return float((epochs + both) * iters)


class RunEta:
    """``finished(name, seconds)`` after each run returns the line to log; ``work``: name -> planned updates,
    in the order the runs go."""

    def __init__(self, work: dict[str, float]):
        self.work = dict(work)
        self.done: list[str] = []
        self.seconds: dict[str, float] = {}  # the finished runs that have a timing record

    def left_seconds(self) -> float | None:
        """Seconds the unfinished runs should take at the timed finished runs' pace; None before any."""
        timed_work = sum(self.work[n] for n in self.seconds)
        if timed_work <= 0:
            return None
        rate = sum(self.seconds.values()) / timed_work
        return rate * sum(w for n, w in self.work.items() if n not in self.done)

    def finished(self, name: str, seconds: float | None) -> str:
        if name not in self.work:
            raise KeyError(f"{name!r} is not one of the planned runs {list(self.work)}")
        if name not in self.done:
            self.done.append(name)
        if seconds is not None and math.isfinite(seconds):
            self.seconds[name] = max(float(seconds), 0.0)
        head = f"run {len(self.done)} of {len(self.work)} done"
        if len(self.done) == len(self.work):
            return f"{head}, no training left"
        left = self.left_seconds()
        if left is None:
            return f"{head}; time left unknown (no finished run has a timing record)"
        return f"{head}, {format_left(left)}"


def format_left(seconds: float) -> str:
    if seconds < 60:
        return "under a minute left"
    return f"about {math.ceil(seconds / 60)} min left"
