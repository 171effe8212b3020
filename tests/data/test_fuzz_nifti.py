"""Fuzzing the NIfTI reading and validation path: whatever the bytes, the answer is a correct read or a
clear ``InputFileError`` / ``DatasetError`` naming the file, quickly, never a hang or a deep traceback."""

from __future__ import annotations

import gzip
import os
import struct
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mnseg.data.io import MAX_VOXELS, Volume, load_nifti
from mnseg.data.validate import read_geometry, validate_dataset
from mnseg.errors import InputFileError

# MNSEG_FUZZ_EXAMPLES=5000 for a deeper run than CI's
EXAMPLES = int(os.environ.get("MNSEG_FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=EXAMPLES, deadline=3000, suppress_health_check=[HealthCheck.function_scoped_fixture])

# NIfTI-1 header fields worth breaking: (byte offset, struct format, values to try)
INT16 = st.integers(-(2**15), 2**15 - 1)
ABSURD_FLOATS = st.floats(allow_nan=True, allow_infinity=True, width=32) | st.sampled_from([0.0, -1.0, 1e-30, 3e38])
FIELDS = {
    "sizeof_hdr": (0, "<i", st.integers(-(2**31), 2**31 - 1)),
    "dim": (40, "<8h", st.tuples(st.integers(-1, 9), *[INT16 | st.integers(0, 4)] * 7)),
    "datatype": (70, "<h", st.sampled_from([0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 768, 1024, 1792, 2304, 7])),
    "bitpix": (72, "<h", INT16),
    "pixdim": (76, "<8f", st.tuples(*[ABSURD_FLOATS] * 8)),
    "vox_offset": (108, "<f", ABSURD_FLOATS),
    "scl": (112, "<2f", st.tuples(ABSURD_FLOATS, ABSURD_FLOATS)),
    "qform_sform_codes": (252, "<2h", st.tuples(st.integers(-1, 5), st.integers(-1, 5))),
    "quatern": (256, "<6f", st.tuples(*[ABSURD_FLOATS] * 6)),
    "srow": (280, "<12f", st.tuples(*[ABSURD_FLOATS] * 12)),
    "magic": (344, "4s", st.sampled_from([b"n+1\0", b"ni1\0", b"n+2\0", b"\0\0\0\0", b"xxxx"])),
}


def valid_nifti_bytes(shape=(4, 5, 6), dtype=np.int16) -> bytes:
    data = np.arange(np.prod(shape)).reshape(shape).astype(dtype)
    return nib.Nifti1Image(data, np.diag([1.0, 1.5, 2.0, 1.0])).to_bytes()


def field_edit():
    return st.sampled_from(sorted(FIELDS)).flatmap(
        lambda name: st.tuples(st.just(name), FIELDS[name][2])
    )


def apply_edits(raw: bytes, edits) -> bytes:
    buf = bytearray(raw)
    for name, value in edits:
        offset, fmt, _ = FIELDS[name]
        values = value if isinstance(value, tuple) else (value,)
        struct.pack_into(fmt, buf, offset, *values)
    return bytes(buf)


def assert_clear_outcome(path: Path, read) -> None:
    """The contract: a sane 3D volume, or InputFileError whose message starts with the file name."""
    start = time.perf_counter()
    try:
        vol = read(path)
    except InputFileError as exc:
        assert str(exc).startswith(f"{path}: "), str(exc)
        assert "Traceback" not in str(exc) and len(str(exc)) < 600
    else:
        shape = vol.shape if isinstance(vol, Volume) else tuple(vol.shape)
        assert len(shape) == 3 and min(shape) >= 1 and int(np.prod(shape)) <= MAX_VOXELS
        assert np.all(np.isfinite(vol.affine)) and abs(np.linalg.det(vol.affine[:3, :3])) > 0
        if isinstance(vol, Volume):
            assert vol.data.shape == shape and vol.data.dtype == np.float32
    assert time.perf_counter() - start < 3


def write(tmp_path: Path, raw: bytes, compressed: bool) -> Path:
    path = tmp_path / ("img.nii.gz" if compressed else "img.nii")
    path.write_bytes(gzip.compress(raw, compresslevel=1) if compressed else raw)
    return path


@FUZZ
@given(edits=st.lists(field_edit(), min_size=1, max_size=4), compressed=st.booleans())
def test_corrupt_header_fields(tmp_path, edits, compressed):
    path = write(tmp_path, apply_edits(valid_nifti_bytes(), edits), compressed)
    assert_clear_outcome(path, load_nifti)
    assert_clear_outcome(path, read_geometry)


@FUZZ
@given(keep=st.integers(0, 348 + 4 + 4 * 5 * 6 * 2), compressed=st.booleans(), compress_then_cut=st.booleans())
def test_truncated_files(tmp_path, keep, compressed, compress_then_cut):
    raw = valid_nifti_bytes()
    if compressed and compress_then_cut:
        gz = gzip.compress(raw)
        path = tmp_path / "img.nii.gz"
        path.write_bytes(gz[: keep * len(gz) // len(raw)])
    else:
        path = write(tmp_path, raw[:keep], compressed)
    assert_clear_outcome(path, load_nifti)
    assert_clear_outcome(path, read_geometry)


@FUZZ
@given(flips=st.lists(st.tuples(st.integers(0, 351), st.integers(0, 255)), min_size=1, max_size=12),
       compressed=st.booleans())
def test_random_bytes_in_the_header(tmp_path, flips, compressed):
    buf = bytearray(valid_nifti_bytes())
    for pos, byte in flips:
        buf[pos] = byte
    path = write(tmp_path, bytes(buf), compressed)
    assert_clear_outcome(path, load_nifti)


@FUZZ
@given(blob=st.binary(max_size=2000), ending=st.sampled_from([".nii", ".nii.gz"]))
def test_arbitrary_bytes(tmp_path, blob, ending):
    path = tmp_path / f"img{ending}"
    path.write_bytes(blob)
    assert_clear_outcome(path, load_nifti)


@pytest.mark.parametrize("compressed", [False, True])
@pytest.mark.parametrize("dims", [(1000, 1000, 1000), (2**15 - 1,) * 3, (30000, 30000, 1)])
def test_absurd_dimensions_are_refused_without_allocating(tmp_path, dims, compressed):
    raw = apply_edits(valid_nifti_bytes(), [("dim", (3, *dims, 1, 1, 1, 1))])
    path = write(tmp_path, raw, compressed)
    start = time.perf_counter()
    with pytest.raises(InputFileError, match=r"header claims shape .*(more than|holds only)"):
        load_nifti(path)
    assert time.perf_counter() - start < 1


@pytest.mark.parametrize("first_column", [(np.nan, 0, 0), (0, 0, 0), (np.inf, 0, 0), (0, 1.5, 0)])
def test_nan_zero_infinite_and_collapsed_axes_are_refused(tmp_path, first_column):
    """sform columns: NaN, zero or infinite voxel size, or x parallel to y."""
    srow = np.diag([1.0, 1.5, 2.0])
    srow[:, 0] = first_column
    rows = tuple(float(v) for v in np.hstack([srow, np.zeros((3, 1))]).ravel())
    raw = apply_edits(valid_nifti_bytes(), [("qform_sform_codes", (0, 1)), ("srow", rows)])
    with pytest.raises(InputFileError, match="affine"):
        load_nifti(write(tmp_path, raw, compressed=True))


@pytest.mark.parametrize("dtype", [np.complex64, np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")])])
def test_rgb_and_complex_voxels_are_refused(tmp_path, dtype):
    path = tmp_path / "img.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), dtype=dtype), np.eye(4)), str(path))
    for want in (np.float32, None):
        with pytest.raises(InputFileError, match="not one real number per voxel"):
            load_nifti(path, dtype=want)


def test_a_valid_file_still_reads_exactly(tmp_path):
    path = write(tmp_path, valid_nifti_bytes(), compressed=True)
    vol = load_nifti(path, dtype=None)
    np.testing.assert_array_equal(vol.data, np.arange(120).reshape(4, 5, 6))
    assert vol.spacing == (1.0, 1.5, 2.0)


# --------------------------------------------------------------------------------------------- validation


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    from mnseg.data.toy import make_toy_dataset

    return make_toy_dataset(tmp_path_factory.mktemp("fuzz") / "Dataset009_Fuzz", n_train=1, n_unlabeled=0, n_test=0,
                            shape=(8, 8, 8))


LABEL_DTYPES = st.sampled_from([np.uint8, np.int16, np.int32, np.uint32, np.int64, np.uint64, np.float32,
                                np.float64])


@settings(max_examples=max(EXAMPLES * 2 // 3, 1), deadline=3000)
@given(dtype=LABEL_DTYPES, value=st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=True, allow_infinity=True),
       where=st.integers(0, 511))
def test_validation_reports_any_label_value(small_dataset, dtype, value, where):
    """Huge, negative, fractional or NaN label values are reported against the label file, never crash."""
    label_path = next((small_dataset / "labelsTr").iterdir())
    original = label_path.read_bytes()
    ref = nib.load(str(label_path))
    data = np.zeros((8, 8, 8), dtype=dtype)
    info = np.finfo(dtype) if np.issubdtype(dtype, np.floating) else np.iinfo(dtype)
    if isinstance(value, float) and not np.isfinite(value) and not np.issubdtype(dtype, np.floating):
        value = 0
    value = value if np.isnan(value) or np.isinf(value) else min(max(value, info.min), info.max)
    data.flat[where] = dtype(value) if not np.issubdtype(dtype, np.integer) else dtype(int(value))
    nib.save(nib.Nifti1Image(data, ref.affine, dtype=dtype), str(label_path))
    try:
        report = validate_dataset(small_dataset)
    finally:
        label_path.write_bytes(original)
    stored = np.asanyarray(nib.load(str(label_path)).dataobj)  # restored
    assert stored.shape == (8, 8, 8)
    bad = not (np.isfinite(float(data.flat[where])) and float(data.flat[where]) in (0.0, 1.0))
    label_errors = [p for p in report.errors if p.path == label_path]
    assert bool(label_errors) == bad, (value, dtype, [p.message for p in report.problems])


@FUZZ
@given(edits=st.lists(field_edit(), min_size=1, max_size=3), check_voxels=st.booleans())
def test_validation_survives_a_corrupt_image_header(small_dataset, edits, check_voxels):
    image_path = next((small_dataset / "imagesTr").iterdir())
    original = image_path.read_bytes()
    try:
        raw = gzip.decompress(original)
        image_path.write_bytes(gzip.compress(apply_edits(raw, edits), compresslevel=1))
        report = validate_dataset(small_dataset, check_voxels=check_voxels)
    finally:
        image_path.write_bytes(original)
    for problem in report.errors:
        assert problem.path.exists() or problem.path.parent.exists()
        assert "Traceback" not in problem.message
