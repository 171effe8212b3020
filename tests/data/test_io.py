import gzip

import numpy as np
import pytest

from mnseg.data.io import load_nifti, save_nifti
from mnseg.errors import InputFileError


def test_round_trip_keeps_data_and_affine(tmp_path):
    affine = np.array([[0, 0, 2.0, 5], [0, -1.5, 0, 3], [0.8, 0, 0, -1], [0, 0, 0, 1]])
    data = np.random.default_rng(0).normal(size=(5, 6, 7)).astype(np.float32)
    path = save_nifti(data, affine, tmp_path / "a.nii.gz")
    vol = load_nifti(path)
    np.testing.assert_array_equal(vol.data, data)
    np.testing.assert_allclose(vol.affine, affine)
    assert vol.spacing == pytest.approx((0.8, 1.5, 2.0))


def test_truncated_file_gives_clear_error(tmp_path):
    path = save_nifti(np.ones((8, 8, 8), np.float32), np.eye(4), tmp_path / "t.nii.gz")
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(InputFileError, match="t.nii.gz"):
        load_nifti(path)


def test_garbage_and_4d_refused(tmp_path):
    bad = tmp_path / "g.nii.gz"
    bad.write_bytes(gzip.compress(b"not a nifti at all" * 10))
    with pytest.raises(InputFileError, match="cannot read"):
        load_nifti(bad)
    p4 = save_nifti(np.ones((4, 4, 4, 2), np.float32), np.eye(4), tmp_path / "f.nii.gz")
    with pytest.raises(InputFileError, match="expected a 3D volume"):
        load_nifti(p4)


def test_save_is_atomic_on_failure(tmp_path):
    target = save_nifti(np.ones((4, 4, 4), np.float32), np.eye(4), tmp_path / "keep.nii.gz")
    before = target.read_bytes()
    with pytest.raises(InputFileError, match="cannot write"):
        save_nifti(np.ones((4, 4, 4), dtype=object), np.eye(4), target)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.nii.gz"]


def test_outputs_get_ordinary_permissions(tmp_path):
    import os
    import stat

    path = save_nifti(np.ones((4, 4, 4), np.float32), np.eye(4), tmp_path / "p.nii.gz")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask
