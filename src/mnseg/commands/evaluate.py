"""``mnseg evaluate``: score predicted label maps against references, the way papers do."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = "score predictions against reference label maps (Dice, Jaccard, HD95, ASD)"
DESCRIPTION = """\
Score every reference label map in REF_DIR against the prediction with the same case name
(CASE.nii.gz) in PRED_DIR. Metrics follow medpy 0.5.2 (Dice, Jaccard, HD, HD95, ASD, ASSD), per
class and case, in voxels by default or in mm with --mm. Writes metrics.csv (one row per case and
class) and summary.json (nnU-Net's shape: per case, mean, std, foreground mean) into PRED_DIR or
-o OUT_DIR, and prints a table of mean ± std.

Both masks empty: Dice 1, distances 0. One mask empty: Dice 0, distances undefined (null),
left out of the means and counted.

example:
  mnseg evaluate runs/exp1/predictions Dataset001_LA/labelsTs --dataset-json Dataset001_LA/dataset.json --mm
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pred_dir", type=Path, metavar="PRED_DIR", help="folder of predicted label maps")
    parser.add_argument("ref_dir", type=Path, metavar="REF_DIR", help="folder of reference label maps")
    parser.add_argument("--dataset-json", type=Path, default=None, metavar="F",
                        help="dataset.json whose 'labels' name the classes "
                        "(default: the values seen, named 1, 2, ...)")
    parser.add_argument("--mm", action="store_true",
                        help="distances in mm from the reference's voxel spacing (default: voxel units)")
    parser.add_argument("-o", "--out-dir", type=Path, default=None, metavar="OUT_DIR",
                        help="where to write metrics.csv and summary.json (default: PRED_DIR)")
    parser.add_argument("--workers", type=int, default=1, metavar="N",
                        help="cases scored in parallel (default 1)")


def run(args: argparse.Namespace) -> int:
    import warnings

    from mnseg.evaluation.folders import evaluate_folders, format_summary_table

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        summary = evaluate_folders(args.pred_dir, args.ref_dir, dataset_json=args.dataset_json, in_mm=args.mm,
                                   out_dir=args.out_dir, workers=args.workers)
    for warning in caught:
        print(f"mnseg evaluate: warning: {warning.message}", file=sys.stderr)
    print(format_summary_table(summary))
    out_dir = args.out_dir if args.out_dir is not None else args.pred_dir
    print(f"wrote {out_dir / 'metrics.csv'} and {out_dir / 'summary.json'}")
    return 0
