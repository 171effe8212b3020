"""engine.data_setup: every case is read from (or built into) the preprocessing cache once per set-up."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

import mnseg.data.cache as cache_mod
from mnseg.config.schema import Config
from mnseg.data.cache import PreprocessCache
from mnseg.data.preprocess import preprocess_case
from mnseg.engine.data_setup import prepare_data


@pytest.fixture
def counts(monkeypatch):
    """Count, per case, builds (preprocess_case) and entry reads (PreprocessCache._load, full or header-only)."""
    seen = {"build": Counter(), "read": Counter(), "check": Counter()}
    real_load = PreprocessCache._load

    def counting_build(case_id, *args, **kwargs):
        seen["build"][case_id] += 1
        return preprocess_case(case_id, *args, **kwargs)

    def counting_load(self, case_id, fp, has_label, mmap_mode):
        seen["check" if mmap_mode else "read"][case_id] += 1
        return real_load(self, case_id, fp, has_label, mmap_mode)

    monkeypatch.setattr(cache_mod, "preprocess_case", counting_build)
    monkeypatch.setattr(PreprocessCache, "_load", counting_load)
    return seen


def _cfg(dataset, cache_dir, num_labeled=2):
    cfg = Config()
    cfg.data.dataset = str(dataset)
    cfg.data.cache_dir = str(cache_dir)
    cfg.data.num_labeled = num_labeled
    cfg.data.num_val = 1
    return cfg


def _all_ids(data):
    return [c.case_id for c in data.labeled + data.unlabeled + data.val]


def test_cold_cache_builds_each_case_once_and_never_rereads_it(toy_dataset, tmp_path, counts):
    data = prepare_data(_cfg(toy_dataset, tmp_path / "cache"), progress=False)

    ids = _all_ids(data)
    assert len(ids) == len(set(ids)) == 4 + 4  # imagesTr + imagesUnlabeled
    assert counts["build"] == Counter(ids)
    assert not counts["check"]  # no separate validity pass
    # The one lookup that found nothing; the built arrays are used as they are, not read back.
    assert counts["read"] == Counter(ids)
    assert all(c.label is not None for c in data.labeled + data.val)
    assert all(c.label is None for c in data.unlabeled)


def test_warm_cache_reads_each_case_once(toy_dataset, tmp_path, counts):
    first = prepare_data(_cfg(toy_dataset, tmp_path / "cache"), progress=False)
    for kind in counts.values():
        kind.clear()

    again = prepare_data(_cfg(toy_dataset, tmp_path / "cache"), progress=False)

    ids = _all_ids(again)
    assert not counts["build"]
    assert not counts["check"]
    assert counts["read"] == Counter(ids)
    for a, b in zip(first.labeled + first.unlabeled, again.labeled + again.unlabeled):
        np.testing.assert_array_equal(a.image, b.image)


def test_damaged_entry_is_still_rebuilt(toy_dataset, tmp_path, counts):
    first = prepare_data(_cfg(toy_dataset, tmp_path / "cache"), progress=False)
    victim = first.labeled[0].case_id
    (tmp_path / "cache" / f"{victim}.img.npy").write_bytes(b"not an array")
    for kind in counts.values():
        kind.clear()

    again = prepare_data(_cfg(toy_dataset, tmp_path / "cache"), progress=False)

    assert counts["build"] == Counter([victim])
    np.testing.assert_array_equal(again.labeled[0].image, first.labeled[0].image)


def test_unlabelled_pool_cases_without_label_files_train_fine(toy_dataset, tmp_path):
    from mnseg.data.dataset import DatasetFolder
    from mnseg.data.split import make_split
    from mnseg.errors import DatasetError

    cfg = _cfg(toy_dataset, tmp_path / "cache")
    split = make_split(DatasetFolder(toy_dataset), cfg.data.num_labeled, cfg.train.seed, num_val=cfg.data.num_val)
    pool = [c.case_id for c in split.unlabeled if c.case_id.startswith("toytr")]
    assert pool
    for case_id in pool:
        (toy_dataset / "labelsTr" / f"{case_id}.nii.gz").unlink()

    data = prepare_data(cfg, progress=False)
    assert [c.case_id for c in data.labeled] == [c.case_id for c in split.labeled]
    assert set(pool) <= {c.case_id for c in data.unlabeled}

    (toy_dataset / "labelsTr" / f"{split.labeled[0].case_id}.nii.gz").unlink()
    with pytest.raises(DatasetError, match=f"labelsTr/{split.labeled[0].case_id}.nii.gz"):
        prepare_data(cfg, progress=False)


def test_domain_adaptation_loads_the_target_scans_without_labels(tmp_path):
    from mnseg.data.toy import make_toy_dataset

    ds = make_toy_dataset(tmp_path / "Dataset007_Shift", n_target=2)
    cfg = _cfg(ds, tmp_path / "cache")
    assert prepare_data(cfg, progress=False).target == []  # adaptation off: the target is not read
    cfg.domain.dann_weight = 1.0
    data = prepare_data(cfg, progress=False)
    assert [c.case_id for c in data.target] == ["toytgt_000", "toytgt_001"]
    assert all(c.label is None for c in data.target)
    assert not {c.case_id for c in data.target} & set(_all_ids(data))  # never in the split
