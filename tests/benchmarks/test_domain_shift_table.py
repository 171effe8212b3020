"""benchmarks/domain_shift_table.py: the domain-shift table pairs runs with supervised by (seed, target subject)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from domain_shift_table import RUNS, table  # noqa: E402


def _summary(dice_per_case: list[float]) -> dict:
    classes = ("white_matter", "grey_matter", "lesion")
    cases = [{"case": f"t{i}", "metrics": {c: {"dice": d} for c in classes}} for i, d in enumerate(dice_per_case)]
    mean = sum(dice_per_case) / len(dice_per_case)
    return {"metric_per_case": cases, "mean": {c: {"dice": mean} for c in classes},
            "foreground_mean": {"dice": mean}}


def _write(out: Path, run: str, seed: int, part: str, dice: list[float]) -> None:
    path = out / "pred" / run / f"seed{seed}" / part / "summary.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(_summary(dice)))


def test_each_run_is_paired_with_supervised_over_seeds_and_target_subjects(tmp_path):
    base = {0: [0.5, 0.6, 0.7], 1: [0.4, 0.5, 0.6]}
    for run in RUNS:
        gain = {"sup": 0.0, "dann": 0.1, "entropy": -0.05, "tent": 0.0}[run]
        for seed, dice in base.items():
            _write(tmp_path, run, seed, "Target", [d + gain for d in dice])
            _write(tmp_path, run, seed, "Ts", dice)
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in table(tmp_path, 10).splitlines()[2:]}
    dann = rows["supervised + DANN (0.1)"]
    assert dann[1] == "2" and dann[3] == "+0.1000" and dann[4] == "6"  # 2 seeds, 3 subjects each
    assert rows["supervised + target entropy (0.1)"][3] == "-0.0500"
    assert rows["supervised, TENT at prediction (10 steps)"][5] == "1"  # identical scores: p = 1
    assert rows["supervised"][2] == "0.5500 ± 0.0707"  # seed means 0.6 and 0.5


def test_a_missing_run_names_what_to_run(tmp_path):
    _write(tmp_path, "sup", 0, "Target", [0.5, 0.6])
    with pytest.raises(SystemExit, match="domain_shift.sh"):
        table(tmp_path, 10)
