"""Importer of the h5 files plus list files that UA-MT, MC-Net and SSL4MIS use for LA and Pancreas-CT.

As the Decathlon importer (``data/convert.py``, whose helpers it shares): every case is planned first (so a missing
file is reported before anything is written), then the NIfTI files are written, ``dataset.json`` last.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

import numpy as np

from mnseg.data.convert import (
    FILE_ENDING,
    _Case,
    _check_label_values,
    _check_output,
    _label_dtype,
    _paths_summary,
    _remove_stale,
    _start_output,
    _write_dataset_json,
    check_labels,
)
from mnseg.data.geometry import check_spacing
from mnseg.data.io import save_nifti
from mnseg.errors import ConfigError, DatasetError, InputFileError

DEFAULT_H5_LABELS = {"background": 0, "foreground": 1}



def read_case_list(path: str | os.PathLike) -> list[tuple[int, str]]:
    """Read a list file: one case per line; returns (line number, entry), skipping blanks and '#' comments."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputFileError(f"{path}: list file not found")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise InputFileError(f"{path}: not a text file ({exc})") from None
    entries = [(i, line.strip()) for i, line in enumerate(lines, start=1)]
    return [(i, e) for i, e in entries if e and not e.startswith("#")]


def h5_candidates(h5_dir: Path, entry: str) -> tuple[str, list[Path]]:
    """Case name and the paths tried, in order, for one list entry.

    Layouts: ``NAME/mri_norm2.h5`` (LA), ``NAME`` (a file), ``NAME.h5``,
    ``NAME_norm.h5`` (Pancreas). Entries may carry a path prefix or ``.h5``.
    """
    raw = entry.replace("\\", "/")
    p = PurePosixPath(raw)
    tried = [Path(raw) if p.is_absolute() else h5_dir / raw]
    if p.name == "mri_norm2.h5":
        p = p.parent
    key = p.name[:-3] if p.name.endswith(".h5") else p.name
    prefix = str(p.parent)
    bases = [h5_dir]
    if prefix not in ("", ".", "/"):
        bases.insert(0, Path(prefix) if p.is_absolute() else h5_dir / prefix)
    for base in bases:
        tried += [base / key / "mri_norm2.h5", base / key, base / f"{key}.h5", base / f"{key}_norm.h5"]
    case = key[: -len("_norm")] if key.endswith("_norm") and len(key) > len("_norm") else key
    return case, list(dict.fromkeys(tried))


def _plan_h5_list(h5_dir: Path, source: str | os.PathLike | Sequence[str], subset: str) -> list[_Case]:
    if isinstance(source, (str, os.PathLike)):
        entries, origin = read_case_list(source), str(source)
    else:
        entries, origin = list(enumerate((str(s).strip() for s in source), start=1)), f"{subset} case list"
    cases = []
    for line, entry in entries:
        case, tried = h5_candidates(h5_dir, entry)
        found = next((t for t in tried if t.is_file()), None)
        if not case or found is None:
            raise InputFileError(
                f"{origin} line {line}: {entry!r} resolves to no h5 file under {h5_dir}; "
                f"tried:{_paths_summary(tried)}"
            )
        cases.append(_Case(case, subset, found, found))
    return cases


def _plan_h5(h5_dir: Path, train_list, test_list) -> list[_Case]:
    cases = _plan_h5_list(h5_dir, train_list, "Tr")
    if not cases:
        raise InputFileError(f"{train_list}: the training list is empty")
    if test_list is not None:
        cases += _plan_h5_list(h5_dir, test_list, "Ts")
    by_name: dict[str, _Case] = {}
    for c in cases:
        if c.name in by_name:
            other = by_name[c.name]
            both = other.subset != c.subset
            kind = "in both the training and the test list" if both else "twice in one list"
            raise DatasetError(f"case {c.name!r} appears {kind} ({other.image}, {c.image})")
        by_name[c.name] = c
    return cases


def _read_h5_case(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in ("image", "label") if k not in f]
            if missing:
                raise InputFileError(
                    f"{path}: no dataset {' or '.join(repr(m) for m in missing)} (found: {sorted(f.keys())})"
                )
            image, label = f["image"][()], f["label"][()]
    except InputFileError:
        raise
    except Exception as exc:  # h5py raises OSError and others for broken files
        raise InputFileError(f"{path}: cannot read as HDF5 ({type(exc).__name__}: {exc})") from None
    for key, arr in (("image", image), ("label", label)):
        if np.ndim(arr) != 3:
            raise InputFileError(f"{path}: '{key}' must be 3D, found shape {np.shape(arr)}")
    if image.shape != label.shape:
        raise InputFileError(f"{path}: 'image' shape {image.shape} differs from 'label' shape {label.shape}")
    if not np.issubdtype(image.dtype, np.number):
        raise InputFileError(f"{path}: 'image' has non-numeric type {image.dtype}")
    return image, label


def convert_h5(
    h5_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    train_list: str | os.PathLike | Sequence[str],
    test_list: str | os.PathLike | Sequence[str] | None = None,
    *,
    spacing: Sequence[float],
    labels: dict[str, int] | None = None,
    modality: str = "MRI",
    overwrite: bool = False,
) -> Path:
    """Convert UA-MT/MC-Net/SSL4MIS h5 files (datasets ``image``, ``label``) into a dataset folder; return it.

    ``train_list``/``test_list`` are list files (or lists of names). h5 stores no
    geometry, so the affine is ``diag(spacing)`` with spacing per array axis.
    Images are written as float32, labels as the smallest integer type that fits.
    """
    h5_dir = Path(h5_dir).expanduser()
    if not h5_dir.is_dir():
        raise InputFileError(f"{h5_dir}: h5 folder not found")
    spacing = check_spacing(spacing)
    labels = check_labels(dict(DEFAULT_H5_LABELS if labels is None else labels), "labels")
    if not isinstance(modality, str) or not modality.strip():
        raise ConfigError(f"modality must be a non-empty name such as MRI or CT, got {modality!r}")
    out = _check_output(out_dir, h5_dir, overwrite)
    cases = _plan_h5(h5_dir, train_list, test_list)

    _start_output(out)
    affine = np.diag([*spacing, 1.0])
    allowed = set(labels.values())
    label_dtype = _label_dtype(max(allowed))
    written: set[Path] = set()
    for case in cases:
        image, label = _read_h5_case(case.image)
        _check_label_values(label, allowed, case.image)
        image_dst = out / f"images{case.subset}" / f"{case.name}_0000{FILE_ENDING}"
        label_dst = out / f"labels{case.subset}" / f"{case.name}{FILE_ENDING}"
        save_nifti(image, affine, image_dst, dtype=np.float32)
        save_nifti(np.round(label).astype(label_dtype), affine, label_dst, dtype=label_dtype)
        written.update((image_dst, label_dst))
    removed = _remove_stale(out, written) if overwrite else []

    def _list_record(src):
        if src is None or isinstance(src, (str, os.PathLike)):
            return None if src is None else str(Path(src).expanduser().resolve())
        return [str(s) for s in src]

    _write_dataset_json(
        out, {"name": h5_dir.name}, {"0": modality}, labels, cases, removed,
        {
            "format": "h5",
            "source": str(h5_dir.resolve()),
            "train_list": _list_record(train_list),
            "test_list": _list_record(test_list),
            "spacing": list(spacing),
            "modality": modality,
            "cases": {c.name: str(c.image.resolve()) for c in cases},
        },
    )
    return out
