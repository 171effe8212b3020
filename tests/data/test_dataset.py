import json

import numpy as np
import pytest

from mnseg.data.dataset import (
    Case,
    DatasetFolder,
    DatasetSpec,
    write_dataset_json,
)
from mnseg.data.io import save_nifti
from mnseg.data.split import Split, make_split
from mnseg.data.toy import make_toy_dataset
from mnseg.errors import ConfigError, DatasetError

BASE = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1}, "numTraining": 1,
        "file_ending": ".nii.gz"}


def _write_json(tmp_path, data):
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps(data))
    return path


def test_spec_properties_with_ignore_label(tmp_path):
    labels = {"ignore": 3, "background": 0, "b": 2, "a": 1}
    data = dict(BASE, labels=labels, channel_names={"1": "T2", "0": "mri"})
    spec = DatasetSpec.from_json(_write_json(tmp_path, data))
    assert spec.num_channels == 2
    assert spec.channel_names == {0: "mri", 1: "T2"}
    assert spec.modality == "MRI"
    assert spec.ignore_label == 3
    assert spec.num_classes == 3
    assert spec.class_names == ["background", "a", "b"]
    assert spec.name == tmp_path.name  # defaults to the folder name


def test_spec_without_ignore():
    spec = DatasetSpec.from_dict(BASE)
    assert spec.ignore_label is None
    assert spec.num_classes == 2
    assert spec.class_names == ["background", "liver"]
    assert spec.num_training == 1


@pytest.mark.parametrize(
    "change, message",
    [
        ({"channel_names": None}, "missing key 'channel_names'"),
        ({"labels": None}, "missing key 'labels'"),
        ({"labels": {"background": 0, "a": 2}}, "without gaps"),
        ({"labels": {"background": 0, "a": 1, "b": 1}}, "same value"),
        ({"labels": {"background": 0, "a": "1"}}, "integer value"),
        ({"labels": {"background": 0, "ignore": 1, "a": 2}}, "highest value"),
        ({"channel_names": {"0": "CT", "2": "PET"}}, "keys must be 0..1"),
        ({"channel_names": {"0": ""}}, "non-empty string"),
        ({"file_ending": ".mha"}, "not supported"),
        ({"numTraining": -1}, "numTraining"),
    ],
)
def test_spec_rejects_bad_json(tmp_path, change, message):
    data = {k: v for k, v in {**BASE, **change}.items() if v is not None}
    path = _write_json(tmp_path, data)
    with pytest.raises(DatasetError, match=message) as info:
        DatasetSpec.from_json(path)
    assert str(path) in str(info.value)


def test_spec_missing_file_and_bad_json(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        DatasetSpec.from_json(tmp_path / "dataset.json")
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(DatasetError, match="not valid JSON"):
        DatasetSpec.from_json(tmp_path / "dataset.json")
    (tmp_path / "dataset.json").write_text("[1, 2]")
    with pytest.raises(DatasetError, match="JSON object"):
        DatasetSpec.from_json(tmp_path / "dataset.json")


def test_spec_reports_every_problem_at_once(tmp_path):
    path = _write_json(tmp_path, {"labels": {"background": 0, "a": 5}})
    with pytest.raises(DatasetError) as info:
        DatasetSpec.from_json(path)
    assert "channel_names" in str(info.value) and "without gaps" in str(info.value)


def test_write_dataset_json_round_trip_keeps_extra_keys(tmp_path):
    path = write_dataset_json(tmp_path, "Liver", ["CT"], {"background": 0, "liver": 1}, 7,
                              description="from MSD")
    spec = DatasetSpec.from_json(path)
    assert (spec.name, spec.channel_names, spec.num_training) == ("Liver", {0: "CT"}, 7)
    assert spec.extra == {"description": "from MSD"}
    assert DatasetSpec.from_dict(spec.to_json_dict()) == spec
    assert not list(tmp_path.glob(".*"))  # no temporary left behind


def test_write_dataset_json_refuses_bad_labels(tmp_path):
    with pytest.raises(DatasetError, match="without gaps"):
        write_dataset_json(tmp_path, "X", {0: "CT"}, {"background": 0, "a": 3}, 1)
    assert not (tmp_path / "dataset.json").exists()


def test_folder_lists_cases_sorted(toy_dataset):
    folder = DatasetFolder(toy_dataset)
    train = folder.training_cases()
    assert [c.case_id for c in train] == sorted(c.case_id for c in train)
    assert len(train) == 4 and all(c.label is not None and c.label.exists() for c in train)
    assert all(c.label.parent.name == "labelsTr" for c in train)
    unlabeled = folder.unlabeled_cases()
    assert len(unlabeled) == 4 and all(c.label is None for c in unlabeled)
    test = folder.test_cases()
    assert len(test) == 2 and all(c.label.parent.name == "labelsTs" for c in test)


def test_folder_groups_channels_in_order(tmp_path):
    root = tmp_path / "D"
    write_dataset_json(root, "Two", {0: "T1", 1: "T2"}, {"background": 0, "a": 1}, 2)
    img = np.zeros((4, 4, 4), np.float32)
    for case in ("b", "a"):
        for ch in (1, 0):
            save_nifti(img, np.eye(4), root / "imagesTr" / f"{case}_{ch:04d}.nii.gz")
        save_nifti(img.astype(np.uint8), np.eye(4), root / "labelsTr" / f"{case}.nii.gz")
    cases = DatasetFolder(root).training_cases()
    assert [c.case_id for c in cases] == ["a", "b"]
    assert [p.name for p in cases[0].images] == ["a_0000.nii.gz", "a_0001.nii.gz"]
    assert DatasetFolder(root).unlabeled_cases() == []


def test_folder_errors(tmp_path, toy_dataset):
    with pytest.raises(DatasetError, match="not found"):
        DatasetFolder(tmp_path / "nope")
    (toy_dataset / "dataset.json").unlink()
    with pytest.raises(DatasetError, match="dataset.json"):
        DatasetFolder(toy_dataset)


def test_training_cases_refuse_missing_label(toy_dataset):
    (toy_dataset / "labelsTr" / "toytr_002.nii.gz").unlink()
    with pytest.raises(DatasetError, match="toytr_002") as info:
        DatasetFolder(toy_dataset).training_cases()
    assert "image without label" in str(info.value)


def _ids(cases):
    return [c.case_id for c in cases]


def test_split_all_labelled_by_default(toy_dataset):
    split = make_split(DatasetFolder(toy_dataset))
    assert len(split.labeled) == 4 and split.val == []
    assert _ids(split.unlabeled) == [f"toyunlabeled_{i:03d}" for i in range(4)]
    assert _ids(split.test) == ["toyts_000", "toyts_001"]


def test_split_num_labeled_is_seeded_and_drops_labels(tmp_path):
    root = make_toy_dataset(tmp_path / "D", n_train=8, n_unlabeled=2, n_test=2, shape=(8, 8, 8))
    folder = DatasetFolder(root)
    a = make_split(folder, num_labeled=3, seed=5)
    b = make_split(folder, num_labeled=3, seed=5)
    assert _ids(a.labeled) == _ids(b.labeled)
    assert len({tuple(_ids(make_split(folder, num_labeled=3, seed=s).labeled)) for s in range(10)}) > 1
    train_ids = set(_ids(folder.training_cases()))
    from_train = [c for c in a.unlabeled if c.case_id in train_ids]
    assert len(a.labeled) == 3 and len(from_train) == 5
    assert set(_ids(a.labeled)).isdisjoint(_ids(from_train))
    assert all(c.label is None for c in a.unlabeled)
    assert all(c.label is not None for c in a.labeled)
    assert not any(c.case_id.startswith("toyts") for c in a.unlabeled)
    assert a.seed == 5 and a.num_labeled == 3 and a.transductive is False


def test_split_val_is_held_out_before_labelled_choice(tmp_path):
    root = make_toy_dataset(tmp_path / "D", n_train=6, n_unlabeled=1, n_test=1, shape=(8, 8, 8))
    folder = DatasetFolder(root)
    split = make_split(folder, num_labeled=2, seed=1, num_val=2)
    assert len(split.val) == 2 and all(c.label is not None for c in split.val)
    val = set(_ids(split.val))
    assert val.isdisjoint(_ids(split.labeled)) and val.isdisjoint(_ids(split.unlabeled))
    unlabeled_train = sum(c.case_id.startswith("toytr") for c in split.unlabeled)
    assert len(split.labeled) + len(split.val) + unlabeled_train == 6
    assert _ids(make_split(folder, num_labeled=None, seed=1, num_val=2).val) == _ids(split.val)
    with pytest.raises(ConfigError, match="between 0 and 4"):
        make_split(folder, num_labeled=5, num_val=2)


def test_split_transductive_adds_test_without_labels(toy_dataset):
    split = make_split(DatasetFolder(toy_dataset), transductive=True)
    test_in_pool = [c for c in split.unlabeled if c.case_id.startswith("toyts")]
    assert _ids(test_in_pool) == _ids(split.test)
    assert all(c.label is None for c in test_in_pool)
    assert all(c.label is not None for c in split.test)


@pytest.mark.parametrize("kwargs, message", [
    ({"num_labeled": -1}, "between 0 and 4"),
    ({"num_labeled": 5}, "between 0 and 4"),
    ({"num_val": 4}, "no labelled training case"),
    ({"num_val": -1}, "non-negative"),
])
def test_split_bad_settings(toy_dataset, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        make_split(DatasetFolder(toy_dataset), **kwargs)


def test_split_without_labelled_cases_puts_all_of_imagestr_in_the_pool(toy_dataset):
    split = make_split(DatasetFolder(toy_dataset), num_labeled=0)
    assert split.labeled == [] and split.num_labeled == 0
    assert sum(c.case_id.startswith("toytr") for c in split.unlabeled) == 4
    assert all(c.label is None for c in split.unlabeled)
    assert not any(c.case_id.startswith("toyts") for c in split.unlabeled)


def test_split_json_round_trip(toy_dataset):
    folder = DatasetFolder(toy_dataset)
    split = make_split(folder, num_labeled=2, seed=3, num_val=1, transductive=True)
    saved = json.loads(json.dumps(split.to_json_dict()))
    assert saved["num_labeled"] == 2 and saved["seed"] == 3 and saved["num_val"] == 1
    assert len(saved["unlabeled"]["imagesTr"]) == 1 and len(saved["unlabeled"]["imagesTs"]) == 2
    assert Split.from_json_dict(saved, folder) == split


def test_split_from_json_refuses_vanished_case(toy_dataset):
    folder = DatasetFolder(toy_dataset)
    saved = make_split(folder).to_json_dict()
    saved["labeled"].append("ghost")
    with pytest.raises(DatasetError, match="ghost"):
        Split.from_json_dict(saved, folder)
    del saved["seed"]
    with pytest.raises(ConfigError, match="seed"):
        Split.from_json_dict(saved, folder)


def test_case_is_hashable_value():
    from pathlib import Path

    a = Case("x", (Path("x_0000.nii.gz"),))
    assert a == Case("x", (Path("x_0000.nii.gz"),)) and len({a, a}) == 1


# --------------------------------------------------------------------- label files only where the split reads them


def _strip_labels(root, case_ids):
    for case_id in case_ids:
        (root / "labelsTr" / f"{case_id}.nii.gz").unlink()


def test_unlabelled_pool_cases_may_lack_labels_and_the_split_stays_the_same(tmp_path):
    root = make_toy_dataset(tmp_path / "D", n_train=8, n_unlabeled=1, n_test=1, shape=(8, 8, 8))
    full = make_split(DatasetFolder(root), num_labeled=3, seed=7, num_val=1)
    pool_from_train = [c.case_id for c in full.unlabeled if c.case_id.startswith("toytr")]
    assert len(pool_from_train) == 4

    _strip_labels(root, pool_from_train)
    stripped = make_split(DatasetFolder(root), num_labeled=3, seed=7, num_val=1)

    assert stripped.to_json_dict() == full.to_json_dict()
    assert all(c.label is not None and c.label.exists() for c in stripped.labeled + stripped.val)
    saved = json.loads(json.dumps(stripped.to_json_dict()))
    assert Split.from_json_dict(saved, DatasetFolder(root)) == stripped  # resuming works too
    with pytest.raises(DatasetError, match="image without label"):  # the plain listing still wants every label
        DatasetFolder(root).training_cases()


@pytest.mark.parametrize("which", ["labeled", "val"])
def test_labelled_or_validation_case_without_label_is_a_clear_error(tmp_path, which):
    root = make_toy_dataset(tmp_path / "D", n_train=6, n_unlabeled=1, n_test=1, shape=(8, 8, 8))
    split = make_split(DatasetFolder(root), num_labeled=2, seed=3, num_val=1)
    victim = getattr(split, which)[0].case_id
    _strip_labels(root, [victim])

    with pytest.raises(DatasetError) as info:
        make_split(DatasetFolder(root), num_labeled=2, seed=3, num_val=1)
    message = str(info.value)
    assert f"{victim}_0000.nii.gz" in message and f"labelsTr/{victim}.nii.gz" in message
    assert ("validation" if which == "val" else "drawn as labelled") in message
    with pytest.raises(DatasetError, match=victim):  # a saved split that needs the label fails as clearly
        Split.from_json_dict(split.to_json_dict(), DatasetFolder(root))


def test_without_num_labeled_every_training_case_needs_its_label(toy_dataset):
    _strip_labels(toy_dataset, ["toytr_001"])
    with pytest.raises(DatasetError, match="toytr_001") as info:
        make_split(DatasetFolder(toy_dataset))
    assert "image without label" in str(info.value) and "num_labeled" in str(info.value)


def test_target_cases_never_list_the_target_labels(tmp_path, monkeypatch):
    from pathlib import Path

    from mnseg.data.dataset import DatasetFolder, scan_group
    from mnseg.data.toy import make_toy_dataset

    ds = make_toy_dataset(tmp_path / "Dataset008_Shift", n_target=2)
    folder = DatasetFolder(ds)
    with_labels = scan_group(ds, "imagesTarget", folder.spec)
    assert [c.label.name for c in with_labels.cases] == ["toytgt_000.nii.gz", "toytgt_001.nii.gz"]  # for check
    listed, real_iterdir = [], Path.iterdir
    monkeypatch.setattr(Path, "iterdir", lambda self: (listed.append(self.name), real_iterdir(self))[1])
    cases = folder.target_cases()
    assert [c.case_id for c in cases] == ["toytgt_000", "toytgt_001"] and all(c.label is None for c in cases)
    assert listed == ["imagesTarget"]
