"""Preprocessing: RAS reorientation, resampling forth and back, normalisation, settings."""

from __future__ import annotations

import numpy as np
import pytest

from mnseg.data.io import save_nifti
from mnseg.data.preprocess import (
    Geometry,
    PreprocessSettings,
    preprocess_case,
    resolve_target_spacing,
    restore_labels,
    restore_probabilities,
)
from mnseg.errors import ConfigError, InputFileError

# An LPS-style affine with permuted axes: array axis 0 runs S->I, axis 1 R->L, axis 2 A->P (not RAS at all).
PERMUTED_LPS = np.array(
    [
        [0.0, -1.2, 0.0, 30.0],
        [0.0, 0.0, -0.9, 20.0],
        [-2.0, 0.0, 0.0, 50.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)


def _oblique(affine: np.ndarray, degrees: float = 12.0) -> np.ndarray:
    t = np.deg2rad(degrees)
    rot = np.eye(4)
    rot[:3, :3] = [[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]]
    return rot @ affine


def _ball(shape, centre, radius) -> np.ndarray:
    grid = np.indices(shape, dtype=np.float32)
    d2 = sum((grid[i] - centre[i]) ** 2 for i in range(3))
    return (d2 <= radius**2).astype(np.uint8)


def _dice(a, b) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return 2 * (a & b).sum() / (a.sum() + b.sum())


def _write_case(tmp_path, image, label, affine, name="c"):
    img = save_nifti(image.astype(np.float32), affine, tmp_path / f"{name}_0000.nii.gz")
    lab = None if label is None else save_nifti(label, affine, tmp_path / f"{name}.nii.gz", dtype=np.uint8)
    return img, lab


@pytest.mark.parametrize("affine", [np.diag([1.0, 1.0, 1.0, 1.0]), PERMUTED_LPS, _oblique(PERMUTED_LPS)])
def test_round_trip_without_resampling_is_exact(tmp_path, affine):
    rng = np.random.default_rng(0)
    shape = (9, 11, 13)
    label = rng.integers(0, 4, shape).astype(np.uint8)
    image = rng.normal(size=shape).astype(np.float32)
    img, lab = _write_case(tmp_path, image, label, affine)

    case = preprocess_case("c", [img], lab, PreprocessSettings(normalization="none"), "MRI", None)

    assert case.label.dtype == np.int16
    assert case.image.shape == (1, *case.geometry.resampled_shape)
    back = restore_labels(case.label, case.geometry)
    assert back.shape == shape
    np.testing.assert_array_equal(back, label)
    # The image went through bit-exact too (only a permutation and flips).
    restored = restore_probabilities(case.image, case.geometry)
    np.testing.assert_array_equal(restored[0], image)


def test_ras_orientation_keeps_world_coordinates(tmp_path):
    shape = (10, 12, 14)
    affine = _oblique(PERMUTED_LPS)
    image = np.zeros(shape, np.float32)
    bright = (2, 9, 5)
    image[bright] = 100.0
    img, _ = _write_case(tmp_path, image, None, affine)

    case = preprocess_case("c", [img], None, PreprocessSettings(normalization="none"), "MRI", None)
    g = case.geometry

    new_voxel = np.unravel_index(np.argmax(case.image[0]), case.image.shape[1:])
    world_before = affine @ np.array([*bright, 1.0])
    world_after = g.canonical_affine @ np.array([*new_voxel, 1.0])
    np.testing.assert_allclose(world_after, world_before, atol=1e-6)
    # RAS+: each array axis points (mostly) along +x, +y, +z respectively.
    direction = g.canonical_affine[:3, :3]
    assert np.all(np.argmax(np.abs(direction), axis=0) == [0, 1, 2])
    assert np.all(np.diag(direction) > 0)
    # Spacing follows its axis: the 2 mm S->I axis becomes the (third) inferior->superior axis.
    np.testing.assert_allclose(g.original_spacing, [2.0, 1.2, 0.9])
    np.testing.assert_allclose(g.canonical_spacing, [1.2, 0.9, 2.0])
    assert g.canonical_shape == (12, 14, 10)


def test_resampling_ball_round_trip(tmp_path):
    shape = (40, 37, 38)
    label = _ball(shape, (20.3, 18, 18.6), 12)
    img, lab = _write_case(tmp_path, label * 100.0, label, np.diag([1.0, 1.0, 1.0, 1.0]))
    target = (1.7, 1.7, 1.7)

    case = preprocess_case("c", [img], lab, PreprocessSettings(), "MRI", target)

    expected = tuple(int(round(s / 1.7)) for s in shape)
    assert case.geometry.resampled_shape == expected
    assert case.image.shape == (1, *expected) and case.label.shape == expected
    np.testing.assert_allclose(case.geometry.resampled_spacing, [s / e for s, e in zip(shape, expected)])
    back = restore_labels(case.label, case.geometry)
    assert back.shape == shape
    assert _dice(back, label) > 0.95
    nearest = restore_labels(case.label, case.geometry, method="nearest")
    assert nearest.shape == shape and set(np.unique(nearest)) == {0, 1}
    assert _dice(nearest, label) > 0.9


def test_resampling_keeps_world_position_of_centre(tmp_path):
    shape = (30, 30, 30)
    label = _ball(shape, (10, 18, 14), 5)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    img, lab = _write_case(tmp_path, label * 1.0, label, affine)

    case = preprocess_case("c", [img], lab, PreprocessSettings(), "MRI", (2.0, 1.5, 2.5))

    centre_before = affine @ np.array([*np.argwhere(label).mean(axis=0), 1.0])
    centre_after = case.geometry.resampled_affine @ np.array([*np.argwhere(case.label).mean(axis=0), 1.0])
    np.testing.assert_allclose(centre_after[:3], centre_before[:3], atol=0.5)


def test_restore_probabilities_shape_and_sum(tmp_path):
    shape = (20, 18, 16)
    affine = _oblique(PERMUTED_LPS, 5.0)
    img, _ = _write_case(tmp_path, np.random.default_rng(1).normal(size=shape), None, affine)
    case = preprocess_case("c", [img], None, PreprocessSettings(), "MRI", (1.5, 1.5, 1.5))
    assert case.geometry.resampled_shape != case.geometry.canonical_shape

    rng = np.random.default_rng(2)
    logits = rng.normal(size=(3, *case.geometry.resampled_shape))
    probs = np.exp(logits) / np.exp(logits).sum(axis=0, keepdims=True)
    out = restore_probabilities(probs, case.geometry)

    assert out.shape == (3, *shape) and out.dtype == np.float32
    np.testing.assert_allclose(out.sum(axis=0), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="shape"):
        restore_probabilities(probs[:, :-1], case.geometry)


def test_zscore_and_ct_window(tmp_path):
    rng = np.random.default_rng(3)
    mri = rng.normal(50.0, 7.0, (12, 12, 12))
    ct = rng.uniform(-1000, 1000, (12, 12, 12))
    img, _ = _write_case(tmp_path, mri, None, np.eye(4), name="m")
    ct_img, _ = _write_case(tmp_path, ct, None, np.eye(4), name="ct")

    z = preprocess_case("m", [img], None, PreprocessSettings(), "MRI", None).image[0]
    assert abs(z.mean()) < 1e-4 and abs(z.std() - 1.0) < 1e-4
    np.testing.assert_allclose(z, (mri - mri.mean()) / mri.std(), atol=1e-4)

    w = preprocess_case("ct", [ct_img], None, PreprocessSettings(), "CT", None).image[0]
    assert w.min() >= 0.0 and w.max() <= 1.0
    np.testing.assert_allclose(w, (np.clip(ct, -175, 250) + 175) / 425, atol=1e-6)

    custom = PreprocessSettings(normalization="ct", ct_window=(0.0, 100.0))
    w2 = preprocess_case("ct", [ct_img], None, custom, "MRI", None).image[0]
    np.testing.assert_allclose(w2, np.clip(ct, 0, 100) / 100, atol=1e-6)

    # CT data forced to z-score, and a constant channel, stay finite.
    as_z = PreprocessSettings(normalization="zscore")
    zct = preprocess_case("ct", [ct_img], None, as_z, "CT", None).image[0]
    assert abs(zct.std() - 1.0) < 1e-4
    flat, _ = _write_case(tmp_path, np.full((6, 6, 6), 3.0), None, np.eye(4), name="flat")
    assert np.all(preprocess_case("f", [flat], None, PreprocessSettings(), "MRI", None).image == 0)


def test_multichannel_per_channel_modality_and_clahe(tmp_path):
    rng = np.random.default_rng(4)
    a = rng.normal(10, 2, (16, 16, 16))
    b = rng.uniform(-500, 500, (16, 16, 16))
    pa = save_nifti(a.astype(np.float32), np.eye(4), tmp_path / "c_0000.nii.gz")
    pb = save_nifti(b.astype(np.float32), np.eye(4), tmp_path / "c_0001.nii.gz")

    case = preprocess_case("c", [pa, pb], None, PreprocessSettings(), ["MRI", "CT"], None)
    assert case.image.shape == (2, 16, 16, 16) and case.image.dtype == np.float32
    assert abs(case.image[0].std() - 1) < 1e-4
    assert case.image[1].min() >= 0 and case.image[1].max() <= 1

    eq = preprocess_case("c", [pa], None, PreprocessSettings(clahe=True, normalization="none"), "MRI", None)
    assert eq.image.min() >= 0 and eq.image.max() <= 1
    assert not np.allclose(eq.image[0], (a - a.min()) / (a.max() - a.min()), atol=1e-3)


def test_label_values_kept_including_ignore(tmp_path):
    label = np.zeros((20, 20, 20), np.uint8)
    label[5:15, 5:15, 5:15] = 1
    label[:, :, 18:] = 3  # e.g. an "ignore" label
    img, lab = _write_case(tmp_path, label * 1.0, label, PERMUTED_LPS)
    case = preprocess_case("c", [img], lab, PreprocessSettings(), "MRI", (1.5, 1.5, 1.5))
    assert set(np.unique(case.label)) == {0, 1, 3}


def test_median_target_spacing_in_ras_order(tmp_path):
    paths = []
    for i, sp in enumerate([(1.0, 1.0, 3.0), (1.0, 1.0, 5.0), (0.5, 0.5, 4.0)]):
        paths.append(save_nifti(np.zeros((4, 4, 4), np.uint8), np.diag([*sp, 1.0]), tmp_path / f"{i}.nii.gz"))
    permuted = np.diag([1.0, 1.0, 1.0, 1.0])[:, [2, 0, 1, 3]] * [4.0, 0.5, 0.5, 1.0]  # axis 0 is z at 4 mm
    paths.append(save_nifti(np.zeros((4, 4, 4), np.uint8), permuted, tmp_path / "p.nii.gz"))

    median = resolve_target_spacing(PreprocessSettings(target_spacing="median"), paths)
    assert median == pytest.approx((0.75, 0.75, 4.0))
    assert resolve_target_spacing(PreprocessSettings(), paths) is None
    assert resolve_target_spacing(PreprocessSettings(target_spacing=(1, 2, 3)), []) == (1.0, 2.0, 3.0)
    with pytest.raises(ConfigError):
        resolve_target_spacing(PreprocessSettings(target_spacing="median"), [])


def test_settings_validation_and_round_trip():
    s = PreprocessSettings(target_spacing=[1, 1, 2.5], normalization="ct", ct_window=[-100, 200], clahe=True)
    assert PreprocessSettings.from_dict(s.to_dict()) == s
    assert s.target_spacing == (1.0, 1.0, 2.5)
    for bad in [
        {"target_spacing": "mean"},
        {"target_spacing": (1, 0, 1)},
        {"target_spacing": (1, 1)},
        {"normalization": "minmax"},
        {"ct_window": (250, -175)},
    ]:
        with pytest.raises(ConfigError):
            PreprocessSettings(**bad)
    with pytest.raises(ConfigError, match="unknown"):
        PreprocessSettings.from_dict({"spacing": 1})


def test_geometry_json_round_trip(tmp_path):
    import json

    img, _ = _write_case(tmp_path, np.ones((8, 9, 10)), None, _oblique(PERMUTED_LPS))
    g = preprocess_case("c", [img], None, PreprocessSettings(), "MRI", (1.0, 1.0, 1.0)).geometry
    g2 = Geometry.from_dict(json.loads(json.dumps(g.to_dict())))
    for name in ("original_affine", "canonical_affine", "ornt", "resampled_affine"):
        np.testing.assert_array_equal(getattr(g2, name), getattr(g, name))
    assert g2.resampled_shape == g.resampled_shape and g2.original_shape == g.original_shape


def test_bad_inputs_name_the_file(tmp_path):
    img, _ = _write_case(tmp_path, np.ones((8, 8, 8)), None, np.eye(4))
    wrong_shape = save_nifti(np.zeros((8, 8, 7), np.uint8), np.eye(4), tmp_path / "s.nii.gz")
    with pytest.raises(InputFileError, match="s.nii.gz.*shape"):
        preprocess_case("c", [img], wrong_shape, PreprocessSettings(), "MRI", None)
    shifted = np.eye(4)
    shifted[:3, 3] = 5.0
    moved = save_nifti(np.zeros((8, 8, 8), np.uint8), shifted, tmp_path / "m.nii.gz")
    with pytest.raises(InputFileError, match="m.nii.gz.*affine"):
        preprocess_case("c", [img], moved, PreprocessSettings(), "MRI", None)
    frac = save_nifti(np.full((8, 8, 8), 0.5, np.float32), np.eye(4), tmp_path / "f.nii.gz")
    with pytest.raises(InputFileError, match="f.nii.gz.*integer"):
        preprocess_case("c", [img], frac, PreprocessSettings(), "MRI", None)
    with pytest.raises(InputFileError, match="missing.nii.gz"):
        preprocess_case("c", [tmp_path / "missing.nii.gz"], None, PreprocessSettings(), "MRI", None)
