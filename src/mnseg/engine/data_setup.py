"""From a dataset folder to preprocessed in-memory cases, with the facts prediction will need (plans)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from mnseg.config.schema import Config


@dataclass
class PreparedData:
    folder: object  # DatasetFolder
    split: object  # Split
    plans: dict
    labeled: list  # PreprocessedCase
    unlabeled: list
    val: list
    target: list = field(default_factory=list)  # imagesTarget, images only (domain adaptation); never labelled


def default_cache_dir() -> Path:
    return Path(os.environ.get("MNSEG_CACHE_DIR", Path.home() / ".cache" / "mnseg" / "preprocessed"))


def preprocess_settings(cfg: Config):
    from mnseg.data.preprocess import PreprocessSettings

    spacing = cfg.data.target_spacing
    if isinstance(spacing, list | tuple):
        spacing = tuple(float(s) for s in spacing)
    return PreprocessSettings(target_spacing=spacing, normalization=cfg.data.normalization, clahe=cfg.data.clahe)


def make_plans(cfg: Config, folder, split) -> dict:
    from mnseg.data.preprocess import resolve_target_spacing

    settings = preprocess_settings(cfg)
    paths = [c.images[0] for c in split.labeled or split.unlabeled]  # no labelled case: pretraining
    target = resolve_target_spacing(settings, paths)
    spec = folder.spec
    return {
        "labels": spec.labels,
        "class_names": spec.class_names,
        "num_classes": spec.num_classes,
        "ignore_label": spec.ignore_label,
        "in_channels": spec.num_channels,
        "modality": spec.modality,
        "file_ending": spec.file_ending,
        "preprocess": settings.to_dict(),
        "target_spacing": list(target) if target is not None else None,
        "patch_size": list(cfg.data.patch_size),
    }


def prepare_data(
    cfg: Config, split_dict: dict | None = None, plans: dict | None = None, progress: bool = True
) -> PreparedData:
    """Validate the dataset, make (or restore) the split, preprocess every case once (cached)."""
    from mnseg.data.cache import PreprocessCache
    from mnseg.data.dataset import TARGET_GROUP, DatasetFolder
    from mnseg.data.preprocess import PreprocessSettings
    from mnseg.data.split import Split, make_split
    from mnseg.data.validate import validate_dataset

    folder = DatasetFolder(cfg.data.dataset)
    # imagesTr cases without a label are fine in the unlabelled pool; the split raises, naming the file, for a
    # labelled or validation case without one. Without labelled cases (num_labeled 0: pretraining) no label file
    # is opened, nor imagesTs unless it joins the pool (transductive).
    label_free = cfg.data.num_labeled == 0
    groups = ("imagesTr", "imagesUnlabeled") + (("imagesTs",) if cfg.data.transductive or not label_free else ())
    # domain adaptation: imagesTarget too, its labelsTarget folder not even listed (labels for scoring only)
    groups += (TARGET_GROUP,) if cfg.domain.active else ()
    validate_dataset(folder.root, require_training_labels=False, groups=groups, read_labels=not label_free,
                     label_blind=(TARGET_GROUP,)).raise_if_invalid()
    if split_dict is not None:
        split = Split.from_json_dict(split_dict, folder)
    else:
        split = make_split(folder, cfg.data.num_labeled, cfg.train.seed, cfg.data.transductive, cfg.data.num_val)
    if plans is None:
        plans = make_plans(cfg, folder, split)
    settings = PreprocessSettings.from_dict(plans["preprocess"])
    target = tuple(plans["target_spacing"]) if plans["target_spacing"] else None
    cache = PreprocessCache(Path(cfg.data.cache_dir) if cfg.data.cache_dir else default_cache_dir())

    def run(cases, with_labels):
        items = [(c.case_id, list(c.images), c.label if with_labels else None) for c in cases]
        return load_cases(cache, items, settings, plans["modality"], target, progress, cfg.data.num_workers)

    unlabeled = split.unlabeled
    oracle = bool(cfg.method.params.get("oracle_pseudo", False))
    if oracle:
        unlabeled = oracle_label_cases(folder, unlabeled)
    return PreparedData(
        folder, split, plans, run(split.labeled, True), run(unlabeled, oracle), run(split.val, True),
        run(target_cases(cfg, folder), False),
    )


def target_cases(cfg: Config, folder) -> list:
    """The imagesTarget cases domain adaptation trains on (none when it is off), images only: ``target_cases``
    never lists labelsTarget. DatasetError when adaptation is on and the folder holds no scan."""
    from mnseg.data.dataset import TARGET_GROUP
    from mnseg.errors import DatasetError

    if not cfg.domain.active:
        return []
    cases = folder.target_cases()
    if not cases:
        raise DatasetError(f"{folder.root / TARGET_GROUP}: domain adaptation (domain.dann_weight, "
                           "domain.target_entropy_weight) needs unlabelled target-domain scans here, named like "
                           f"CASE_0000{folder.spec.file_ending}; none found")
    return cases


def oracle_label_cases(folder, cases: list) -> list:
    """The unlabelled cases with their label files, for M&N's oracle diagnostic alone (``oracle_pseudo``: are
    perfect pseudo-masks enough?). Only imagesTr cases sent to the unlabelled pool have one."""
    from mnseg.data.dataset import Case
    from mnseg.errors import ConfigError

    labels = {c.case_id: c.label for c in folder.training_cases(require_labels=False)}
    missing = [c.case_id for c in cases if labels.get(c.case_id) is None]
    if missing:
        raise ConfigError(f"method.params.oracle_pseudo needs a label for every unlabelled case; {len(missing)} have "
                          f"none (e.g. {missing[0]}; imagesUnlabeled cases never do)")
    return [Case(c.case_id, c.images, labels[c.case_id]) for c in cases]


def load_cases(cache, items: list, settings, modality, target, progress: bool = True, workers: int = 0) -> list:
    """Each (case_id, image_paths, label_path) from the cache, checked and read (or built) once.

    ``cache.get`` already verifies the fingerprint and the arrays before trusting an entry and keeps a freshly
    built case in memory, so a separate ``prepare`` pass would only repeat the checks and re-read what was just
    written. With ``workers > 0`` missing entries are first built in parallel (finding them reads only each
    entry's metadata and array headers), then every case is read once.
    """
    from mnseg.utils.progress import progress_bar

    if workers and workers > 0 and len(items) > 1:
        cache.prepare(items, settings, modality, target, progress=progress, workers=workers)
        progress = False
    cases = []
    for item in progress_bar(items, desc="preprocess", disable=not progress):
        cases.append(cache.get(item, settings, modality, target))
    return cases

