"""The embedded demo: synthetic subjects from the real MNI152 anatomy -> supervised vs M&N -> report.

Everything runs in one output folder and is reused when present: the data (same settings), finished runs
(skipped), interrupted runs (resumed). So running the demo again after an interruption continues it.
"""

from __future__ import annotations

from pathlib import Path

from mnseg.config import Config, load_config

DATASET_NAME = "Dataset900_MNIDemo"
METHOD_LABELS = {"supervised": "Supervised 3D UNet", "mn": "M&N (2D pretrained + 3D UNet)"}


def demo_configs(dataset: Path, out: Path, device: str, num_labeled: int, seed: int, quick: bool) -> dict[str, Config]:
    kind = "gpu" if device.startswith("cuda") else "cpu"
    common = [f"data.dataset={dataset}", f"data.num_labeled={num_labeled}", f"train.seed={seed}",
              f"train.device={device}", f"data.cache_dir={out / 'cache'}"]
    quick_over = {
        "supervised": ["train.epochs=2", "train.iters_per_epoch=2", "models.net.kwargs={depth: 3, base_filters: 4}"],
        "mn": ["train.epochs=3", "train.iters_per_epoch=2", "method.params.sup_epochs=1",
               "models.net3d.kwargs={depth: 3, base_filters: 4}"],
    }
    return {m: load_config(f"demo_{kind}_{m}", common + (quick_over[m] if quick else [])) for m in METHOD_LABELS}


MARKER = ".mnseg_demo"  # written into the output folder, so a later run knows the folder is the demo's own
DEMO_ENTRIES = ("cache", "data", "runs", "report")


def _finished(run_dir: Path, epochs: int) -> bool:
    rows = (run_dir / "history.csv").read_text().splitlines() if (run_dir / "history.csv").exists() else []
    return (run_dir / "checkpoints" / "last.pt").exists() and len(rows) - 1 >= epochs


def run_demo(out: str | Path, device: str = "auto", num_labeled: int = 3, seed: int = 0, quick: bool = False,
             progress: bool = True, log=print) -> Path:
    import time

    import torch

    from mnseg.data.synth import synthesize_dataset
    from mnseg.engine.predict import load_run, predict_folder
    from mnseg.engine.trainer import Trainer
    from mnseg.evaluation import evaluate_folders, format_summary_table
    from mnseg.report import MethodResult, write_report
    from mnseg.utils.output_folder import claim_output_folder

    out = Path(out).resolve()
    claim_output_folder(out, MARKER, DEMO_ENTRIES, "demo", "--out")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    t_start = time.time()
    dataset = out / "data" / DATASET_NAME
    log(f"[1/4] demo data: {dataset}")
    if quick:
        synthesize_dataset(dataset, n_labeled=3, n_unlabeled=3, n_test=2, spacing=6.0, seed=seed, progress=progress,
                           reuse=True)
    else:
        spacing = 3.0 if device == "cpu" else 1.5
        synthesize_dataset(dataset, n_labeled=6, n_unlabeled=12, n_test=6, spacing=spacing, seed=seed,
                           progress=progress, reuse=True)
    configs = demo_configs(dataset, out, device, num_labeled, seed, quick)
    results, timings = [], {}
    for step, (method, cfg) in enumerate(configs.items(), start=2):
        run_dir = out / "runs" / method
        log(f"[{step}/4] train {METHOD_LABELS[method]} -> {run_dir}")
        t0 = time.time()
        if not _finished(run_dir, cfg.train.epochs):
            resume = (run_dir / "checkpoints" / "last.pt").exists()
            Trainer(cfg, run_dir, resume=resume, overwrite=not resume, progress=progress, log=log).fit()
        run = load_run(run_dir, "last", device)
        pred_dir = run_dir / "test_predictions"
        failures = predict_folder(run, dataset / "imagesTs", pred_dir, overwrite=True, progress=progress, log=log)
        if failures:
            raise RuntimeError(f"demo predictions failed: {failures}")
        summary = evaluate_folders(pred_dir, dataset / "labelsTs", dataset_json=dataset / "dataset.json")
        timings[method] = time.time() - t0
        log(format_summary_table(summary))
        results.append(MethodResult(METHOD_LABELS[method], summary, run_dir / "history.csv", pred_dir))

    log("[4/4] report")
    import json

    spec = json.loads((dataset / "dataset.json").read_text())
    class_names = {v: k for k, v in spec["labels"].items() if k != "ignore"}
    test_cases = sorted(
        (p.name[: -len("_0000.nii.gz")], p, dataset / "labelsTs" / p.name.replace("_0000.nii.gz", ".nii.gz"))
        for p in (dataset / "imagesTs").glob("*_0000.nii.gz"))
    total = time.time() - t_start
    notes = [
        f"Data: one real anatomy (MNI152 2009, shipped in nilearn) with synthetic variation: {DATASET_NAME}; "
        "figures on it are not comparable with published LA or Pancreas-CT figures.",
        f"{num_labeled} labelled subjects for both methods (seed {seed}); M&N also uses the unlabelled subjects. "
        "Test subjects are never in the unlabelled pool.",
        f"Device: {device}. Wall-clock: " + ", ".join(f"{m} {t / 60:.1f} min" for m, t in timings.items())
        + f"; whole demo {total / 60:.1f} min.",
        "Presets: " + ", ".join(f"demo_{'gpu' if device.startswith('cuda') else 'cpu'}_{m}" for m in configs)
        + (" (quick mode: a smoke test, not a result)" if quick else ""),
    ]
    report = write_report(out / "report", "mnseg demo: supervised 3D UNet vs M&N", results, test_cases,
                          class_names, notes=notes)
    log(f"report: {report}")
    return report


