"""Benchmark numbers from per-run files: results.csv rows, mean ± std over seeds, paired Wilcoxon tests.

Everything here is a pure function of what each run wrote (``test_predictions/summary.json``,
``split.json``, ``timing.json``), so a table can always be recomputed, and checked, from the runs.

Conventions (also printed under the markdown table):
- a run's score for a class is the mean over test cases of that class's metric (``summary.json``'s
  ``mean``); mean ± std are then taken over seeds, std with ddof=0 (as mnseg's summary.json over cases);
  undefined values (HD95/ASD when a mask is empty in every case) are left out and the cell reads n/a;
- paired comparison: for each (seed, test case) present in both runs, the difference of the per-case
  foreground-mean Dice (method minus supervised at the same labelled count and seed); two-sided
  Wilcoxon signed-rank test (scipy.stats.wilcoxon, zero differences dropped). Fewer than 2 pairs:
  p = NaN (no test possible); all differences zero: p = 1.0 (no evidence of a difference);
- verdict: "beat" / "trailed" only at p < 0.05 (``mnseg.reporting.verdict``), else "tied"; only those Δ are bold.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mnseg.errors import MnsegError
from mnseg.reporting.verdict import Comparison, verdict_sentence, wilcoxon_p  # noqa: F401 - wilcoxon_p: this module's API

METRICS = ("dice", "jaccard", "hd95", "asd")
TIMING = ("train_seconds", "iterations_per_second", "peak_gpu_memory_mb")
CSV_COLUMNS = ("method", "num_labeled", "seed", "class", *METRICS, *TIMING, "n_test_cases", "transductive",
               "run_dir")
BASELINE = "supervised"
FOREGROUND = "foreground mean"


@dataclass
class RunResult:
    """One finished grid cell: what it is (label, labelled count, seed) and what it wrote."""

    label: str  # method name, or "supervised (all labels)" for the upper bound
    num_labeled: int  # labelled cases actually used (from split.json)
    seed: int
    summary: dict  # test_predictions/summary.json
    timing: dict  # timing.json (may be empty)
    transductive: bool
    run_dir: str


def read_run_result(run_dir: str | Path, label: str) -> RunResult:
    """Read a finished run's summary.json, split.json and timing.json."""
    from mnseg.engine.run_dir import RunDir

    run = RunDir(run_dir)
    run_dir = run.path

    def load(path: Path, required: bool = True) -> dict:
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            if required:
                raise MnsegError(f"{path}: missing; {run_dir} is not a finished benchmark run") from None
            return {}
        except json.JSONDecodeError as exc:
            raise MnsegError(f"{path}: corrupt JSON ({exc})") from None

    summary = load(run.test_summary)
    split = load(run.path / run.SPLIT)
    return RunResult(
        label=label,
        num_labeled=len(split["labeled"]),
        seed=int(split["seed"]),
        summary=summary,
        timing=load(run.timing, required=False),
        transductive=bool(split["transductive"]),
        run_dir=str(run_dir),
    )


def _num(value) -> float:
    return float("nan") if value is None else float(value)


def _classes(summary: dict) -> list[str]:
    return list(summary["mean"])


# ----------------------------------------------------------------------------------------------- per run


def result_rows(runs: list[RunResult]) -> list[dict]:
    """One row per run and class (the rows of results.csv); undefined values are NaN, no GPU -> None."""
    rows = []
    for run in runs:
        for cls in _classes(run.summary):
            row = {"method": run.label, "num_labeled": run.num_labeled, "seed": run.seed, "class": cls}
            row.update({m: _num(run.summary["mean"][cls].get(m)) for m in METRICS})
            row.update({k: run.timing.get(k) for k in TIMING})
            row.update(n_test_cases=run.summary.get("n_cases"), transductive=run.transductive, run_dir=run.run_dir)
            rows.append(row)
    return rows


def results_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        writer.writerow([_csv_cell(row[c]) for c in CSV_COLUMNS])
    return buffer.getvalue()


def _csv_cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else repr(value)
    return str(value)


# ----------------------------------------------------------------------------------------------- over seeds


def _mean_std(values: list[float]) -> tuple[float, float, int]:
    arr = np.array([v for v in values if v is not None], dtype=np.float64)
    arr = arr[~np.isnan(arr)]
    if arr.size == 0:
        return float("nan"), float("nan"), 0
    return float(arr.mean()), float(arr.std()), int(arr.size)


def _groups(runs: list[RunResult]) -> dict[tuple[str, int], list[RunResult]]:
    groups: dict[tuple[str, int], list[RunResult]] = {}
    for run in sorted(runs, key=lambda r: (r.num_labeled, r.label != BASELINE, r.label, r.seed)):
        groups.setdefault((run.label, run.num_labeled), []).append(run)
    return groups


def aggregate(runs: list[RunResult]) -> list[dict]:
    """Per method x labelled count x class (plus the foreground mean): mean, std and n over seeds.

    Keys: method, num_labeled, class, n_seeds, seeds, and ``<metric>_mean`` / ``<metric>_std`` for every
    metric and timing value.
    """
    rows = []
    for (label, n), group in _groups(runs).items():
        classes = []
        for run in group:
            classes += [c for c in _classes(run.summary) if c not in classes]
        per_class = {
            cls: {m: [_num(r.summary["mean"].get(cls, {}).get(m)) for r in group] for m in METRICS}
            for cls in classes
        }
        per_class[FOREGROUND] = {m: [_num(r.summary["foreground_mean"].get(m)) for r in group] for m in METRICS}
        for cls, values in per_class.items():
            row = {"method": label, "num_labeled": n, "class": cls, "n_seeds": len(group),
                   "seeds": [r.seed for r in group]}
            for key, vals in [*values.items(), *((k, [r.timing.get(k) for r in group]) for k in TIMING)]:
                mean, std, _ = _mean_std(vals)
                row[f"{key}_mean"], row[f"{key}_std"] = mean, std
            rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------- paired test


def case_foreground_dice(summary: dict) -> dict[str, float]:
    """Per test case: the mean Dice over its foreground classes."""
    out = {}
    for item in summary["metric_per_case"]:
        values = [_num(v.get("dice")) for v in item["metrics"].values()]
        out[item["case"]] = float(np.nanmean(values)) if values and not all(map(math.isnan, values)) else math.nan
    return out


def paired_comparisons(runs: list[RunResult], baseline: str = BASELINE) -> list[dict]:
    """Each method vs ``baseline`` at the same labelled count: pairs over all (seed, test case) in both.

    Keys: method, num_labeled, n_pairs, mean_diff, median_diff, p_value (see the module docstring), and
    method_mean, baseline_mean: both sides' means over those pairs (what the verdict quotes: a method run on fewer
    seeds than supervised is set against supervised on its own seeds).
    """
    base = {(r.num_labeled, r.seed): case_foreground_dice(r.summary) for r in runs if r.label == baseline}
    rows = []
    for (label, n), group in _groups(runs).items():
        if label == baseline or not any((n, r.seed) in base for r in group):
            continue
        pairs = []
        for run in group:
            ref = base.get((n, run.seed))
            if ref is None:
                continue
            mine = case_foreground_dice(run.summary)
            pairs += [(mine[case], ref[case]) for case in sorted(set(mine) & set(ref))]
        both = np.array(pairs, dtype=np.float64).reshape(-1, 2)
        arr = both[:, 0] - both[:, 1]
        rows.append({
            "method": label,
            "num_labeled": n,
            "n_pairs": int(arr.size),
            "mean_diff": float(np.nanmean(arr)) if arr.size else math.nan,
            "median_diff": float(np.nanmedian(arr)) if arr.size else math.nan,
            "p_value": wilcoxon_p(arr),
            "method_mean": float(np.nanmean(both[:, 0])) if arr.size else math.nan,
            "baseline_mean": float(np.nanmean(both[:, 1])) if arr.size else math.nan,
        })
    return rows


def class_deltas(runs: list[RunResult], baseline: str = BASELINE) -> dict[tuple[str, int, str], float]:
    """(method, labelled count, class) -> mean over the seeds both ran of the method's class Dice (its mean over
    test cases) minus supervised's at the same count and seed: what "no class is worse" is read from."""
    base = {(r.num_labeled, r.seed): r.summary["mean"] for r in runs if r.label == baseline}
    diffs: dict[tuple[str, int, str], list[float]] = {}
    for run in runs:
        ref = base.get((run.num_labeled, run.seed))
        if run.label == baseline or ref is None:
            continue
        for cls in _classes(run.summary):
            mine, theirs = _num(run.summary["mean"].get(cls, {}).get("dice")), _num(ref.get(cls, {}).get("dice"))
            diffs.setdefault((run.label, run.num_labeled, cls), []).append(mine - theirs)
    return {key: float(np.nanmean(vals)) if not all(map(math.isnan, vals)) else math.nan
            for key, vals in diffs.items()}


# ----------------------------------------------------------------------------------------------- markdown


def _pm(mean: float, std: float, digits: int) -> str:
    return "n/a" if math.isnan(mean) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _delta(c: Comparison) -> str:
    text = "n/a" if math.isnan(c.mean_diff) else f"{c.mean_diff:+.4f}"
    return f"**{text}**" if c.supported else text


def _signed(value: float | None) -> str:
    return "" if value is None else "n/a" if math.isnan(value) else f"{value:+.4f}"


def _p(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.3g}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
            *("| " + " | ".join(r) + " |" for r in rows)]


def _as_comparison(comp: dict) -> Comparison:
    """A ``paired_comparisons`` row as a ``Comparison`` (both means over the pairs, for the sentence)."""
    return Comparison(comp["method"], BASELINE, comp["n_pairs"], comp["mean_diff"], comp["p_value"],
                      comp["method_mean"], comp["baseline_mean"])


def verdicts(comparisons: list[dict]) -> list[str]:
    """One plain sentence per method and labelled count: beat / tied / trailed supervised, by how much, p."""
    return [f"{c['num_labeled']} labelled: " + verdict_sentence(_as_comparison(c), over="(seed, test case) pairs")
            for c in comparisons]


def markdown_report(title: str, notes: list[str], agg: list[dict], comparisons: list[dict],
                    failures: list[dict], units: str = "voxel", deltas: dict | None = None) -> str:
    """The benchmark table: verdicts, foreground mean with the paired test, then per class (with ``deltas``,
    ``class_deltas``' output, as a column), then failures."""
    deltas = deltas or {}
    paired = {(c["method"], c["num_labeled"]): c for c in comparisons}
    main_rows = []
    for row in (r for r in agg if r["class"] == FOREGROUND):
        comp = paired.get((row["method"], row["num_labeled"]))
        mem = row["peak_gpu_memory_mb_mean"]
        main_rows.append([
            row["method"], str(row["num_labeled"]), str(row["n_seeds"]),
            _pm(row["dice_mean"], row["dice_std"], 4), _pm(row["hd95_mean"], row["hd95_std"], 2),
            _pm(row["asd_mean"], row["asd_std"], 2),
            "" if comp is None else _delta(_as_comparison(comp)),
            "" if comp is None else str(comp["n_pairs"]),
            "" if comp is None else _p(comp["p_value"]),
            _pm(row["train_seconds_mean"], row["train_seconds_std"], 1),
            "n/a" if math.isnan(row["iterations_per_second_mean"]) else f"{row['iterations_per_second_mean']:.2f}",
            "" if math.isnan(mem) else f"{mem:.0f}",
        ])
    class_rows = [
        [r["method"], str(r["num_labeled"]), r["class"], *(_pm(r[f"{m}_mean"], r[f"{m}_std"], 4 if m in
                                                                ("dice", "jaccard") else 2) for m in METRICS),
         _signed(deltas.get((r["method"], r["num_labeled"], r["class"])))]
        for r in agg if r["class"] != FOREGROUND
    ]
    lines = [f"# {title}", "", *(f"- {n}" for n in notes), "", "## Verdict", ""]
    lines += [f"- {v}" for v in verdicts(comparisons)] or ["- No comparison: no supervised run at the same "
                                                                "labelled count finished."]
    lines += ["", "## Foreground mean", ""]
    lines += _table(["Method", "Labelled", "Seeds", "Dice", f"HD95 ({units})", f"ASD ({units})",
                     "Δ Dice vs supervised", "Pairs", "Wilcoxon p", "Train time (s)", "Iterations/s",
                     "Peak GPU memory (MB)"], main_rows)
    lines += ["", "## Per class", ""]
    lines += _table(["Method", "Labelled", "Class", "Dice", "Jaccard", f"HD95 ({units})", f"ASD ({units})",
                     "Δ Dice vs supervised"], class_rows)
    lines += ["", "Mean ± std over seeds (ddof=0) of each run's mean over test cases; n/a: undefined in every run.",
              "Δ Dice: mean over (seed, test case) pairs of the per-case foreground-mean Dice minus supervised's "
              "at the same labelled count and seed; Wilcoxon signed-rank, two-sided (p n/a: fewer than 2 pairs; "
              "1.0: all differences zero). Bold Δ: a difference the test supports (p < 0.05); the others are ties. "
              "Empty peak GPU memory: trained on CPU. Per-class Δ Dice: mean over the seeds both ran of the class "
              "Dice minus supervised's at the same labelled count and seed.",
              "n/a: HD95/ASD undefined in every run (a mask empty in every test case); iterations/s n/a: the run "
              "wrote no timing.json."]
    if failures:
        lines += ["", "## Failed runs (not in the tables)", ""]
        lines += _table(["Method", "Labelled", "Seed", "Error"],
                        [[f["method"], str(f["num_labeled"]), str(f["seed"]),
                          f["error"].replace("|", "\\|").replace("\n", " ")] for f in failures])
    return "\n".join(lines) + "\n"
