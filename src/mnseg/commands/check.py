"""``mnseg check DATASET``: validate a dataset folder and print what it holds."""

from __future__ import annotations

import argparse
import sys

HELP = "check a dataset folder (layout, dataset.json, every file) and print its statistics"
DESCRIPTION = """\
Check a dataset folder before training: dataset.json, file names, missing labels or
channels, unreadable files, shape/affine mismatches, undeclared label values, NaN/Inf.
An imagesTr case without a label is a warning: training can use it only as unlabelled data.
imagesTarget (unlabelled target-domain scans for domain adaptation) and labelsTarget (scoring
only) are checked like the other groups and counted when present. Prints case counts,
spacings, sizes, class frequencies, intensity percentiles and every problem with its file.
Exit status 0 if there are no errors (warnings allowed), 2 otherwise.

example:
  mnseg check Dataset001_Brain
  mnseg check Dataset001_Brain --no-voxels     # file names and headers only (fast)
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", metavar="DATASET",
                        help="dataset folder holding dataset.json and imagesTr/")
    parser.add_argument("--no-voxels", action="store_true",
                        help="read file names and NIfTI headers only "
                             "(skips label values, NaN/Inf and statistics)")


def run(args: argparse.Namespace) -> int:
    from mnseg.data.validate import validate_dataset

    # an imagesTr case without a label is a warning here: training can still use it as unlabelled data
    report = validate_dataset(args.dataset, check_voxels=not args.no_voxels, progress=sys.stderr.isatty(),
                              require_training_labels=False)
    print(report.to_text())
    if report.errors:
        print(f"mnseg check: {len(report.errors)} error(s) found", file=sys.stderr)
        return 2
    return 0
