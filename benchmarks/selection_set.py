"""Choose between recipes on a selection set: many fresh subjects from the generator that made the runs' data,
with another seed, never the test subjects.

Each benchmark run holds out 2 labelled subjects for validation (``--num-val 2``): enough to pick a run's best
epoch, too few to pick a recipe, because the rare class's Dice on two small lesions swings by 0.3 between runs
that differ by one lesion. A synthetic dataset can afford what real data cannot: more subjects drawn exactly as the
training ones were. This script makes them (``mnseg synth`` with the settings recorded in the runs' dataset.json,
base seed ``--seed``, whose subjects share no seed with the dataset's), predicts them with each run's best
checkpoint (the one its benchmark cell is scored with), scores them as ``mnseg evaluate`` does and prints
compare_runs' table, pairing runs by labelled count and seed:

  python benchmarks/selection_set.py --out /tmp/sel --baseline "mn=/tmp/dm/runs/mn/n4_seed*" \\
      --run "u2=/tmp/du/runs/mn_unet2d_lesion_rest/n4_seed*"

Writes OUT/data/<dataset>Selection (made once), OUT/predictions/<label>/<run>/ (label maps, metrics.csv,
summary.json; a run already scored is not predicted again) and OUT/selection.md (the table).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from compare_runs import read_runs, table

from mnseg.engine.run_dir import RunDir
from mnseg.reporting.benchmark_stats import RunResult

SETTINGS = ("spacing", "sparse_every", "thick_slice_fraction", "variation")


def dataset_of(run_dir: str) -> Path:
    """The dataset folder a run trained on (its config.yaml's ``data.dataset``)."""
    return Path(RunDir(run_dir).read_config()["data"]["dataset"])


def make_selection_set(dataset: Path, out: Path, subjects: int, seed: int) -> Path:
    """``subjects`` fresh test subjects drawn as ``dataset``'s were (its recorded synth settings), base seed
    ``seed``; refuses a seed whose subjects could be the dataset's."""
    from mnseg.data.synth import synthesize_dataset

    meta = json.loads((dataset / "dataset.json").read_text())
    synthetic = meta.get("synthetic")
    if not synthetic:
        raise SystemExit(f"{dataset}: not made by mnseg synth (no 'synthetic' record): no generator to draw from")
    settings = synthetic["settings"]
    if int(settings["seed"]) == seed:
        raise SystemExit(f"--seed {seed} is {dataset}'s own base seed: its test subjects would be the test set")
    folder = out / "data" / f"{dataset.name}Selection"
    synthesize_dataset(folder, n_labeled=1, n_unlabeled=0, n_test=subjects, seed=seed, progress=False, reuse=True,
                       **{k: settings[k] for k in SETTINGS if k in settings})
    taken = {s["seed"] for s in synthetic.get("subjects", {}).values()}
    drawn = json.loads((folder / "dataset.json").read_text())["synthetic"]["subjects"]
    shared = sorted(case for case, s in drawn.items() if s["seed"] in taken)
    if shared:
        raise SystemExit(f"{folder}: {', '.join(shared)} share a seed with {dataset}'s subjects; choose another --seed")
    return folder


def score_run(run: RunResult, selection: Path, out: Path) -> RunResult:
    """The run's best checkpoint on the selection set's test subjects: a RunResult whose summary is theirs."""
    from mnseg.cli import main as mnseg

    preds = out / "predictions" / run.label / Path(run.run_dir).name
    summary = preds / "summary.json"
    if not summary.exists():
        for argv in (["predict", "-i", str(selection / "imagesTs"), "-o", str(preds), "-m", run.run_dir,
                      "--checkpoint", "best", "--no-progress"],
                     ["evaluate", str(preds), str(selection / "labelsTs"), "--dataset-json",
                      str(selection / "dataset.json")]):
            if mnseg(argv) != 0:
                raise SystemExit(f"mnseg {' '.join(argv)} failed")
    return dataclasses.replace(run, summary=json.loads(summary.read_text()), timing={})


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--baseline", required=True, help="LABEL=GLOB of the baseline's runs")
    p.add_argument("--run", action="append", required=True, help="LABEL=GLOB (repeat)")
    p.add_argument("--subjects", type=int, default=20, help="selection subjects (default 20)")
    p.add_argument("--seed", type=int, default=1000, help="their base seed (default 1000; not the dataset's)")
    args = p.parse_args(argv)
    base = read_runs(args.baseline)
    others = [r for spec in args.run for r in read_runs(spec)]
    datasets = {dataset_of(r.run_dir).resolve() for r in base + others}
    if len(datasets) != 1:
        raise SystemExit(f"the runs trained on different datasets ({', '.join(map(str, sorted(datasets)))}): "
                         "a selection set is drawn for one")
    selection = make_selection_set(datasets.pop(), args.out, args.subjects, args.seed)
    text = table([score_run(r, selection, args.out) for r in base],
                 [score_run(r, selection, args.out) for r in others],
                 score=f"selection fg Dice ({args.subjects} subjects)")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "selection.md").write_text(text + "\n")
    print(text)
    return text


if __name__ == "__main__":
    main()
