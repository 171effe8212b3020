"""``mnseg train``: train any method on a dataset folder."""

HELP = "train a method (supervised, mn, ...) on a dataset folder"
DESCRIPTION = """Train a segmentation method on an nnU-Net-style dataset folder.

The configuration starts from the method's preset (mnseg/config/presets/<method>.yaml) or --config,
then the options below, then any key.sub=value overrides, e.g.

  mnseg train Dataset001_Brain --method mn --num-labeled 4 --test
  mnseg train Dataset001_Brain --method supervised --num-labeled 4 train.epochs=200 models.net.optim.lr=3e-4
  mnseg train --resume runs/Dataset001_Brain/mn_4l_seed0
"""


def add_arguments(p):
    from mnseg.methods import METHODS, list_methods

    p.epilog = "methods:\n" + "\n".join(f"  {name:<22} {line}" for name, line in list_methods())

    p.add_argument("dataset", nargs="?", help="dataset folder (dataset.json, imagesTr, labelsTr, ...)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.epochs=50")
    p.add_argument("--method", choices=sorted(METHODS), help="learning method (default: the config's, else supervised)")
    p.add_argument("--config", help="YAML file or preset name (see mnseg/config/presets)")
    p.add_argument("--num-labeled", type=int, help="keep N labelled cases (seeded); the rest of imagesTr is unlabelled")
    p.add_argument("--num-val", type=int, help="hold out N labelled cases for validation Dice and the best checkpoint")
    p.add_argument("--transductive", action="store_true", help="let imagesTs join the unlabelled pool (off by default)")
    p.add_argument("--epochs", type=int, help="training epochs (default: the config's train.epochs)")
    p.add_argument("--iters-per-epoch", type=int,
                   help="optimiser steps per epoch (default: the config's train.iters_per_epoch)")
    p.add_argument("--batch-size", type=int,
                   help="patches per step, labelled and unlabelled together (default: the config's)")
    p.add_argument("--patch-size", help="training crop, e.g. 96,96,64 (also the sliding window)")
    p.add_argument("--seed", type=int, help="seed of the labelled/unlabelled split, sampling and weights (default 0)")
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:1")
    p.add_argument("--run-dir", help="where to write the run (default runs/<dataset>/<method>_<N>l_seed<S>, "
                   "or <method>_all_seed<S> with every label)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="start again in a non-empty run directory")
    p.add_argument("--test", action="store_true", help="after training, predict imagesTs and score against labelsTs")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (log lines only)")


def build_config(args):
    from mnseg.config.schema import PRESET_DIR, Config, apply_overrides, load_config
    from mnseg.engine.run_dir import RunDir
    from mnseg.errors import ConfigError

    overrides = list(args.overrides or [])
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"unexpected argument(s) {bad}; overrides look like key.sub=value")
    if args.dataset and "=" in args.dataset:  # an override took the dataset's place (e.g. with --resume)
        overrides.insert(0, args.dataset)
        args.dataset = None
    if args.resume:
        cfg = Config.from_dict(RunDir(args.resume).read_config())
        return Config.from_dict(apply_overrides(cfg.to_dict(), overrides)) if overrides else cfg
    source = args.config
    if source is None:
        name = args.method or "supervised"
        source = name if (PRESET_DIR / f"{name}.yaml").exists() else None
    cfg = load_config(source, [])
    d = cfg.to_dict()
    if args.method and args.method != d["method"]["name"]:
        d["method"]["name"] = args.method
    if args.dataset:
        d["data"]["dataset"] = args.dataset
    for flag, key in [("num_labeled", "num_labeled"), ("num_val", "num_val")]:
        if getattr(args, flag) is not None:
            d["data"][key] = getattr(args, flag)
    if args.transductive:
        d["data"]["transductive"] = True
    if args.patch_size:
        try:
            d["data"]["patch_size"] = [int(v) for v in args.patch_size.split(",")]
        except ValueError:
            raise ConfigError(f"--patch-size {args.patch_size!r}: give whole numbers such as 96,96,64") from None
    for flag, key in [
        ("epochs", "epochs"),
        ("iters_per_epoch", "iters_per_epoch"),
        ("batch_size", "batch_size"),
        ("seed", "seed"),
        ("device", "device"),
    ]:
        if getattr(args, flag) is not None:
            d["train"][key] = getattr(args, flag)
    cfg = Config.from_dict(apply_overrides(d, overrides))
    if not cfg.data.dataset:
        raise ConfigError("no dataset given: mnseg train DATASET ...")
    return cfg


def default_run_dir(cfg) -> str:
    from pathlib import Path

    name = Path(cfg.data.dataset).resolve().name
    labelled = f"{cfg.data.num_labeled}l" if cfg.data.num_labeled is not None else "all"
    return str(Path("runs") / name / f"{cfg.method.name}_{labelled}_seed{cfg.train.seed}")


# Checkpoints of the small default models are tens of MiB; refuse to start with less than this free.
MIN_FREE_BYTES = 200 * 2**20
# errno values that mean "this output cannot be written", as opposed to a bug or a missing input.
WRITE_ERRNOS = {"ENOSPC", "EDQUOT", "EROFS", "EACCES", "EPERM", "EFBIG", "EIO"}


def run(args) -> int:
    from mnseg.engine.run_dir import removed_if_failed_early

    cfg = build_config(args)
    run_dir = args.resume or args.run_dir or default_run_dir(cfg)
    preflight(cfg, run_dir, resume=bool(args.resume), overwrite=args.overwrite)
    with removed_if_failed_early(run_dir):
        return train_and_test(args, cfg, run_dir)


def preflight(cfg, run_dir: str, resume: bool, overwrite: bool) -> None:
    """Path and folder errors in a second, before torch and the models are imported (which takes many)."""
    from mnseg.data.dataset import DatasetFolder
    from mnseg.engine.run_dir import RunDir, is_rank_zero
    from mnseg.utils.preflight import check_writable

    if resume:
        RunDir(run_dir).require_resumable()
    elif is_rank_zero():  # under torchrun rank 0 may have made the folder already
        RunDir(run_dir).check_new(overwrite)
    DatasetFolder(cfg.data.dataset).training_cases(require_labels=False)  # folder, dataset.json, imagesTr
    check_writable(run_dir, MIN_FREE_BYTES, what="run directory")


def train_and_test(args, cfg, run_dir: str) -> int:
    import torch

    from mnseg.workflows.pipeline import run_pipeline

    try:
        result = run_pipeline(cfg, run_dir, test=args.test, resume=bool(args.resume), overwrite=args.overwrite,
                              strict=False, progress=not args.no_progress)
    except torch.OutOfMemoryError:
        raise out_of_memory_error(cfg, run_dir) from None
    except OSError as exc:
        err = write_error(exc, run_dir)
        if err is None:
            raise
        raise err from None
    return 1 if result.failures else 0


def out_of_memory_error(cfg, run_dir):
    """Name what to shrink: the message a user needs at 3 a.m., not a CUDA allocator dump."""
    from mnseg.errors import MnsegError

    patch = "x".join(str(v) for v in cfg.data.patch_size)
    return MnsegError(
        f"out of GPU memory while training with patch size {patch}, batch size {cfg.train.batch_size} "
        f"(validation sliding-window sw_batch_size {cfg.infer.sw_batch_size}) on device {cfg.train.device}. "
        f"Try a smaller --patch-size or --batch-size, infer.sw_batch_size=1, or --device cpu. "
        f"The last checkpoint in {run_dir} is kept; continue with: mnseg train --resume {run_dir}"
    )


def write_error(exc: OSError, run_dir):
    """An ``MnsegError`` for a failed write (disk full, read-only, ...); None for other OS errors (bugs)."""
    import errno

    from mnseg.errors import MnsegError
    from mnseg.utils.preflight import describe_os_error

    if errno.errorcode.get(exc.errno or -1) not in WRITE_ERRNOS:
        return None
    where = f" ({exc.filename})" if exc.filename else ""
    return MnsegError(
        f"{run_dir}: cannot write{where}: {describe_os_error(exc)}. Files already written are complete "
        f"(checkpoints are replaced atomically); after freeing space continue with: mnseg train --resume {run_dir}"
    )
