"""The dataset folder: ``dataset.json`` and case listing (the labelled/unlabelled split: ``data/split.py``).

The folder follows nnU-Net v2's raw layout (so the same folder stays usable by
nnU-Net) plus ``imagesUnlabeled`` and, for domain adaptation, ``imagesTarget`` (unlabelled scans of a target
domain) with an optional ``labelsTarget``, which only scoring reads: training lists the target group without
its label folder. Everything here reads file *names* and ``dataset.json`` only; voxel-level checks live in
``mnseg.data.validate``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mnseg.errors import DatasetError
from mnseg.utils.atomic import atomic_write_json

SUPPORTED_FILE_ENDINGS = (".nii.gz", ".nii")
IGNORE_LABEL_NAME = "ignore"
GROUPS = ("imagesTr", "imagesUnlabeled", "imagesTs")  # the groups a split draws from
TARGET_GROUP = "imagesTarget"  # unlabelled target-domain scans (domain adaptation), never part of a split
ALL_GROUPS = (*GROUPS, TARGET_GROUP)
LABEL_DIRS = {"imagesTr": "labelsTr", "imagesTs": "labelsTs", TARGET_GROUP: "labelsTarget"}
_SCORED_ONLY = ("imagesTs", TARGET_GROUP)  # groups whose labels only scoring reads
_CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
MISSING_LABEL_MESSAGE = "image without label"  # how scan_group reports an imagesTr case with no labelsTr file


@dataclass(frozen=True)
class Case:
    """One scan: its channel files (``_0000``, ``_0001``, ...) and its label file if it has one."""

    case_id: str
    images: tuple[Path, ...]
    label: Path | None = None


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a dataset or input file; ``severity`` is "error" or "warning"."""

    path: Path
    message: str
    severity: str = "error"

    def __str__(self) -> str:
        return f"{self.severity}: {self.path}: {self.message}"


# --------------------------------------------------------------------------------------------- dataset.json


@dataclass
class DatasetSpec:
    """The parsed ``dataset.json``. Keys nnU-Net knows but mnseg doesn't use are kept in ``extra``."""

    name: str
    channel_names: dict[int, str]
    labels: dict[str, int]
    file_ending: str = ".nii.gz"
    num_training: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    @property
    def ignore_label(self) -> int | None:
        return self.labels.get(IGNORE_LABEL_NAME)

    @property
    def num_classes(self) -> int:
        """Classes a model predicts: every label except ``ignore`` (background included)."""
        return len(self.class_names)

    @property
    def class_names(self) -> list[str]:
        named = [(v, k) for k, v in self.labels.items() if k != IGNORE_LABEL_NAME]
        return [name for _, name in sorted(named)]

    @property
    def modality(self) -> str:
        return self.channel_names[0].upper()

    @classmethod
    def from_json(cls, path: str | Path) -> DatasetSpec:
        """Read and check ``dataset.json``; every problem found is listed in one ``DatasetError``."""
        path = Path(path)
        if not path.is_file():
            raise DatasetError(f"{path}: dataset.json not found")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DatasetError(f"{path}: not valid JSON ({exc})") from None
        problems = spec_problems(data)
        if problems:
            raise DatasetError("\n".join(f"{path}: {p}" for p in problems))
        return cls._from_checked_dict(data, default_name=path.parent.name)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], default_name: str = "dataset") -> DatasetSpec:
        problems = spec_problems(data)
        if problems:
            raise DatasetError("\n".join(f"dataset.json: {p}" for p in problems))
        return cls._from_checked_dict(data, default_name)

    @classmethod
    def _from_checked_dict(cls, data: Mapping[str, Any], default_name: str) -> DatasetSpec:
        known = {"name", "channel_names", "labels", "file_ending", "numTraining"}
        return cls(
            name=str(data.get("name") or default_name),
            channel_names={int(k): str(v) for k, v in sorted(data["channel_names"].items(),
                                                              key=lambda kv: int(kv[0]))},
            labels={str(k): int(v) for k, v in data["labels"].items()},
            file_ending=data.get("file_ending", ".nii.gz"),
            num_training=data.get("numTraining"),
            extra={k: v for k, v in data.items() if k not in known},
        )

    def to_json_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "channel_names": {str(k): v for k, v in sorted(self.channel_names.items())},
            "labels": dict(sorted(self.labels.items(), key=lambda kv: kv[1])),
            "numTraining": self.num_training,
            "file_ending": self.file_ending,
        }
        out.update(self.extra)
        return out


def spec_problems(data: Any) -> list[str]:
    """Every way ``data`` fails to be a usable dataset.json, as messages (empty list: fine)."""
    if not isinstance(data, Mapping):
        return [f"must hold a JSON object, found {type(data).__name__}"]
    problems: list[str] = []
    problems += _channel_problems(data)
    problems += _label_problems(data)
    ending = data.get("file_ending", ".nii.gz")
    if ending not in SUPPORTED_FILE_ENDINGS:
        problems.append(f"file_ending {ending!r} is not supported; use one of {list(SUPPORTED_FILE_ENDINGS)}")
    num_training = data.get("numTraining")
    if num_training is not None and (not isinstance(num_training, int) or isinstance(num_training, bool)
                                     or num_training < 0):
        problems.append(f"numTraining must be a non-negative integer, found {num_training!r}")
    return problems


def _channel_problems(data: Mapping[str, Any]) -> list[str]:
    channels = data.get("channel_names")
    if channels is None:
        hint = " (nnU-Net v1 'modality' found: rename it to 'channel_names')" if "modality" in data else ""
        return [f"missing key 'channel_names', e.g. {{\"0\": \"MRI\"}}{hint}"]
    if not isinstance(channels, Mapping) or not channels:
        return [f"'channel_names' must be a non-empty object like {{\"0\": \"CT\"}}, found {channels!r}"]
    problems = []
    keys = []
    for k, v in channels.items():
        if not str(k).isdigit():
            problems.append(f"'channel_names' key {k!r} is not a channel number")
        else:
            keys.append(int(k))
        if not isinstance(v, str) or not v.strip():
            problems.append(f"'channel_names' value for channel {k!r} must be a non-empty string, "
                            f"found {v!r}")
    if keys and sorted(keys) != list(range(len(channels))):
        problems.append(f"'channel_names' keys must be 0..{len(channels) - 1}, found {sorted(keys)}")
    return problems


def _label_problems(data: Mapping[str, Any]) -> list[str]:
    labels = data.get("labels")
    if labels is None:
        return ["missing key 'labels', e.g. {\"background\": 0, \"tumour\": 1}"]
    if not isinstance(labels, Mapping) or not labels:
        return ["'labels' must be a non-empty object like {\"background\": 0, \"organ\": 1}, "
                f"found {labels!r}"]
    problems = []
    values: list[int] = []
    for name, value in labels.items():
        if isinstance(value, bool) or not isinstance(value, int):
            hint = " (region-based labels are not supported)" if isinstance(value, (list, tuple)) else ""
            problems.append(f"label {name!r} must have an integer value, found {value!r}{hint}")
        else:
            values.append(value)
    if problems:
        return problems
    if len(set(values)) != len(values):
        dupes = sorted({v for v in values if values.count(v) > 1})
        problems.append(f"'labels' gives the same value to several names: {dupes}")
    elif sorted(values) != list(range(len(values))):
        problems.append(f"'labels' values must be 0..{len(values) - 1} without gaps, found {sorted(values)}")
    if IGNORE_LABEL_NAME in labels and labels[IGNORE_LABEL_NAME] != max(values):
        problems.append(f"label 'ignore' must have the highest value ({max(values)}), "
                        f"found {labels['ignore']}")
    if IGNORE_LABEL_NAME in labels and len(labels) < 3:
        problems.append("'labels' needs background and at least one class besides 'ignore'")
    return problems


def write_dataset_json(
    root: str | Path,
    name: str,
    channel_names: Mapping[int | str, str] | Sequence[str],
    labels: Mapping[str, int],
    num_training: int,
    file_ending: str = ".nii.gz",
    **extra: Any,
) -> Path:
    """Check and atomically write ``root/dataset.json`` (for importers and generators); returns its path."""
    if not isinstance(channel_names, Mapping):
        channel_names = dict(enumerate(channel_names))
    data = {
        "name": name,
        "channel_names": {str(k): v for k, v in channel_names.items()},
        "labels": dict(labels),
        "numTraining": num_training,
        "file_ending": file_ending,
        **extra,
    }
    spec = DatasetSpec.from_dict(data, default_name=name)
    path = Path(root) / "dataset.json"
    atomic_write_json(path, spec.to_json_dict())
    return path


# --------------------------------------------------------------------------------------------- case listing


@dataclass
class GroupScan:
    """What one ``images*`` folder holds: complete cases, problems, and how many case ids were seen."""

    cases: list[Case]
    problems: list[Problem]
    num_case_ids: int


def scan_group(root: str | Path, group: str, spec: DatasetSpec, require_labels: bool = True,
               with_labels: bool = True) -> GroupScan:
    """List the cases of one group (``imagesTr``, ``imagesUnlabeled``, ``imagesTs``, ``imagesTarget``) from names.

    Cases missing a channel (or, in ``imagesTr``, a label) are left out of
    ``cases`` and reported in ``problems``; a missing folder yields no cases
    and no problems (callers decide whether the group is required).
    ``require_labels=False`` keeps ``imagesTr`` cases without a label (``label`` None, reported as a warning):
    the split decides whether each one needs it. ``with_labels=False`` does not even list the group's label
    folder (every ``label`` None): how training sees ``imagesTarget``, whose labels are for scoring only.
    """
    root = Path(root)
    image_dir = root / group
    problems: list[Problem] = []
    channels: dict[str, dict[int, Path]] = {}
    for path in _nifti_files(image_dir, spec.file_ending, problems):
        stem = path.name[: -len(spec.file_ending)]
        m = _CHANNEL_SUFFIX.match(stem)
        if not m:
            problems.append(Problem(path, "image name must end with a channel suffix, "
                                          f"e.g. {stem}_0000{spec.file_ending}"))
            continue
        channel = int(m["channel"])
        if channel >= spec.num_channels:
            problems.append(Problem(path, f"channel {channel} but dataset.json declares {spec.num_channels} "
                                          f"channel(s) ({_channel_list(spec)})"))
            continue
        channels.setdefault(m["case"], {})[channel] = path

    complete: dict[str, tuple[Path, ...]] = {}
    for case_id, files in sorted(channels.items()):
        missing = [c for c in range(spec.num_channels) if c not in files]
        if missing:
            for c in missing:
                problems.append(Problem(image_dir / f"{case_id}_{c:04d}{spec.file_ending}",
                                        f"missing channel file for case {case_id!r} "
                                        f"({spec.channel_names[c]})"))
            continue
        complete[case_id] = tuple(files[c] for c in range(spec.num_channels))

    labels = _label_files(root, group, spec, problems) if with_labels else {}
    cases: list[Case] = []
    for case_id, images in complete.items():
        label = labels.get(case_id)
        if label is None and group == "imagesTr":
            expected = _missing_label(case_id, spec)
            if require_labels:
                problems.append(Problem(images[0], expected))
                continue
            problems.append(Problem(images[0], f"{expected}; usable only as unlabelled data (a run that needs "
                                               "it labelled stops with an error)", "warning"))
        if label is None and group in _SCORED_ONLY and labels:
            kind = "test" if group == "imagesTs" else "target"
            problems.append(Problem(images[0], f"{kind} case {case_id!r} has no label in {LABEL_DIRS[group]}; "
                                               "it cannot be scored", "warning"))
        cases.append(Case(case_id, images, label))
    for case_id, label in sorted(labels.items()):
        if case_id not in channels:
            problems.append(_orphan_label_problem(label, case_id, group, channels, spec))
    return GroupScan(cases=cases, problems=problems, num_case_ids=len(channels))


def _missing_label(case_id: str, spec: DatasetSpec) -> str:
    """What an imagesTr case without its labelsTr file is told, in the scan and in the split's error alike."""
    return f"{MISSING_LABEL_MESSAGE}: expected labelsTr/{case_id}{spec.file_ending}"


def _label_files(root: Path, group: str, spec: DatasetSpec, problems: list[Problem]) -> dict[str, Path]:
    if group not in LABEL_DIRS:
        return {}
    label_dir = root / LABEL_DIRS[group]
    return {p.name[: -len(spec.file_ending)]: p for p in _nifti_files(label_dir, spec.file_ending, problems)}


def _orphan_label_problem(label: Path, case_id: str, group: str, channels: Mapping[str, Any],
                          spec: DatasetSpec) -> Problem:
    m = _CHANNEL_SUFFIX.match(case_id)
    if m and m["case"] in channels:
        hint = f"; label names carry no channel suffix: rename it to {m['case']}{spec.file_ending}"
    else:
        hint = f"; expected {group}/{case_id}_0000{spec.file_ending}"
    severity = "error" if group == "imagesTr" else "warning"
    return Problem(label, f"label without image{hint}", severity)


def _nifti_files(folder: Path, file_ending: str, problems: list[Problem]) -> list[Path]:
    """Files in ``folder`` with the dataset's ending; other files are reported, hidden ones skipped."""
    if not folder.is_dir():
        return []
    found = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue  # .DS_Store, editor and atomic-write temporaries
        if path.is_dir():
            problems.append(Problem(path, "unexpected sub-folder (ignored)", "warning"))
        elif path.name.endswith(file_ending):
            found.append(path)
        elif path.name.endswith(SUPPORTED_FILE_ENDINGS):
            problems.append(Problem(path, "file ending does not match dataset.json "
                                          f"file_ending {file_ending!r}; "
                                          "rename/convert the file or fix file_ending (file ignored)"))
        else:
            problems.append(Problem(path, f"stray file, not a {file_ending} file (ignored)", "warning"))
    return found


def _channel_list(spec: DatasetSpec) -> str:
    return ", ".join(f"_{k:04d} {v}" for k, v in sorted(spec.channel_names.items()))


class DatasetFolder:
    """A dataset folder on disk; listing methods raise ``DatasetError`` for cases they cannot build."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(f"{self.root}: dataset folder not found")
        self.spec = DatasetSpec.from_json(self.root / "dataset.json")

    def __repr__(self) -> str:
        return f"DatasetFolder({str(self.root)!r})"

    def training_cases(self, require_labels: bool = True) -> list[Case]:
        """Cases of ``imagesTr`` + ``labelsTr``; the folder must exist and hold at least one.

        ``require_labels=False`` also lists cases without a label file (``label`` None), for the split: a
        case that ``--num-labeled`` sends to the unlabelled pool never needs one.
        """
        if not (self.root / "imagesTr").is_dir():
            raise DatasetError(f"{self.root / 'imagesTr'}: folder not found "
                               "(labelled training images go here)")
        cases = self._cases("imagesTr", require_labels)
        if not cases:
            raise DatasetError(f"{self.root / 'imagesTr'}: no training cases "
                               f"(expected CASE_0000{self.spec.file_ending})")
        return cases

    def unlabeled_cases(self) -> list[Case]:
        """Cases of ``imagesUnlabeled`` (label always None); empty if the folder is absent."""
        return self._cases("imagesUnlabeled")

    def test_cases(self) -> list[Case]:
        """Cases of ``imagesTs``, with their ``labelsTs`` file when there is one."""
        return self._cases("imagesTs")

    def target_cases(self) -> list[Case]:
        """Cases of ``imagesTarget``, images only: ``labelsTarget`` is not even listed (label always None), so
        nothing that trains from these cases can reach a target label; empty if the folder is absent."""
        return self._cases(TARGET_GROUP, with_labels=False)

    def _cases(self, group: str, require_labels: bool = True, with_labels: bool = True) -> list[Case]:
        scan = scan_group(self.root, group, self.spec, require_labels, with_labels)
        errors = [p for p in scan.problems if p.severity == "error"]
        if errors:
            lines = "\n".join(f"  {p.path}: {p.message}" for p in errors)
            raise DatasetError(f"{self.root / group}: {len(errors)} problem(s):\n{lines}\n"
                               f"Run `mnseg check {self.root}` for a full report.")
        return scan.cases
