"""``mnseg synth``: write the demo dataset built from the MNI152 template shipped with nilearn."""

from __future__ import annotations

HELP = "write a synthetic brain MRI dataset (MNI152 anatomy, WM/GM/lesion labels) for demos and tests"
DESCRIPTION = """\
Write a dataset folder of pseudo-subjects made from the real MNI152 2009 template
(which ships inside nilearn): random smooth deformations, synthetic white-matter
lesions and MRI artefacts (bias field, Rician noise, contrast, blur, thick slices).
Labels: background 0, white_matter 1, grey_matter 2, lesion 3 (+ ignore 4 with --sparse-every).
The same --seed gives the same files; test subjects never share a seed with training ones.

One real anatomy with synthetic variation: figures on it are not comparable with
published LA or Pancreas-CT figures.

example:
  mnseg synth data/Dataset900_MNISynth --n-labeled 4 --n-unlabeled 8 --n-test 4
  mnseg synth data/Dataset901_MNISparse --sparse-every 5
  mnseg synth data/Dataset902_MNI1mm --spacing 1      # full resolution, for GPU runs
  mnseg synth data/Dataset903_MNIShift --domain-shift  # + imagesTarget/labelsTarget from another "scanner"
"""


def add_arguments(parser) -> None:
    parser.add_argument("out_dir", metavar="OUT_DIR", help="folder to create (must be empty or absent)")
    parser.add_argument("--n-labeled", type=int, default=6, help="labelled subjects in imagesTr/labelsTr (6)")
    parser.add_argument("--n-unlabeled", type=int, default=12,
                        help="unlabelled subjects in imagesUnlabeled (12)")
    parser.add_argument("--n-test", type=int, default=6, help="test subjects in imagesTs/labelsTs (6)")
    parser.add_argument("--spacing", type=float, default=3.0,
                        help="isotropic voxel size in mm, 1 to 8 (3: ~56x68x56 voxels, trains on a CPU; "
                             "1: full template resolution)")
    parser.add_argument("--seed", type=int, default=0,
                        help="base seed; every subject's seed derives from it (0)")
    parser.add_argument("--sparse-every", type=int, default=None, metavar="K",
                        help="label only every K-th axial slice of the labelled subjects; "
                             "the rest is 'ignore'")
    parser.add_argument("--variation", choices=["standard", "strong"], default="standard",
                        help="how far subjects stray from the template: standard (the demo's) or strong (larger "
                        "warps, per-subject grey/white contrast, fainter lesions, more noise: leaves room for "
                        "label-efficiency comparisons)")
    parser.add_argument("--domain-shift", action="store_true",
                        help="also write imagesTarget/labelsTarget: subjects of a target domain (another contrast "
                        "curve, a stronger bias field, a coarser resolution, more noise) for domain adaptation; "
                        "the other folders stay as without it")
    parser.add_argument("--n-target", type=int, default=6,
                        help="target-domain subjects with --domain-shift (6)")
    parser.add_argument("--workers", type=int, default=None,
                        help="processes building subjects at once (default: one per CPU core); any number gives "
                        "the same files")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the dataset sub-folders and dataset.json of a non-empty OUT_DIR")


def run(args) -> int:
    import json

    from mnseg.data.synth import synthesize_dataset

    out = synthesize_dataset(
        args.out_dir,
        n_labeled=args.n_labeled,
        n_unlabeled=args.n_unlabeled,
        n_test=args.n_test,
        spacing=args.spacing,
        seed=args.seed,
        sparse_every=args.sparse_every,
        overwrite=args.overwrite,
        variation=args.variation,
        workers=args.workers,
        domain_shift=args.domain_shift,
        n_target=args.n_target,
    )
    meta = json.loads((out / "dataset.json").read_text())
    info = meta["synthetic"]
    counts = info["counts"]
    shape = "x".join(str(n) for n in info["shape"])
    fractions = ", ".join(f"{name} {100 * f:.2f}%" for name, f in info["class_voxel_fractions"].items())
    print(f"wrote {out}")
    print(f"  cases: {counts['labeled']} labelled (imagesTr/labelsTr), {counts['unlabeled']} unlabelled "
          f"(imagesUnlabeled), {counts['test']} test (imagesTs/labelsTs)")
    if "target" in counts:
        print(f"  target domain: {counts['target']} (imagesTarget; labelsTarget for scoring only, never trained on)")
    print(f"  shape: {shape} voxels at {info['spacing_mm'][0]:g} mm")
    print(f"  class voxel fractions: {fractions}")
    if info["sparse_slices"] is not None:
        print(f"  sparse labels: axial slices {info['sparse_slices']} of labelsTr; the rest is 'ignore' "
              f"({meta['labels']['ignore']})")
    print(f"  note: {info['statement']}")
    return 0
