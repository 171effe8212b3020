"""A tiny generated dataset (bright ellipsoids in noise) for tests and smoke runs.

Written in the same folder layout as a user's dataset, so every code path
that reads real data is exercised by it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mnseg.data.io import save_nifti


def toy_case(shape=(32, 32, 32), seed: int = 0, num_foreground: int = 1, noise: float = 0.35,
             ramp: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """One image/label pair: class 1 an ellipsoid, class 2 (optional) a small ball inside it. ``ramp`` adds an
    intensity ramp rising by that much along x and half as much along z, so a crop shows its orientation (the
    rotation pretext task's tests)."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"))
    shape_arr = np.asarray(shape, dtype=np.float32)
    centre = shape_arr / 2 + rng.uniform(-0.12, 0.12, 3) * shape_arr
    radii = shape_arr * rng.uniform(0.18, 0.3, 3)
    d = sum(((grid[i] - centre[i]) / radii[i]) ** 2 for i in range(3))
    label = (d <= 1.0).astype(np.uint8)
    image = rng.normal(0.0, noise, shape).astype(np.float32) + 1.0 * label
    if ramp:
        image += ramp * (grid[0] / shape_arr[0] + 0.5 * grid[2] / shape_arr[2])
    if num_foreground >= 2:
        r2 = float(radii.min()) * 0.45
        d2 = sum((grid[i] - centre[i]) ** 2 for i in range(3)) / r2**2
        inner = d2 <= 1.0
        label[inner] = 2
        image[inner] += 1.0
    return image.astype(np.float32), label


def toy_target_image(image: np.ndarray) -> np.ndarray:
    """The target domain of the toy data: a compressive contrast curve (tanh) and a dark-to-bright ramp across x,
    so z-scoring alone does not undo the shift."""
    ramp = np.linspace(-0.5, 0.5, image.shape[0], dtype=np.float32)[:, None, None]
    return (np.tanh(1.5 * image) + ramp).astype(np.float32)


def make_toy_dataset(
    root: str | Path,
    n_train: int = 4,
    n_unlabeled: int = 4,
    n_test: int = 2,
    shape=(32, 32, 32),
    spacing=(1.0, 1.0, 1.0),
    seed: int = 0,
    num_foreground: int = 1,
    modality: str = "MRI",
    noise: float = 0.35,
    ramp: float = 0.0,
    n_target: int = 0,
) -> Path:
    """Write a dataset folder with imagesTr/labelsTr, imagesUnlabeled and imagesTs/labelsTs; with ``n_target``
    also imagesTarget/labelsTarget, a shifted domain (``toy_target_image``). The other groups do not change."""
    root = Path(root)
    affine = np.diag([*spacing, 1.0])
    labels = {"background": 0, "fg": 1} if num_foreground == 1 else {"background": 0, "outer": 1, "inner": 2}
    groups = [("Tr", n_train, True), ("Unlabeled", n_unlabeled, False), ("Ts", n_test, True)]
    case_seed = seed * 1000
    for suffix, count, with_label in groups:
        for i in range(count):
            case_seed += 1
            image, label = toy_case(shape, case_seed, num_foreground, noise, ramp)
            name = f"toy{suffix.lower()}_{i:03d}"
            save_nifti(image, affine, root / f"images{suffix}" / f"{name}_0000.nii.gz")
            if with_label:
                save_nifti(label, affine, root / f"labels{suffix}" / f"{name}.nii.gz", dtype=np.uint8)
    for i in range(n_target):
        image, label = toy_case(shape, seed * 1000 + 500 + i, num_foreground, noise, ramp)
        name = f"toytgt_{i:03d}"
        save_nifti(toy_target_image(image), affine, root / "imagesTarget" / f"{name}_0000.nii.gz")
        save_nifti(label, affine, root / "labelsTarget" / f"{name}.nii.gz", dtype=np.uint8)
    meta = {
        "name": "Toy",
        "channel_names": {"0": modality},
        "labels": labels,
        "numTraining": n_train,
        "file_ending": ".nii.gz",
    }
    (root / "dataset.json").write_text(json.dumps(meta, indent=2))
    return root
