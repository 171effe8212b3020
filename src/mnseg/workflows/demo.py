"""The embedded demo: synthetic subjects from the real MNI152 anatomy -> supervised vs M&N -> report.

Everything runs in one output folder and is reused when present: the data (same settings), finished runs
(skipped), interrupted runs (resumed). So running the demo again after an interruption continues it.
Timings come from records (each run's timing.json, the demo's own timing.json), not from this session's
clock, so a re-run that reuses finished runs reports how long they took.
"""

from __future__ import annotations

from pathlib import Path

from mnseg.config.schema import Config, load_config

DATASET_NAME = "Dataset900_MNIDemo"
METHOD_LABELS = {"supervised": "Supervised 3D UNet", "mn": "M&N (2D pretrained + 3D UNet)"}
# Validation Dice every N epochs (and after the last) on the held-out subjects (--num-val, default 1), for the
# report's validation curves. On CPU one validation of a 55x68x56 subject costs about 2.6 training iterations of
# the 3D UNet, so every 4 epochs of 20 iterations adds about 3 % to the training time.
VAL_EVERY = {"cpu": 4, "gpu": 10}


def demo_configs(dataset: Path, out: Path, device: str, num_labeled: int, seed: int, quick: bool,
                 num_val: int = 1) -> dict[str, Config]:
    kind = "gpu" if device.startswith("cuda") else "cpu"
    common = [f"data.dataset={dataset}", f"data.num_labeled={num_labeled}", f"data.num_val={num_val}",
              f"train.val_every={1 if quick else VAL_EVERY[kind]}", f"train.seed={seed}",
              f"train.device={device}", f"data.cache_dir={out / 'cache'}"]
    quick_over = {
        "supervised": ["train.epochs=2", "train.iters_per_epoch=2", "models.net.kwargs={depth: 3, base_filters: 4}"],
        "mn": ["train.epochs=3", "train.iters_per_epoch=2", "method.params.sup_epochs=1",
               "models.net3d.kwargs={depth: 3, base_filters: 4}"],
    }
    return {m: load_config(f"demo_{kind}_{m}", common + (quick_over[m] if quick else [])) for m in METHOD_LABELS}


MARKER = ".mnseg_demo"  # written into the output folder, so a later run knows the folder is the demo's own
DEMO_ENTRIES = ("cache", "data", "runs", "report", "timing.json")
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


def check_counts(num_labeled: int, num_val: int, quick: bool) -> None:
    """The demo data has 6 labelled subjects (4 in quick mode): labelled plus held-out ones must fit."""
    from mnseg.errors import ConfigError

    have = 4 if quick else 6
    if num_val < 0 or num_labeled < 1 or num_labeled + num_val > have:
        raise ConfigError(f"--num-labeled {num_labeled} and --num-val {num_val}: the demo data has {have} labelled "
                          f"subjects{' in quick mode' if quick else ''}, so --num-labeled must be at least 1, "
                          f"--num-val at least 0, and both together at most {have}")


def run_demo(out: str | Path, device: str = "auto", num_labeled: int = 3, seed: int = 0, quick: bool = False,
             progress: bool = True, log=print, num_val: int = 1) -> Path:
    check_counts(num_labeled, num_val, quick)
    import time

    import torch

    from mnseg.data.synth import synthesize_dataset
    from mnseg.engine.hooks import TimingHook
    from mnseg.engine.run_dir import RunDir
    from mnseg.reporting.report import MethodResult, write_report
    from mnseg.utils.atomic import atomic_write_json
    from mnseg.utils.output_folder import claim_output_folder
    from mnseg.workflows.eta import RunEta, planned_updates
    from mnseg.workflows.pipeline import run_pipeline

    out = Path(out).resolve()
    claim_output_folder(out, MARKER, DEMO_ENTRIES, "demo", "--out")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    record = _read_json(out / TIMING)
    t_start = time.time()
    dataset = out / "data" / DATASET_NAME
    log(f"[1/4] demo data: {dataset}")
    if quick:
        synthesize_dataset(dataset, n_labeled=4, n_unlabeled=3, n_test=2, spacing=6.0, seed=seed, progress=progress,
                           reuse=True)
    else:
        spacing = 3.0 if device == "cpu" else 1.5
        synthesize_dataset(dataset, n_labeled=6, n_unlabeled=12, n_test=6, spacing=spacing, seed=seed,
                           progress=progress, reuse=True)
    record["data_seconds"] = record.get("data_seconds", 0.0) + time.time() - t_start  # a reuse adds a moment
    atomic_write_json(out / TIMING, record)
    configs = demo_configs(dataset, out, device, num_labeled, seed, quick, num_val)
    results, eta = [], RunEta({m: planned_updates(c) for m, c in configs.items()})
    for step, (method, cfg) in enumerate(configs.items(), start=2):
        run = RunDir(out / "runs" / method)
        log(f"[{step}/4] train {METHOD_LABELS[method]} -> {run.path}")
        # a finished run is kept, an interrupted one resumes; timing.json per epoch
        result = run_pipeline(cfg, run.path, checkpoint="last", hooks=[TimingHook()], progress=progress, log=log)
        record.setdefault("predict_seconds", {})[method] = result.test_seconds
        atomic_write_json(out / TIMING, record)
        results.append(MethodResult(METHOD_LABELS[method], result.summary, run.history, run.test_predictions))
        trained = _read_json(run.timing).get("train_seconds")  # the run's own record, also for a reused run
        log(eta.finished(method, None if trained is None else trained + (result.test_seconds or 0.0)))

    log("[4/4] report")
    import json

    spec = json.loads((dataset / "dataset.json").read_text())
    class_names = {v: k for k, v in spec["labels"].items() if k != "ignore"}
    test_cases = sorted(
        (p.name[: -len("_0000.nii.gz")], p, dataset / "labelsTs" / p.name.replace("_0000.nii.gz", ".nii.gz"))
        for p in (dataset / "imagesTs").glob("*_0000.nii.gz"))
    train = {m: _read_json(RunDir(out / "runs" / m).timing).get("train_seconds") for m in configs}
    total = record["data_seconds"] + sum(t or 0.0 for t in train.values()) + sum(record["predict_seconds"].values())
    notes = [
        f"Data: one real anatomy (MNI152 2009, shipped in nilearn) with synthetic variation: {DATASET_NAME}; "
        "figures on it are not comparable with published LA or Pancreas-CT figures.",
        f"{num_labeled} labelled subjects for both methods (seed {seed}); M&N also uses the unlabelled subjects. "
        + (f"{num_val} labelled subject(s) held out for the validation curves (never trained on). " if num_val else
           "No subject held out for validation (--num-val 0). ")
        + "Test subjects are never in the unlabelled pool.",
        f"Device: {device}. Training time (each run's timing.json): "
        + ", ".join(f"{m} {_duration(t)}" for m, t in train.items())
        + f"; whole demo {_duration(total)} (data, training and prediction, from the timing records).",
        "Presets: " + ", ".join(f"demo_{'gpu' if device.startswith('cuda') else 'cpu'}_{m}" for m in configs)
        + (" (quick mode: a smoke test, not a result)" if quick else ""),
    ]
    report = write_report(out / "report", "mnseg demo: supervised 3D UNet vs M&N", results, test_cases,
                          class_names, notes=notes)
    log(f"report: {report}")
    return report


