"""``mnseg benchmark``: a label-efficiency grid (methods x labelled counts x seeds) with tables and plots."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = "compare methods over labelled counts and seeds (label-efficiency table, plots, paired tests)"
DESCRIPTION = """\
Train every (method, labelled count, seed) of a grid on one dataset folder, each in its own run
directory OUT/runs/<method>/n<N>_seed<S>, score each on imagesTs/labelsTs, and write into OUT:
results.csv (one row per run and class), results.md (mean ± std over seeds, paired Wilcoxon test
against supervised at the same labelled count), dice_vs_labeled.png and dice_per_class.png.

supervised with the same labels (lower bound) is always in the grid, and supervised with all
labelled cases (upper bound, "supervised (all labels)") once per seed unless --no-upper-bound.
At a given seed every method gets the same labelled cases. Test cases never join the unlabelled
pool unless --transductive; the table says which.

Run the same command again to continue an interrupted grid: finished runs are kept, runs with a
checkpoint resume, failed runs are tried again. Failed runs are listed in failures.json and
results.md, and the command exits 1.

examples:
  mnseg benchmark Dataset001_LA --methods supervised,mn,mean_teacher --num-labeled 2,4,8 --seeds 0,1,2
  mnseg benchmark Dataset001_LA --methods mn --num-labeled 4 --preset demo_cpu -o bench/demo
  mnseg benchmark Dataset001_LA --methods entropy_min --num-labeled 2 --seeds 0 \\
      --set train.epochs=20 --set-method entropy_min:method.params.consistency=0.3
"""


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def _name_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", type=Path, help="dataset folder (dataset.json, imagesTr, labelsTr, imagesTs, "
                        "labelsTs, ...)")
    parser.add_argument("--methods", type=_name_list, required=True,
                        help="comma-separated methods, e.g. supervised,mn,mean_teacher (supervised is always added)")
    parser.add_argument("--num-labeled", type=_int_list, required=True, metavar="N,N,...",
                        help="labelled counts, e.g. 2,4,8")
    parser.add_argument("--seeds", type=_int_list, default=[0, 1, 2], metavar="S,S,...",
                        help="seeds (default 0,1,2); each seed draws its own split, shared by all methods")
    parser.add_argument("-o", "--out", type=Path, default=None,
                        help="benchmark folder (default runs/<dataset>/benchmark)")
    parser.add_argument("--preset", metavar="PREFIX",
                        help="use preset PREFIX_<method> for every method (e.g. demo_cpu); default: <method>")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every run, e.g. train.epochs=50 (repeatable; bare KEY=VALUE "
                        "arguments work too)")
    parser.add_argument("--set-method", action="append", default=[], metavar="METHOD:KEY=VALUE",
                        help="config override for one method's runs, e.g. mn:method.params.sup_epochs=5")
    parser.add_argument("--transductive", action="store_true",
                        help="let imagesTs join the unlabelled pool (off by default; marked in the table)")
    parser.add_argument("--num-val", type=int, default=0,
                        help="hold out N labelled cases per run for validation and the best checkpoint")
    parser.add_argument("--no-upper-bound", action="store_true",
                        help="skip supervised with all labelled cases")
    parser.add_argument("--device", help="auto (default), cpu, cuda, cuda:1")
    parser.add_argument("--max-runs", type=int, metavar="K",
                        help="train at most K runs in this invocation (run again to continue)")
    parser.add_argument("--jobs", type=int, default=1, metavar="J",
                        help="train J runs at the same time (default 1); small runs leave a GPU mostly idle, so "
                        "J > 1 finishes a grid sooner. With several visible GPUs and --device cuda (or auto) the "
                        "J worker processes are spread over them. Per-run timings then share a device")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (log lines only)")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: re-make results.csv, results.md and the plots from the finished runs "
                        "in OUT (e.g. run folders gathered from several machines); the dataset need not be here")


def _method_overrides(items: list[str]) -> dict[str, list[str]]:
    from mnseg.errors import ConfigError

    out: dict[str, list[str]] = {}
    for item in items:
        method, sep, override = item.partition(":")
        if not sep or "=" not in override or not method.strip():
            raise ConfigError(f"--set-method '{item}' must look like METHOD:key.sub=value")
        out.setdefault(method.strip(), []).append(override)
    return out


def run(args: argparse.Namespace) -> int:
    from mnseg.workflows.benchmark import BenchmarkSpec, run_benchmark

    out = args.out or Path("runs") / args.dataset.resolve().name / "benchmark"
    spec = BenchmarkSpec(
        dataset=args.dataset,
        out=out,
        methods=args.methods,
        num_labeled=args.num_labeled,
        seeds=args.seeds,
        transductive=args.transductive,
        num_val=args.num_val,
        overrides=list(args.overrides or []),
        method_overrides=_method_overrides(args.set_method),
        preset=args.preset,
        upper_bound=not args.no_upper_bound,
        device=args.device,
        jobs=args.jobs,
    )
    outcome = run_benchmark(spec, max_runs=args.max_runs, progress=not args.no_progress,
                            report_only=args.report_only)
    print(f"{len(outcome.done)} of {len(outcome.cells)} runs finished; wrote "
          + ", ".join(str(p) for p in outcome.files))
    if outcome.not_run:
        why = "--report-only" if args.report_only else "--max-runs"
        print(f"{len(outcome.not_run)} runs not finished ({why}); run the same command again to continue")
    if outcome.failures:
        print(f"{len(outcome.failures)} run(s) failed (details in {Path(out) / 'failures.json'}):", file=sys.stderr)
        for f in outcome.failures:
            n = "all" if f["num_labeled"] is None else f["num_labeled"]
            print(f"  {f['method']} n={n} seed={f['seed']}: {f['error']}", file=sys.stderr)
        return 1
    return 0
