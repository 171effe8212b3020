"""NIfTI reading and writing with errors that name the file and the problem.

Arrays are returned in the file's own voxel order (no reorientation here;
that is preprocessing's job), together with the affine and spacing needed to
write a result back into the same grid.
"""

from __future__ import annotations

import gzip
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mnseg.errors import InputFileError
from mnseg.utils.atomic import atomic_path

NIFTI_ENDINGS = (".nii.gz", ".nii")
MAX_VOXELS = 2**31
# deflate cannot compress better than about 1032:1, so a .gz file of n bytes holds at most ~1032 n bytes of data
_GZIP_MAX_RATIO = 1100


@dataclass
class Volume:
    """A 3D array with the geometry it came with."""

    data: np.ndarray
    affine: np.ndarray
    path: Path | None = None
    header: object | None = None

    @property
    def spacing(self) -> tuple[float, float, float]:
        return voxel_spacing(self.affine)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)


def voxel_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size along each array axis, from the affine's column norms."""
    return tuple(float(v) for v in np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0)))


def load_nifti(path: str | os.PathLike, *, dtype: np.dtype | None = np.float32) -> Volume:
    """Read a 3D NIfTI file, raising ``InputFileError`` for anything unreadable.

    A trailing singleton 4th dimension is dropped (common in exported files);
    any other 4D volume is refused, since every scan must be one 3D channel.
    """
    import nibabel as nib

    path = Path(path)
    if not path.exists():
        raise InputFileError(f"{path}: file not found")
    if not path.is_file():
        raise InputFileError(f"{path}: not a regular file")
    try:
        img = nib.load(str(path))
        check_claimed_size(path, img)
        data = np.asanyarray(img.dataobj)
    except InputFileError:
        raise
    except (EOFError, OSError, zlib.error, gzip.BadGzipFile, ValueError, TypeError, MemoryError) as exc:
        raise InputFileError(
            f"{path}: cannot read as NIfTI ({_short(exc)}); the file may be truncated or corrupt"
        ) from None
    except Exception as exc:  # nibabel raises many types for malformed headers
        raise InputFileError(f"{path}: cannot read as NIfTI ({type(exc).__name__}: {_short(exc)})") from None
    if data.dtype.fields is not None or data.dtype.kind not in "biuf":
        raise InputFileError(
            f"{path}: voxel type {data.dtype} is not one real number per voxel (RGB or complex data); "
            f"convert it to a grey-scale volume first"
        )
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputFileError(f"{path}: expected a 3D volume, found {data.ndim}D with shape {tuple(data.shape)}")
    if min(data.shape) < 1:
        raise InputFileError(f"{path}: empty volume with shape {tuple(data.shape)}")
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)):
        raise InputFileError(f"{path}: the affine (voxel-to-world matrix) contains NaN or Inf")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputFileError(f"{path}: the affine is singular (zero voxel size or collapsed axes)")
    if dtype is not None:
        with np.errstate(over="ignore", invalid="ignore"):  # out-of-range values become Inf, reported by validation
            data = np.asarray(data, dtype=dtype)
    return Volume(data=data, affine=affine, path=path, header=img.header)


def check_claimed_size(path: Path, img) -> None:
    """Refuse headers whose shape could not fit in the file (or in memory) before any voxel is allocated.

    A corrupt ``dim`` field otherwise makes nibabel try to allocate terabytes or
    decompress for minutes before failing.
    """
    shape = tuple(int(s) for s in img.shape)
    nvox = int(np.prod(shape, dtype=object)) if shape else 0
    if nvox > MAX_VOXELS:
        raise InputFileError(
            f"{path}: cannot read as NIfTI: header claims shape {shape} = {nvox:,} voxels, more than the "
            f"{MAX_VOXELS:,} mnseg reads; the header is corrupt or the volume must be cropped or downsampled first"
        )
    need = nvox * np.dtype(img.get_data_dtype()).itemsize
    size = path.stat().st_size
    name = path.name.lower()
    if name.endswith(".nii"):
        need += int(float(img.header.get("vox_offset", 0)))
        limit = size
    elif name.endswith(".gz"):
        limit = size * _GZIP_MAX_RATIO + 2**20
    else:
        return
    if need > limit:
        raise InputFileError(
            f"{path}: cannot read as NIfTI: header claims shape {shape} of {img.get_data_dtype()} "
            f"({need:,} bytes) but the file holds only {size:,} bytes; it is truncated or its header is corrupt"
        )


def save_nifti(
    data: np.ndarray,
    affine: np.ndarray,
    path: str | os.PathLike,
    *,
    header: object | None = None,
    dtype: np.dtype | None = None,
) -> Path:
    """Write a 3D (or 4D, channels last) array atomically as NIfTI."""
    import nibabel as nib

    path = Path(path)
    if not str(path).endswith(NIFTI_ENDINGS):
        raise InputFileError(f"{path}: output must end with .nii.gz or .nii")
    arr = np.asarray(data)
    if dtype is not None:
        arr = arr.astype(dtype, copy=False)
    elif arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    elif arr.dtype == np.float64:
        arr = arr.astype(np.float32)
    hdr = header.copy() if header is not None else None
    try:
        img = nib.Nifti1Image(arr, np.asarray(affine, dtype=np.float64), header=hdr)
        img.set_data_dtype(arr.dtype)
        img.set_qform(np.asarray(affine), code=1)
        img.set_sform(np.asarray(affine), code=1)
        with atomic_path(path) as tmp:
            nib.save(img, str(tmp))
    except (nib.spatialimages.HeaderDataError, ValueError, TypeError) as exc:
        raise InputFileError(f"{path}: cannot write NIfTI ({_short(exc)})") from None
    return path


def strip_nifti_ending(name: str) -> str:
    for end in NIFTI_ENDINGS:
        if name.endswith(end):
            return name[: -len(end)]
    return name


def _short(exc: BaseException, limit: int = 200) -> str:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return msg if len(msg) <= limit else msg[:limit] + "..."
