"""The domain-shift table (benchmarks/domain_shift.sh) from its scores, without training.

  python benchmarks/domain_shift_table.py OUT [--adapt-steps 10]

Reads OUT/pred/<run>/seed<S>/{Target,Ts}/summary.json (mnseg evaluate's) for the runs sup, dann, entropy and
tent. Prints one markdown row per run: target foreground-mean Dice (mean ± std over seeds), its paired difference
from supervised over (seed, target subject) pairs with the two-sided Wilcoxon signed-rank p
(mnseg.reporting.verdict.wilcoxon_p, as the benchmark tables), the target's per-class Dice, and the source test
subjects' foreground-mean Dice with its own paired difference.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from mnseg.reporting.benchmark_stats import case_foreground_dice
from mnseg.reporting.verdict import wilcoxon_p

RUNS = {"sup": "supervised", "dann": "supervised + DANN (0.1)", "entropy": "supervised + target entropy (0.1)",
        "tent": "supervised, TENT at prediction ({steps} steps)"}
CLASSES = ("white_matter", "grey_matter", "lesion")


def _scores(out: Path, run: str, part: str) -> dict[int, dict]:
    """seed -> that seed's summary.json for one run and one part (Target or Ts)."""
    found = {}
    for path in sorted((out / "pred" / run).glob(f"seed*/{part}/summary.json")):
        found[int(path.parent.parent.name.removeprefix("seed"))] = json.loads(path.read_text())
    if not found:
        raise SystemExit(f"{out / 'pred' / run}: no seed*/{part}/summary.json; run benchmarks/domain_shift.sh first")
    return found


def _paired(run: dict[int, dict], base: dict[int, dict]) -> tuple[float, int, float]:
    """Mean difference, number of pairs and Wilcoxon p over the (seed, case) pairs both have."""
    diffs = []
    for seed in sorted(set(run) & set(base)):
        a, b = case_foreground_dice(run[seed]), case_foreground_dice(base[seed])
        diffs += [a[c] - b[c] for c in sorted(set(a) & set(b))]
    return float(np.nanmean(diffs)), len(diffs), wilcoxon_p(diffs)


def _fg(scores: dict[int, dict]) -> tuple[float, float]:
    values = [s["foreground_mean"]["dice"] for s in scores.values()]
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")


def table(out: Path, adapt_steps: int) -> str:
    target = {run: _scores(out, run, "Target") for run in RUNS}
    source = {run: _scores(out, run, "Ts") for run in RUNS}
    rows = ["| run | seeds | target fg Dice | Δ vs supervised | pairs | Wilcoxon p | target WM | target GM | "
            "target lesion | source test fg Dice | source Δ (p) |", "|---|" + "---|" * 10]
    for run, label in RUNS.items():
        mean, std = _fg(target[run])
        cls = [np.mean([s["mean"][c]["dice"] for s in target[run].values()]) for c in CLASSES]
        src_mean, _ = _fg(source[run])
        if run == "sup":
            delta, src_delta = " | | ", ""
        else:
            d, n, p = _paired(target[run], target["sup"])
            sd, _, sp = _paired(source[run], source["sup"])
            delta, src_delta = f"{d:+.4f} | {n} | {p:.2g}", f"{sd:+.4f} ({sp:.2g})"
        spread = "" if np.isnan(std) else f" ± {std:.4f}"
        rows.append(f"| {label.format(steps=adapt_steps)} | {len(target[run])} | {mean:.4f}{spread} | {delta} | "
                    + " | ".join(f"{v:.4f}" for v in cls) + f" | {src_mean:.4f} | {src_delta} |")
    return "\n".join(rows) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--adapt-steps", type=int, default=10)
    args = p.parse_args()
    print(table(args.out, args.adapt_steps), end="")


if __name__ == "__main__":
    main()
