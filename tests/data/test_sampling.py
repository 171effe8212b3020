"""Patch sampling: foreground coordinates, window placement, cropping with padding."""

from __future__ import annotations

import numpy as np
import pytest

from mnseg.data.sampling import Window, extract, foreground_coords, sample_window


def two_class_label(shape=(32, 32, 32)) -> np.ndarray:
    """A large class 1 block in one corner and a single class 2 voxel in the opposite corner."""
    label = np.zeros(shape, dtype=np.int64)
    label[:12, :12, :12] = 1
    label[28, 28, 28] = 2
    return label


def test_foreground_coords_lists_each_class_and_skips_ignore():
    label = two_class_label()
    label[20:22, 0, 0] = 3  # ignore label
    coords = foreground_coords(label, ignore_index=3)
    assert sorted(coords) == [1, 2]
    assert coords[1].shape == (12**3, 3)
    assert coords[2].tolist() == [[28, 28, 28]]
    for cls, xyz in coords.items():
        assert (label[tuple(xyz.T)] == cls).all()


def test_foreground_coords_subsamples_large_classes():
    label = two_class_label()
    coords = foreground_coords(label, max_per_class=100, rng=np.random.default_rng(5))
    assert coords[1].shape == (100, 3)
    assert len(np.unique(coords[1], axis=0)) == 100
    assert (label[tuple(coords[1].T)] == 1).all()
    assert coords[2].shape == (1, 3)


def test_foreground_coords_of_empty_label_is_empty():
    assert foreground_coords(np.zeros((4, 4, 4), dtype=np.uint8)) == {}


def test_window_is_inside_a_larger_volume():
    shape, patch = (32, 20, 40), (16, 16, 16)
    coords = foreground_coords(_label_for(shape))
    rng = np.random.default_rng(0)
    for _ in range(300):
        window = sample_window(shape, patch, rng, fg_coords=coords, fg_prob=0.5)
        assert window.size == patch
        assert all(s >= 0 for s in window.start)
        assert all(e <= d for e, d in zip(window.stop, shape))


def _label_for(shape) -> np.ndarray:
    label = np.zeros(shape, dtype=np.int64)
    label[0, 0, 0] = 1
    label[-1, -1, -1] = 2
    return label


def test_fg_prob_one_always_contains_foreground():
    label = np.zeros((32, 32, 32), dtype=np.int64)
    label[1:3, 29:31, 5:7] = 1  # small blob near the border
    coords = foreground_coords(label)
    rng = np.random.default_rng(1)
    for _ in range(200):
        window = sample_window(label.shape, (8, 8, 8), rng, fg_coords=coords, fg_prob=1.0)
        assert extract(label, window).any()


def test_fg_prob_zero_is_uniform_and_ignores_foreground():
    label = two_class_label()
    coords = foreground_coords(label)
    rng = np.random.default_rng(2)
    hits = sum(
        extract(label, sample_window(label.shape, (4, 4, 4), rng, fg_coords=coords, fg_prob=0.0)).max() == 2
        for _ in range(300)
    )
    assert hits < 15  # a 4^3 window rarely reaches a single voxel by chance


def _rare_class_rate(class_balanced: bool) -> float:
    label = two_class_label()
    coords = foreground_coords(label)
    rng = np.random.default_rng(3)
    draws = 400
    hits = 0
    for _ in range(draws):
        window = sample_window(
            label.shape, (4, 4, 4), rng, fg_coords=coords, fg_prob=1.0, class_balanced=class_balanced
        )
        hits += int((extract(label, window) == 2).any())
    return hits / draws


def test_class_balanced_sampling_sees_rare_class_as_often_as_common():
    assert 0.4 < _rare_class_rate(class_balanced=True) < 0.6
    assert _rare_class_rate(class_balanced=False) < 0.05


def test_padding_when_volume_is_smaller_than_patch():
    volume = np.arange(3 * 4 * 5, dtype=np.float32).reshape(3, 4, 5) + 1
    rng = np.random.default_rng(4)
    for _ in range(50):
        window = sample_window(volume.shape, (6, 6, 6), rng)
        patch = extract(volume, window, pad_value=-1)
        assert patch.shape == (6, 6, 6)
        assert (patch == -1).sum() == 6**3 - volume.size  # the whole volume is inside the window
        assert patch[patch != -1].sum() == volume.sum()


def test_extract_pads_with_per_channel_values_and_copies():
    image = np.stack([np.full((4, 4, 4), 10.0), np.full((4, 4, 4), 20.0)]).astype(np.float32)
    window = Window(start=(-2, 1, 2), size=(4, 4, 4))
    patch = extract(image, window, pad_value=np.array([-1.0, -2.0]))
    assert patch.shape == (2, 4, 4, 4)
    assert (patch[0, :2] == -1).all() and (patch[1, :2] == -2).all()  # before the volume along x
    assert (patch[0, 2:, :3, :2] == 10).all() and (patch[1, 2:, :3, :2] == 20).all()  # inside
    assert (patch[:, :, 3] < 0).all() and (patch[:, :, :, 2:] < 0).all()  # beyond y and z
    patch[:] = 0
    assert (image > 0).all()  # the source is never modified through the patch


def test_extract_inside_equals_slicing():
    volume = np.random.default_rng(0).random((10, 11, 12))
    window = Window(start=(2, 3, 4), size=(5, 6, 7))
    np.testing.assert_array_equal(extract(volume, window), volume[2:7, 3:9, 4:11])


def test_extract_window_fully_outside_is_all_padding():
    patch = extract(np.ones((4, 4, 4), dtype=np.uint8), Window(start=(10, 0, 0), size=(2, 2, 2)), pad_value=7)
    assert (patch == 7).all() and patch.dtype == np.uint8


def test_sampling_is_deterministic_for_a_seeded_rng():
    label = two_class_label()
    coords = foreground_coords(label)

    def draw(seed):
        rng = np.random.default_rng(seed)
        return [sample_window(label.shape, (8, 8, 8), rng, fg_coords=coords) for _ in range(20)]

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)


def test_mismatched_patch_size_is_rejected():
    with pytest.raises(ValueError, match="patch_size"):
        sample_window((8, 8, 8), (4, 4), np.random.default_rng(0))
