"""Score a folder of predicted label maps against a folder of references.

Files are matched by case name (``CASE.nii.gz`` in both folders), checked for the same grid, scored
per class with ``mnseg.evaluation.metrics`` and written as ``metrics.csv`` (one row per case and class) and
``summary.json`` (nnU-Net's shape). Anything wrong with the inputs is a ``MnsegError`` naming the
file and the problem, raised before any output is written.
"""

from __future__ import annotations

import csv
import io
import json
import math
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from mnseg.errors import ConfigError, InputFileError, MnsegError
from mnseg.evaluation.metrics import both_empty_metrics, evaluate_case, foreground_classes, summarize

CSV_COLUMNS = ("case", "class", "dice", "jaccard", "hd95", "asd", "assd")
AFFINE_ATOL = 1e-3
DEFAULT_ENDINGS = (".nii.gz", ".nii")


def read_dataset_labels(dataset_json: str | Path) -> tuple[dict[str, int], str | None]:
    """The ``labels`` map and ``file_ending`` of a dataset.json, validated."""
    path = Path(dataset_json)
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputFileError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputFileError(f"{path}: cannot read as JSON ({exc})") from None
    if not isinstance(meta, dict) or "labels" not in meta:
        raise InputFileError(f"{path}: no 'labels' entry (expected e.g. {{\"background\": 0, \"organ\": 1}})")
    labels = _checked_labels(meta["labels"], source=str(path))
    ending = meta.get("file_ending")
    return labels, ending if isinstance(ending, str) and ending else None


def _checked_labels(labels: object, source: str) -> dict[str, int]:
    if not isinstance(labels, Mapping) or not labels:
        raise InputFileError(f"{source}: 'labels' must be a non-empty map of class name -> integer value")
    checked = {}
    for name, value in labels.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise InputFileError(
                f"{source}: label {name!r} has value {value!r}; only integer values are supported "
                "(region-based label lists cannot be evaluated)"
            )
        checked[str(name)] = int(value)
    values = list(checked.values())
    if len(set(values)) != len(values):
        raise InputFileError(f"{source}: two labels share one value in {checked}")
    return checked


def list_cases(folder: Path, endings: tuple[str, ...]) -> dict[str, Path]:
    """Case name -> label-map file, for the NIfTI files directly inside ``folder`` (hidden files skipped)."""
    cases: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        ending = next((e for e in endings if path.name.endswith(e)), None)
        if ending is None:
            continue
        case = path.name[: -len(ending)]
        if case in cases:
            raise InputFileError(
                f"{folder}: case {case!r} appears twice ({cases[case].name} and {path.name})"
            )
        cases[case] = path
    return cases


def _load_label_map(path: Path):
    """Load a label map and make sure it holds whole numbers only."""
    from mnseg.data.io import load_nifti

    volume = load_nifti(path, dtype=None)
    data = volume.data
    if not np.issubdtype(data.dtype, np.integer) and data.dtype != np.bool_:
        data = np.asarray(data, dtype=np.float64)
        bad = ~np.isfinite(data) | (data != np.round(data))
        if bad.any():
            raise InputFileError(
                f"{path}: holds non-integer values (e.g. {data[bad].flat[0]!r}); "
                "a label map must hold integer class values, not probabilities"
            )
        data = data.astype(np.int64)
    volume.data = data.astype(np.int64, copy=False) if data.dtype == np.bool_ else data
    return volume


def _present_values(data: np.ndarray) -> list[int]:
    flat = data.ravel()
    low, high = int(flat.min()), int(flat.max())
    if low >= 0 and high < 1 << 16:
        return [int(v) for v in np.flatnonzero(np.bincount(flat.astype(np.intp, copy=False)))]
    return [int(v) for v in np.unique(flat)]


def _check_values(path: Path, values: list[int], labels: Mapping[str, int]) -> None:
    unknown = sorted(set(values) - set(labels.values()))
    if unknown:
        raise InputFileError(
            f"{path}: label values {unknown} are not in the label map {dict(labels)}; "
            "pass the dataset.json that defines them (--dataset-json)"
        )


def evaluate_pair(
    case: str, pred_path: Path, ref_path: Path, labels: dict[str, int] | None, in_mm: bool
) -> dict:
    """Score one case; with ``labels=None`` every non-zero value present is a class named by its value."""
    pred = _load_label_map(pred_path)
    ref = _load_label_map(ref_path)
    if pred.shape != ref.shape:
        raise InputFileError(
            f"{pred_path}: shape {pred.shape} differs from the reference {ref_path} with shape {ref.shape}"
        )
    if not np.allclose(pred.affine, ref.affine, rtol=0.0, atol=AFFINE_ATOL):
        raise InputFileError(
            f"{pred_path}: its affine (voxel-to-world matrix) differs from the reference {ref_path} by up to "
            f"{np.abs(pred.affine - ref.affine).max():.4g}; the prediction is not in the reference's grid"
        )
    pred_values, ref_values = _present_values(pred.data), _present_values(ref.data)
    if labels is None:
        seen = sorted((set(pred_values) | set(ref_values)) - {0})
        case_labels = {"background": 0, **{str(v): v for v in seen}}
    else:
        _check_values(pred_path, pred_values, labels)
        _check_values(ref_path, ref_values, labels)
        case_labels = labels
    spacing = ref.spacing if in_mm else None
    return {
        "case": case,
        "prediction_file": str(pred_path),
        "reference_file": str(ref_path),
        "metrics": evaluate_case(pred.data, ref.data, case_labels, spacing=spacing),
    }


def _run_all(jobs: list[tuple], workers: int) -> list[dict]:
    if workers == 1 or len(jobs) <= 1:
        return [evaluate_pair(*job) for job in jobs]
    from concurrent.futures import ProcessPoolExecutor

    # The platform's default start method: workers run numpy/scipy/nibabel only (no torch, no OpenMP),
    # so fork is safe on Linux, and unlike spawn it does not re-import the caller's __main__.
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
        return list(pool.map(evaluate_pair, *zip(*jobs)))


def _complete_union_classes(per_case: list[dict]) -> None:
    """Give every case every class seen anywhere (absent in both masks = the both-empty values), sorted."""
    names = sorted({name for item in per_case for name in item["metrics"]}, key=int)
    for item in per_case:
        item["metrics"] = {name: item["metrics"].get(name, both_empty_metrics()) for name in names}


def evaluate_folders(
    pred_dir: str | Path,
    ref_dir: str | Path,
    labels: dict[str, int] | None = None,
    dataset_json: str | Path | None = None,
    in_mm: bool = False,
    out_dir: str | Path | None = None,
    workers: int = 1,
) -> dict:
    """Score every reference case against its prediction, write metrics.csv and summary.json; return summary.

    Labels come from ``labels``, else from ``dataset_json``, else from the values seen (named "1", "2", ...).
    """
    pred_dir, ref_dir = Path(pred_dir), Path(ref_dir)
    for folder, what in ((pred_dir, "prediction"), (ref_dir, "reference")):
        if not folder.is_dir():
            raise InputFileError(f"{folder}: {what} folder not found")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"workers must be a positive integer, got {workers!r}")
    endings = DEFAULT_ENDINGS
    if labels is not None:
        labels = _checked_labels(labels, source="labels argument")
    elif dataset_json is not None:
        labels, ending = read_dataset_labels(dataset_json)
        if ending:
            endings = (ending,)
    if labels is not None and not foreground_classes(labels):
        raise InputFileError(f"{dataset_json or 'labels argument'}: no foreground class to score in {labels}")

    preds, refs = list_cases(pred_dir, endings), list_cases(ref_dir, endings)
    if not refs:
        raise InputFileError(f"{ref_dir}: no reference label maps ({' or '.join(endings)}) found")
    missing = sorted(set(refs) - set(preds))
    if missing:
        raise MnsegError(
            f"{pred_dir}: no prediction for {len(missing)} of {len(refs)} reference cases: "
            + ", ".join(missing)
        )
    extra = sorted(set(preds) - set(refs))
    if extra:
        warnings.warn(
            f"{pred_dir}: {len(extra)} predictions have no reference in {ref_dir} and are ignored: "
            + ", ".join(extra),
            stacklevel=2,
        )

    jobs = [(case, preds[case], refs[case], labels, in_mm) for case in sorted(refs)]
    per_case = _run_all(jobs, workers)
    if labels is None:
        _complete_union_classes(per_case)
    summary = summarize(per_case, units="mm" if in_mm else "voxel")

    from mnseg.utils.atomic import atomic_write_json, atomic_write_text

    out_dir = Path(out_dir) if out_dir is not None else pred_dir
    if out_dir.exists() and not out_dir.is_dir():
        raise InputFileError(f"{out_dir}: output folder is a file")
    atomic_write_text(out_dir / "metrics.csv", metrics_csv(per_case))
    atomic_write_json(out_dir / "summary.json", summary)
    return summary


def _csv_value(value: float | None) -> str:
    return "nan" if value is None or math.isnan(value) else repr(float(value))


def metrics_csv(per_case: list[dict]) -> str:
    """One row per case and class; undefined distances are written as ``nan``."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for item in per_case:
        for name, values in item["metrics"].items():
            writer.writerow([item["case"], name, *(_csv_value(values[m]) for m in CSV_COLUMNS[2:])])
    return buffer.getvalue()


def _mean_std(mean: float | None, std: float | None, digits: int) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def format_summary_table(summary: dict) -> str:
    """Aligned table: per class Dice, Jaccard, HD95 and ASD as mean ± std, then the foreground mean."""
    units = summary.get("units", "voxel")
    columns = [("Dice", "dice", 4), ("Jaccard", "jaccard", 4), (f"HD95 ({units})", "hd95", 3),
               (f"ASD ({units})", "asd", 3)]
    header = ["Class", *(title for title, _, _ in columns)]
    rows = []
    for name, means in summary["mean"].items():
        stds = summary["std"][name]
        rows.append([name, *(_mean_std(means[key], stds[key], d) for _, key, d in columns)])
    fg = summary["foreground_mean"]
    rows.append(["foreground mean", *("n/a" if fg[k] is None else f"{fg[k]:.{d}f}" for _, k, d in columns)])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        padded = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return "  ".join(padded)

    lines = [line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows[:-1])]
    lines += ["  ".join("-" * w for w in widths), line(rows[-1])]
    lines.append(f"{summary.get('n_cases', len(summary['metric_per_case']))} cases, mean ± std over cases, "
                 f"distances in {units}")
    undefined = {name: counts["hd95"] for name, counts in summary["n_undefined"].items() if counts["hd95"]}
    if undefined:
        listed = ", ".join(f"{name}: {n}" for name, n in undefined.items())
        lines.append(f"distances undefined (one mask empty), left out of the means: {listed}")
    return "\n".join(lines)
