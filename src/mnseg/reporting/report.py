"""Human-readable comparison of methods: a verdict, a metrics table, learning curves and overlay pictures.

``write_report`` writes ``report.md`` (linking the PNGs in ``figures/``), ``report.html`` (self-contained:
the same PNGs inlined, so the one file can be mailed) and ``report.png`` (the verdict, curves and an overlay as
one picture). The verdict and the bold cells come from a paired
Wilcoxon test over test cases against the baseline (the first method unless named), so a difference
that chance explains is not presented as a win. The example cases are the best, median and worst by
Dice, with an error map per method (pictures: ``mnseg.reporting.overlays``). Figures are drawn with matplotlib's
object API (``Figure`` + Agg canvas), never pyplot, so importing this module does not change the backend
of an interactive session.
"""

from __future__ import annotations

import base64
import html
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mnseg.errors import InputFileError
from mnseg.reporting.curves import learning_curves
from mnseg.reporting.overlays import NOT_DRAWN, overlay_figure, ras_spacing, to_ras
from mnseg.reporting.picture import report_picture
from mnseg.reporting.verdict import SIGNIFICANCE, Comparison, compare, verdict_sentence
from mnseg.utils.atomic import atomic_write_text

METRICS = (("dice", "Dice", 3), ("jaccard", "Jaccard", 3), ("hd95", "HD95", 2), ("asd", "ASD", 2))
FOREGROUND_MEAN = "foreground mean"

@dataclass
class MethodResult:
    """What one method produced: its evaluation summary, training history and predictions."""

    name: str
    summary: dict
    history_csv: Path | None = None
    pred_dir: Path | None = None


def dataset_test_cases(dataset: Path) -> tuple[list[tuple[str, Path, Path]], dict[int, str]]:
    """``write_report``'s ``test_cases`` and ``class_names`` for a dataset folder's imagesTs/labelsTs (the demo's,
    or any run predicted on them): ``(case_id, image, label)`` sorted by case, and label value -> class name."""
    import json

    labels = json.loads((Path(dataset) / "dataset.json").read_text())["labels"]
    class_names = {v: k for k, v in labels.items() if k != "ignore"}
    cases = sorted(
        (p.name[: -len("_0000.nii.gz")], p, Path(dataset) / "labelsTs" / p.name.replace("_0000.nii.gz", ".nii.gz"))
        for p in (Path(dataset) / "imagesTs").glob("*_0000.nii.gz"))
    return cases, class_names


def write_report(
    out_dir: Path,
    title: str,
    results: list[MethodResult],
    test_cases: list[tuple[str, Path, Path]],
    class_names: dict[int, str],
    n_overlay_cases: int = 3,
    notes: Sequence[str] = (),
    baseline: str | None = None,
) -> Path:
    """Write ``report.md``, ``report.html``, ``report.png`` (the verdict, curves and an overlay in one picture:
    ``mnseg.reporting.picture``) and ``figures/*.png`` into ``out_dir``; return the markdown path.

    ``test_cases`` are ``(case_id, image_path, label_path)``; predictions are read from
    ``pred_dir/CASE.nii.gz`` (or ``.nii``). A method without predictions or history is reported as such.
    Every other method is compared with ``baseline`` (a result's name; default the first result's).
    """
    out_dir = Path(out_dir)
    figures = out_dir / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    notes = list(notes)
    classes = _reported_classes(class_names, results)
    units = next((r.summary.get("units") for r in results if r.summary.get("units")), "voxel")
    baseline = baseline if baseline is not None else (results[0].name if results else None)
    comparisons = compare_with_baseline(results, classes, baseline)
    table = _metrics_table(results, classes, comparisons)
    verdict = [verdict_sentence(c) for (cls, _), c in comparisons.items() if cls == FOREGROUND_MEAN]

    curves_png = learning_curves(results, figures / "learning_curves.png", notes)

    overlays = []
    for (case_id, image_path, label_path), role in example_cases(test_cases, results, classes, n_overlay_cases):
        png = figures / f"overlay_{_safe_name(case_id)}.png"
        _case_overlay(case_id, Path(image_path), Path(label_path), results, class_names, png, notes)
        overlays.append((f"{case_id}{role}", png))

    n_cases = {r.name: len(r.summary.get("metric_per_case", [])) for r in results}
    page_parts = (title, notes, verdict, table, units, n_cases, baseline, curves_png, overlays, out_dir)
    markdown = _render_markdown(*page_parts)
    page = _render_html(*page_parts)
    report_md = out_dir / "report.md"
    atomic_write_text(report_md, markdown)
    atomic_write_text(out_dir / "report.html", page)
    report_picture(out_dir / "report.png", title, _verdict_lines(verdict), curves_png, overlays)
    return report_md


# ----------------------------------------------------------------------------------------------- pictures


def example_cases(
    test_cases: list[tuple[str, Path, Path]], results: list[MethodResult], classes: list[str], count: int
) -> list[tuple[tuple[str, Path, Path], str]]:
    """``count`` test cases spread from best to worst by mean foreground Dice over the methods (best, median,
    worst for 3), each with a heading suffix saying which it is; the first ``count`` when none was scored."""
    count = max(count, 0)
    scores = [case_dice(r.summary, FOREGROUND_MEAN, classes) for r in results]
    ranked = []
    for case in test_cases:
        values = [s[case[0]] for s in scores if case[0] in s]
        if values:
            ranked.append((float(np.mean(values)), case))
    if not ranked or not count:
        return [(case, "") for case in test_cases[:count]]
    ranked.sort(key=lambda item: -item[0])
    picks = sorted({int(round(i)) for i in np.linspace(0, len(ranked) - 1, min(count, len(ranked)))})
    names = {picks[0]: "best", picks[-1]: "worst"}
    if len(picks) == 3:
        names[picks[1]] = "median"
    out = []
    for i in picks:
        dice, case = ranked[i]
        which = names.get(i, f"number {i + 1}") if len(picks) > 1 else "the only one"
        out.append((case, f": {which} of {len(ranked)} by mean foreground Dice over the methods ({dice:.3f})"))
    return out


def _case_overlay(
    case_id: str,
    image_path: Path,
    label_path: Path,
    results: list[MethodResult],
    class_names: dict[int, str],
    out_png: Path,
    notes: list[str],
) -> Path:
    from mnseg.data.io import load_nifti

    image = load_nifti(image_path)
    reference = load_nifti(label_path, dtype=None)
    if reference.shape != image.shape:
        raise InputFileError(
            f"{label_path}: shape {reference.shape} differs from its image {image.shape} ({image_path})"
        )
    labels, titles = [_as_labels(reference)], ["ground truth"]
    for result in results:
        pred_path = _prediction_path(result, case_id)
        if pred_path is None:
            labels.append(None)
            titles.append(f"{result.name} (no prediction)")
            notes.append(f"{result.name}: no prediction found for test case {case_id}.")
            continue
        prediction = load_nifti(pred_path, dtype=None)
        if prediction.shape != image.shape:
            raise InputFileError(
                f"{pred_path}: prediction shape {prediction.shape} differs from the test image {image.shape} "
                f"({image_path}); predictions must be in the original image geometry"
            )
        labels.append(_as_labels(prediction))
        titles.append(result.name)
    oriented_image = to_ras(image.data, image.affine)
    spacing = ras_spacing(image.affine)
    oriented = [None if lab is None else to_ras(lab, image.affine) for lab in labels]
    return overlay_figure(oriented_image, oriented, titles, class_names, out_png, spacing=spacing, errors_against=0)


def _prediction_path(result: MethodResult, case_id: str) -> Path | None:
    if result.pred_dir is None:
        return None
    for ending in (".nii.gz", ".nii"):
        candidate = Path(result.pred_dir) / f"{case_id}{ending}"
        if candidate.is_file():
            return candidate
    return None


def _as_labels(volume) -> np.ndarray:
    return np.rint(np.asarray(volume.data, dtype=np.float64)).astype(np.int32)


# ----------------------------------------------------------------------------------------------- tables


@dataclass
class _Row:
    class_name: str
    method: str
    cells: dict[str, tuple[float | None, float | None]]  # metric -> (mean, std)
    bold_dice: bool = False  # better than the other of a pair, by a difference the test supports
    comparison: Comparison | None = None  # against the baseline (None for the baseline itself)


def _reported_classes(class_names: dict[int, str], results: list[MethodResult]) -> list[str]:
    names = [
        name
        for k, name in sorted((int(k), v) for k, v in class_names.items())
        if k > 0 and name not in NOT_DRAWN
    ]
    if names:
        return names
    seen: list[str] = []
    for result in results:
        seen += [c for c in result.summary.get("mean", {}) if c not in seen]
    return seen


def case_dice(summary: dict, class_name: str, classes: list[str]) -> dict[str, float]:
    """Per test case: the class's Dice, or for the foreground mean the mean of its classes' defined Dice."""
    out = {}
    for case in summary.get("metric_per_case", []):
        metrics = case.get("metrics", {})
        names = classes if class_name == FOREGROUND_MEAN else [class_name]
        values = [_number(metrics.get(c, {}).get("dice")) for c in names]
        values = [v for v in values if v is not None and not math.isnan(v)]
        if values:
            out[str(case.get("case"))] = float(np.mean(values))
    return out


def compare_with_baseline(
    results: list[MethodResult], classes: list[str], baseline: str | None
) -> dict[tuple[str, str], Comparison]:
    """(class, method) -> paired comparison of per-case Dice with the baseline's, for every other method."""
    base = next((r for r in results if r.name == baseline), None)
    if base is None:
        return {}
    out = {}
    for class_name in [*classes, FOREGROUND_MEAN]:
        theirs = case_dice(base.summary, class_name, classes)
        for result in results:
            if result is not base:
                mine = case_dice(result.summary, class_name, classes)
                out[(class_name, result.name)] = compare(result.name, base.name, mine, theirs)
    return out


def _metrics_table(
    results: list[MethodResult], classes: list[str], comparisons: dict[tuple[str, str], Comparison]
) -> list[_Row]:
    rows = []
    for class_name in [*classes, FOREGROUND_MEAN]:
        group = [_Row(class_name, r.name, _cells(r.summary, class_name, classes), comparison=comparisons.get(
            (class_name, r.name))) for r in results]
        for row in group:
            c = row.comparison
            if c is not None and c.supported:  # bold the better of the pair; a tie bolds neither
                winner = c.method if c.mean_diff > 0 else c.baseline
                for other in group:
                    other.bold_dice = other.bold_dice or other.method == winner
        rows += group
    return rows


def _cells(
    summary: dict, class_name: str, classes: list[str]
) -> dict[str, tuple[float | None, float | None]]:
    if class_name != FOREGROUND_MEAN:
        means = summary.get("mean", {}).get(class_name, {})
        stds = summary.get("std", {}).get(class_name, {})
        return {m: (_number(means.get(m)), _number(stds.get(m))) for m, _, _ in METRICS}
    # Foreground mean: the summary's value; its spread is the std over cases of each case's class mean.
    fg_means = summary.get("foreground_mean", {})
    cells = {}
    for metric, _, _ in METRICS:
        per_case = []
        for case in summary.get("metric_per_case", []):
            values = [_number(case.get("metrics", {}).get(c, {}).get(metric)) for c in classes]
            values = [v for v in values if v is not None and not math.isnan(v)]
            if values:
                per_case.append(float(np.mean(values)))
        mean = _number(fg_means.get(metric))
        if mean is None and per_case:
            mean = float(np.mean(per_case))
        std = _number(summary.get("foreground_std", {}).get(metric))
        if std is None and per_case:
            std = float(np.std(per_case))
        cells[metric] = (mean, std)
    return cells


def format_mean_std(mean: float | None, std: float | None, decimals: int) -> str:
    """``0.912 ± 0.034``; ``n/a`` for missing/NaN, ``inf`` for infinite values; std left out if missing."""
    text = _format_number(mean, decimals)
    if text == "n/a" or std is None or math.isnan(std):
        return text
    return f"{text} ± {_format_number(std, decimals)}"


def _format_number(value: float | None, decimals: int, signed: bool = False) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:+.{decimals}f}" if signed else f"{value:.{decimals}f}"


def _header(units: str, baseline: str | None) -> list[str]:
    return ["Class", "Method"] + [
        f"{label} ({units})" if key in ("hd95", "asd") else label for key, label, _ in METRICS
    ] + [f"Δ Dice vs {baseline}", "p"]


def _row_texts(row: _Row) -> list[str]:
    texts = [format_mean_std(*row.cells[key], decimals) for key, _, decimals in METRICS]
    c = row.comparison
    if c is None:
        return [*texts, "(baseline)", ""]
    return [*texts, _format_number(c.mean_diff, 3, signed=True), _format_p(c.p_value)]


def _format_p(p: float) -> str:
    return "n/a" if p is None or math.isnan(p) else f"{p:.2g}"


def _legend(n_cases: dict[str, int], baseline: str | None) -> list[str]:
    """What the table's numbers, bold cells and n/a mean (markdown and HTML print the same)."""
    lines = [
        _cases_sentence(n_cases),
        f"Δ Dice: mean over test cases of the method's Dice minus {baseline}'s on the same case; p: two-sided "
        "paired Wilcoxon signed-rank test over those cases. Bold: the better Dice of a pair whose difference the "
        f"test supports (p < {SIGNIFICANCE:g}); without bold the methods are tied.",
        "n/a: HD95 and ASD are undefined when the prediction or the reference is empty in every case (cases where "
        "one is empty are left out of their means); p is n/a with fewer than 2 test cases scored by both, and "
        "1 when their Dice is the same on every case.",
    ]
    return lines


def _verdict_lines(verdict: list[str]) -> list[str]:
    return verdict or ["No verdict: there is no baseline to compare with (one method only)."]


def _render_markdown(title, notes, verdict, table, units, n_cases, baseline, curves_png, overlays, out_dir) -> str:
    lines = [f"# {title}", "", "## Verdict", ""]
    lines += [f"**{_md_escape(v)}**" for v in _verdict_lines(verdict)] + [""]
    lines += ["The verdict, the learning curves and an example case in one picture: [report.png](report.png)", ""]
    if notes:
        lines += [f"- {note}" for note in notes] + [""]
    lines += ["## Test metrics", ""]
    header = _header(units, baseline)
    lines += ["| " + " | ".join(_md_escape(h) for h in header) + " |", "|" + "---|" * len(header)]
    for row in table:
        texts = _row_texts(row)
        if row.bold_dice:
            texts[0] = f"**{texts[0]}**"
        lines.append("| " + " | ".join([_md_escape(row.class_name), _md_escape(row.method), *texts]) + " |")
    lines += [""] + [f"{line}  " for line in _legend(n_cases, baseline)]
    lines += ["", "## Learning curves", ""]
    if curves_png is not None:
        lines.append(f"![learning curves]({_relative(curves_png, out_dir)})")
    else:
        lines.append("No training history was given.")
    lines += ["", "## Example test cases", ""]
    if not overlays:
        lines.append("No test cases were given.")
    for case_id, png in overlays:
        lines += [
            f"### {_md_escape(case_id)}",
            "",
            f"![{_md_escape(case_id)}]({_relative(png, out_dir)})",
            "",
        ]
    return "\n".join(lines).rstrip() + "\n"


def _render_html(title, notes, verdict, table, units, n_cases, baseline, curves_png, overlays, out_dir) -> str:
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse}th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        "th:nth-child(-n+2),td:nth-child(-n+2){text-align:left}img{max-width:100%}"
        ".verdict{font-size:1.1em;font-weight:bold}.legend{font-size:0.9em;color:#444}</style>",
        "</head><body>",
        f"<h1>{e(title)}</h1>",
        "<h2>Verdict</h2>",
        *(f'<p class="verdict">{e(v)}</p>' for v in _verdict_lines(verdict)),
    ]
    if notes:
        parts.append("<ul>" + "".join(f"<li>{e(n)}</li>" for n in notes) + "</ul>")
    parts += ["<h2>Test metrics</h2>", "<table>"]
    parts.append("<tr>" + "".join(f"<th>{e(h)}</th>" for h in _header(units, baseline)) + "</tr>")
    for row in table:
        texts = [e(t) for t in _row_texts(row)]
        if row.bold_dice:
            texts[0] = f"<b>{texts[0]}</b>"
        cells = [e(row.class_name), e(row.method), *texts]
        parts.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    parts.append("</table>")
    parts += [f'<p class="legend">{e(line)}</p>' for line in _legend(n_cases, baseline)]
    parts.append("<h2>Learning curves</h2>")
    if curves_png is not None:
        parts.append(f'<img src="{_data_uri(curves_png)}" alt="learning curves">')
    else:
        parts.append("<p>No training history was given.</p>")
    parts.append("<h2>Example test cases</h2>")
    if not overlays:
        parts.append("<p>No test cases were given.</p>")
    for case_id, png in overlays:
        parts += [f"<h3>{e(case_id)}</h3>", f'<img src="{_data_uri(png)}" alt="{e(case_id)}">']
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _data_uri(png: Path) -> str:
    """The PNG inlined, so report.html is one self-contained file."""
    return "data:image/png;base64," + base64.b64encode(Path(png).read_bytes()).decode("ascii")


def _cases_sentence(n_cases: dict[str, int]) -> str:
    counts = sorted(set(n_cases.values()))
    if len(counts) == 1:
        return f"Mean ± std over {counts[0]} test cases."
    return "Mean ± std over test cases (" + ", ".join(f"{k}: {v}" for k, v in n_cases.items()) + ")."


# ----------------------------------------------------------------------------------------------- helpers


def _number(value) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name) or "case"


def _relative(path: Path, root: Path) -> str:
    return Path(path).relative_to(root).as_posix()


def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|")
