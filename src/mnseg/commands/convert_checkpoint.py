"""``mnseg convert-checkpoint``: rewrite a run trained before safe checkpoints, once, so it predicts and resumes."""

HELP = "convert a run directory's old pickled checkpoints to the safe formats (once)"
DESCRIPTION = """Rewrite checkpoints/last.pt and best.pt of a run trained by an earlier mnseg (full pickles)
so they load without unpickling code, and write last.safetensors / best.safetensors beside them,
which predict and export read. Nothing else in the run changes.

An mnseg checkpoint holds only tensors and NumPy arrays and is converted without running any code.
A file that holds other pickled objects (it was not written by mnseg, or was tampered with) is
refused: loading it could run arbitrary code. --trust loads it anyway; give it only for a file
whose origin you trust.

  mnseg convert-checkpoint runs/Dataset001_Brain/mn_4l_seed0
"""


def add_arguments(p):
    p.add_argument("run_dir", metavar="RUN_DIR", help="run directory from an earlier mnseg train")
    p.add_argument("--trust", action="store_true",
                   help="fully unpickle checkpoints that hold more than tensors and NumPy arrays (this can run "
                        "code from the file: only for files whose origin you trust)")


def run(args) -> int:
    from mnseg.engine.legacy import convert_run

    written = convert_run(args.run_dir, trust=args.trust)
    print(f"{args.run_dir}: {len(written)} file(s) written" if written else f"{args.run_dir}: nothing to convert")
    return 0
