"""mnseg benchmark: the grid, resuming it, failures, and tables that agree with the per-run summaries."""

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from mnseg.cli import main
from mnseg.errors import ConfigError, MnsegError
from mnseg.reporting.benchmark_stats import (
    FOREGROUND,
    RunResult,
    aggregate,
    case_foreground_dice,
    paired_comparisons,
    wilcoxon_p,
)
from mnseg.workflows.benchmark import UPPER_LABEL, BenchmarkSpec, Cell, cell_config, check_spec, plan_cells

TINY = ["models.net.name=unet3d", "models.net.kwargs={depth: 3, base_filters: 4}", "train.epochs=1",
        "train.iters_per_epoch=2", "data.patch_size=[32,32,32]", "models.net.optim.warmup_epochs=0",
        "models.net.optim.lr=3e-3", "train.deterministic=true"]


def _summary(per_case: dict[str, dict[str, float]]) -> dict:
    """A summary.json-shaped dict from {case: {class: dice}} (other metrics derived, HD95 undefined for one)."""
    from mnseg.evaluation.metrics import summarize

    items = [{"case": case, "metrics": {cls: {"dice": d, "jaccard": d / (2 - d), "hd95": 1 / d if d > 0.5 else None,
                                               "asd": 1 - d, "assd": 1 - d} for cls, d in classes.items()}}
             for case, classes in per_case.items()]
    return summarize(items)


def _run(label, n, seed, per_case, timing=None):
    return RunResult(label, n, seed, _summary(per_case), timing or {}, False, f"runs/{label}/{n}_{seed}")


# ----------------------------------------------------------------------------------------------- statistics


def test_wilcoxon_edge_cases_are_defined():
    assert math.isnan(wilcoxon_p([]))
    assert math.isnan(wilcoxon_p([0.3]))
    assert wilcoxon_p([0.0, 0.0, 0.0]) == 1.0
    rng = np.random.default_rng(0)
    d = rng.normal(0.1, 0.05, size=12)
    p = wilcoxon_p(d)
    assert 0 < p < 0.05  # a consistent gain is told from noise
    assert wilcoxon_p(-d) == pytest.approx(p)  # two-sided
    assert 0 <= wilcoxon_p(rng.normal(0, 0.05, size=12)) <= 1


def test_aggregate_is_mean_and_std_over_seeds_per_class_and_foreground():
    rng = np.random.default_rng(1)
    dice = rng.uniform(0.4, 0.95, size=(3, 2, 2))  # seed, case, class
    runs = [_run("mn", 4, s, {f"c{c}": {"a": dice[s, c, 0], "b": dice[s, c, 1]} for c in range(2)}) for s in range(3)]
    rows = {(r["method"], r["num_labeled"], r["class"]): r for r in aggregate(runs)}
    per_run_a = dice[:, :, 0].mean(axis=1)
    assert rows[("mn", 4, "a")]["dice_mean"] == pytest.approx(per_run_a.mean())
    assert rows[("mn", 4, "a")]["dice_std"] == pytest.approx(per_run_a.std())
    per_run_fg = dice.mean(axis=1).mean(axis=1)
    assert rows[("mn", 4, FOREGROUND)]["dice_mean"] == pytest.approx(per_run_fg.mean())
    assert rows[("mn", 4, "a")]["n_seeds"] == 3


def test_paired_comparison_pairs_same_seed_and_case_only():
    runs = [
        _run("supervised", 2, 0, {"x": {"fg": 0.5}, "y": {"fg": 0.6}}),
        _run("supervised", 2, 1, {"x": {"fg": 0.4}, "y": {"fg": 0.7}}),
        _run("mn", 2, 0, {"x": {"fg": 0.7}, "y": {"fg": 0.9}}),
        _run("mn", 2, 1, {"x": {"fg": 0.45}, "y": {"fg": 0.8}}),
        _run("mn", 4, 0, {"x": {"fg": 0.9}, "y": {"fg": 0.9}}),  # no supervised at n=4: no comparison
    ]
    (comp,) = paired_comparisons(runs)
    expected = [0.7 - 0.5, 0.9 - 0.6, 0.45 - 0.4, 0.8 - 0.7]
    assert (comp["method"], comp["num_labeled"], comp["n_pairs"]) == ("mn", 2, 4)
    assert comp["mean_diff"] == pytest.approx(np.mean(expected))
    assert comp["p_value"] == pytest.approx(wilcoxon_p(expected))
    assert case_foreground_dice(runs[0].summary) == pytest.approx({"x": 0.5, "y": 0.6})


def test_benchmark_table_gives_a_verdict_and_bolds_only_supported_differences():
    from mnseg.reporting.benchmark_stats import markdown_report

    rng = np.random.default_rng(2)
    runs = []
    for seed in (0, 1):
        base = {f"c{c}": float(rng.uniform(0.5, 0.7)) for c in range(5)}
        runs.append(_run("supervised", 2, seed, {c: {"fg": d} for c, d in base.items()}))
        runs.append(_run("mn", 2, seed, {c: {"fg": d + float(rng.uniform(0.05, 0.1))} for c, d in base.items()}))
        runs.append(_run("cps", 2, seed, {c: {"fg": d + (0.01 if i % 2 else -0.01)}
                                          for i, (c, d) in enumerate(base.items())}))
    agg, comparisons = aggregate(runs), paired_comparisons(runs)
    text = markdown_report("T", [], agg, comparisons, [])
    mn = next(c for c in comparisons if c["method"] == "mn")
    assert mn["p_value"] < 0.05 and mn["n_pairs"] == 10
    assert (f"2 labelled: mn beat supervised by {mn['mean_diff']:.3f} foreground-mean Dice" in text
            and f"p = {mn['p_value']:.2g}" in text and "over 10 (seed, test case) pairs" in text)
    assert "2 labelled: cps tied supervised" in text
    assert text.index("## Verdict") < text.index("## Foreground mean")
    mn_line = next(ln for ln in text.splitlines() if ln.startswith("| mn | 2 |"))
    cps_line = next(ln for ln in text.splitlines() if ln.startswith("| cps | 2 |"))
    assert f"**{mn['mean_diff']:+.4f}**" in mn_line and "**" not in cps_line
    assert "Bold Δ: a difference the test supports (p < 0.05)" in text and "n/a: HD95/ASD undefined" in text


def test_per_class_delta_is_paired_by_seed_and_shown_in_the_class_table():
    from mnseg.reporting.benchmark_stats import class_deltas, markdown_report

    runs = [
        _run("supervised", 2, 0, {"x": {"wm": 0.7, "les": 0.1}, "y": {"wm": 0.8, "les": 0.3}}),
        _run("supervised", 2, 1, {"x": {"wm": 0.6, "les": 0.2}, "y": {"wm": 0.6, "les": 0.2}}),
        _run("mn", 2, 0, {"x": {"wm": 0.68, "les": 0.5}, "y": {"wm": 0.78, "les": 0.5}}),
        _run("mn", 2, 1, {"x": {"wm": 0.59, "les": 0.4}, "y": {"wm": 0.59, "les": 0.4}}),
        _run("mn", 2, 2, {"x": {"wm": 0.1, "les": 0.1}, "y": {"wm": 0.1, "les": 0.1}}),  # no supervised at seed 2
    ]
    deltas = class_deltas(runs)
    assert deltas[("mn", 2, "wm")] == pytest.approx(np.mean([0.73 - 0.75, 0.59 - 0.6]))
    assert deltas[("mn", 2, "les")] == pytest.approx(np.mean([0.5 - 0.2, 0.4 - 0.2]))
    assert ("supervised", 2, "wm") not in deltas
    text = markdown_report("T", [], aggregate(runs), paired_comparisons(runs), [], deltas=deltas)
    wm_line = next(ln for ln in text.splitlines() if ln.startswith("| mn | 2 | wm |"))
    assert wm_line.rstrip(" |").endswith(f"{deltas[('mn', 2, 'wm')]:+.4f}")
    assert "Per-class Δ Dice" in text


# ----------------------------------------------------------------------------------------------- the grid


def _spec(ds, out, **kw):
    kw.setdefault("methods", ["entropy_min"])
    kw.setdefault("num_labeled", [2])
    kw.setdefault("seeds", [0, 1])
    return BenchmarkSpec(dataset=ds, out=out, **kw)


def test_plan_puts_supervised_first_and_adds_the_upper_bound_per_seed(toy_dataset, tmp_path):
    spec = _spec(toy_dataset, tmp_path, methods=["mean_teacher", "supervised", "mean_teacher"], num_labeled=[2, 3])
    cells = plan_cells(spec)
    assert cells[:2] == [Cell("supervised", 2, 0), Cell("mean_teacher", 2, 0)]
    assert len(cells) == 2 * (2 * 2 + 1)
    upper = [c for c in cells if c.label == UPPER_LABEL]
    assert [c.seed for c in upper] == [0, 1]
    cfg = cell_config(spec, upper[0])
    assert cfg.data.num_labeled is None and cfg.method.name == "supervised" and cfg.train.seed == 0
    assert len({c.run_dir(tmp_path) for c in cells}) == len(cells)
    assert not any(c.label == UPPER_LABEL for c in plan_cells(_spec(toy_dataset, tmp_path, upper_bound=False)))


def test_bad_grids_fail_before_training(toy_dataset, tmp_path):
    with pytest.raises(ConfigError, match="train.seed"):
        check_spec(_spec(toy_dataset, tmp_path, overrides=["train.seed=3"]))
    with pytest.raises(ConfigError, match="unknown method"):
        check_spec(_spec(toy_dataset, tmp_path, methods=["nope"]))
    with pytest.raises(ConfigError, match="no preset"):
        check_spec(_spec(toy_dataset, tmp_path, preset="demo_cpu"))  # demo_cpu_entropy_min does not exist
    import shutil

    shutil.rmtree(toy_dataset / "labelsTs")
    with pytest.raises(MnsegError, match="labelsTs"):
        check_spec(_spec(toy_dataset, tmp_path))
    check_spec(_spec(toy_dataset, tmp_path), need_dataset=False)  # --report-only tabulates without the data
    assert main(["benchmark", str(toy_dataset), "--methods", "supervised", "--num-labeled", "2", "-o",
                 str(tmp_path / "b")]) == 2


# ----------------------------------------------------------------------------------------------- end to end


def _bench(ds, out, cache, *extra):
    return main(["benchmark", str(ds), "--methods", "supervised,entropy_min", "--num-labeled", "2",
                 "--seeds", "0,1", "-o", str(out), "--no-upper-bound", "--no-progress",
                 "--set", f"data.cache_dir={cache}", *TINY, *extra])


def _mtimes(out: Path) -> dict[str, float]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in out.glob("runs/*/*/checkpoints/last.pt")}


@pytest.mark.slow
def test_grid_interrupt_fail_resume_and_tables_match_runs(toy_dataset, tmp_path, monkeypatch):
    import mnseg.workflows.pipeline as bench  # the benchmark's cells run its train -> test pipeline

    out, cache = tmp_path / "bench", tmp_path / "cache"

    # 1) "interrupted": only two cells this time
    assert _bench(toy_dataset, out, cache, "--max-runs", "2") == 0
    first = _mtimes(out)
    assert sorted(first) == ["runs/entropy_min/n2_seed0/checkpoints/last.pt",
                             "runs/supervised/n2_seed0/checkpoints/last.pt"]

    assert "not finished yet: 2" in (out / "results.md").read_text()  # of 4 cells

    # 1b) killed (Ctrl-C, a time limit) while scoring the fourth cell: the third one's result is in the table
    real = bench.test_run

    def killed(run_dir, *a, **k):
        if "entropy_min/n2_seed1" in str(run_dir).replace("\\", "/"):
            raise KeyboardInterrupt
        return real(run_dir, *a, **k)

    monkeypatch.setattr(bench, "test_run", killed)
    assert _bench(toy_dataset, out, cache) == 130
    with open(out / "results.csv", newline="") as fh:
        assert {(r["method"], r["seed"]) for r in csv.DictReader(fh)} == {
            ("supervised", "0"), ("entropy_min", "0"), ("supervised", "1")}

    # 2) continue; one cell fails after training (its checkpoint stays, its summary is never written)

    def flaky(run_dir, *a, **k):
        if "entropy_min/n2_seed1" in str(run_dir).replace("\\", "/"):
            raise RuntimeError("simulated crash during prediction")
        return real(run_dir, *a, **k)

    killed_mtime = _mtimes(out)["runs/entropy_min/n2_seed1/checkpoints/last.pt"]
    monkeypatch.setattr(bench, "test_run", flaky)
    assert _bench(toy_dataset, out, cache) == 1
    failures = json.loads((out / "failures.json").read_text())
    assert [(f["method"], f["num_labeled"], f["seed"]) for f in failures] == [("entropy_min", 2, 1)]
    assert "simulated crash" in failures[0]["error"]
    assert "simulated crash" in (out / "results.md").read_text()
    second = _mtimes(out)
    assert {k: second[k] for k in first} == first  # finished cells were not retrained
    assert len(second) == 4
    assert second["runs/entropy_min/n2_seed1/checkpoints/last.pt"] == killed_mtime  # resumed, not retrained

    # 3) run again: the failed cell resumes from its checkpoint (no new training) and gets scored
    monkeypatch.setattr(bench, "test_run", real)
    assert _bench(toy_dataset, out, cache) == 0
    assert _mtimes(out) == second
    assert json.loads((out / "failures.json").read_text()) == []

    # the same labelled cases for every method at a given seed
    splits = {p.parent.parent.name + "/" + p.parent.name: json.loads(p.read_text())
              for p in out.glob("runs/*/*/split.json")}
    for seed in (0, 1):
        assert splits[f"supervised/n2_seed{seed}"]["labeled"] == splits[f"entropy_min/n2_seed{seed}"]["labeled"]
        assert not set(splits[f"supervised/n2_seed{seed}"]["test"]) & {
            c for group in splits[f"supervised/n2_seed{seed}"]["unlabeled"].values() for c in group}

    # results.csv agrees with the per-run summary.json files
    with open(out / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4
    for row in rows:
        run = out / "runs" / row["method"] / f"n{row['num_labeled']}_seed{row['seed']}"
        summary = json.loads((run / "test_predictions" / "summary.json").read_text())
        assert float(row["dice"]) == pytest.approx(summary["mean"][row["class"]]["dice"])
        assert float(row["hd95"]) == pytest.approx(summary["mean"][row["class"]]["hd95"])
        timing = json.loads((run / "timing.json").read_text())
        assert float(row["train_seconds"]) == pytest.approx(timing["train_seconds"]) and timing["iterations"] == 2
        assert row["peak_gpu_memory_mb"] == ""  # CPU

    # the markdown table's mean ± std and p-value, recomputed from the summaries
    table = (out / "results.md").read_text()
    assert "inductive" in table
    for method in ("supervised", "entropy_min"):
        per_seed = [json.loads((out / "runs" / method / f"n2_seed{s}" / "test_predictions" / "summary.json")
                               .read_text())["foreground_mean"]["dice"] for s in (0, 1)]
        line = next(ln for ln in table.splitlines() if ln.startswith(f"| {method} | 2 | 2 |"))
        assert f"{np.mean(per_seed):.4f} ± {np.std(per_seed):.4f}" in line
    diffs = []
    for s in (0, 1):
        sup, ent = (json.loads((out / "runs" / m / f"n2_seed{s}" / "test_predictions" / "summary.json").read_text())
                    for m in ("supervised", "entropy_min"))
        a, b = case_foreground_dice(ent), case_foreground_dice(sup)
        diffs += [a[c] - b[c] for c in sorted(a)]
    line = next(ln for ln in table.splitlines() if ln.startswith("| entropy_min | 2 |"))
    assert f"| {len(diffs)} |" in line
    p = wilcoxon_p(diffs)
    assert ("n/a" if math.isnan(p) else f"{p:.3g}") in line
    for png in ("dice_vs_labeled.png", "dice_per_class.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"

    # --report-only re-makes the same tables from the run folders alone, training nothing
    before = (out / "results.csv").read_text()
    for name in ("results.csv", "results.md"):
        (out / name).unlink()
    assert _bench(toy_dataset, out, cache, "--report-only") == 0
    assert (out / "results.csv").read_text() == before and _mtimes(out) == second


def test_changed_settings_are_refused_not_mixed(toy_dataset, tmp_path):
    out = tmp_path / "bench"
    run = Cell("supervised", 2, 0).run_dir(out)
    spec = _spec(toy_dataset, out, methods=["supervised"], seeds=[0], upper_bound=False,
                 overrides=["train.epochs=1"])
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(cell_config(_spec(toy_dataset, out, overrides=["train.epochs=3"]),
                                                 Cell("supervised", 2, 0)).to_yaml())
    from mnseg.workflows.benchmark import run_benchmark

    with pytest.raises(MnsegError, match="other settings"):
        run_benchmark(spec, progress=False, log=lambda *a: None)


def test_execution_only_settings_do_not_make_a_finished_run_another_benchmark(toy_dataset, tmp_path):
    """A cell trained with the NaN check every step on a GPU (as older defaults did) still belongs to a grid run now
    with other execution settings; a setting that changes what is learnt still makes it another benchmark."""
    from mnseg.workflows.benchmark import _changed_cells

    out, cell = tmp_path / "bench", Cell("supervised", 2, 0)
    spec = _spec(toy_dataset, out, methods=["supervised"], seeds=[0], upper_bound=False,
                 overrides=["train.epochs=1", "models.net.activation_checkpoint=true", "train.compile=true"])
    old = _spec(toy_dataset, out, overrides=["train.epochs=1", "train.check_every=1", "train.device=cuda",
                                              "train.checkpoint_every=5"])
    cell.run_dir(out).mkdir(parents=True)
    (cell.run_dir(out) / "config.yaml").write_text(cell_config(old, cell).to_yaml())
    assert _changed_cells(spec, [cell]) == []
    learnt = _spec(toy_dataset, out, overrides=["train.epochs=2", "train.check_every=1"])
    (cell.run_dir(out) / "config.yaml").write_text(cell_config(learnt, cell).to_yaml())
    assert _changed_cells(spec, [cell]) == [cell.name]


def test_a_moved_copy_of_the_dataset_keeps_the_cells_another_dataset_does_not(toy_dataset, tmp_path):
    """Kept cells (benchmarks/results) copied next to a fresh copy of the same dataset are the same benchmark; a
    dataset of another name is another benchmark."""
    import shutil

    from mnseg.workflows.benchmark import _changed_cells

    out, cell = tmp_path / "bench", Cell("supervised", 2, 0)

    def spec_on(folder):
        return _spec(folder, out, methods=["supervised"], seeds=[0], upper_bound=False, overrides=["train.epochs=1"])

    cell.run_dir(out).mkdir(parents=True)
    (cell.run_dir(out) / "config.yaml").write_text(cell_config(spec_on(toy_dataset), cell).to_yaml())
    moved, other = tmp_path / "elsewhere" / toy_dataset.name, tmp_path / "Dataset999_Other"
    for copy in (moved, other):
        shutil.copytree(toy_dataset, copy)
    assert _changed_cells(spec_on(moved), [cell]) == []
    assert _changed_cells(spec_on(other), [cell]) == [cell.name]


@pytest.mark.slow
def test_parallel_jobs_give_the_sequential_grid(toy_dataset, tmp_path):
    """--jobs 2 trains the cells in worker processes; the table matches the one-at-a-time grid."""
    cache = tmp_path / "cache"

    def dice_by_run(out):
        with open(out / "results.csv", newline="") as fh:
            return {(r["method"], r["seed"], r["class"]): float(r["dice"]) for r in csv.DictReader(fh)}

    common = ["benchmark", str(toy_dataset), "--methods", "supervised,entropy_min", "--num-labeled", "2",
              "--seeds", "0", "--no-upper-bound", "--no-progress", "--set", f"data.cache_dir={cache}", *TINY]
    assert main([*common, "-o", str(tmp_path / "seq")]) == 0
    assert main([*common, "-o", str(tmp_path / "par"), "--jobs", "2"]) == 0
    seq, par = dice_by_run(tmp_path / "seq"), dice_by_run(tmp_path / "par")
    assert sorted(par) == sorted(seq) and len(seq) >= 2
    for key in seq:
        assert par[key] == pytest.approx(seq[key], abs=0.02), key
    assert "2 at a time" in (tmp_path / "par" / "results.md").read_text()
    # the runs remember that their timings were shared, so a table re-made without --jobs still says so
    assert main([*common, "-o", str(tmp_path / "par"), "--report-only"]) == 0
    assert "2 at a time" in (tmp_path / "par" / "results.md").read_text()
    assert "at a time" not in (tmp_path / "seq" / "results.md").read_text()
    assert main([*common, "-o", str(tmp_path / "bad"), "--jobs", "0"]) == 2


def test_parallel_workers_are_spread_over_the_visible_gpus(monkeypatch):
    """--jobs J with several GPUs: worker n sees only GPU n mod #GPUs (checked in real spawned processes)."""
    import multiprocessing
    import os
    from concurrent.futures import ProcessPoolExecutor

    import torch

    from mnseg.workflows.benchmark import _pin_worker_to_gpu, runs_per_device, worker_gpus

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert worker_gpus("cuda", 4) == worker_gpus(None, 4) == ["0", "1", "2"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4, 6,7")
    assert worker_gpus("auto", 4) == ["4", "6", "7"]  # the user's own selection is kept
    for device, jobs in [("cuda:1", 4), ("cpu", 4), ("cuda", 1)]:
        assert worker_gpus(device, jobs) is None
    spec = BenchmarkSpec(Path("d"), Path("o"), ["supervised"], [2], [0], device="cuda", jobs=5)
    assert runs_per_device(spec) == 2  # 5 runs over 3 GPUs: at most 2 share one
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert worker_gpus("cuda", 4) is None and runs_per_device(spec) == 5

    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(2, mp_context=context, initializer=_pin_worker_to_gpu,
                             initargs=(context.Value("i", 0), ["5", "9"])) as pool:
        seen = {pool.submit(os.getenv, "CUDA_VISIBLE_DEVICES").result() for _ in range(6)}
    assert seen <= {"5", "9"} and seen


def test_benchmark_refuses_an_output_folder_that_is_not_a_benchmarks(toy_dataset, tmp_path, capsys):
    """-o is reused (results rewritten, runs resumed), so a folder holding other files is refused untouched."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "results.csv").write_text("my own table")
    (out / "paper.tex").write_text("draft")
    argv = ["benchmark", str(toy_dataset), "--methods", "supervised", "--num-labeled", "2", "--seeds", "0",
            "--no-upper-bound", "-o", str(out), "--report-only"]
    assert main(argv) == 2
    assert "not a benchmark folder" in capsys.readouterr().err
    assert (out / "results.csv").read_text() == "my own table" and len(list(out.iterdir())) == 2


def _alive(pid: int) -> bool:
    """A process exists and is not a zombie (a container's init may leave orphans unreaped)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
def test_sigterm_stops_the_benchmarks_worker_processes_too(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    repo = Path(__file__).resolve().parents[2]
    parent = subprocess.Popen([sys.executable, "-m", "tests.helpers.sleepy_worker", str(tmp_path)], cwd=repo,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    pid_files = [tmp_path / "pids" / "supervised_0", tmp_path / "pids" / "supervised_1"]
    deadline = time.time() + 60
    while not all(f.exists() and f.read_text() for f in pid_files):
        assert parent.poll() is None and time.time() < deadline, parent.communicate()[0]
        time.sleep(0.2)
    workers = [int(f.read_text()) for f in pid_files]
    assert all(_alive(pid) for pid in workers)
    parent.send_signal(signal.SIGTERM)
    output = parent.communicate(timeout=30)[0]
    assert parent.returncode != 0  # interrupted, not finished
    assert "stopping its worker processes" in output
    deadline = time.time() + 15
    while any(_alive(pid) for pid in workers) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in workers), f"workers {workers} outlived the benchmark"
    for pid in workers:  # nothing left behind if the assertion above failed on another platform
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_the_verdict_quotes_supervised_on_the_method_s_own_seeds():
    from mnseg.reporting.benchmark_stats import paired_comparisons, verdicts

    # supervised on seeds 0 and 1, the method on seed 0 only: its sentence sets it against supervised's seed 0
    def cases(a, b):
        return {"c1": {"lesion": a}, "c2": {"lesion": b}}

    runs = [_run("supervised", 2, 0, cases(0.50, 0.60)), _run("supervised", 2, 1, cases(0.90, 0.90)),
            _run("mn", 2, 0, cases(0.55, 0.66))]
    (comp,) = paired_comparisons(runs)
    assert comp["baseline_mean"] == pytest.approx(0.55) and comp["method_mean"] == pytest.approx(0.605)
    assert "(0.605 vs 0.550)" in verdicts([comp])[0]
