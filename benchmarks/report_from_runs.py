"""A demo-style report (verdict, curves, best/median/worst overlays) from finished runs, without training.

Used for docs/images/demo_long_report.png: the CPU grid's seed-0 cells at 2 labelled are the runs `mnseg demo
--long` trains (tests/workflows/test_demo_eta.py checks the configs), so their report is the long demo's.

  python benchmarks/report_from_runs.py /tmp/exp/Dataset921_MNIStrong3mm -o /tmp/longrep \\
      --run "Supervised 3D UNet=/tmp/grid/bench/runs/supervised/n2_seed0" \\
      --run "M&N (2D pretrained + 3D UNet)=/tmp/grid/bench/runs/mn/n2_seed0"

Each run folder needs history.csv and test_predictions/ (summary.json and the predicted NIfTI files); the first
run is the baseline.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mnseg.engine.run_dir import RunDir
from mnseg.reporting.report import MethodResult, dataset_test_cases, write_report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", type=Path, help="the dataset folder whose imagesTs/labelsTs the runs predicted")
    p.add_argument("-o", "--out", type=Path, required=True, help="report folder")
    p.add_argument("--run", action="append", required=True, help="LABEL=RUN_DIR (repeat; first is the baseline)")
    p.add_argument("--title", default="mnseg demo --long: supervised 3D UNet vs M&N")
    args = p.parse_args()
    results = []
    for spec in args.run:
        label, _, path = spec.partition("=")
        run = RunDir(Path(path))
        summary = json.loads((run.test_predictions / "summary.json").read_text())
        results.append(MethodResult(label, summary, run.history, run.test_predictions))
    cases, class_names = dataset_test_cases(args.dataset)
    notes = ["Made from finished runs without training: " + ", ".join(args.run) + "."]
    print(write_report(args.out, args.title, results, cases, class_names, notes=notes))


if __name__ == "__main__":
    main()
