"""The embedded demo: synthetic subjects from the real MNI152 anatomy -> supervised vs M&N -> report.

Everything runs in one output folder and is reused when present: the data (same settings), finished runs
(skipped), interrupted runs (resumed). So running the demo again after an interruption continues it.
Timings come from records (each run's timing.json, the demo's own timing.json), not from this session's
clock, so a re-run that reuses finished runs reports how long they took.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mnseg.config.schema import Config, load_config

METHOD_LABELS = {"supervised": "Supervised 3D UNet", "mn": "M&N (2D pretrained + 3D UNet)"}
# Validation Dice every N epochs (and after the last) on the held-out subjects (--num-val, default 1), for the
# report's validation curves. On CPU one validation of a 55x68x56 subject costs about 2.6 training iterations of
# the 3D UNet, so every 4 epochs of 20 iterations adds about 3 % to the training time.
VAL_EVERY = {"cpu": 4, "gpu": 10}


@dataclass(frozen=True)
class DemoMode:
    """One size of the demo: its data, its presets, its default split and what its figures can show."""

    dataset: str                  # folder name under OUT/data
    synth: dict                   # mnseg.data.synth.synthesize_dataset keywords (spacing None: by device)
    preset: str                   # preset name, formatted with kind (cpu/gpu) and method
    num_labeled: int              # default labelled subjects per method
    num_val: int                  # default held-out labelled subjects
    runs: str = "runs"            # where the runs go, under OUT
    checkpoint: str = "last"      # the checkpoint that predicts the test subjects
    overrides: dict = field(default_factory=dict)  # per-method config overrides
    shows: str = ""               # what its figures can show, said in the report


MODES = {
    "quick": DemoMode(
        "Dataset900_MNIDemo", dict(n_labeled=4, n_unlabeled=3, n_test=2, spacing=6.0), "demo_{kind}_{method}", 3, 1,
        overrides={
            "supervised": ["train.epochs=2", "train.iters_per_epoch=2",
                           "models.net.kwargs={depth: 3, base_filters: 4}"],
            "mn": ["train.epochs=3", "train.iters_per_epoch=2", "method.params.sup_epochs=1",
                   "models.net3d.kwargs={depth: 3, base_filters: 4}"]},
        shows="quick mode: a smoke test of the pipeline, not a result"),
    "standard": DemoMode(
        "Dataset900_MNIDemo", dict(n_labeled=6, n_unlabeled=12, n_test=6, spacing=None), "demo_{kind}_{method}", 3, 1,
        shows="the standard demo: 500 updates of each 3D model on CPU, too few to learn the lesion class; "
              "`mnseg demo --long` is the run in which M&N beat supervised"),
    # The CPU label-efficiency grid's seed-0 cell at 2 labelled (benchmarks/cpu_grid.sh, docs/results.md):
    # 1,500 updates of each 3D model, where the lesion is learnt and M&N gains over supervised.
    "long": DemoMode(
        "Dataset921_MNIStrong3mm", dict(n_labeled=22, n_unlabeled=0, n_test=10, spacing=3.0, variation="strong"),
        "cpu_grid_{method}", 2, 2, runs="runs_long", checkpoint="best",  # as the benchmark scores
        shows="the long demo: the CPU grid's recipe (presets cpu_grid_*), 1,500 updates of each 3D model; over seeds "
              "0-2 of that grid M&N beat supervised by +0.027 foreground Dice (docs/results.md)"),
}


def demo_mode(quick: bool = False, long: bool = False) -> str:
    from mnseg.errors import ConfigError

    if quick and long:
        raise ConfigError("--quick and --long: choose one demo size")
    return "quick" if quick else "long" if long else "standard"


def demo_configs(dataset: Path, out: Path, device: str, num_labeled: int, seed: int, mode: str = "standard",
                 num_val: int = 1) -> dict[str, Config]:
    kind = "gpu" if device.startswith("cuda") else "cpu"
    spec = MODES[mode]
    common = [f"data.dataset={dataset}", f"data.num_labeled={num_labeled}", f"data.num_val={num_val}",
              f"train.seed={seed}", f"train.device={device}", f"data.cache_dir={out / 'cache'}"]
    if mode != "long":  # the long demo keeps its presets' validation schedule (the grid cell's)
        common.append(f"train.val_every={1 if mode == 'quick' else VAL_EVERY[kind]}")
    return {m: load_config(spec.preset.format(kind=kind, method=m), common + spec.overrides.get(m, []))
            for m in METHOD_LABELS}


MARKER = ".mnseg_demo"  # written into the output folder, so a later run knows the folder is the demo's own
DEMO_ENTRIES = ("cache", "data", "runs", "runs_long", "report", "timing.json")
TIMING = "timing.json"  # the demo's own record: data_seconds (summed over sessions), predict_seconds per method


def _read_json(path: Path) -> dict:
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "n/a (no timing.json)"
    return f"{seconds:.0f} s" if seconds < 60 else f"{seconds / 60:.1f} min"


def check_counts(num_labeled: int, num_val: int, mode: str = "standard") -> None:
    """Labelled plus held-out subjects must fit the mode's labelled subjects (6 standard, 4 quick, 22 long)."""
    from mnseg.errors import ConfigError

    have = MODES[mode].synth["n_labeled"]
    if num_val < 0 or num_labeled < 1 or num_labeled + num_val > have:
        raise ConfigError(f"--num-labeled {num_labeled} and --num-val {num_val}: the demo data has {have} labelled "
                          f"subjects{'' if mode == 'standard' else f' in {mode} mode'}, so --num-labeled must be at "
                          f"least 1, --num-val at least 0, and both together at most {have}")


def run_demo(out: str | Path, device: str = "auto", num_labeled: int | None = None, seed: int = 0,
             mode: str = "standard", progress: bool = True, log=print, num_val: int | None = None) -> Path:
    spec = MODES[mode]
    num_labeled = spec.num_labeled if num_labeled is None else num_labeled
    num_val = spec.num_val if num_val is None else num_val
    check_counts(num_labeled, num_val, mode)
    import time

    import torch

    from mnseg.data.synth import synthesize_dataset
    from mnseg.engine.run_dir import RunDir
    from mnseg.reporting.report import MethodResult, dataset_test_cases, write_report
    from mnseg.utils.atomic import atomic_write_json
    from mnseg.utils.output_folder import claim_output_folder
    from mnseg.workflows.eta import RunEta, planned_updates
    from mnseg.workflows.pipeline import run_pipeline

    out = Path(out).resolve()
    claim_output_folder(out, MARKER, DEMO_ENTRIES, "demo", "--out")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    runs = out / spec.runs
    timing = out / TIMING if spec.runs == "runs" else runs / TIMING  # the long demo keeps its own record
    record = _read_json(timing)
    t_start = time.time()
    dataset = out / "data" / spec.dataset
    log(f"[1/4] demo data: {dataset}")
    synth = dict(spec.synth)
    if synth["spacing"] is None:
        synth["spacing"] = 3.0 if device == "cpu" else 1.5
    synthesize_dataset(dataset, seed=seed, progress=progress, reuse=True, **synth)
    record["data_seconds"] = record.get("data_seconds", 0.0) + time.time() - t_start  # a reuse adds a moment
    runs.mkdir(parents=True, exist_ok=True)
    atomic_write_json(timing, record)
    configs = demo_configs(dataset, out, device, num_labeled, seed, mode, num_val)
    results, eta = [], RunEta({m: planned_updates(c) for m, c in configs.items()})
    for step, (method, cfg) in enumerate(configs.items(), start=2):
        run = RunDir(runs / method)
        log(f"[{step}/4] train {METHOD_LABELS[method]} -> {run.path}")
        # a finished run is kept, an interrupted one resumes; timing.json per epoch
        result = run_pipeline(cfg, run.path, checkpoint=spec.checkpoint, progress=progress,
                              log=log)
        record.setdefault("predict_seconds", {})[method] = result.test_seconds
        atomic_write_json(timing, record)
        results.append(MethodResult(METHOD_LABELS[method], result.summary, run.history, run.test_predictions))
        trained = _read_json(run.timing).get("train_seconds")  # the run's own record, also for a reused run
        log(eta.finished(method, None if trained is None else trained + (result.test_seconds or 0.0)))

    log("[4/4] report")
    test_cases, class_names = dataset_test_cases(dataset)
    train = {m: _read_json(RunDir(runs / m).timing).get("train_seconds") for m in configs}
    total = record["data_seconds"] + sum(t or 0.0 for t in train.values()) + sum(record["predict_seconds"].values())
    notes = [
        f"Data: one real anatomy (MNI152 2009, shipped in nilearn) with synthetic variation: {spec.dataset}; "
        "figures on it are not comparable with published LA or Pancreas-CT figures.",
        f"{num_labeled} labelled subjects for both methods (seed {seed}); M&N also uses the unlabelled subjects. "
        + (f"{num_val} labelled subject(s) held out for the validation curves (never trained on). " if num_val else
           "No subject held out for validation (--num-val 0). ")
        + "Test subjects are never in the unlabelled pool.",
        f"Device: {device}. Training time (each run's timing.json): "
        + ", ".join(f"{m} {_duration(t)}" for m, t in train.items())
        + f"; whole demo {_duration(total)} (data, training and prediction, from the timing records).",
        "Presets: " + ", ".join(spec.preset.format(kind="gpu" if device.startswith("cuda") else "cpu", method=m)
                                for m in configs) + f" ({spec.shows}).",
    ]
    report = write_report(out / "report", "mnseg demo: supervised 3D UNet vs M&N", results, test_cases,
                          class_names, notes=notes)
    log(f"report: {report}")
    return report


