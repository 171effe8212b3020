"""On-disk cache of preprocessed cases, so each scan is reoriented/resampled/normalised once.

Per case the cache holds ``<id>.img.npy``, ``<id>.seg.npy`` (if labelled) and
``<id>.json`` (geometry, fingerprint, and the size/mtime of the two arrays).
The JSON is written last and removed first, so it acts as the commit marker:
an entry is trusted only if its fingerprint matches the current inputs and
settings and its arrays are exactly the files it was written with. Anything
else (missing, truncated, stale, unreadable) is rebuilt, never trusted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mnseg.data.preprocess import Geometry, PreprocessedCase, PreprocessSettings, preprocess_case
from mnseg.errors import InputFileError
from mnseg.utils.atomic import atomic_path, atomic_write_json

# Bump when the preprocessing code changes what it produces: every old entry is then rebuilt.
CACHE_FORMAT_VERSION = 1

CacheItem = tuple[str, Sequence[str | os.PathLike], str | os.PathLike | None]


def fingerprint(
    image_paths: Sequence[str | os.PathLike],
    label_path: str | os.PathLike | None,
    settings: PreprocessSettings,
    modality: str | Sequence[str],
    target_spacing: Sequence[float] | None,
) -> str:
    """Hash of all a cached case depends on: settings, spacing, modality and each source file's stat."""
    sources = [Path(p) for p in image_paths] + ([Path(label_path)] if label_path is not None else [])
    stats = []
    for p in sources:
        try:
            st = p.stat()
        except OSError as exc:
            raise InputFileError(f"{p}: cannot read ({exc.strerror or exc})") from None
        stats.append({"path": str(p.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    payload = {
        "version": CACHE_FORMAT_VERSION,
        "settings": settings.to_dict(),
        "target_spacing": None if target_spacing is None else [float(v) for v in target_spacing],
        "modality": modality if isinstance(modality, str) else list(modality),
        "has_label": label_path is not None,
        "sources": stats,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()


class PreprocessCache:
    """A folder of preprocessed cases; ``get`` loads a valid entry or computes and stores a fresh one."""

    def __init__(self, cache_dir: str | os.PathLike, mmap: bool = False):
        self.cache_dir = Path(cache_dir)
        self.mmap = mmap  # memory-map arrays read-only instead of loading them (large datasets)

    def paths(self, case_id: str) -> dict[str, Path]:
        _check_case_id(case_id)
        return {
            "image": self.cache_dir / f"{case_id}.img.npy",
            "label": self.cache_dir / f"{case_id}.seg.npy",
            "meta": self.cache_dir / f"{case_id}.json",
        }

    def get(
        self, item: CacheItem, settings: PreprocessSettings, modality: str | Sequence[str],
        target_spacing: Sequence[float] | None,
    ) -> PreprocessedCase:
        """The case ``item`` = (case_id, image_paths, label_path), from a valid entry or freshly built."""
        case_id, image_paths, label_path = item
        fp = fingerprint(image_paths, label_path, settings, modality, target_spacing)
        cached = self._load(case_id, fp, label_path is not None, mmap_mode="r" if self.mmap else None)
        if cached is not None:
            return cached
        case = self.build(item, settings, modality, target_spacing)
        if self.mmap:
            return self._load(case_id, fp, label_path is not None, mmap_mode="r") or case
        return case

    def is_valid(
        self, item: CacheItem, settings: PreprocessSettings, modality: str | Sequence[str],
        target_spacing: Sequence[float] | None,
    ) -> bool:
        """Whether a trustworthy entry exists (arrays are memory-mapped to check them, not read)."""
        case_id, image_paths, label_path = item
        fp = fingerprint(image_paths, label_path, settings, modality, target_spacing)
        return self._load(case_id, fp, label_path is not None, mmap_mode="r") is not None

    def prepare(
        self,
        items: Sequence[CacheItem],
        settings: PreprocessSettings,
        modality: str | Sequence[str],
        target_spacing: Sequence[float] | None,
        progress: bool = True,
        workers: int = 0,
    ) -> list[str]:
        """Make sure every (case_id, image_paths, label_path) is cached; return the ids that were (re)built.

        ``workers > 0`` builds missing entries in that many processes, started with
        "spawn" so a parent holding torch/OpenMP threads cannot deadlock a forked child.
        """
        from mnseg.utils.progress import progress_bar

        todo = [item for item in items if not self.is_valid(item, settings, modality, target_spacing)]
        bar = progress_bar(total=len(items), initial=len(items) - len(todo), desc="preprocess", disable=not progress)
        try:
            if workers and workers > 0 and len(todo) > 1:
                import multiprocessing
                from concurrent.futures import ProcessPoolExecutor

                context = multiprocessing.get_context("spawn")
                with ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=context) as pool:
                    futures = [
                        pool.submit(_build, str(self.cache_dir), (cid, list(imgs), lbl), settings, modality,
                                    target_spacing)
                        for cid, imgs, lbl in todo
                    ]
                    for future in futures:
                        future.result()  # re-raises a worker's error (e.g. an unreadable file)
                        bar.update(1)
            else:
                for item in todo:
                    self.build(item, settings, modality, target_spacing)
                    bar.update(1)
        finally:
            bar.close()
        return [it[0] for it in todo]

    def build(
        self, item: CacheItem, settings: PreprocessSettings, modality: str | Sequence[str],
        target_spacing: Sequence[float] | None,
    ) -> PreprocessedCase:
        """Compute one case and store it, whatever is cached."""
        case_id, image_paths, label_path = item
        fp = fingerprint(image_paths, label_path, settings, modality, target_spacing)
        case = preprocess_case(case_id, image_paths, label_path, settings, modality, target_spacing)
        self._store(case, fp)
        return case

    # -- storage ---------------------------------------------------------------------------------

    def _store(self, case: PreprocessedCase, fp: str) -> None:
        paths = self.paths(case.case_id)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            paths["meta"].unlink()  # invalidate first: a crash below leaves no entry, not a mixed one
        arrays = {"image": np.ascontiguousarray(case.image, dtype=np.float32)}
        if case.label is not None:
            arrays["label"] = np.ascontiguousarray(case.label, dtype=np.int16)
        else:
            with contextlib.suppress(FileNotFoundError):
                paths["label"].unlink()
        files = {}
        for key, arr in arrays.items():
            with atomic_path(paths[key], suffix=".npy") as tmp:
                np.save(tmp, arr, allow_pickle=False)
            st = paths[key].stat()
            files[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
        meta = {
            "format_version": CACHE_FORMAT_VERSION,
            "case_id": case.case_id,
            "fingerprint": fp,
            "image_shape": list(arrays["image"].shape),
            "has_label": case.label is not None,
            "files": files,
            "geometry": case.geometry.to_dict(),
        }
        atomic_write_json(paths["meta"], meta)

    def _load(self, case_id: str, fp: str, has_label: bool, mmap_mode: str | None) -> PreprocessedCase | None:
        """The cached case if every check passes, else None (the caller rebuilds)."""
        paths = self.paths(case_id)
        try:
            meta = json.loads(paths["meta"].read_text(encoding="utf-8"))
            if meta.get("format_version") != CACHE_FORMAT_VERSION or meta.get("fingerprint") != fp:
                return None
            if meta.get("case_id") != case_id or bool(meta.get("has_label")) != has_label:
                return None
            geometry = Geometry.from_dict(meta["geometry"])
            keys = ["image", "label"] if has_label else ["image"]
            for key in keys:  # the arrays must be exactly the files this entry wrote
                st = paths[key].stat()
                if meta["files"][key] != {"size": st.st_size, "mtime_ns": st.st_mtime_ns}:
                    return None
            image = np.load(paths["image"], mmap_mode=mmap_mode, allow_pickle=False)
            expected = (int(meta["image_shape"][0]), *geometry.resampled_shape)
            if image.dtype != np.float32 or tuple(image.shape) != expected:
                return None
            label = None
            if has_label:
                label = np.load(paths["label"], mmap_mode=mmap_mode, allow_pickle=False)
                if label.dtype != np.int16 or tuple(label.shape) != tuple(geometry.resampled_shape):
                    return None
        except (OSError, ValueError, KeyError, TypeError, IndexError, EOFError, AttributeError):
            return None
        return PreprocessedCase(case_id=case_id, image=image, label=label, geometry=geometry)


def _build(cache_dir: str, item: CacheItem, settings, modality, target_spacing) -> str:
    """Process-pool entry point (top level so it pickles under fork, spawn and forkserver)."""
    PreprocessCache(cache_dir).build(item, settings, modality, target_spacing)
    return item[0]


def _check_case_id(case_id: str) -> None:
    if not case_id or "/" in case_id or "\\" in case_id or case_id.startswith(".") or "\0" in case_id:
        raise ValueError(f"case id {case_id!r} cannot be used as a cache file name")

