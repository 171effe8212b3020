"""Check a dataset folder (or a plain list of images) before any training starts.

Every problem is collected, not just the first, so one ``mnseg check`` run
tells the user everything to fix. Each file is loaded once; the statistics a
user wants to see before training (spacings, sizes, class frequencies,
intensities) are gathered in the same pass.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mnseg.data.dataset import ALL_GROUPS, LABEL_DIRS, TARGET_GROUP, Case, DatasetSpec, Problem, scan_group
from mnseg.data.io import NIFTI_ENDINGS, check_claimed_size, load_nifti
from mnseg.errors import DatasetError, InputFileError

__all__ = ["Problem", "ValidationReport", "validate_dataset", "validate_inputs"]

AFFINE_ATOL = 1e-3
PERCENTILES = (0.5, 5.0, 50.0, 95.0, 99.5)
_SAMPLES_PER_IMAGE = 20_000
_MAX_LISTED_VALUES = 20


@dataclass
class _Geometry:
    shape: tuple[int, ...]
    affine: np.ndarray


@dataclass
class _Loaded(_Geometry):
    data: np.ndarray


@dataclass
class ValidationReport:
    """Problems found plus the statistics ``mnseg check`` prints."""

    root: Path
    problems: list[Problem] = field(default_factory=list)
    spec: DatasetSpec | None = None
    case_counts: dict[str, int] = field(default_factory=dict)
    spacings: list[tuple[float, float, float]] = field(default_factory=list)
    shapes: list[tuple[int, int, int]] = field(default_factory=list)
    class_voxels: dict[str, int] = field(default_factory=dict)
    class_cases: dict[str, int] = field(default_factory=dict)
    intensity: dict[str, dict[str, float]] = field(default_factory=dict)
    voxels_checked: bool = True

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def add(self, path: str | os.PathLike, message: str, severity: str = "error") -> None:
        self.problems.append(Problem(Path(path), message, severity))

    def raise_if_invalid(self) -> None:
        """Raise ``DatasetError`` listing every error (one per line, each naming its file)."""
        if self.errors:
            lines = "\n".join(f"  {p.path}: {p.message}" for p in self.errors)
            raise DatasetError(f"{self.root}: {len(self.errors)} problem(s) found:\n{lines}")

    @property
    def spacing_stats(self) -> dict[str, list[float]]:
        return _min_median_max(self.spacings)

    @property
    def shape_stats(self) -> dict[str, list[float]]:
        return _min_median_max(self.shapes)

    @property
    def class_fractions(self) -> dict[str, float]:
        total = sum(self.class_voxels.values())
        return {k: (v / total if total else 0.0) for k, v in self.class_voxels.items()}

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "root": str(self.root),
            "ok": self.ok,
            "case_counts": self.case_counts,
            "spacing": self.spacing_stats,
            "shape": self.shape_stats,
            "class_voxels": self.class_voxels,
            "class_cases": self.class_cases,
            "intensity": self.intensity,
            "problems": [{"path": str(p.path), "message": p.message, "severity": p.severity}
                         for p in self.problems],
        }

    def to_text(self) -> str:
        """A readable report: counts, geometry, class frequencies, intensities, then problems."""
        lines = [f"Dataset: {self.root}"]
        if self.spec is not None:
            channels = ", ".join(f"{k}: {v}" for k, v in sorted(self.spec.channel_names.items()))
            labels = ", ".join(f"{v}: {k}" for k, v in sorted(self.spec.labels.items(), key=lambda kv: kv[1]))
            lines += [f"  name: {self.spec.name}", f"  channels: {channels}", f"  labels: {labels}",
                      f"  file ending: {self.spec.file_ending}"]
        if self.case_counts:
            lines.append("Cases: " + ", ".join(f"{g} {n}" for g, n in self.case_counts.items()))
        geometry = (("Spacing (mm)", self.spacing_stats, "{:.3g}"), ("Shape", self.shape_stats, "{:g}"))
        for title, stats, fmt in geometry:
            if stats:
                lines.append(f"{title}:")
                for key in ("min", "median", "max"):
                    lines.append(f"  {key:<7}" + " x ".join(fmt.format(v) for v in stats[key]))
        if self.class_voxels:
            n_labelled = self.case_counts.get("imagesTr", 0)
            lines.append("Classes over labelled training cases (voxel fraction, cases containing it):")
            for name, frac in self.class_fractions.items():
                cases = f"{self.class_cases.get(name, 0)}/{n_labelled}"
                lines.append(f"  {name:<16}{100 * frac:8.3f} %   {cases}")
        if self.intensity:
            lines.append("Intensity percentiles (" + ", ".join(f"p{p:g}" for p in PERCENTILES) + "):")
            for key, stats in self.intensity.items():
                lines.append(f"  {key:<32}" + "  ".join(f"{stats[f'p{p:g}']:.4g}" for p in PERCENTILES))
        if not self.voxels_checked:
            lines.append("(voxel checks skipped: headers and file names only)")
        if self.problems:
            lines.append(f"Problems: {len(self.errors)} error(s), {len(self.warnings)} warning(s)")
            lines += [f"  {p.severity.upper():<7} {p.path}: {p.message}" for p in self.errors + self.warnings]
        else:
            lines.append("No problems found.")
        return "\n".join(lines)


def _min_median_max(rows: list[tuple]) -> dict[str, list[float]]:
    if not rows:
        return {}
    arr = np.asarray(rows, dtype=np.float64)
    return {"min": arr.min(0).tolist(), "median": np.median(arr, 0).tolist(), "max": arr.max(0).tolist()}


# --------------------------------------------------------------------------------------------- dataset folder


def validate_dataset(
    root: str | os.PathLike, check_voxels: bool = True, progress: bool = False, require_training_labels: bool = True,
    groups: tuple[str, ...] = ALL_GROUPS, read_labels: bool = True, label_blind: tuple[str, ...] = (),
) -> ValidationReport:
    """Check a dataset folder's layout, dataset.json and (unless ``check_voxels=False``) every voxel.

    Without voxel checks only file names and NIfTI headers are read: shapes,
    dimensionality and affines are still compared, but truncated data, label
    values and NaN/Inf go unnoticed. ``require_training_labels=False`` accepts
    imagesTr cases without a label (training decides, per split, which must have one). ``groups``: the image
    folders whose files are opened (pretraining leaves imagesTs alone); ``read_labels=False`` opens no label file
    (pretraining reads images only). ``label_blind``: groups whose label folder is not even listed (training's
    view of ``imagesTarget``: ``labelsTarget`` is for scoring only). The target group is counted only when its
    folder exists (and ``labelsTarget`` beside it when that exists).
    """
    root = Path(root)
    report = ValidationReport(root=root, voxels_checked=check_voxels)
    if not root.is_dir():
        report.add(root, "dataset folder not found")
        return report
    try:
        spec = DatasetSpec.from_json(root / "dataset.json")
    except DatasetError as exc:
        for line in str(exc).splitlines():
            prefix = f"{root / 'dataset.json'}: "
            report.add(root / "dataset.json", line[len(prefix):] if line.startswith(prefix) else line)
        return report
    report.spec = spec

    found: dict[str, list[Case]] = {}
    for group in (g for g in ALL_GROUPS if g in groups):
        if group == TARGET_GROUP and not (root / group).is_dir():
            continue  # optional, and only for domain adaptation: not worth a "0" in every report
        blind = group in label_blind
        scan = scan_group(root, group, spec, require_labels=require_training_labels and read_labels,
                          with_labels=not blind)
        report.problems += scan.problems
        found[group] = scan.cases if read_labels else [Case(c.case_id, c.images) for c in scan.cases]
        report.case_counts[group] = len(scan.cases)
        if group == TARGET_GROUP and not blind and (root / LABEL_DIRS[group]).is_dir():
            report.case_counts[LABEL_DIRS[group]] = sum(c.label is not None for c in scan.cases)
        if group == "imagesTr":
            _check_training_folder(report, root, spec, scan.num_case_ids)

    checker = _CaseChecker(report, spec, check_voxels)
    todo = [(g, c) for g in found for c in found[g]]
    if progress:
        from mnseg.utils.progress import progress_bar

        todo = progress_bar(todo, desc="checking cases", unit="case")
    for group, case in todo:
        checker.check(case, count_classes=group == "imagesTr")
    checker.finish()
    return report


def _check_training_folder(
    report: ValidationReport, root: Path, spec: DatasetSpec, num_case_ids: int
) -> None:
    folder = root / "imagesTr"
    if not folder.is_dir():
        report.add(folder, "folder not found: labelled training images go here")
    elif num_case_ids == 0:
        report.add(folder, f"no training images (expected files like CASE_0000{spec.file_ending})")
    if spec.num_training is None:
        report.add(root / "dataset.json", f"numTraining missing (imagesTr holds {num_case_ids} case(s))",
                   "warning")
    elif spec.num_training != num_case_ids:
        report.add(root / "dataset.json", f"numTraining is {spec.num_training} but imagesTr holds "
                                          f"{num_case_ids} case(s)", "warning")


class _CaseChecker:
    """Loads each file of a case once, records problems and accumulates statistics."""

    def __init__(self, report: ValidationReport, spec: DatasetSpec, check_voxels: bool):
        self.report = report
        self.spec = spec
        self.check_voxels = check_voxels
        self.rng = np.random.default_rng(0)
        self.samples: dict[str, list[np.ndarray]] = {}
        self.values_by_name = {v: k for k, v in spec.labels.items()}
        self.voxels = np.zeros(len(spec.labels), dtype=np.int64)
        self.cases_with = np.zeros(len(spec.labels), dtype=np.int64)

    def check(self, case: Case, count_classes: bool) -> None:
        images = [self._load(p, image=True) for p in case.images]
        ref = images[0]
        if ref is not None:
            self.report.spacings.append(_spacing(ref.affine))
            self.report.shapes.append(tuple(int(s) for s in ref.shape))
            for path, other in zip(case.images[1:], images[1:]):
                if other is not None:
                    self._compare(path, other, case.images[0], ref, "channel")
        label = self._load(case.label, image=False) if case.label is not None else None
        if label is not None and ref is not None:
            self._compare(case.label, label, case.images[0], ref, "label")
        if not self.check_voxels:
            return
        fg = None
        if label is not None and isinstance(label, _Loaded):
            fg = self._check_label(case.label, label.data, count_classes)
        for channel, (path, img) in enumerate(zip(case.images, images)):
            if isinstance(img, _Loaded):
                img_fg = fg if fg is not None and fg.shape == img.shape else None
                self._check_image(path, img.data, channel, img_fg)

    def _load(self, path: Path, image: bool) -> _Geometry | None:
        try:
            if not self.check_voxels:
                return read_geometry(path)
            vol = load_nifti(path, dtype=np.float32 if image else None)
        except InputFileError as exc:
            self.report.add(path, _strip_path(str(exc), path))
            return None
        return _Loaded(vol.shape, vol.affine, vol.data)

    def _compare(self, path: Path, geom: _Geometry, ref_path: Path, ref: _Geometry, what: str) -> None:
        if tuple(geom.shape) != tuple(ref.shape):
            self.report.add(path, f"{what} shape {tuple(geom.shape)} differs from image {ref_path.name} "
                                  f"shape {tuple(ref.shape)}")
        elif not np.allclose(geom.affine, ref.affine, atol=AFFINE_ATOL, rtol=0):
            diff = float(np.abs(geom.affine - ref.affine).max())
            self.report.add(path, f"{what} affine (orientation/spacing/origin) differs from image "
                                  f"{ref_path.name} "
                                  f"by up to {diff:.4g} (tolerance {AFFINE_ATOL})")

    def _check_label(self, path: Path, data: np.ndarray, count_classes: bool) -> np.ndarray | None:
        if not np.issubdtype(data.dtype, np.integer):
            finite = np.isfinite(data)
            if not finite.all():
                self.report.add(path, f"label holds {int((~finite).sum())} NaN/Inf voxel(s)")
                return None
            fractional = data != np.round(data)
            if fractional.any():
                examples = np.unique(data[fractional])[:5].tolist()
                self.report.add(path, f"label holds non-integer values, e.g. {examples} "
                                      "(a label map must be integers; was it resampled with interpolation?)")
                return None
        k = len(self.spec.labels)
        # compared in the file's own dtype: casting first would wrap huge uint64 / float values into range
        unknown_mask = (data < 0) | (data >= k)
        if unknown_mask.any():
            unknown = np.unique(data[unknown_mask])
            unknown = unknown.astype(np.int64) if np.abs(unknown).max() < 2**62 else unknown
            shown = ", ".join(str(v) for v in unknown[:_MAX_LISTED_VALUES])
            extra = len(unknown) - _MAX_LISTED_VALUES
            more = f" and {extra} more" if extra > 0 else ""
            self.report.add(path, f"label values not declared in dataset.json: {shown}{more} "
                                  f"(declared: 0..{k - 1})")
            return None
        values = data.astype(np.int64, copy=False)
        counts = np.bincount(values.ravel(), minlength=k)
        if count_classes:
            self.voxels += counts
            self.cases_with += counts > 0
        ignore = self.spec.ignore_label
        return (values > 0) & (values != ignore) if ignore is not None else values > 0

    def _check_image(self, path: Path, data: np.ndarray, channel: int, fg: np.ndarray | None) -> None:
        finite = np.isfinite(data)
        if not finite.all():
            n_nan = int(np.isnan(data).sum())
            n_inf = int((~finite).sum()) - n_nan
            self.report.add(path, f"image holds {n_nan} NaN and {n_inf} Inf voxel(s)")
            return
        name = f"channel {channel} ({self.spec.channel_names[channel]})"
        self._sample(f"{name} all", data.ravel())
        if fg is not None and fg.any():
            self._sample(f"{name} foreground", data[fg])

    def _sample(self, key: str, values: np.ndarray) -> None:
        if values.size > _SAMPLES_PER_IMAGE:
            values = values[self.rng.integers(0, values.size, _SAMPLES_PER_IMAGE)]
        self.samples.setdefault(key, []).append(np.asarray(values, dtype=np.float64))

    def finish(self) -> None:
        if self.check_voxels and self.report.case_counts.get("imagesTr"):
            for value in range(len(self.spec.labels)):
                name = self.values_by_name[value]
                self.report.class_voxels[name] = int(self.voxels[value])
                self.report.class_cases[name] = int(self.cases_with[value])
        for key, chunks in sorted(self.samples.items()):
            allv = np.concatenate(chunks)
            pct = np.percentile(allv, PERCENTILES)
            stats = {f"p{p:g}": float(v) for p, v in zip(PERCENTILES, pct)}
            stats.update(mean=float(allv.mean()), std=float(allv.std()))
            self.report.intensity[key] = stats


def _spacing(affine: np.ndarray) -> tuple[float, float, float]:
    return tuple(float(v) for v in np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0)))


def _strip_path(message: str, path: Path) -> str:
    """``InputFileError`` messages start with the path, which the report already shows."""
    prefix = f"{path}: "
    return message[len(prefix):] if message.startswith(prefix) else message


def read_geometry(path: str | os.PathLike) -> _Geometry:
    """Shape and affine from a NIfTI header alone (no voxel data read), with ``load_nifti``'s checks."""
    import nibabel as nib

    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"{path}: file not found")
    try:
        img = nib.load(str(path))
        shape = tuple(int(s) for s in img.shape)
        affine = np.asarray(img.affine, dtype=np.float64)
        check_claimed_size(path, img)
    except InputFileError:
        raise
    except Exception as exc:  # nibabel raises many types for malformed headers
        raise InputFileError(f"{path}: cannot read NIfTI header ({type(exc).__name__}: {exc})") from None
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise InputFileError(f"{path}: expected a 3D volume, found {len(shape)}D with shape {shape}")
    if min(shape) < 1:
        raise InputFileError(f"{path}: empty volume with shape {shape}")
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputFileError(f"{path}: the affine (voxel-to-world matrix) is singular or not finite")
    return _Geometry(shape, affine)


# --------------------------------------------------------------------------------------------- plain inputs


def validate_inputs(paths: Iterable[str | os.PathLike], progress: bool = False) -> ValidationReport:
    """Check images to predict on: each readable, 3D and finite. Folders are expanded to their NIfTI files."""
    paths = [Path(p) for p in paths]
    files: list[Path] = []
    report = ValidationReport(root=paths[0] if len(paths) == 1 else Path("."))
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.iterdir()
                           if p.name.endswith(NIFTI_ENDINGS) and not p.name.startswith("."))
            if not found:
                report.add(path, "folder holds no .nii.gz or .nii files")
            files += found
        else:
            files.append(path)
    if not paths:
        report.add(Path("."), "no input images given")
    report.case_counts["inputs"] = len(files)
    iterator: Iterable[Path] = files
    if progress:
        from mnseg.utils.progress import progress_bar

        iterator = progress_bar(files, desc="checking inputs", unit="file")
    for path in iterator:
        if not path.name.endswith(NIFTI_ENDINGS):
            report.add(path, "not a NIfTI file (expected .nii.gz or .nii)")
            continue
        try:
            vol = load_nifti(path)
        except InputFileError as exc:
            report.add(path, _strip_path(str(exc), path))
            continue
        finite = np.isfinite(vol.data)
        if not finite.all():
            report.add(path, f"image holds {int((~finite).sum())} NaN/Inf voxel(s)")
        report.spacings.append(vol.spacing)
        report.shapes.append(tuple(int(s) for s in vol.shape))
    return report
