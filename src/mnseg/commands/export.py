"""``mnseg export``: one zip to share a trained model; it holds no pickle, so opening it cannot run code."""

HELP = "write a trained run as one shareable model zip (safe weights, config, plans, label names)"
DESCRIPTION = """Write the weights of a run directory (checkpoints/best.safetensors, else last) with its resolved
config.yaml, plans.json and a model.json (mnseg version, method, label names) into one zip.
Nothing in it is a pickle, so predicting with it cannot run code hidden in it.

  mnseg export runs/Dataset001_Brain/mn_4l_seed0 brain_mn.zip
  mnseg predict -i imagesTs -o preds -m brain_mn.zip

Runs trained before safe checkpoints: mnseg convert-checkpoint RUN_DIR first.
"""


def add_arguments(p):
    p.add_argument("run_dir", metavar="RUN_DIR", help="run directory from mnseg train")
    p.add_argument("output", metavar="OUT.zip", help="the model zip to write")
    p.add_argument("--checkpoint", default="best", choices=["best", "last"],
                   help="whose weights: best (falls back to last when the run had no validation) or last")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT.zip")


def run(args) -> int:
    from mnseg.engine.export import export_model
    from mnseg.errors import MnsegError

    if not args.output.endswith(".zip"):
        raise MnsegError(f"{args.output}: the model file name must end in .zip")
    info = export_model(args.run_dir, args.output, args.checkpoint, overwrite=args.overwrite)
    print(f"wrote {args.output}: method {info['method']}, models {', '.join(info['roles'])}, "
          f"{info['checkpoint']} weights of epoch {info['epoch']}")
    return 0
