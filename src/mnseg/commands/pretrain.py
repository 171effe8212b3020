"""``mnseg pretrain``: self-supervised pretraining of the 3D UNet on a dataset folder's unlabelled scans."""

HELP = "pretrain the 3D UNet on unlabelled scans (rotation, contrastive, reconstruction, clustering); no label is read"
DESCRIPTION = """Pretrain the 3D UNet's encoder (and decoder) on imagesTr + imagesUnlabeled with a pretext task; no
label file is opened, nor imagesTs unless --transductive. The run is a normal mnseg run (progress bar, TensorBoard,
atomic checkpoints, --resume) of the method `pretrain` (preset mnseg/config/presets/pretrain.yaml, then the
options below, then key.sub=value overrides). Start any method from it:

  mnseg pretrain Dataset001_Brain --task contrastive -o runs/pre_contrastive
  mnseg train Dataset001_Brain --method supervised --num-labeled 2 \
      models.net.init=runs/pre_contrastive/checkpoints/last.pt
  mnseg pretrain --resume runs/pre_contrastive
"""

TASKS = ("rotation", "contrastive", "reconstruction", "clustering")


def add_arguments(p):
    p.add_argument("dataset", nargs="?", help="dataset folder (dataset.json, imagesTr, imagesUnlabeled, ...)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides, e.g. method.params.mask_ratio=0.6")
    p.add_argument("--task", choices=TASKS, help="the pretext task (default: the config's, rotation)")
    p.add_argument("-o", "--output", dest="run_dir", metavar="RUN",
                   help="the run directory (default runs/<dataset>/pretrain_<task>_seed<S>)")
    p.add_argument("--config", help="YAML file or preset name (default: pretrain)")
    p.add_argument("--transductive", action="store_true", help="let imagesTs join the unlabelled pool (off by default)")
    p.add_argument("--epochs", type=int, help="training epochs (default: the config's train.epochs)")
    p.add_argument("--iters-per-epoch", type=int,
                   help="optimiser steps per epoch (default: the config's train.iters_per_epoch)")
    p.add_argument("--batch-size", type=int, help="crops per step (default: the config's)")
    p.add_argument("--patch-size", help="training crop, e.g. 96,96,64")
    p.add_argument("--seed", type=int, help="seed of sampling and weights (default 0)")
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:1")
    p.add_argument("--resume", metavar="RUN", help="continue an interrupted pretraining run from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="start again in a non-empty run directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (log lines only)")


def build_config(args):
    """The train command's configuration, from the pretrain preset, with the task and no labelled case."""
    from mnseg.commands import train

    args.method, args.num_labeled, args.num_val = "pretrain", None, None
    args.config = args.config or "pretrain"
    overrides = list(args.overrides or [])
    if args.task:
        overrides.append(f"method.params.task={args.task}")
    if not args.resume:
        overrides += ["data.num_labeled=0", "data.num_val=0"]
    args.overrides = overrides
    return train.build_config(args)


def default_run_dir(cfg) -> str:
    from pathlib import Path

    name = Path(cfg.data.dataset).resolve().name
    task = cfg.method.params.get("task", "rotation")
    return str(Path("runs") / name / f"pretrain_{task}_seed{cfg.train.seed}")


def run(args) -> int:
    from mnseg.commands.train import preflight
    from mnseg.engine.run_dir import removed_if_failed_early
    from mnseg.errors import ConfigError

    cfg = build_config(args)
    if cfg.method.name != "pretrain":
        raise ConfigError(f"mnseg pretrain runs the method 'pretrain'; the config names '{cfg.method.name}'")
    run_dir = args.resume or args.run_dir or default_run_dir(cfg)
    preflight(cfg, run_dir, resume=bool(args.resume), overwrite=args.overwrite)
    with removed_if_failed_early(run_dir):
        from mnseg.workflows.pipeline import train_run

        train_run(cfg, run_dir, resume=bool(args.resume), overwrite=args.overwrite, progress=not args.no_progress)
    print(f"done: {run_dir}; start a model from it with models.<role>.init={run_dir}/checkpoints/last.pt")
    return 0
