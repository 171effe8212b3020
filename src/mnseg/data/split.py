"""The labelled/unlabelled/validation/test split of a dataset folder: seeded, recorded in every run."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mnseg.data.dataset import GROUPS, Case, DatasetFolder, _missing_label
from mnseg.errors import ConfigError, DatasetError


@dataclass
class Split:
    """Which cases train with labels, train without, validate, and test; recorded in every run."""

    labeled: list[Case]
    unlabeled: list[Case]
    val: list[Case]
    test: list[Case]
    seed: int
    num_labeled: int | None
    transductive: bool

    def to_json_dict(self) -> dict[str, Any]:
        unlabeled: dict[str, list[str]] = {g: [] for g in GROUPS}
        for case in self.unlabeled:
            unlabeled.setdefault(case.images[0].parent.name, []).append(case.case_id)
        return {
            "seed": self.seed,
            "num_labeled": self.num_labeled,
            "num_val": len(self.val),
            "transductive": self.transductive,
            "labeled": [c.case_id for c in self.labeled],
            "val": [c.case_id for c in self.val],
            "unlabeled": unlabeled,
            "test": [c.case_id for c in self.test],
        }

    @classmethod
    def from_json_dict(cls, d: Mapping[str, Any], folder: DatasetFolder) -> Split:
        """Rebuild a saved split from ``folder`` (for resuming); every listed case must still exist."""
        required = ("seed", "num_labeled", "transductive", "labeled", "val", "unlabeled", "test")
        missing = [k for k in required if k not in d]
        if missing:
            raise ConfigError(f"saved split is missing key(s) {missing}")
        train = {c.case_id: c for c in folder.training_cases(require_labels=False)}
        by_group = {
            "imagesTr": {k: Case(c.case_id, c.images) for k, c in train.items()},
            "imagesUnlabeled": {c.case_id: c for c in folder.unlabeled_cases()},
            "imagesTs": {c.case_id: Case(c.case_id, c.images) for c in folder.test_cases()},
        }
        test = {c.case_id: c for c in folder.test_cases()}

        def pick(table: Mapping[str, Case], ids: Any, group: str) -> list[Case]:
            if not isinstance(ids, list):
                raise ConfigError(f"saved split: expected a list of case ids for {group}, found {ids!r}")
            gone = [i for i in ids if i not in table]
            if gone:
                raise DatasetError(f"{folder.root / group}: saved split lists case(s) {gone} "
                                   "that are no longer in the dataset folder")
            return [table[i] for i in ids]

        unlabeled_ids = d["unlabeled"]
        if not isinstance(unlabeled_ids, Mapping) or set(unlabeled_ids) - set(GROUPS):
            raise ConfigError(f"saved split: 'unlabeled' must map {list(GROUPS)} to case ids, "
                              f"found {unlabeled_ids!r}")
        unlabeled = [c for g in GROUPS for c in pick(by_group[g], unlabeled_ids.get(g, []), g)]
        labeled, val = pick(train, d["labeled"], "imagesTr"), pick(train, d["val"], "imagesTr")
        _require_labels(folder, labeled, "labelled in the saved split")
        _require_labels(folder, val, "a validation case in the saved split")
        return cls(
            labeled=labeled,
            unlabeled=unlabeled,
            val=val,
            test=pick(test, d["test"], "imagesTs"),
            seed=int(d["seed"]),
            num_labeled=d["num_labeled"],
            transductive=bool(d["transductive"]),
        )


def make_split(
    folder: DatasetFolder,
    num_labeled: int | None = None,
    seed: int = 0,
    transductive: bool = False,
    num_val: int = 0,
) -> Split:
    """Divide a dataset folder into labelled / unlabelled / validation / test cases.

    Order, all with one ``np.random.default_rng(seed)``: first ``num_val``
    ``imagesTr`` cases are drawn as the validation set; then ``num_labeled``
    of the remaining ``imagesTr`` cases are drawn to keep their labels (all of
    them when ``num_labeled`` is None, none when it is 0: self-supervised pretraining, which reads no label).
    Remaining ``imagesTr`` cases join the
    unlabelled pool with their label dropped, followed by ``imagesUnlabeled``
    and, only if ``transductive``, ``imagesTs`` (labels dropped too).

    The draw depends on the ``imagesTr`` case ids only, never on which label files exist: a case sent to the
    unlabelled pool may lack its label file (its label is never read), and leaving such files out gives the
    same split as keeping them. A validation or labelled case without a label is a ``DatasetError``.
    """
    train = folder.training_cases(require_labels=False)
    if isinstance(num_val, bool) or not isinstance(num_val, (int, np.integer)) or num_val < 0:
        raise ConfigError(f"num_val must be a non-negative integer, found {num_val!r}")
    if num_val >= len(train):
        raise ConfigError(f"num_val={num_val} leaves no labelled training case: "
                          f"{folder.root / 'imagesTr'} has {len(train)} case(s)")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(train))
    val = sorted((train[i] for i in order[:num_val]), key=lambda c: c.case_id)
    pool = sorted((train[i] for i in order[num_val:]), key=lambda c: c.case_id)

    if num_labeled is None:
        labeled, rest = pool, []
    else:
        if isinstance(num_labeled, bool) or not isinstance(num_labeled, (int, np.integer)):
            raise ConfigError(f"num_labeled must be an integer, found {num_labeled!r}")
        if num_labeled < 0 or num_labeled > len(pool):
            held = f" after holding out {num_val} for validation" if num_val else ""
            raise ConfigError(f"num_labeled={num_labeled} must be between 0 and {len(pool)}: "
                              f"{folder.root / 'imagesTr'} has {len(pool)} training case(s){held}")
        chosen = set(rng.permutation(len(pool))[:num_labeled].tolist())
        labeled = [c for i, c in enumerate(pool) if i in chosen]
        rest = [c for i, c in enumerate(pool) if i not in chosen]
        num_labeled = int(num_labeled)

    _require_labels(folder, val, f"drawn for validation (seed {seed})")
    if num_labeled is None:
        _require_labels(folder, labeled, "labelled (without num_labeled every imagesTr case keeps its label)")
    else:
        _require_labels(folder, labeled, f"drawn as labelled (num_labeled={num_labeled}, seed {seed})")
    test = folder.test_cases()
    unlabeled = [Case(c.case_id, c.images) for c in rest] + folder.unlabeled_cases()
    if transductive:
        unlabeled += [Case(c.case_id, c.images) for c in test]
    return Split(labeled=labeled, unlabeled=unlabeled, val=val, test=test, seed=int(seed),
                 num_labeled=num_labeled, transductive=bool(transductive))


def _require_labels(folder: DatasetFolder, cases: Sequence[Case], role: str) -> None:
    """The clear error for cases whose labels the run reads but which have no label file."""
    missing = [c for c in cases if c.label is None]
    if missing:
        lines = "\n".join(f"  {c.images[0]}: {_missing_label(c.case_id, folder.spec)}" for c in missing)
        raise DatasetError(
            f"{folder.root / 'labelsTr'}: {len(missing)} case(s) {role} have no label:\n{lines}\n"
            f"Add the label file(s); only cases that go to the unlabelled pool may lack one."
        )
