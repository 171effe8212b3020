"""A stand-in for a benchmark cell's worker: it records its process id, then sleeps as a long training would, so a
test can stop the benchmark and see whether its workers stop with it."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def sleep_in_cell(spec, cell, tag, sharing) -> None:
    """Write this worker's pid to OUT/pids/<cell>, then sleep for a minute."""
    pids = Path(spec.out) / "pids"
    pids.mkdir(parents=True, exist_ok=True)
    (pids / f"{cell.method}_{cell.seed}").write_text(str(os.getpid()))
    time.sleep(60)


def run_grid(out: str) -> None:
    """The benchmark's parallel loop over two cells, each in a sleeping worker (run as a script by the test)."""
    from mnseg.workflows.benchmark import BenchmarkSpec, Cell, _run_parallel

    spec = BenchmarkSpec(dataset=Path(out), out=Path(out), methods=["supervised"], num_labeled=[2], seeds=[0, 1],
                         device="cpu", jobs=2)
    todo = [(1, Cell("supervised", 2, 0)), (2, Cell("supervised", 2, 1))]
    _run_parallel(spec, todo, 2, worker=sleep_in_cell)


if __name__ == "__main__":
    run_grid(sys.argv[1])
