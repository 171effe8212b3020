"""Importers: turn public dataset layouts into an mnseg dataset folder.

Two sources are supported: a Medical Segmentation Decathlon task folder (here), and the
h5 files plus list files that UA-MT, MC-Net and SSL4MIS use for LA and Pancreas-CT
(``convert_h5.py``). Each importer first plans every case (so a missing file is reported
before anything is written), then writes the NIfTI files and finally
``dataset.json``; a folder without ``dataset.json`` is therefore an unfinished
conversion. Inputs are only ever read.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mnseg.data.io import NIFTI_ENDINGS, save_nifti, strip_nifti_ending
from mnseg.errors import ConfigError, DatasetError, InputFileError, MnsegError
from mnseg.utils.atomic import atomic_path, atomic_write_json

FILE_ENDING = ".nii.gz"
# The folders an importer writes; with overwrite=True stale NIfTI files in them are removed.
WRITTEN_SUBFOLDERS = ("imagesTr", "labelsTr", "imagesTs", "labelsTs")


@dataclass
class _Case:
    """One case to write: source file(s) and where it goes (``subset`` is "Tr" or "Ts")."""

    name: str
    subset: str
    image: Path
    label: Path | None


# --------------------------------------------------------------------------- shared helpers


def safe_label_name(name: str) -> str:
    """Lower case, spaces (and other non-word characters) to underscores: 'Left Atrium' -> 'left_atrium'."""
    safe = re.sub(r"[^0-9a-z_]+", "_", str(name).strip().lower()).strip("_")
    return re.sub(r"_+", "_", safe)


def check_labels(labels: dict[str, int], where: str) -> dict[str, int]:
    """Validate a name -> int map (background 0, unique non-negative ints); return it sorted by value."""
    if not isinstance(labels, dict) or not labels:
        raise ConfigError(f"{where}: labels must be a non-empty mapping name -> integer")
    clean: dict[str, int] = {}
    for name, value in labels.items():
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"{where}: label name {name!r} is empty")
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ConfigError(f"{where}: label {name!r} has value {value!r}; values must be integers >= 0")
        clean[name] = int(value)
    if clean.get("background") != 0:
        raise ConfigError(f"{where}: labels must map 'background' to 0 (got {labels})")
    values = list(clean.values())
    if len(set(values)) != len(values):
        raise ConfigError(f"{where}: two label names share one value ({labels})")
    return dict(sorted(clean.items(), key=lambda kv: kv[1]))


def _check_label_values(label: np.ndarray, allowed: set[int], path: Path) -> np.ndarray:
    """Return the label's integer values, raising if any is fractional or undeclared."""
    if not (np.issubdtype(label.dtype, np.integer) or np.issubdtype(label.dtype, np.floating)
            or label.dtype == np.bool_):
        raise InputFileError(f"{path}: label array has non-numeric type {label.dtype}")
    values = np.unique(label)
    if np.issubdtype(values.dtype, np.floating):
        bad = [float(v) for v in values if not (np.isfinite(v) and v == np.round(v))][:5]
        if bad:
            raise InputFileError(f"{path}: label values must be integers, found {bad}")
    found = {int(v) for v in values}
    unknown = sorted(found - allowed)
    if unknown:
        raise InputFileError(
            f"{path}: label values {unknown} are not among the declared labels {sorted(allowed)}"
        )
    return values


def _label_dtype(max_value: int) -> type:
    return np.uint8 if max_value <= 255 else np.int16 if max_value <= 32767 else np.int32


def _check_output(out_dir: str | os.PathLike, source: Path, overwrite: bool) -> Path:
    """Refuse an output that overlaps the input, is a file, or is non-empty without ``overwrite``."""
    out = Path(out_dir).expanduser().resolve()
    src = source.resolve()
    if out == src or src in out.parents:
        raise MnsegError(f"{out}: the output folder is inside the input folder {src}; choose one outside it")
    if out in src.parents:
        raise MnsegError(f"{out}: the output folder contains the input folder {src}; choose another one")
    if out.exists() and not out.is_dir():
        raise MnsegError(f"{out}: output path exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise MnsegError(
            f"{out}: output folder exists and is not empty; "
            "pass --overwrite (overwrite=True) to replace its dataset"
        )
    return out


def _start_output(out: Path) -> None:
    """Create the folder and drop an old dataset.json, so an interrupted run is visibly unfinished."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "dataset.json").unlink(missing_ok=True)


def _remove_stale(out: Path, written: set[Path]) -> list[Path]:
    """Delete NIfTI files of an earlier conversion that this one did not write (only with overwrite)."""
    removed = []
    for sub in WRITTEN_SUBFOLDERS:
        folder = out / sub
        if not folder.is_dir():
            continue
        for f in sorted(folder.iterdir()):
            if f.is_file() and f.name.endswith(NIFTI_ENDINGS) and f not in written:
                f.unlink()
                removed.append(f)
    return removed


def _copy_as_nii_gz(src: Path, dst: Path) -> None:
    """Copy a NIfTI file byte for byte (gzip-compressing a plain .nii), atomically."""
    with atomic_path(dst) as tmp:
        if src.name.endswith(".gz"):
            shutil.copyfile(src, tmp)
        else:
            with open(src, "rb") as fi, gzip.open(tmp, "wb", compresslevel=6) as fo:
                shutil.copyfileobj(fi, fo)


def _load_nib(path: Path):
    """Open a NIfTI file with nibabel and read its array once (so corruption is caught here)."""
    import nibabel as nib

    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # nibabel and gzip raise many types for broken files
        raise InputFileError(f"{path}: cannot read as NIfTI ({type(exc).__name__}: {exc})") from None
    return img, data


def _paths_summary(paths: Sequence[Path], limit: int = 10) -> str:
    shown = "\n  ".join(str(p) for p in paths[:limit])
    more = f"\n  ... and {len(paths) - limit} more" if len(paths) > limit else ""
    return f"\n  {shown}{more}"


# --------------------------------------------------------------------------- Medical Segmentation Decathlon


def convert_msd(task_dir: str | os.PathLike, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Convert a Decathlon task folder (e.g. Task02_Heart) into an mnseg dataset folder; return it.

    3D files are copied byte for byte; 4D multi-modal images (last axis =
    modality) are split into ``CASE_0000``, ``CASE_0001``, ... with the same affine.
    """
    task = Path(task_dir).expanduser()
    if not task.is_dir():
        raise InputFileError(f"{task}: Decathlon task folder not found")
    out = _check_output(out_dir, task, overwrite)
    meta = _read_msd_json(task / "dataset.json")
    where = str(task / "dataset.json")
    channels = _msd_channels(meta.get("modality"), where)
    labels = _msd_labels(meta.get("labels"), where)
    cases = _plan_msd_cases(task, meta, where)

    _start_output(out)
    written: set[Path] = set()
    allowed = set(labels.values())
    for case in cases:
        shape = _write_msd_image(case, out, len(channels), written)
        if case.label is not None:
            _write_msd_label(case, out, shape, allowed, written)
    removed = _remove_stale(out, written) if overwrite else []

    kept = ("name", "description", "reference", "licence", "release")
    _write_dataset_json(
        out, {key: meta[key] for key in kept if key in meta}, channels, labels, cases, removed,
        {
            "format": "msd",
            "source": str(task.resolve()),
            "original_labels": meta.get("labels"),
            "original_modality": meta.get("modality"),
        },
    )
    return out


def _write_dataset_json(
    out: Path, head: dict, channels: dict[str, str], labels: dict[str, int], cases: Sequence[_Case],
    removed: Sequence[Path], converted_from: dict,
) -> None:
    """Write dataset.json last (it marks the folder finished): ``head``, the channels, labels and counts,
    and where the data came from (``converted_from`` plus the test count and the stale files removed)."""
    atomic_write_json(out / "dataset.json", {
        **head,
        "channel_names": channels,
        "labels": labels,
        "numTraining": sum(c.subset == "Tr" for c in cases),
        "file_ending": FILE_ENDING,
        "converted_from": {
            **converted_from,
            "numTest": sum(c.subset == "Ts" for c in cases),
            "stale_files_removed": len(removed),
        },
    })


def _read_msd_json(path: Path) -> dict:
    if not path.is_file():
        raise InputFileError(
            f"{path}: not found; a Decathlon task folder holds dataset.json, imagesTr/ and labelsTr/"
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputFileError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise InputFileError(f"{path}: expected a JSON object at the top level")
    return meta


def _msd_channels(modality: object, where: str) -> dict[str, str]:
    if not isinstance(modality, dict) or not modality:
        raise DatasetError(f"{where}: 'modality' must be a mapping like {{\"0\": \"MRI\"}}")
    try:
        by_number = {int(k): str(v) for k, v in modality.items()}
    except ValueError:
        raise DatasetError(
            f"{where}: 'modality' keys must be channel numbers, got {list(modality)}"
        ) from None
    if sorted(by_number) != list(range(len(modality))):
        raise DatasetError(f"{where}: 'modality' keys must be 0, 1, ... without gaps, got {list(modality)}")
    return {str(k): by_number[k] for k in sorted(by_number)}


def _msd_labels(labels: object, where: str) -> dict[str, int]:
    """MSD stores {"0": "background", "1": "left atrium"}; we store {"background": 0, "left_atrium": 1}."""
    if not isinstance(labels, dict) or not labels:
        raise DatasetError(f"{where}: 'labels' must be a mapping like {{'0': 'background', '1': 'tumour'}}")
    converted: dict[str, int] = {}
    for key, name in labels.items():
        try:
            value = int(key)
        except (TypeError, ValueError):
            raise DatasetError(f"{where}: label key {key!r} is not an integer") from None
        safe = "background" if value == 0 else safe_label_name(name)
        if not safe:
            raise DatasetError(f"{where}: label {key} has no usable name ({name!r})")
        if safe in converted:
            raise DatasetError(f"{where}: label names {name!r} and another become the same name {safe!r}")
        converted[safe] = value
    if 0 not in converted.values():
        raise DatasetError(f"{where}: 'labels' has no entry for 0 (background)")
    return check_labels(converted, where)


def _is_junk(name: str) -> bool:
    """macOS resource-fork files (``._la_003.nii.gz``) ship in the Decathlon tarballs."""
    return name.startswith("._")


def _case_name(path: Path, where: str) -> str:
    if not path.name.endswith(NIFTI_ENDINGS):
        raise DatasetError(f"{where}: {path.name} is not a .nii.gz or .nii file")
    return strip_nifti_ending(path.name)


def _plan_msd_cases(task: Path, meta: dict, where: str) -> list[_Case]:
    training = meta.get("training")
    if not isinstance(training, list) or not training:
        raise DatasetError(f"{where}: 'training' must be a non-empty list of {{'image': ..., 'label': ...}}")
    cases: list[_Case] = []
    for i, entry in enumerate(training):
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str) \
                or not isinstance(entry.get("label"), str):
            raise DatasetError(
                f"{where}: training entry {i} must have 'image' and 'label' paths, got {entry!r}"
            )
        image, label = task / entry["image"], task / entry["label"]
        if _is_junk(image.name):
            continue
        cases.append(_Case(_case_name(image, where), "Tr", image, label))
    test = meta.get("test")
    if test is None:  # not listed: take the folder's NIfTI files
        folder = task / "imagesTs"
        files = sorted(folder.iterdir()) if folder.is_dir() else []
        test = [f"imagesTs/{f.name}" for f in files
                if f.name.endswith(NIFTI_ENDINGS) and not _is_junk(f.name)]
    if not isinstance(test, list):
        raise DatasetError(f"{where}: 'test' must be a list of image paths")
    for i, entry in enumerate(test):
        path = entry.get("image") if isinstance(entry, dict) else entry
        if not isinstance(path, str):
            raise DatasetError(f"{where}: test entry {i} must be an image path, got {entry!r}")
        image = task / path
        if not _is_junk(image.name):
            cases.append(_Case(_case_name(image, where), "Ts", image, None))

    seen: dict[tuple[str, str], Path] = {}
    for c in cases:
        if (c.subset, c.name) in seen:
            first = seen[(c.subset, c.name)]
            raise DatasetError(f"{where}: case {c.name!r} is listed twice ({first}, {c.image})")
        seen[(c.subset, c.name)] = c.image
    missing = [p for c in cases for p in (c.image, c.label) if p is not None and not p.is_file()]
    if missing:
        raise InputFileError(
            f"{where}: {len(missing)} file(s) listed there do not exist:{_paths_summary(missing)}"
        )
    return cases


def _write_msd_image(case: _Case, out: Path, n_channels: int, written: set[Path]) -> tuple[int, ...]:
    """Write one case's channels; return its spatial shape."""
    img, data = _load_nib(case.image)
    if data.ndim == 3:
        found = 1
    elif data.ndim == 4:
        found = data.shape[3]
    else:
        raise InputFileError(
            f"{case.image}: expected a 3D or 4D (channels last) image, found shape {data.shape}"
        )
    if found != n_channels:
        raise InputFileError(
            f"{case.image}: has {found} channel(s) but dataset.json 'modality' lists {n_channels}"
        )
    folder = out / f"images{case.subset}"
    if data.ndim == 3:
        dst = folder / f"{case.name}_0000{FILE_ENDING}"
        _copy_as_nii_gz(case.image, dst)
        written.add(dst)
    else:
        for c in range(found):
            dst = folder / f"{case.name}_{c:04d}{FILE_ENDING}"
            save_nifti(data[..., c], img.affine, dst, header=img.header, dtype=data.dtype)
            written.add(dst)
    return tuple(data.shape[:3])


def _write_msd_label(
    case: _Case, out: Path, shape: tuple[int, ...], allowed: set[int], written: set[Path]
) -> None:
    img, data = _load_nib(case.label)
    squeezed = data[..., 0] if data.ndim == 4 and data.shape[3] == 1 else data
    if squeezed.shape != shape:
        raise InputFileError(
            f"{case.label}: label shape {data.shape} differs from its image's {shape} ({case.image})"
        )
    values = _check_label_values(squeezed, allowed, case.label)
    dst = out / f"labels{case.subset}" / f"{case.name}{FILE_ENDING}"
    if squeezed is data:
        _copy_as_nii_gz(case.label, dst)
    else:
        dtype = _label_dtype(int(values.max()))
        save_nifti(np.round(squeezed).astype(dtype), img.affine, dst, dtype=dtype)
    written.add(dst)
