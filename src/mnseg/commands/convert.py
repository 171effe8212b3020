"""``mnseg convert``: import a Decathlon task or UA-MT/MC-Net/SSL4MIS h5 files as a dataset folder."""

from __future__ import annotations

import argparse

HELP = "import a Medical Segmentation Decathlon task or LA/Pancreas h5 files as a dataset folder"
DESCRIPTION = """\
Import public data into an mnseg dataset folder (nnU-Net v2 raw layout). Inputs are never modified;
an existing non-empty output folder is refused unless --overwrite is given.

Medical Segmentation Decathlon task (4D multi-modal images are split into _0000, _0001, ...):
  mnseg convert msd Task02_Heart Dataset002_Heart

h5 files used by UA-MT, MC-Net and SSL4MIS (datasets 'image' and 'label'; h5 has no geometry,
so give the voxel spacing per array axis):
  mnseg convert h5 "data/2018LA_Seg_Training Set" Dataset010_LA --train-list data/train.list \\
      --test-list data/test.list --spacing 0.625,0.625,0.625 --labels background=0,left_atrium=1
  mnseg convert h5 data/Pancreas_h5 Dataset011_Pancreas --train-list data/Pancreas/train.list \\
      --spacing 1,1,1 --labels background=0,pancreas=1 --modality CT
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="source_format", metavar="FORMAT", required=True,
                                help="what to convert from: msd or h5 (mnseg convert FORMAT --help)")

    msd = sub.add_parser(
        "msd",
        help="a Medical Segmentation Decathlon task folder (TaskNN_Name)",
        description="Convert a Decathlon task folder (dataset.json, imagesTr, labelsTr, imagesTs).",
    )
    msd.add_argument("task_dir", metavar="TASK_DIR", help="Decathlon task folder, e.g. Task02_Heart")
    msd.add_argument("out_dir", metavar="OUT_DIR", help="dataset folder to write")
    msd.add_argument("--overwrite", action="store_true", help="replace the dataset in a non-empty OUT_DIR")

    h5 = sub.add_parser(
        "h5",
        help="h5 files with 'image'/'label' datasets plus list files (UA-MT, MC-Net, SSL4MIS)",
        description="Convert h5 cases named in list files. A list entry NAME resolves to "
        "H5_DIR/NAME/mri_norm2.h5, H5_DIR/NAME, H5_DIR/NAME.h5 or H5_DIR/NAME_norm.h5.",
    )
    h5.add_argument("h5_dir", metavar="H5_DIR", help="folder holding the h5 files or case folders")
    h5.add_argument("out_dir", metavar="OUT_DIR", help="dataset folder to write")
    h5.add_argument("--train-list", required=True, metavar="FILE", help="training cases, one per line")
    h5.add_argument("--test-list", metavar="FILE",
                    help="test cases, one per line (written to imagesTs/labelsTs)")
    h5.add_argument("--spacing", required=True, metavar="SX,SY,SZ",
                    help="voxel size in mm per array axis, e.g. 0.625,0.625,0.625 (one number: isotropic)")
    h5.add_argument("--labels", default="background=0,foreground=1", metavar="NAME=INT,...",
                    help="label names and values (default: background=0,foreground=1)")
    h5.add_argument("--modality", default="MRI", help="channel name written to dataset.json, e.g. MRI or CT")
    h5.add_argument("--overwrite", action="store_true", help="replace the dataset in a non-empty OUT_DIR")


def parse_spacing(text: str) -> tuple[float, float, float]:
    """'0.625,0.625,0.625' -> (0.625, 0.625, 0.625); a single number means isotropic spacing."""
    from mnseg.errors import ConfigError

    parts = [p.strip() for p in text.split(",")]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise ConfigError(f"--spacing {text!r}: expected numbers like 0.625,0.625,0.625") from None
    if len(values) == 1:
        values *= 3
    if len(values) != 3 or not all(v > 0 and v != float("inf") for v in values):
        raise ConfigError(f"--spacing {text!r}: expected one or three positive numbers")
    return tuple(values)


def parse_labels(text: str) -> dict[str, int]:
    """'background=0,left_atrium=1' -> {'background': 0, 'left_atrium': 1}."""
    from mnseg.errors import ConfigError

    labels: dict[str, int] = {}
    for item in (p.strip() for p in text.split(",")):
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ConfigError(f"--labels {text!r}: expected NAME=INT pairs separated by commas, got {item!r}")
        try:
            number = int(value)
        except ValueError:
            raise ConfigError(
                f"--labels {text!r}: value of {name.strip()!r} is not an integer ({value!r})"
            ) from None
        if name.strip() in labels:
            raise ConfigError(f"--labels {text!r}: name {name.strip()!r} given twice")
        labels[name.strip()] = number
    return labels


def run(args: argparse.Namespace) -> int:
    import json

    from mnseg.data.convert import convert_msd
    from mnseg.data.convert_h5 import convert_h5

    if args.source_format == "msd":
        out = convert_msd(args.task_dir, args.out_dir, overwrite=args.overwrite)
    else:
        out = convert_h5(
            args.h5_dir,
            args.out_dir,
            args.train_list,
            args.test_list,
            spacing=parse_spacing(args.spacing),
            labels=parse_labels(args.labels),
            modality=args.modality,
            overwrite=args.overwrite,
        )
    meta = json.loads((out / "dataset.json").read_text(encoding="utf-8"))
    info = meta["converted_from"]
    print(f"Wrote {out}")
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        folder = out / sub
        if folder.is_dir():
            print(f"  {sub + '/':<10} {sum(1 for _ in folder.glob('*.nii.gz'))} files")
    print(f"  dataset.json: {meta['numTraining']} training and {info['numTest']} test cases, "
          f"channels {meta['channel_names']}, labels {meta['labels']}")
    if info.get("stale_files_removed"):
        print(f"  removed {info['stale_files_removed']} NIfTI file(s) left from an earlier conversion")
    return 0
