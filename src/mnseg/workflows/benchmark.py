"""Label-efficiency benchmark: train a grid of (method, labelled count, seed) runs, then tabulate them.

OUT/
  benchmark.json       the grid and settings of the latest invocation
  runs/<method>/n<N>_seed<S>/   one ordinary run directory per cell (+ timing.json, test_predictions/)
  failures.json        cells that raised in the latest invocation (method, N, seed, error)
  results.csv, results.md, dice_vs_labeled.png, dice_per_class.png

A cell is done when its ``test_predictions/summary.json`` exists; a cell with ``checkpoints/last.pt``
but no summary resumes; anything else starts (again). So an interrupted grid, or one with failed
cells, continues where it stopped when the same command is run again. Every method at a given seed
gets the same split (``make_split`` depends only on the folder, N, seed, num_val and transductive).
The tables are rewritten after every finished run, so a grid killed half-way (a time limit) still leaves
a table of what finished; ``report_only`` re-makes them from OUT alone (run folders copied from elsewhere).
"""

from __future__ import annotations

import contextlib
import datetime
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mnseg.engine.run_dir import RunDir
from mnseg.errors import ConfigError, MnsegError
from mnseg.utils.atomic import atomic_write_json, atomic_write_text
from mnseg.utils.output_folder import claim_output_folder

UPPER_LABEL = "supervised (all labels)"
# Settings the grid owns; an override of these would break the "same split for every method" promise.
GRID_KEYS = ("data.dataset", "data.num_labeled", "data.num_val", "data.transductive", "train.seed")


@dataclass(frozen=True)
class Cell:
    method: str
    num_labeled: int | None  # None: every labelled case (the upper-bound reference)
    seed: int

    @property
    def label(self) -> str:
        return UPPER_LABEL if self.num_labeled is None else self.method

    @property
    def name(self) -> str:
        return f"{self.method}/n{'all' if self.num_labeled is None else self.num_labeled}_seed{self.seed}"

    def run_dir(self, out: Path) -> Path:
        return Path(out) / "runs" / self.name


@dataclass
class BenchmarkSpec:
    dataset: Path
    out: Path
    methods: list[str]
    num_labeled: list[int]
    seeds: list[int]
    transductive: bool = False
    num_val: int = 0
    overrides: list[str] = field(default_factory=list)  # key=value for every run
    method_overrides: dict[str, list[str]] = field(default_factory=dict)  # method -> key=value
    preset: str | None = None  # PREFIX: method m uses preset PREFIX_m (default: preset m)
    upper_bound: bool = True
    device: str | None = None
    jobs: int = 1  # runs trained at the same time (small runs leave a GPU mostly idle); spread over visible GPUs


@dataclass
class BenchmarkOutcome:
    cells: list[Cell]
    done: list[Cell]
    failures: list[dict]
    not_run: list[Cell]  # left for a later invocation (max_runs reached)
    files: list[Path]


# ----------------------------------------------------------------------------------------------- the grid


def plan_cells(spec: BenchmarkSpec) -> list[Cell]:
    """Seed by seed (so complete comparisons appear early): per count supervised first, then the methods;
    then the all-labels supervised reference for that seed."""
    methods = ["supervised"] + [m for m in dict.fromkeys(spec.methods) if m != "supervised"]
    cells = []
    for seed in dict.fromkeys(spec.seeds):
        for n in dict.fromkeys(spec.num_labeled):
            cells += [Cell(m, n, seed) for m in methods]
        if spec.upper_bound:
            cells.append(Cell("supervised", None, seed))
    return cells


def preset_for(method: str, prefix: str | None) -> str:
    from mnseg.config.schema import PRESET_DIR

    name = f"{prefix}_{method}" if prefix else method
    if not (PRESET_DIR / f"{name}.yaml").exists():
        known = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
        raise ConfigError(f"no preset '{name}' for method '{method}' (presets: {', '.join(known)})")
    return name


def check_spec(spec: BenchmarkSpec, need_dataset: bool = True) -> None:
    """Fail before training anything: unknown methods, bad counts/seeds, overrides of grid settings,
    a dataset without labelled test cases (unless only tabulating), missing presets."""
    from mnseg.data.dataset import DatasetFolder
    from mnseg.methods import METHODS

    unknown = [m for m in spec.methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"unknown method(s) {unknown}; known: {', '.join(sorted(METHODS))}")
    if not spec.methods or not spec.num_labeled or not spec.seeds:
        raise ConfigError("the grid is empty: give --methods, --num-labeled and --seeds")
    if spec.jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {spec.jobs}")
    bad = [n for n in spec.num_labeled if n < 1]
    if bad:
        raise ConfigError(f"--num-labeled values must be >= 1, got {bad}")
    for method in spec.method_overrides:
        if method not in METHODS:
            raise ConfigError(f"--set-method names unknown method '{method}'")
    for item in [*spec.overrides, *(o for v in spec.method_overrides.values() for o in v)]:
        key = item.partition("=")[0].strip()
        if "=" not in item or not key:
            raise ConfigError(f"override '{item}' must look like key.sub=value")
        if key in GRID_KEYS:
            raise ConfigError(f"override '{item}': {key} is set by the benchmark grid (use its options instead)")
    from mnseg.config.checks import check_config

    first_cells = {c.method: c for c in reversed(plan_cells(spec))}  # one cell per method: settings differ by method
    for method, cell in first_cells.items():
        preset_for(method, spec.preset)
        try:
            check_config(cell_config(spec, cell))
        except ConfigError as exc:
            raise ConfigError(f"{cell.label}: {exc}") from None
    if not need_dataset:
        return
    root = DatasetFolder(spec.dataset).root
    for sub in ("imagesTs", "labelsTs"):
        if not (root / sub).is_dir():
            raise MnsegError(f"{root / sub}: missing; the benchmark scores every run on labelled test cases")


def cell_config(spec: BenchmarkSpec, cell: Cell):
    """The method's preset, then the overrides for every run and for this method, then the grid's facts."""
    from mnseg.config.schema import Config, load_config

    cfg = load_config(preset_for(cell.method, spec.preset),
                      [*spec.overrides, *spec.method_overrides.get(cell.method, [])])
    d = cfg.to_dict()
    d["method"]["name"] = cell.method
    d["data"].update(dataset=str(Path(spec.dataset).resolve()), num_labeled=cell.num_labeled,
                     num_val=spec.num_val, transductive=spec.transductive)
    d["train"]["seed"] = cell.seed
    if spec.device:
        d["train"]["device"] = spec.device
    return Config.from_dict(d)


MARKER = ".mnseg_benchmark"  # marks -o as a benchmark folder (it is reused: the same command continues the grid)
OWN_ENTRIES = ("runs", "results.csv", "results.md", "dice_vs_labeled.png", "dice_per_class.png", "benchmark.json",
               "failures.json")


# Settings that change how a run executes, not what it learns: where it trains, how often it checks for a
# non-finite loss or saves, whether kernels are compiled or tensors laid out channels-last (the
# same arithmetic up to rounding order, as on another device), and whether activations are recomputed (same values
# and gradients).
EXECUTION_ONLY_TRAIN = ("device", "check_every", "checkpoint_every", "keep_epochs", "compile",
                        "compile_mode", "channels_last")
EXECUTION_ONLY_MODEL = ("activation_checkpoint",)


def resolved_params(method: str, params: dict) -> dict:
    """A method's parameters with every default filled in, so a preset that lists a default and one that leaves
    it out describe the same run."""
    import dataclasses

    from mnseg.methods import method_class
    from mnseg.methods.base import parse_params

    cls = method_class(method)
    return dataclasses.asdict(parse_params(cls.params_class, params, method))


def comparable_config(cfg) -> dict:
    """A config as a dict without what only changes how a run executes, so that two configs that train the same
    model compare equal (defaults filled in, and the model sections a method adds to itself; ``cfg`` itself is
    left as it is)."""
    from mnseg.config.schema import Config
    from mnseg.engine.build import add_method_roles

    cfg = Config.from_dict(cfg.to_dict())
    add_method_roles(cfg)
    d = cfg.to_dict()
    d["method"]["params"] = resolved_params(d["method"]["name"], d["method"]["params"])  # defaults filled in
    for key in EXECUTION_ONLY_TRAIN:
        d["train"].pop(key)
    for model in d["models"].values():
        for key in EXECUTION_ONLY_MODEL:
            model.pop(key)
        model["kwargs"].pop("input_range", None)  # filled in from the data by the trainer (resolve_input_ranges)
    if d["data"].get("dataset"):  # the folder's name, not where it lies: kept cells still match a moved copy
        d["data"]["dataset"] = Path(d["data"]["dataset"]).name
    return d


def _changed_cells(spec: BenchmarkSpec, cells: list[Cell]) -> list[str]:
    """Cells whose existing run was made with other settings (reusing them would mix two benchmarks)."""
    from mnseg.config.schema import Config

    comparable = comparable_config
    changed = []
    for cell in cells:
        run = RunDir(cell.run_dir(spec.out))
        if run.config.exists() and comparable(Config.from_dict(run.read_config())) != comparable(
                cell_config(spec, cell)):
            changed.append(cell.name)
    return changed


# ----------------------------------------------------------------------------------------------- one cell


def cell_state(run_dir: Path) -> str:
    run = RunDir(run_dir)
    if run.tested():
        return "done"
    return "resume" if run.can_resume() else "new"


# ----------------------------------------------------------------------------------------------- the whole grid


def run_benchmark(spec: BenchmarkSpec, max_runs: int | None = None, progress: bool = True,
                  log=print, report_only: bool = False) -> BenchmarkOutcome:
    """Run (or continue) the grid, then write the tables and plots from every finished run.

    ``report_only``: train nothing and need no dataset; tabulate the finished runs already in OUT."""
    spec.out = Path(spec.out)
    check_spec(spec, need_dataset=not report_only)
    cells = plan_cells(spec)
    changed = _changed_cells(spec, cells)
    if changed:
        raise MnsegError(
            f"{spec.out}: these runs were made with other settings than now: {', '.join(changed)}; "
            f"use another output folder (-o) for a benchmark with new settings"
        )
    failures: list[dict] = []

    def tabulate() -> BenchmarkOutcome:
        """Tables from the runs finished so far; cells neither finished nor failed count as not finished."""
        done = [c for c in cells if cell_state(c.run_dir(spec.out)) == "done"]
        failed = {f["run_dir"] for f in failures}
        pending = [c for c in cells if c not in done and str(c.run_dir(spec.out)) not in failed]
        return BenchmarkOutcome(cells, done, failures, pending, write_results(spec, cells, done, failures, pending))

    claim_output_folder(spec.out, MARKER, OWN_ENTRIES, "benchmark", "-o")
    if report_only:
        return tabulate()
    atomic_write_json(spec.out / "benchmark.json", _spec_record(spec, cells))
    todo: list[tuple[int, Cell]] = []
    for i, cell in enumerate(cells, 1):
        if cell_state(cell.run_dir(spec.out)) == "done":
            log(f"[{i}/{len(cells)}] {cell.name}: done before, kept")
        elif max_runs is None or len(todo) < max_runs:
            todo.append((i, cell))

    def finished(failure: dict | None) -> None:
        """Record a cell's end and rewrite the tables, so a grid stopped half-way keeps what finished."""
        if failure:
            failures.append(failure)
        atomic_write_json(spec.out / "failures.json", failures)
        tabulate()

    if spec.jobs > 1 and len(todo) > 1:
        _run_parallel(spec, todo, len(cells), log, on_finished=finished)
    else:
        for i, cell in todo:
            finished(_run_cell(spec, cell, f"[{i}/{len(cells)}]", progress, log, sharing=1))
    atomic_write_json(spec.out / "failures.json", failures)  # also when nothing was left to run
    return tabulate()  # not finished now: the cells --max-runs left for later


def _run_cell(spec: BenchmarkSpec, cell: Cell, tag: str, progress: bool = True, log=print,
              sharing: int = 1) -> dict | None:
    """Train and score one cell; a failure is returned as a record (one failed cell must not stop the grid)."""
    from mnseg.engine.hooks import TimingHook
    from mnseg.workflows.pipeline import run_pipeline

    run_dir = cell.run_dir(spec.out)
    log(f"{tag} {cell.name}: {'resuming' if cell_state(run_dir) == 'resume' else 'training'}")
    try:
        # timing.json: wall-clock, iterations and peak GPU memory, over every session of the cell
        run_pipeline(cell_config(spec, cell), run_dir, hooks=[TimingHook(sharing)], show_summary=False,
                     progress=progress, log=log)
    except Exception as exc:  # noqa: BLE001 - reported in failures.json and results.md
        log(f"{tag} {cell.name}: FAILED: {type(exc).__name__}: {exc}")
        return _failure(spec, cell, f"{type(exc).__name__}: {exc}", traceback.format_exc())
    log(f"{tag} {cell.name}: done")
    return None


def _failure(spec: BenchmarkSpec, cell: Cell, error: str, trace: str) -> dict:
    return {"method": cell.label, "num_labeled": cell.num_labeled, "seed": cell.seed,
            "run_dir": str(cell.run_dir(spec.out)), "error": error, "traceback": trace}


def _run_cell_quietly(spec: BenchmarkSpec, cell: Cell, tag: str, sharing: int) -> dict | None:
    """A worker process's cell: no progress bars (they would interleave); log lines carry the cell's tag;
    the CPU threads are shared out between the workers instead of each taking them all."""
    import os

    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // spec.jobs))
    return _run_cell(spec, cell, tag, progress=False, log=lambda *a: print(*a, flush=True), sharing=sharing)


def worker_gpus(device: str | None, jobs: int) -> list[str] | None:
    """The CUDA devices to spread ``jobs`` worker processes over, as CUDA_VISIBLE_DEVICES entries: every visible GPU
    when the grid trains on CUDA without naming one (``--device cuda`` or auto) and there are several; else None
    (all workers share the one device the configuration names)."""
    import os

    import torch

    if jobs < 2 or (device or "auto") not in ("auto", "cuda"):
        return None
    count = torch.cuda.device_count()
    if count < 2:
        return None
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return (visible or [str(i) for i in range(count)])[:count]


def runs_per_device(spec: BenchmarkSpec) -> int:
    """How many runs train at once on each device (what their timings share)."""
    gpus = worker_gpus(spec.device, spec.jobs)
    return -(-spec.jobs // len(gpus)) if gpus else spec.jobs


def _pin_worker_to_gpu(counter, gpus: list[str]) -> None:
    """Worker process initializer: the n-th worker sees only GPU n mod len(gpus), as its cuda:0 (set before CUDA
    starts in the fresh spawned process)."""
    import os

    with counter.get_lock():
        index = counter.value
        counter.value += 1
    os.environ["CUDA_VISIBLE_DEVICES"] = gpus[index % len(gpus)]


def _run_parallel(spec: BenchmarkSpec, todo: list[tuple[int, Cell]], total: int, log=print,
                  on_finished=lambda failure: None, worker=None) -> None:
    """Train up to spec.jobs cells at once, each in its own process (spawned: CUDA cannot be forked);
    ``on_finished(failure or None)`` after each. SIGTERM or Ctrl-C stops the workers too (a worker left running
    would go on training a cell that the next benchmark then resumes as well); their checkpoints, written
    atomically, let that next benchmark continue the cells."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    worker = worker or _run_cell_quietly
    context = multiprocessing.get_context("spawn")
    gpus = worker_gpus(spec.device, spec.jobs)
    pin = {}
    if gpus:
        pin = {"initializer": _pin_worker_to_gpu, "initargs": (context.Value("i", 0), gpus)}
        log(f"training {len(todo)} run(s), {spec.jobs} at a time, spread over GPUs {','.join(gpus)}")
    else:
        log(f"training {len(todo)} run(s), {spec.jobs} at a time")
    pool = ProcessPoolExecutor(max_workers=spec.jobs, mp_context=context, **pin)
    try:
        with _sigterm_as_interrupt():
            # Counted here: a worker sees only its own GPU, so it cannot tell how many runs share each one.
            sharing = runs_per_device(spec)
            futures = {pool.submit(worker, spec, cell, f"[{i}/{total}]", sharing): cell for i, cell in todo}
            for future in as_completed(futures):
                cell = futures[future]
                try:
                    failure = future.result()
                except Exception as exc:  # noqa: BLE001 - the worker process itself died (killed, out of memory)
                    failure = _failure(spec, cell, f"worker process died: {type(exc).__name__}: {exc}",
                                       traceback.format_exc())
                    log(f"{cell.name}: FAILED: {failure['error']}")
                on_finished(failure)
    except KeyboardInterrupt:
        log("benchmark stopped: stopping its worker processes (their cells resume from their checkpoints)")
        _stop_workers(pool)
        raise
    pool.shutdown(wait=True)


def _stop_workers(pool) -> None:
    """Terminate a ProcessPoolExecutor's workers now, not after their current cell."""
    processes = list(getattr(pool, "_processes", {}).values())  # terminate_workers() exists from Python 3.14 only
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(timeout=10)
        if process.is_alive():
            process.kill()


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM (``kill``, a scheduler's stop) raises KeyboardInterrupt in the main thread, as Ctrl-C does."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _spec_record(spec: BenchmarkSpec, cells: list[Cell]) -> dict:
    import mnseg

    record = asdict(spec)
    record.update(dataset=str(Path(spec.dataset).resolve()), out=str(spec.out),
                  presets={m: preset_for(m, spec.preset) for m in dict.fromkeys(c.method for c in cells)},
                  cells=[c.name for c in cells], mnseg=mnseg.__version__,
                  written=datetime.datetime.now().isoformat(timespec="seconds"))
    return record


def write_results(spec: BenchmarkSpec, cells: list[Cell], done: list[Cell], failures: list[dict],
                  not_run: list[Cell]) -> list[Path]:
    """results.csv, results.md and the two plots, from the finished runs' files only."""
    from mnseg.reporting.benchmark_plots import plot_class_bars, plot_dice_vs_labeled
    from mnseg.reporting.benchmark_stats import (
        aggregate,
        class_deltas,
        markdown_report,
        paired_comparisons,
        read_run_result,
        result_rows,
        results_csv,
    )

    out = Path(spec.out)
    runs = [read_run_result(c.run_dir(out), c.label) for c in done]
    agg = aggregate(runs)
    atomic_write_text(out / "results.csv", results_csv(result_rows(runs)))
    shared = max([runs_per_device(spec)] + [int(r.timing.get("runs_sharing_device") or 1) for r in runs])
    mode = ("transductive: imagesTs joined the unlabelled pool (its labels never used in training)"
            if spec.transductive else "inductive: test cases never in the unlabelled pool")
    presets = {m: preset_for(m, spec.preset) for m in dict.fromkeys(c.method for c in cells)}
    notes = [
        f"Dataset: {Path(spec.dataset).resolve()}",
        f"Mode: {mode}",
        f"Seeds: {', '.join(map(str, dict.fromkeys(spec.seeds)))}; labelled counts: "
        f"{', '.join(map(str, dict.fromkeys(spec.num_labeled)))}; validation cases held out: {spec.num_val}",
        "Presets: " + ", ".join(f"{m}={p}" for m, p in presets.items()),
        "Overrides: " + (" ".join(spec.overrides) or "none")
        + "".join(f"; {m}: {' '.join(o)}" for m, o in spec.method_overrides.items() if o),
        *([f"Runs trained up to {shared} at a time on one device: wall-clock and iterations/s are per run while "
            "sharing it"] if shared > 1 else []),
        f"Runs finished: {len(done)} of {len(cells)}"
        + (f"; failed: {len(failures)}" if failures else "")
        + (f"; not finished yet: {len(not_run)}" if not_run else ""),
    ]
    units = runs[0].summary.get("units", "voxel") if runs else "voxel"
    text = markdown_report("Label-efficiency benchmark", notes, agg, paired_comparisons(runs), failures, units,
                           class_deltas(runs))
    atomic_write_text(out / "results.md", text)
    files = [out / "results.csv", out / "results.md",
             plot_dice_vs_labeled(agg, out / "dice_vs_labeled.png", upper_label=UPPER_LABEL),
             plot_class_bars(agg, out / "dice_per_class.png")]
    return files
