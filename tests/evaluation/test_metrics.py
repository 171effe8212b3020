"""Metrics against medpy 0.5.2 (the oracle), crop-equals-full-volume, empty-mask conventions, aggregation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from medpy.metric import binary as medpy_binary
from scipy.ndimage import binary_erosion, distance_transform_edt, generate_binary_structure

from mnseg.evaluation import metrics

SETTINGS = settings(max_examples=60, deadline=None)


@st.composite
def masks(draw, shape):
    """A union of 1-3 boxes and balls (sometimes none); centres may sit on or past the volume edge."""
    mask = np.zeros(shape, dtype=bool)
    if draw(st.integers(0, 9)) == 9:
        return mask
    grid = np.indices(shape)
    for _ in range(draw(st.integers(1, 3))):
        centre = [draw(st.integers(-1, s)) for s in shape]
        if draw(st.booleans()):
            half = [draw(st.integers(0, max(1, s // 2))) for s in shape]
            inside = np.ones(shape, dtype=bool)
            for axis in range(3):
                inside &= np.abs(grid[axis] - centre[axis]) <= half[axis]
        else:
            radius = draw(st.floats(0.5, max(shape) / 2))
            inside = sum((grid[axis] - centre[axis]) ** 2 for axis in range(3)) <= radius**2
        mask |= inside
    return mask


@st.composite
def mask_pairs(draw):
    shape = tuple(draw(st.integers(2, 20)) for _ in range(3))
    spacing = draw(st.one_of(st.none(), st.tuples(*[st.floats(0.2, 5.0) for _ in range(3)])))
    return draw(masks(shape)), draw(masks(shape)), spacing


def _medpy_values(pred, ref, spacing):
    return {
        "dice": medpy_binary.dc(pred, ref),
        "jaccard": medpy_binary.jc(pred, ref),
        "hd": medpy_binary.hd(pred, ref, voxelspacing=spacing),
        "hd95": medpy_binary.hd95(pred, ref, voxelspacing=spacing),
        "asd": medpy_binary.asd(pred, ref, voxelspacing=spacing),
        "assd": medpy_binary.assd(pred, ref, voxelspacing=spacing),
    }


@SETTINGS
@given(mask_pairs())
def test_metrics_match_medpy_or_documented_empty_convention(pair):
    pred, ref = pair[0], pair[1]
    spacing = pair[2]
    ours = metrics.binary_metrics(pred, ref, spacing)
    assert set(ours) == set(metrics.METRICS)
    if pred.any() and ref.any():
        expected = _medpy_values(pred, ref, spacing)
        for name, value in expected.items():
            assert ours[name] == pytest.approx(value, rel=1e-12, abs=1e-9), name
        # the single-metric helpers give the same numbers as the combined call
        assert metrics.hd95(pred, ref, spacing) == ours["hd95"]
        assert metrics.asd(pred, ref, spacing) == ours["asd"]
        assert metrics.dice(pred, ref) == ours["dice"]
    elif not pred.any() and not ref.any():
        assert ours == {"dice": 1.0, "jaccard": 1.0, "hd": 0.0, "hd95": 0.0, "asd": 0.0, "assd": 0.0}
    else:
        assert ours["dice"] == 0.0 and ours["jaccard"] == 0.0
        assert all(math.isnan(ours[name]) for name in metrics.DISTANCE_METRICS)
        # dice/jaccard still agree with medpy, which defines them for one empty mask
        assert ours["dice"] == medpy_binary.dc(pred, ref)
        assert ours["jaccard"] == medpy_binary.jc(pred, ref)


def _full_volume_distances(pred, ref, spacing):
    """The reference definition, on the whole volume (what the crop must reproduce)."""
    cross = generate_binary_structure(3, 1)
    pred_border = pred ^ binary_erosion(pred, structure=cross)
    ref_border = ref ^ binary_erosion(ref, structure=cross)
    pred_to_ref = distance_transform_edt(~ref_border, sampling=spacing)[pred_border]
    ref_to_pred = distance_transform_edt(~pred_border, sampling=spacing)[ref_border]
    return pred_border, ref_border, pred_to_ref, ref_to_pred


@SETTINGS
@given(mask_pairs())
def test_padded_bounding_box_gives_full_volume_borders_and_distances(pair):
    pred, ref, spacing = pair
    if not (pred.any() and ref.any()):
        return
    pred_border, ref_border, full_p2r, full_r2p = _full_volume_distances(pred, ref, spacing)
    box = metrics._bounding_box(pred | ref)
    # the borders found in the padded crop are exactly the full-volume borders inside the box ...
    np.testing.assert_array_equal(metrics._border(np.pad(pred[box], 1))[1:-1, 1:-1, 1:-1], pred_border[box])
    np.testing.assert_array_equal(metrics._border(np.pad(ref[box], 1))[1:-1, 1:-1, 1:-1], ref_border[box])
    # ... and no border voxel lies outside the box
    assert pred_border.sum() == pred_border[box].sum() and ref_border.sum() == ref_border[box].sum()
    # the distances are identical, in the same (C) order
    crop_p2r, crop_r2p = metrics.surface_distances(pred, ref, spacing)
    np.testing.assert_array_equal(crop_p2r, full_p2r)
    np.testing.assert_array_equal(crop_r2p, full_r2p)


def test_mask_touching_every_face_matches_medpy():
    # a full block: the volume edge is the only surface; the zero padding must act as the outside
    pred = np.ones((6, 7, 5), dtype=bool)
    ref = np.zeros_like(pred)
    ref[1:5, 2:6, 0:3] = True
    spacing = (0.7, 1.3, 2.5)
    ours = metrics.surface_metrics(pred, ref, spacing)
    assert ours["hd95"] == pytest.approx(medpy_binary.hd95(pred, ref, voxelspacing=spacing), abs=1e-12)
    assert ours["asd"] == pytest.approx(medpy_binary.asd(pred, ref, voxelspacing=spacing), abs=1e-12)
    assert ours["assd"] == pytest.approx(medpy_binary.assd(pred, ref, voxelspacing=spacing), abs=1e-12)


def test_asd_is_directed_and_assd_symmetric():
    pred = np.zeros((16, 16, 16), dtype=bool)
    ref = np.zeros_like(pred)
    pred[4:12, 4:12, 4:12] = True
    ref[4:12, 4:12, 4:7] = True  # pred's far faces are far from ref's surface, not vice versa
    assert metrics.asd(pred, ref) != pytest.approx(metrics.asd(ref, pred))
    assert metrics.assd(pred, ref) == pytest.approx(metrics.assd(ref, pred))
    assert metrics.hd(pred, ref) == metrics.hd(ref, pred)


def test_spacing_scales_distances_and_bad_spacing_refused():
    pred = np.zeros((12, 12, 12), dtype=bool)
    ref = np.zeros_like(pred)
    pred[2:6, 2:6, 2:6] = True
    ref[5:10, 5:10, 5:10] = True
    voxel = metrics.surface_metrics(pred, ref)
    mm = metrics.surface_metrics(pred, ref, (2.0, 2.0, 2.0))
    for name in metrics.DISTANCE_METRICS:
        assert mm[name] == pytest.approx(2.0 * voxel[name])
    with pytest.raises(ValueError, match="spacing"):
        metrics.surface_metrics(pred, ref, (1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="shape"):
        metrics.dice(pred, ref[:-1])


def test_evaluate_case_multiclass_with_ignore_label():
    rng = np.random.default_rng(3)
    ref = rng.integers(0, 3, size=(14, 15, 16))
    pred = rng.integers(0, 3, size=ref.shape)
    ref[:, :, :5] = 3  # unannotated slab
    pred[:, :, :5] = 1  # whatever the model says there must not count
    labels = {"background": 0, "liver": 1, "tumour": 2, "ignore": 3}
    result = metrics.evaluate_case(pred, ref, labels, spacing=(1.0, 2.0, 0.5))
    assert list(result) == ["liver", "tumour"]
    annotated = ref != 3
    for name, value in (("liver", 1), ("tumour", 2)):
        pred_mask, ref_mask = (pred == value) & annotated, (ref == value) & annotated
        expected = metrics.binary_metrics(pred_mask, ref_mask, (1.0, 2.0, 0.5))
        assert result[name] == expected
    # without the ignore label the unannotated slab would be scored as liver false positives
    unignored = metrics.evaluate_case(pred, ref, {"background": 0, "liver": 1, "tumour": 2})
    assert unignored["liver"]["dice"] < result["liver"]["dice"]


def test_evaluate_case_absent_class_and_missed_class():
    ref = np.zeros((10, 10, 10), dtype=np.uint8)
    ref[2:5, 2:5, 2:5] = 1
    pred = np.zeros_like(ref)
    result = metrics.evaluate_case(pred, ref, {"background": 0, "a": 1, "b": 2})
    assert result["b"] == metrics.both_empty_metrics()
    assert result["a"]["dice"] == 0.0 and math.isnan(result["a"]["hd95"])


def test_summarize_is_nan_aware_and_counts_undefined():
    per_case = [
        {"case": f"c{i}", "prediction_file": f"p{i}", "reference_file": f"r{i}",
         "metrics": {"a": {"dice": d, "jaccard": d / 2, "hd": h, "hd95": h, "asd": h, "assd": h},
                     "b": {"dice": 1.0, "jaccard": 1.0, "hd": 0.0, "hd95": 0.0, "asd": 0.0, "assd": 0.0}}}
        for i, (d, h) in enumerate([(0.8, 2.0), (0.6, 4.0), (0.0, math.nan)])
    ]
    summary = metrics.summarize(per_case, units="mm")
    assert summary["units"] == "mm" and "empty" in summary["conventions"]
    assert summary["mean"]["a"]["dice"] == pytest.approx(np.mean([0.8, 0.6, 0.0]))
    assert summary["mean"]["a"]["hd95"] == pytest.approx(3.0)
    assert summary["std"]["a"]["hd95"] == pytest.approx(1.0)
    assert summary["n_undefined"]["a"] == {"dice": 0, "jaccard": 0, "hd": 1, "hd95": 1, "asd": 1, "assd": 1}
    assert summary["foreground_mean"]["hd95"] == pytest.approx((3.0 + 0.0) / 2)
    assert summary["metric_per_case"][2]["metrics"]["a"]["hd95"] is None  # JSON null, not NaN
    assert [c["case"] for c in summary["metric_per_case"]] == ["c0", "c1", "c2"]


def test_summarize_all_undefined_gives_none():
    per_case = [{"case": "x", "metrics": {"a": {m: math.nan for m in metrics.METRICS}}}]
    summary = metrics.summarize(per_case)
    assert summary["mean"]["a"]["hd95"] is None and summary["foreground_mean"]["hd95"] is None
