"""Tests for the MNI152-based synthetic demo data (``mnseg.data.synth`` and ``mnseg synth``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

from mnseg.data import synth
from mnseg.data.io import load_nifti
from mnseg.data.synth_artefacts import thick_slices
from mnseg.data.synth_deform import random_deformation, warp
from mnseg.errors import MnsegError

SPACING = 6.0  # coarse grid keeps every test to seconds


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "Dataset900_MNISynth"
    return synth.synthesize_dataset(out, n_labeled=2, n_unlabeled=2, n_test=2, spacing=SPACING, seed=3,
                                    progress=False)


@pytest.fixture(scope="module")
def sparse_dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth_sparse") / "Dataset901_MNISparse"
    return synth.synthesize_dataset(out, n_labeled=2, n_unlabeled=0, n_test=1, spacing=SPACING, seed=3,
                                    sparse_every=3, progress=False)


def test_same_seed_gives_identical_bytes_and_other_seed_differs():
    image_a, label_a, affine_a = synth.synthesize_subject(11, SPACING)
    image_b, label_b, affine_b = synth.synthesize_subject(11, SPACING)
    image_c, label_c, _ = synth.synthesize_subject(12, SPACING)
    assert image_a.dtype == np.float32 and label_a.dtype == np.uint8
    assert image_a.tobytes() == image_b.tobytes()
    assert label_a.tobytes() == label_b.tobytes()
    np.testing.assert_array_equal(affine_a, affine_b)
    assert image_a.tobytes() != image_c.tobytes()
    assert label_a.tobytes() != label_c.tobytes()


def test_deformation_moves_image_and_label_together():
    shape = (30, 34, 28)
    image = np.zeros(shape, dtype=np.float32)
    label = np.zeros(shape, dtype=np.uint8)
    cube = (slice(8, 22), slice(10, 24), slice(7, 20))
    image[cube] = 1.0
    label[cube] = 1
    coords = random_deformation(shape, 2.0, np.random.default_rng(5), max_rotation_deg=10.0)
    warped_image = warp(image, coords, order=1)
    warped_label = warp(label, coords, order=0)
    assert not np.array_equal(warped_label, label), "the deformation should move the cube"
    assert warped_label.sum() > 0.5 * label.sum()
    bright = warped_image > 0.5
    border = ndimage.binary_dilation(warped_label == 1) & ~ndimage.binary_erosion(warped_label == 1)
    mismatch = bright != (warped_label == 1)
    assert not (mismatch & ~border).any(), "image and label disagree away from the cube's border"
    assert mismatch.sum() < 0.05 * label.sum()


def test_subject_image_intensities_follow_its_labels():
    image, label, _ = synth.synthesize_subject(4, SPACING, thick_slice_fraction=0.0)
    mean = {c: float(image[label == c].mean()) for c in range(4)}
    # T1 contrast: lesions (hyperintense) > white matter > grey matter > background.
    assert mean[synth.LESION] > mean[synth.WM] > mean[synth.GM] > mean[0]


def test_template_affine_places_anatomy_in_the_right_world_position():
    import nibabel as nib

    original = nib.load(str(synth.template_dir() / synth.TEMPLATE_FILES["wm"]))
    wm = np.asarray(original.dataobj, dtype=np.float64)
    centroid_world = (original.affine @ np.append(ndimage.center_of_mass(wm), 1.0))[:3]
    tpl = synth.load_template(SPACING)
    resampled = (tpl.affine @ np.append(ndimage.center_of_mass(tpl.wm.astype(np.float64)), 1.0))[:3]
    np.testing.assert_allclose(resampled, centroid_world, atol=1.5)
    np.testing.assert_allclose(np.abs(np.diag(tpl.affine)[:3]), SPACING)
    assert tpl.brain_extracted  # the nilearn T1 ships skull-stripped


def test_skull_is_detected_and_removed():
    grid = np.stack(np.meshgrid(*[np.arange(40.0)] * 3, indexing="ij"))
    radius = np.sqrt(((grid - 19.5) ** 2).sum(axis=0))
    brain_prob = (radius < 12).astype(np.float32)
    stripped = 100.0 * brain_prob
    with_skull = stripped + 80.0 * ((radius > 16) & (radius < 18))
    kept, was_extracted = synth.ensure_brain_extracted(stripped, brain_prob)
    assert was_extracted and np.array_equal(kept, stripped)
    cleaned, was_extracted = synth.ensure_brain_extracted(with_skull, brain_prob)
    assert not was_extracted
    assert cleaned[radius > 16].max() == 0 and np.array_equal(cleaned[radius < 12], stripped[radius < 12])


def test_groups_draw_from_disjoint_seeds(dataset):
    seeds = {g: {synth.subject_seed(0, g, i) for i in range(200)} for g in synth.GROUPS}
    assert all(len(s) == 200 for s in seeds.values())
    assert not (seeds["labeled"] & seeds["test"]) and not (seeds["unlabeled"] & seeds["test"])
    assert not (seeds["labeled"] & seeds["unlabeled"])

    subjects = json.loads((dataset / "dataset.json").read_text())["synthetic"]["subjects"]
    by_group = {g: {s["seed"] for s in subjects.values() if s["group"] == g} for g in synth.GROUPS}
    assert not (by_group["test"] & (by_group["labeled"] | by_group["unlabeled"]))
    test_images = [load_nifti(p).data for p in sorted((dataset / "imagesTs").glob("*.nii.gz"))]
    train_images = [load_nifti(p).data for p in sorted((dataset / "imagesTr").glob("*.nii.gz"))]
    assert all(not np.array_equal(a, b) for a in test_images for b in train_images)


def test_test_subjects_do_not_depend_on_training_counts(dataset, tmp_path):
    other = synth.synthesize_dataset(tmp_path / "other", n_labeled=1, n_unlabeled=0, n_test=1,
                                     spacing=SPACING, seed=3, progress=False)
    case = "mni_test_000"
    a = load_nifti(dataset / "labelsTs" / f"{case}.nii.gz", dtype=None).data
    b = load_nifti(other / "labelsTs" / f"{case}.nii.gz", dtype=None).data
    np.testing.assert_array_equal(a, b)


def test_dataset_json_and_files_read_back(dataset):
    meta = json.loads((dataset / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "MRI"}
    assert meta["labels"] == {"background": 0, "white_matter": 1, "grey_matter": 2, "lesion": 3}
    assert meta["numTraining"] == 2 and meta["file_ending"] == ".nii.gz"
    info = meta["synthetic"]
    assert "MNI152 2009" in info["statement"] and "not comparable" in info["statement"]
    assert info["counts"] == {"labeled": 2, "unlabeled": 2, "test": 2}
    assert info["settings"]["seed"] == 3 and info["spacing_mm"] == [SPACING] * 3
    assert abs(sum(info["class_voxel_fractions"].values()) - 1.0) < 1e-6

    tpl = synth.load_template(SPACING)
    expected = {"imagesTr": 2, "labelsTr": 2, "imagesUnlabeled": 2, "imagesTs": 2, "labelsTs": 2}
    for folder, count in expected.items():
        files = sorted((dataset / folder).glob("*.nii.gz"))
        assert len(files) == count, folder
        for path in files:
            vol = load_nifti(path, dtype=None)
            assert vol.shape == tuple(info["shape"])
            np.testing.assert_allclose(vol.affine, tpl.affine, atol=1e-4)
            np.testing.assert_allclose(vol.spacing, [SPACING] * 3, atol=1e-5)
            if folder.startswith("labels"):
                assert vol.data.dtype == np.uint8 and set(np.unique(vol.data)) <= {0, 1, 2, 3}
            else:
                assert vol.data.dtype == np.float32 and np.isfinite(vol.data).all()
    assert not list(dataset.rglob(".*"))  # no temporary files left behind


def test_lesions_exist_and_sit_inside_white_matter(dataset):
    paths = sorted((dataset / "labelsTr").glob("*.nii.gz")) + sorted((dataset / "labelsTs").glob("*.nii.gz"))
    for path in paths:
        label = load_nifti(path, dtype=None).data
        lesion = label == synth.LESION
        assert lesion.any(), f"{path.name} has no lesion"
        ring = ndimage.binary_dilation(lesion) & ~lesion
        assert (label[ring] == synth.WM).mean() > 0.5, f"{path.name}: lesions not surrounded by white matter"


def test_sparse_variant_labels_only_chosen_slices(sparse_dataset):
    meta = json.loads((sparse_dataset / "dataset.json").read_text())
    assert meta["labels"]["ignore"] == synth.IGNORE == max(meta["labels"].values())
    kept = meta["synthetic"]["sparse_slices"]
    for path in sorted((sparse_dataset / "labelsTr").glob("*.nii.gz")):
        label = load_nifti(path, dtype=None).data
        assert kept == list(range(1, label.shape[2], 3))
        for z in range(label.shape[2]):
            if z in kept:
                assert not (label[:, :, z] == synth.IGNORE).any()
            else:
                assert (label[:, :, z] == synth.IGNORE).all()
        assert (label[:, :, kept] > 0).any()
    test_label = load_nifti(next((sparse_dataset / "labelsTs").glob("*.nii.gz")), dtype=None).data
    assert not (test_label == synth.IGNORE).any(), "test labels stay dense"


def test_thick_slices_average_along_the_axial_axis_only():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(6, 7, 12)).astype(np.float32)
    out = thick_slices(image, 2, axis=2)
    assert out.shape == image.shape
    assert np.abs(np.diff(out, axis=2)).mean() < np.abs(np.diff(image, axis=2)).mean()
    constant_along_z = np.repeat(image[:, :, :1], 12, axis=2)
    np.testing.assert_allclose(thick_slices(constant_along_z, 3, axis=2), constant_along_z, rtol=1e-6)


def test_refuses_non_empty_folder_reuses_and_overwrites(tmp_path):
    out = tmp_path / "ds"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    kwargs = dict(n_labeled=1, n_unlabeled=0, n_test=0, spacing=SPACING, seed=1, progress=False)
    with pytest.raises(MnsegError, match="not empty"):
        synth.synthesize_dataset(out, **kwargs)
    synth.synthesize_dataset(out, overwrite=True, **kwargs)
    assert (out / "notes.txt").read_text() == "mine"  # only dataset parts are replaced
    image = out / "imagesTr" / "mni_lab_000_0000.nii.gz"
    stamp = image.stat().st_mtime_ns
    assert synth.synthesize_dataset(out, reuse=True, **kwargs) == out
    assert image.stat().st_mtime_ns == stamp
    with pytest.raises(MnsegError, match="not empty"):
        synth.synthesize_dataset(out, reuse=True, **{**kwargs, "seed": 2})
    image.unlink()  # incomplete: reuse must not accept it
    assert not synth.is_complete(out, json.loads((out / "dataset.json").read_text())["synthetic"]["settings"])


@pytest.mark.parametrize("bad", [{"spacing": 0.5}, {"n_labeled": 0}, {"sparse_every": 1},
                                 {"thick_slice_fraction": 1.5}, {"variation": "extreme"}])
def test_bad_options_raise_clear_errors(tmp_path, bad):
    with pytest.raises(MnsegError):
        synth.synthesize_dataset(tmp_path / "x", **{"progress": False, "spacing": SPACING, **bad})
    assert not (tmp_path / "x").exists()


def test_cli_writes_dataset_and_prints_summary(tmp_path, capsys):
    from mnseg.cli import main

    out = tmp_path / "cli"
    rc = main(["synth", str(out), "--n-labeled", "1", "--n-unlabeled", "1", "--n-test", "0",
               "--spacing", str(SPACING), "--sparse-every", "4"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "lesion" in text and "x".join(map(str, synth.load_template(SPACING).shape)) in text
    assert len(list((out / "imagesUnlabeled").glob("*.nii.gz"))) == 1
    assert main(["synth", str(out), "--spacing", str(SPACING)]) == 2  # not empty, no --overwrite
    assert "not empty" in capsys.readouterr().err


def _mean_white_matter_overlap_with_template(variation: str, seeds=range(4)) -> float:
    tpl = synth.load_template(SPACING)
    template_wm = synth.tissue_labels(tpl.wm, tpl.gm) == synth.WM
    dice = []
    for seed in seeds:
        wm = synth.synthesize_subject(seed, SPACING, variation=variation)[1] == synth.WM
        dice.append(2 * (wm & template_wm).sum() / (wm.sum() + template_wm.sum()))
    return float(np.mean(dice))


def test_strong_variation_strays_further_from_the_template():
    """Same seed: "strong" is another subject, warped further from the template than "standard" (so a
    model sees more new anatomy per subject), and T1 order and label values still hold."""
    assert _mean_white_matter_overlap_with_template("strong") < _mean_white_matter_overlap_with_template(
        "standard") - 0.1
    image, label, _ = synth.synthesize_subject(3, SPACING, thick_slice_fraction=0.0, variation="strong")
    assert image.tobytes() != synth.synthesize_subject(3, SPACING, thick_slice_fraction=0.0)[0].tobytes()
    assert set(np.unique(label)) <= {0, 1, 2, 3}
    assert np.median(image[label == synth.WM]) > np.median(image[label == synth.GM]) > np.median(image[label == 0])


def test_variation_is_recorded_only_when_not_standard(tmp_path):
    kwargs = {"n_labeled": 1, "n_unlabeled": 0, "n_test": 0, "spacing": SPACING, "progress": False}
    std = synth.synthesize_dataset(tmp_path / "std", **kwargs)
    strong = synth.synthesize_dataset(tmp_path / "strong", variation="strong", **kwargs)
    settings = {name: json.loads((p / "dataset.json").read_text())["synthetic"]["settings"]
                for name, p in (("std", std), ("strong", strong))}
    assert "variation" not in settings["std"]  # datasets written before variations existed are still reused
    assert settings["strong"]["variation"] == "strong"
    with pytest.raises(MnsegError, match="not empty"):  # other settings: never reused, never overwritten
        synth.synthesize_dataset(tmp_path / "std", reuse=True, variation="strong", **kwargs)


def test_parallel_workers_write_the_same_files(tmp_path):
    kwargs = {"n_labeled": 2, "n_unlabeled": 1, "n_test": 1, "spacing": 8.0, "progress": False, "seed": 5}
    one = synth.synthesize_dataset(tmp_path / "one", workers=1, **kwargs)
    two = synth.synthesize_dataset(tmp_path / "two", workers=2, **kwargs)
    files = sorted(p.relative_to(one) for p in one.rglob("*.nii.gz"))
    assert len(files) == 2 * 2 + 1 + 2
    assert files == sorted(p.relative_to(two) for p in two.rglob("*.nii.gz"))
    for rel in files:
        assert load_nifti(one / rel).data.tobytes() == load_nifti(two / rel).data.tobytes(), rel
    assert (one / "dataset.json").read_text() == (two / "dataset.json").read_text()


def test_domain_shift_writes_a_target_domain_of_other_intensities(tmp_path):
    out = synth.synthesize_dataset(tmp_path / "shift", n_labeled=2, n_unlabeled=0, n_test=0, spacing=SPACING, seed=3,
                                   progress=False, workers=1, domain_shift=True, n_target=2)
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["synthetic"]["counts"] == {"labeled": 2, "unlabeled": 0, "test": 0, "target": 2}
    assert meta["synthetic"]["settings"]["domain_shift"] == {"n_target": 2}
    assert "target=3" in meta["synthetic"]["seed_derivation"]

    def contrast(group, label_group):
        ratios, spreads = [], []
        for path in sorted((out / group).iterdir()):
            image = load_nifti(path).data
            label = load_nifti(out / label_group / path.name.replace("_0000", "")).data
            wm = image[label == synth.WM]
            ratios.append(image[label == synth.GM].mean() / wm.mean())
            spreads.append(wm.std() / wm.mean())
        return np.mean(ratios), np.mean(spreads)

    assert sorted(p.name for p in (out / "labelsTarget").iterdir()) == ["mni_tgt_000.nii.gz", "mni_tgt_001.nii.gz"]
    source_ratio, source_spread = contrast("imagesTr", "labelsTr")
    target_ratio, target_spread = contrast("imagesTarget", "labelsTarget")
    assert target_ratio < source_ratio - 0.1  # another contrast curve: grey matter darker relative to white
    assert target_spread > 1.5 * source_spread  # stronger bias field, more noise


def test_domain_shift_is_seeded_and_leaves_the_source_alone(tmp_path):
    seed = synth.subject_seed(3, "target", 0)
    a, label_a, _ = synth._generate(seed, SPACING, 0.25, target=True)
    b, label_b, _ = synth._generate(seed, SPACING, 0.25, target=True)
    assert a.tobytes() == b.tobytes() and label_a.tobytes() == label_b.tobytes()
    source, label_s, _ = synth._generate(seed, SPACING, 0.25)
    assert label_s.tobytes() == label_a.tobytes()  # same anatomy, another acquisition
    assert source.tobytes() != a.tobytes()
    assert seed not in {synth.subject_seed(3, g, i) for g in ("labeled", "unlabeled", "test") for i in range(50)}
