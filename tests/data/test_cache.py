"""Preprocessing cache: hits skip work, changed inputs/settings rebuild, damaged entries are never trusted."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import mnseg.data.cache as cache_mod
from mnseg.data.cache import PreprocessCache
from mnseg.data.preprocess import PreprocessSettings, preprocess_case
from mnseg.errors import InputFileError


@pytest.fixture
def counted(monkeypatch):
    """Count calls to the compute function the cache uses."""
    calls = []

    def counting(case_id, *args, **kwargs):
        calls.append(case_id)
        return preprocess_case(case_id, *args, **kwargs)

    monkeypatch.setattr(cache_mod, "preprocess_case", counting)
    return calls


def _case(root, case_id="toytr_000"):
    return case_id, [root / "imagesTr" / f"{case_id}_0000.nii.gz"], root / "labelsTr" / f"{case_id}.nii.gz"


def _get(cache, item, settings=None, target=(1.5, 1.5, 1.5)):
    return cache.get(item, settings or PreprocessSettings(), "MRI", target)


def test_hit_returns_same_arrays_without_recomputing(toy_dataset, tmp_path, counted):
    cache = PreprocessCache(tmp_path / "cache")
    item = _case(toy_dataset)

    first = _get(cache, item)
    second = _get(cache, item)

    assert counted == ["toytr_000"]
    for suffix in (".img.npy", ".seg.npy", ".json"):
        assert (tmp_path / "cache" / f"toytr_000{suffix}").is_file()
    np.testing.assert_array_equal(second.image, first.image)
    np.testing.assert_array_equal(second.label, first.label)
    assert second.image.dtype == np.float32 and second.label.dtype == np.int16
    assert second.geometry.to_dict() == first.geometry.to_dict()
    # A fresh cache object on the same folder (e.g. the next run) also hits.
    _get(PreprocessCache(tmp_path / "cache"), item)
    assert len(counted) == 1


def test_mmap_option_returns_read_only_maps(toy_dataset, tmp_path, counted):
    item = _case(toy_dataset)
    reference = _get(PreprocessCache(tmp_path / "c"), item)
    mapped = _get(PreprocessCache(tmp_path / "c", mmap=True), item)
    assert isinstance(mapped.image, np.memmap) and not mapped.image.flags.writeable
    np.testing.assert_array_equal(mapped.image, reference.image)
    assert len(counted) == 1


def test_changed_settings_or_spacing_or_modality_recompute(toy_dataset, tmp_path, counted):
    cache = PreprocessCache(tmp_path / "cache")
    item = _case(toy_dataset)
    base = _get(cache, item)
    ct = _get(cache, item, PreprocessSettings(normalization="ct"))
    assert len(counted) == 2
    assert not np.array_equal(ct.image, base.image)
    other = _get(cache, item, target=(2.0, 2.0, 2.0))
    assert len(counted) == 3
    assert other.image.shape[1:] == (16, 16, 16)
    cache.get(item, PreprocessSettings(), "CT", (2.0, 2.0, 2.0))
    assert len(counted) == 4
    # The stored entry now reflects the last request, and that request hits.
    cache.get(item, PreprocessSettings(), "CT", (2.0, 2.0, 2.0))
    assert len(counted) == 4


def test_changed_source_file_recomputes(toy_dataset, tmp_path, counted):
    cache = PreprocessCache(tmp_path / "cache")
    item = _case(toy_dataset)
    _get(cache, item)
    label_path = item[2]
    st = label_path.stat()
    os.utime(label_path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    _get(cache, item)
    assert len(counted) == 2
    _get(cache, item)
    assert len(counted) == 2


@pytest.mark.parametrize("damage", ["truncate_image", "truncate_label", "delete_label", "bad_json", "no_json",
                                    "json_wrong_shape", "garbage_image"])
def test_damaged_entry_is_rebuilt(toy_dataset, tmp_path, counted, damage):
    root = tmp_path / "cache"
    cache = PreprocessCache(root)
    item = _case(toy_dataset)
    good = _get(cache, item)
    img, seg, meta = (root / f"toytr_000{s}" for s in (".img.npy", ".seg.npy", ".json"))

    if damage == "truncate_image":
        img.write_bytes(img.read_bytes()[:-100])
    elif damage == "truncate_label":
        seg.write_bytes(seg.read_bytes()[:200])
    elif damage == "delete_label":
        seg.unlink()
    elif damage == "bad_json":
        meta.write_text(meta.read_text()[:50])
    elif damage == "no_json":
        meta.unlink()
    elif damage == "json_wrong_shape":
        d = json.loads(meta.read_text())
        d["geometry"]["resampled_shape"] = [5, 5, 5]
        meta.write_text(json.dumps(d))
    elif damage == "garbage_image":
        size = img.stat().st_size
        st = img.stat()
        img.write_bytes(b"\x00" * size)  # same size: only the stored mtime / npy header can tell
        os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns))

    again = _get(cache, item)
    assert len(counted) == 2, damage
    np.testing.assert_array_equal(again.image, good.image)
    np.testing.assert_array_equal(again.label, good.label)
    assert _get(cache, item) is not None and len(counted) == 2  # and the rebuilt entry is trusted again


def test_prepare_builds_only_missing_entries(toy_dataset, tmp_path, counted):
    cache = PreprocessCache(tmp_path / "cache")
    items = [_case(toy_dataset, f"toytr_{i:03d}") for i in range(3)]
    unlabeled = ("toyunlabeled_000", [toy_dataset / "imagesUnlabeled" / "toyunlabeled_000_0000.nii.gz"], None)
    _get(cache, items[0])

    built = cache.prepare([*items, unlabeled], PreprocessSettings(), "MRI", (1.5, 1.5, 1.5), progress=False)

    assert built == ["toytr_001", "toytr_002", "toyunlabeled_000"]
    assert not (tmp_path / "cache" / "toyunlabeled_000.seg.npy").exists()
    again = cache.prepare([*items, unlabeled], PreprocessSettings(), "MRI", (1.5, 1.5, 1.5), progress=False)
    assert again == []
    case = _get(cache, unlabeled)
    assert case.label is None
    assert len(counted) == 4


def test_prepare_with_worker_processes(toy_dataset, tmp_path):
    cache = PreprocessCache(tmp_path / "cache")
    items = [_case(toy_dataset, f"toytr_{i:03d}") for i in range(2)]
    built = cache.prepare(items, PreprocessSettings(), "MRI", None, progress=False, workers=2)
    assert sorted(built) == ["toytr_000", "toytr_001"]
    assert all(cache.is_valid(item, PreprocessSettings(), "MRI", None) for item in items)


def test_missing_source_and_bad_case_id(toy_dataset, tmp_path):
    cache = PreprocessCache(tmp_path / "cache")
    with pytest.raises(InputFileError, match="nope_0000.nii.gz"):
        missing = toy_dataset / "imagesTr" / "nope_0000.nii.gz"
        cache.get(("nope", [missing], None), PreprocessSettings(), "MRI", None)
    cid, imgs, lbl = _case(toy_dataset)
    with pytest.raises(ValueError, match="case id"):
        cache.get(("../evil", imgs, lbl), PreprocessSettings(), "MRI", None)
