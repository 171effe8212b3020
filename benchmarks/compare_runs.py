"""Paired comparison of finished runs against a baseline, over (seed, test case) pairs, without training.

For controls outside a benchmark grid (e.g. the diagnosis's sup_restart against supervised and M&N):

  python benchmarks/compare_runs.py --baseline "sup=/tmp/diagL/runs/sup/n2_seed*" \\
      --run "sup_restart=/tmp/diagL/runs/sup_restart/n2_seed*" --run "mn=/tmp/diagL/runs/mn/n2_seed*"

Each LABEL=GLOB names finished runs (test_predictions/summary.json, split.json); runs pair by labelled count and
seed. Prints one markdown row per label: foreground-mean Dice (mean ± std over seeds), the paired difference, the
two-sided Wilcoxon signed-rank p (mnseg.reporting.benchmark_stats, as the benchmark tables), per-class deltas.
"""

from __future__ import annotations

import argparse
import glob
from pathlib import Path

import numpy as np

from mnseg.reporting.benchmark_stats import aggregate, class_deltas, paired_comparisons, read_run_result


def read_runs(spec: str):
    label, _, pattern = spec.partition("=")
    paths = sorted(p for p in glob.glob(pattern) if Path(p).is_dir())  # not the runs' log files beside them
    if not paths:
        raise SystemExit(f"{spec}: no run matches")
    return [read_run_result(p, label) for p in paths]


def table(base: list, others: list, score: str = "test fg Dice") -> str:
    """A markdown table of ``others`` against ``base`` (RunResults of one label): foreground-mean Dice over seeds,
    the paired difference over (seed, case) pairs, its Wilcoxon p and the per-class differences."""
    runs = base + others
    label = base[0].label
    fg = {(a["method"], a["num_labeled"]): a for a in aggregate(runs) if a["class"] == "foreground mean"}
    comps = {(c["method"], c["num_labeled"]): c for c in paired_comparisons(runs, baseline=label)}
    deltas = class_deltas(runs, baseline=label)
    classes = sorted({cls for (_, _, cls) in deltas})
    header = ["run", "labelled", "seeds", score, f"Δ vs {label}", "pairs", "Wilcoxon p", *(f"{c} Δ" for c in classes)]
    rows = [header, ["---"] * len(header)]
    for (method, n), a in fg.items():
        c = comps.get((method, n))
        paired = ["", "", ""] if c is None else [f"{c['mean_diff']:+.4f}", str(c["n_pairs"]), f"{c['p_value']:.2g}"]
        per = [f"{deltas[(method, n, cls)]:+.4f}" if (method, n, cls) in deltas else "" for cls in classes]
        std = "" if a["n_seeds"] < 2 or not np.isfinite(a["dice_std"]) else f" ± {a['dice_std']:.4f}"
        rows.append([method, str(n), str(a["n_seeds"]), f"{a['dice_mean']:.4f}{std}", *paired, *per])
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", required=True, help="LABEL=GLOB of the baseline's runs")
    p.add_argument("--run", action="append", required=True, help="LABEL=GLOB (repeat)")
    args = p.parse_args()
    print(table(read_runs(args.baseline), [r for spec in args.run for r in read_runs(spec)]))


if __name__ == "__main__":
    main()
