"""Demo data: pseudo-subjects built from the real MNI152 2009 template that ships inside nilearn.

One real anatomy (T1 plus white/grey matter probability maps) is resampled once
per spacing, cropped to the brain, then each subject gets its own random smooth
deformation, synthetic white-matter lesions and MRI artefacts. Nothing derived
from the template is stored in this repository; everything is rebuilt from a
seed, so datasets are reproducible byte for byte.

Classes: background 0, white_matter 1, grey_matter 2, lesion 3 (+ ignore 4 for
the sparse variant, where only every K-th axial slice is labelled).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from mnseg.data.synth_artefacts import bias_field, random_blur, random_gamma, rician_noise, thick_slices
from mnseg.data.synth_deform import random_deformation, warp
from mnseg.data.synth_domain import TARGET, target_acquisition
from mnseg.errors import ConfigError, MnsegError

LABELS = {"background": 0, "white_matter": 1, "grey_matter": 2, "lesion": 3}
IGNORE = 4
WM, GM, LESION = 1, 2, 3
STATEMENT = (
    "one real anatomy (MNI152 2009) with synthetic variation; figures on it are not comparable "
    "with published LA or Pancreas-CT figures"
)
# Bump when the generator changes what a seed produces, so stale datasets are not reused.
GENERATOR_VERSION = 1
TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
# Each group draws seeds from its own SeedSequence spawn key, so groups never share a subject.
GROUPS = {  # name: (spawn key, image folder, label folder or None, case prefix)
    "labeled": (0, "imagesTr", "labelsTr", "mni_lab"),
    "unlabeled": (1, "imagesUnlabeled", None, "mni_unl"),
    "test": (2, "imagesTs", "labelsTs", "mni_test"),
    "target": (3, "imagesTarget", "labelsTarget", "mni_tgt"),  # --domain-shift only (data/synth_domain.py)
}
DATASET_SUBFOLDERS = ("imagesTr", "labelsTr", "imagesUnlabeled", "imagesTs", "labelsTs", "imagesTarget",
                      "labelsTarget")


@dataclass(frozen=True)
class Variation:
    """How far subjects stray from the template. "standard" is the demo's; "strong" leaves a segmenter more to
    learn from extra subjects (larger warps, per-subject grey/white contrast, fainter and smaller lesions,
    more noise), so label-efficiency benchmarks have room between few and all labels."""

    max_rotation_deg: float = 6.0
    scale_range: tuple[float, float] = (0.94, 1.06)
    max_axis_scale: float = 0.03
    max_translation_mm: float = 4.0
    elastic_std_mm: tuple[float, float] = (1.5, 3.5)
    lesion_count: tuple[int, int] = (3, 10)
    lesion_radius_mm: tuple[float, float] = (3.0, 9.0)
    lesion_intensity: tuple[float, float] = (1.25, 1.6)  # relative to white matter (~1)
    grey_contrast: tuple[float, float] | None = None  # grey matter intensity factor, drawn per subject
    gamma_range: tuple[float, float] = (0.75, 1.35)
    max_blur_vox: float = 0.5
    noise_sigma: tuple[float, float] = (0.02, 0.06)


VARIATIONS = {
    "standard": Variation(),
    "strong": Variation(max_rotation_deg=15.0, scale_range=(0.85, 1.15), max_axis_scale=0.08,
                        max_translation_mm=8.0, elastic_std_mm=(3.0, 7.0), lesion_count=(1, 12),
                        lesion_radius_mm=(2.0, 8.0), lesion_intensity=(1.08, 1.5), grey_contrast=(0.8, 1.35),
                        gamma_range=(0.6, 1.6), max_blur_vox=0.9, noise_sigma=(0.03, 0.10)),
}
MIN_SPACING, MAX_SPACING = 1.0, 8.0


@dataclass(frozen=True)
class Template:
    """The template on one output grid: T1 scaled so white matter is ~1, tissue probabilities in [0, 1]."""

    t1: np.ndarray
    wm: np.ndarray
    gm: np.ndarray
    affine: np.ndarray
    brain_extracted: bool  # whether the shipped T1 already had skull and scalp removed

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.t1.shape)


def template_dir() -> Path:
    """Folder of the MNI152 files inside the installed nilearn wheel."""
    try:
        import nilearn.datasets
    except ImportError as exc:
        raise MnsegError(f"mnseg synth needs nilearn for the MNI152 template ({exc}); "
                         "pip install nilearn") from None
    folder = Path(nilearn.datasets.__file__).resolve().parent / "data"
    missing = [name for name in TEMPLATE_FILES.values() if not (folder / name).is_file()]
    if missing:
        raise MnsegError(f"{folder}: the nilearn install lacks the MNI152 template files {missing}")
    return folder


def ensure_brain_extracted(t1: np.ndarray, brain_prob: np.ndarray) -> tuple[np.ndarray, bool]:
    """Return the T1 with non-brain removed, and whether it already was.

    Bright signal well outside the tissue maps means skull and scalp are present;
    then the T1 is masked with the filled, slightly dilated brain mask (which keeps
    the ventricles and sulcal CSF).
    """
    brain = brain_prob > 0.1
    far_outside = ~ndimage.binary_dilation(brain, iterations=4)
    bright = t1 > 0.2 * float(np.median(t1[brain]))
    if not far_outside.any() or bright[far_outside].mean() < 0.01:
        return t1, True
    mask = ndimage.binary_fill_holes(ndimage.binary_closing(ndimage.binary_dilation(brain, iterations=2),
                                                            iterations=3))
    return (t1 * mask).astype(t1.dtype), False


def load_template(spacing: float = 3.0) -> Template:
    """The template resampled to isotropic ``spacing`` mm and cropped to the brain; cached per spacing."""
    return _load_template(float(spacing))


@functools.lru_cache(maxsize=4)
def _load_template(spacing: float) -> Template:
    import nibabel as nib

    folder = template_dir()
    volumes, affine = {}, None
    for key, name in TEMPLATE_FILES.items():
        path = folder / name
        try:
            img = nib.as_closest_canonical(nib.load(str(path)))  # RAS, so array axis 2 is axial
            volumes[key] = np.asarray(img.dataobj, dtype=np.float32)
        except Exception as exc:
            raise MnsegError(f"{path}: cannot read the MNI152 template ({exc})") from None
        affine = img.affine if affine is None else affine
    wm, gm = volumes["wm"] / 255.0, volumes["gm"] / 255.0  # stored as uint8 probabilities
    t1, extracted = ensure_brain_extracted(volumes["t1"], wm + gm)
    t1 = t1 / float(np.median(t1[wm > 0.9]))

    native = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    step = spacing / native  # output step in native voxels, per axis
    margin = np.ceil(max(10.0, 3 * spacing) / native).astype(int)
    idx = np.argwhere(wm + gm > 0.1)
    start = np.maximum(idx.min(axis=0) - margin, 0)
    end = np.minimum(idx.max(axis=0) + margin, np.asarray(t1.shape) - 1)
    shape = tuple(int(n) for n in np.floor((end - start) / step).astype(int) + 1)

    def resample(vol: np.ndarray) -> np.ndarray:
        sigma = np.maximum((step - 1.0) / 2.0, 0.0)  # anti-aliasing before subsampling
        if sigma.any():
            vol = ndimage.gaussian_filter(vol, sigma)
        out = ndimage.affine_transform(vol, step, offset=start, output_shape=shape, order=1, mode="nearest")
        out.setflags(write=False)  # shared through the cache
        return out

    grid = np.eye(4)
    grid[:3, :3] = np.diag(step)
    grid[:3, 3] = start
    return Template(t1=resample(t1), wm=resample(wm), gm=resample(gm), affine=affine @ grid,
                    brain_extracted=extracted)


def tissue_labels(wm: np.ndarray, gm: np.ndarray) -> np.ndarray:
    """Argmax over (background, WM, GM) with background = 1 - WM - GM (CSF and outside the brain).

    A voxel is tissue only when that tissue outweighs everything else (so at
    least 1/3 likely); outside the brain both maps are zero and it is background.
    """
    background = np.clip(1.0 - wm - gm, 0.0, 1.0)
    label = np.where(wm >= gm, WM, GM).astype(np.uint8)
    label[np.maximum(wm, gm) <= background] = 0
    return label


def random_lesions(
    rng: np.random.Generator,
    wm: np.ndarray,
    spacing: float,
    count_range: tuple[int, int] = (3, 10),
    radius_mm: tuple[float, float] = (3.0, 9.0),
) -> np.ndarray:
    """Soft lesion weight in [0, 1]: ellipsoidal blobs centred in deep white matter, clipped to it.

    The weight is multiplied by the WM probability, so a voxel can only become
    lesion (weight > 0.5) where it is more likely WM than not.
    """
    candidates = np.argwhere(wm > 0.85)
    if len(candidates) == 0:
        candidates = np.argwhere(wm >= 0.9 * float(wm.max()))
    weight = np.zeros(wm.shape, dtype=np.float32)
    for _ in range(int(rng.integers(count_range[0], count_range[1], endpoint=True))):
        centre = candidates[rng.integers(len(candidates))] + rng.uniform(-0.4, 0.4, 3)
        radii = np.maximum(rng.uniform(*radius_mm, 3) / spacing, 0.8)  # voxels; at least one voxel
        lo = np.maximum(np.floor(centre - 1.5 * radii).astype(int), 0)
        hi = np.minimum(np.ceil(centre + 1.5 * radii).astype(int) + 1, wm.shape)
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        axes = [(np.arange(a, b) - c) / r for a, b, c, r in zip(lo, hi, centre, radii)]
        dist = np.sqrt(axes[0][:, None, None] ** 2 + axes[1][None, :, None] ** 2
                       + axes[2][None, None, :] ** 2)
        blob = 1.0 / (1.0 + np.exp((dist - 1.0) / 0.15))
        weight[box] = np.maximum(weight[box], blob)
    return weight * wm


def _generate(seed: int, spacing: float, thick_slice_fraction: float, variation: str = "standard",
              target: bool = False) -> tuple[np.ndarray, np.ndarray, dict]:
    """One subject on the template grid: (image, dense label, facts worth recording). ``target``: acquired by the
    target domain's scanner (``synth_domain.target_acquisition``) instead of the source's artefacts below."""
    var = VARIATIONS[variation]
    tpl = load_template(spacing)
    rng = np.random.default_rng(seed)
    image, label, gm = _anatomy(rng, tpl, spacing, var)
    if target:
        image, facts = target_acquisition(image, rng, spacing)
        return image, label, facts
    if var.grey_contrast is not None:  # drawn only here, so "standard" subjects keep their bytes
        image = image * (1.0 + (rng.uniform(*var.grey_contrast) - 1.0) * gm)
    image = random_gamma(image, rng, var.gamma_range)
    image = image * bias_field(rng, tpl.shape, spacing)
    image = random_blur(image, rng, var.max_blur_vox)
    thick_mm = rng.uniform(5.0, 7.0)  # a clinical 5-7 mm axial acquisition, at least twice the grid spacing
    thick = max(2, round(thick_mm / spacing)) if rng.random() < thick_slice_fraction else 1
    image = thick_slices(image, thick, axis=2)
    image = rician_noise(image, rng, sigma=rng.uniform(*var.noise_sigma))
    image = image * rng.uniform(300.0, 1200.0)  # arbitrary scanner units, so intensity normalisation matters
    return image.astype(np.float32), label, {"slice_thickness_factor": thick}


def _anatomy(rng: np.random.Generator, tpl: Template, spacing: float,
             var: Variation) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A subject's anatomy, before any acquisition: (image with white matter ~1, dense label, grey matter map)."""
    coords = random_deformation(tpl.shape, spacing, rng, max_translation_mm=var.max_translation_mm,
                                elastic_std_mm=var.elastic_std_mm, max_rotation_deg=var.max_rotation_deg,
                                scale_range=var.scale_range, max_axis_scale=var.max_axis_scale)
    t1, wm, gm = (warp(v, coords, order=1) for v in (tpl.t1, tpl.wm, tpl.gm))
    label = tissue_labels(wm, gm)

    lesion = random_lesions(rng, wm, spacing, count_range=var.lesion_count, radius_mm=var.lesion_radius_mm)
    label[lesion > 0.5] = LESION
    image = t1 * (1.0 - lesion) + rng.uniform(*var.lesion_intensity) * lesion  # hyperintense relative to WM
    return image, label, gm


def synthesize_subject(
    seed: int, spacing: float = 3.0, thick_slice_fraction: float = 0.25, variation: str = "standard"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One pseudo-subject: (image float32, dense label uint8, 4x4 world affine). Same seed, same bytes."""
    _check_spacing(spacing)
    _check_variation(variation)
    image, label, _ = _generate(int(seed), float(spacing), float(thick_slice_fraction), variation)
    return image, label, load_template(spacing).affine.copy()


def subject_seed(base_seed: int, group: str, index: int) -> int:
    """The seed of subject ``index`` in ``group``, from a SeedSequence spawn key (group, index)."""
    key = GROUPS[group][0]
    state = np.random.SeedSequence(int(base_seed), spawn_key=(key, int(index))).generate_state(1, np.uint64)
    return int(state[0])


def sparse_slice_indices(n_slices: int, every: int) -> np.ndarray:
    """Axial slices kept labelled in the sparse variant: every ``every``-th, starting at ``every // 2``."""
    return np.arange(every // 2, n_slices, every)


def sparsify(label: np.ndarray, every: int) -> np.ndarray:
    """Keep labels on every ``every``-th slice of array axis 2 (axial, RAS) and mark the rest ``ignore``."""
    out = np.full_like(label, IGNORE)
    keep = sparse_slice_indices(label.shape[2], every)
    out[:, :, keep] = label[:, :, keep]
    return out


def synthesize_dataset(
    out_dir: str | Path,
    n_labeled: int = 6,
    n_unlabeled: int = 12,
    n_test: int = 6,
    spacing: float = 3.0,
    seed: int = 0,
    sparse_every: int | None = None,
    thick_slice_fraction: float = 0.25,
    progress: bool = True,
    overwrite: bool = False,
    reuse: bool = False,
    variation: str = "standard",
    workers: int | None = None,
    domain_shift: bool = False,
    n_target: int = 6,
) -> Path:
    """Write a dataset folder of pseudo-subjects and return its path. ``domain_shift`` also writes ``n_target``
    subjects of a target domain (``synth_domain``) to imagesTarget/labelsTarget.

    Refuses a non-empty folder unless ``overwrite`` (which replaces only the
    dataset sub-folders and dataset.json). With ``reuse``, a complete dataset
    written earlier with the same settings is returned untouched. ``workers``
    processes build subjects at once (default: one per CPU core).
    """
    from mnseg.utils.atomic import atomic_write_json

    settings = _settings(n_labeled, n_unlabeled, n_test, spacing, seed, sparse_every, thick_slice_fraction,
                         variation, n_target if domain_shift else None)
    out = Path(out_dir)
    if reuse and is_complete(out, settings):
        return out
    _prepare_folder(out, overwrite)

    tpl = load_template(settings["spacing"])
    counts = {"labeled": n_labeled, "unlabeled": n_unlabeled, "test": n_test,
              **({"target": n_target} if domain_shift else {})}
    jobs = [(out, group, index, subject_seed(seed, group, index), settings["spacing"], thick_slice_fraction,
             variation, sparse_every) for group, count in counts.items() for index in range(count)]
    subjects, class_voxels = _write_subjects(jobs, workers, progress)
    labels = dict(LABELS, **({"ignore": IGNORE} if sparse_every else {}))
    fractions = class_voxels / max(int(class_voxels.sum()), 1)
    meta = {
        "name": "MNI152Synth",
        "description": f"Synthetic demo data from mnseg synth: {STATEMENT}.",
        "channel_names": {"0": "MRI"},
        "labels": labels,
        "numTraining": n_labeled,
        "file_ending": ".nii.gz",
        "synthetic": {
            "statement": STATEMENT,
            "source": {"template": "MNI152 ICBM 2009a nonlinear symmetric (shipped with nilearn)",
                       "files": list(TEMPLATE_FILES.values()),
                       "brain_extracted_as_shipped": tpl.brain_extracted},
            "settings": settings,
            "seed_derivation": "numpy SeedSequence(base_seed, spawn_key=(group_key, index)); "
                               "group keys labeled=0, unlabeled=1, test=2" + (", target=3" if domain_shift else ""),
            **({"target_domain": TARGET.to_dict()} if domain_shift else {}),
            "spacing_mm": [settings["spacing"]] * 3,
            "shape": list(tpl.shape),
            "counts": counts,
            "sparse_slices": (sparse_slice_indices(tpl.shape[2], sparse_every).tolist()
                              if sparse_every else None),
            "class_voxel_fractions": {name: float(fractions[v]) for name, v in LABELS.items()},
            "subjects": subjects,
        },
    }
    atomic_write_json(out / "dataset.json", meta)  # written last: its presence marks a complete dataset
    return out


def _write_subjects(jobs: list[tuple], workers: int | None, progress: bool) -> tuple[dict, np.ndarray]:
    """Write every subject (``workers`` processes at once, default one per CPU core); returns each subject's
    record and the voxel count of every class over all of them."""
    from mnseg.utils.progress import progress_bar

    workers = max(1, min(int(workers or os.cpu_count() or 1), len(jobs)))
    class_voxels = np.zeros(len(LABELS), dtype=np.int64)
    subjects = {}
    with progress_bar(total=len(jobs), desc="mnseg synth", unit="subject", disable=not progress) as bar:
        if workers == 1:
            results = map(_write_subject, jobs)
        else:  # subjects are independent and seeded, so the files are the same for any number of workers
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
            results = pool.map(_write_subject, jobs)
        try:
            for case, info, voxels in results:
                subjects[case] = info
                class_voxels += voxels
                bar.update(1)
        finally:
            if workers > 1:
                pool.shutdown(cancel_futures=True)
    return subjects, class_voxels


def _write_subject(job: tuple) -> tuple[str, dict, np.ndarray]:
    """Build one subject and write its files; returns (case, facts for dataset.json, class voxel counts)."""
    from mnseg.data.io import save_nifti

    out, group, index, case_seed, spacing, thick_slice_fraction, variation, sparse_every = job
    _, image_dir, label_dir, prefix = GROUPS[group]
    case = f"{prefix}_{index:03d}"
    image, label, facts = _generate(case_seed, spacing, thick_slice_fraction, variation, target=group == "target")
    voxels = np.bincount(label.ravel(), minlength=len(LABELS))[: len(LABELS)]
    affine = load_template(spacing).affine
    save_nifti(image, affine, out / image_dir / f"{case}_0000.nii.gz", dtype=np.float32)
    if label_dir is not None:
        if group == "labeled" and sparse_every:
            label = sparsify(label, sparse_every)
        save_nifti(label, affine, out / label_dir / f"{case}.nii.gz", dtype=np.uint8)
    return case, {"group": group, "index": index, "seed": case_seed, **facts}, voxels


def is_complete(out: Path, settings: dict) -> bool:
    """True when ``out`` holds every file of a dataset written with exactly ``settings``."""
    try:
        meta = json.loads((out / "dataset.json").read_text())
        synthetic = meta["synthetic"]
        if synthetic["settings"] != settings:
            return False
        for case, info in synthetic["subjects"].items():
            _, image_dir, label_dir, _ = GROUPS[info["group"]]
            if not (out / image_dir / f"{case}_0000.nii.gz").is_file():
                return False
            if label_dir is not None and not (out / label_dir / f"{case}.nii.gz").is_file():
                return False
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    return True


def _settings(n_labeled, n_unlabeled, n_test, spacing, seed, sparse_every, thick_slice_fraction,
              variation="standard", n_target=None) -> dict:
    """Validate the options and return them as the record compared by ``reuse`` (``n_target`` None: no domain
    shift, left out of the record)."""
    counts = (("n_labeled", n_labeled, 1), ("n_unlabeled", n_unlabeled, 0), ("n_test", n_test, 0),
              *((("n_target", n_target, 1),) if n_target is not None else ()))
    for name, value, least in counts:
        if int(value) != value or value < least:
            raise ConfigError(f"{name} must be a whole number >= {least}, got {value}")
    _check_spacing(spacing)
    if sparse_every is not None and (int(sparse_every) != sparse_every or sparse_every < 2):
        raise ConfigError(f"sparse_every must be a whole number >= 2 (leave it out for dense labels), "
                          f"got {sparse_every}")
    if not 0.0 <= thick_slice_fraction <= 1.0:
        raise ConfigError(f"thick_slice_fraction must lie in [0, 1], got {thick_slice_fraction}")
    _check_variation(variation)
    # "standard" is left out of the record so datasets written before variations existed are still reused.
    extra = {} if variation == "standard" else {"variation": variation}
    if n_target is not None:
        extra["domain_shift"] = {"n_target": int(n_target)}
    return {
        "generator_version": GENERATOR_VERSION,
        "seed": int(seed),
        "spacing": float(spacing),
        "n_labeled": int(n_labeled),
        "n_unlabeled": int(n_unlabeled),
        "n_test": int(n_test),
        "sparse_every": int(sparse_every) if sparse_every else None,
        "thick_slice_fraction": float(thick_slice_fraction),
        **extra,
    }


def _check_variation(variation: str) -> None:
    if variation not in VARIATIONS:
        raise ConfigError(f"variation must be one of {', '.join(VARIATIONS)}, got {variation!r}")


def _check_spacing(spacing: float) -> None:
    if not MIN_SPACING <= float(spacing) <= MAX_SPACING:
        raise ConfigError(f"spacing must lie in [{MIN_SPACING:g}, {MAX_SPACING:g}] mm "
                          f"(1 = the template's full resolution), got {spacing}")


def _prepare_folder(out: Path, overwrite: bool) -> None:
    """Make ``out`` ready to receive a dataset; never delete anything without ``overwrite``."""
    if out.exists() and not out.is_dir():
        raise MnsegError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise MnsegError(f"{out}: folder is not empty (or holds a dataset with other settings); "
                             f"choose a new folder or pass --overwrite to replace its "
                             f"{', '.join(DATASET_SUBFOLDERS)} and dataset.json")
        # dataset.json goes first, so a half-rewritten folder never looks complete.
        (out / "dataset.json").unlink(missing_ok=True)
        for sub in DATASET_SUBFOLDERS:
            if (out / sub).is_dir():
                shutil.rmtree(out / sub)
    out.mkdir(parents=True, exist_ok=True)
