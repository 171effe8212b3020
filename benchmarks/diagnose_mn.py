"""Why does (or doesn't) M&N beat supervised training? Discriminating runs on one split, rerunnable on a CPU.

Each variant is M&N at the CPU grid's size (preset cpu_grid_mn_paper: the paper's recipe, no switch beyond it)
with one thing changed, next to the supervised baseline with the same labels and the same 1,500 3D updates, and
"full", supervised training on every subject that is not held out (the ceiling of any method at that budget):

    python benchmarks/diagnose_mn.py --out /tmp/diag --variants sup,full,mn,bu0   # seed 0
    python benchmarks/diagnose_mn.py --out /tmp/diag --variants sup,mn_paper,mn --seeds 0,1,2 --jobs 2
    python benchmarks/diagnose_mn.py --out /tmp/diag_short --budget short     # the first diagnosis: 500 updates
    python benchmarks/diagnose_mn.py --out /tmp/diag_late --budget late --variants mn_lesion_rest --num-labeled 4

Variants that change only co-training start from their base run's model at the end of the supervised stage, so
stage 1 is trained once per base; a base that is not asked for itself trains no further than that (OUT/runs/
<base>_stage1/), so `--variants mn_wu0 --num-labeled 4 --seeds 0,1` costs two stage 1s and two co-trainings.
Runs go to OUT/runs/<variant>/n<N>_seed<S> (finished runs are kept, so a rerun continues); OUT/diagnosis.csv and
OUT/diagnosis.md hold (with the rows of earlier calls on the same OUT), per run: validation Dice (2 held-out
labelled subjects: what a recipe is chosen on), test Dice per class (10 test subjects: reported, never chosen on),
and for M&N the lesion's share in the pseudo-masks against its share in the labels over the 3D model's co-training
epochs. Test Dice is that of the checkpoint with the best validation Dice (as `mnseg train --test` and the benchmark
predict), so a variant whose co-training only lowers validation Dice is scored at an epoch before it (the best-epoch
column says which). Each job runs with one thread
(OMP_NUM_THREADS=1, or --threads), so --jobs 2 uses both cores of a 2-core machine.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

PAPER = "cpu_grid_mn_paper"
# the grid's M&N until 2026-12-08 (paper + both models' mean as pseudo-mask), the base of the variants below
ENSEMBLE = str(Path(__file__).parent / "presets" / "cpu_grid_mn_ensemble.yaml")
KEEP = "train.keep_epochs=[{sup_epochs}]"
# the target mn_lesion_rest names: the lesion from both models' mean, the other classes the 3D model's own
LESION_REST = ["method.params.partner_weight_by_class=[0,0,0,0.5]", "method.params.by_class_mix=remainder"]
# The budget: "long" is the cpu_grid presets' own (1,500 updates of the 3D network; M&N 30 supervised + 90
# co-training epochs); "short" is the first diagnosis (2026-12-01): 500 updates, M&N 10 + 30 epochs, in which
# even every label gains only +0.025 (docs/results.md).
BUDGETS = {
    "long": {"sup_epochs": 30, "mn_epochs": 120, "mn": [], "other": []},
    "short": {"sup_epochs": 10, "mn_epochs": 40, "mn": ["train.epochs=40", "method.params.sup_epochs=10",
                                                        "train.val_every=5"],
              "other": ["train.epochs=25", "train.val_every=5"]},
    # "long" with co-training started at epoch 45 instead of 30 (the 3D model still gets 45 + 60 / 2 = 75 epochs,
    # 1,500 updates): at epoch 30 neither model predicts a lesion voxel in the unlabelled subjects at 4 labelled,
    # and supervised training shows the lesion on validation from epoch 45 (seeds 1 and 2)
    "late": {"sup_epochs": 45, "mn_epochs": 105, "mn": ["train.epochs=105", "method.params.sup_epochs=45"],
             "other": []},
}
# name -> (preset, overrides, base): a variant with a base starts from the base run's model at the end of the
# supervised stage (checkpoints/epoch10.pt; the changed switch acts in co-training only), so the diagnosis trains
# stage 1 once per base, not once per variant. Every M&N variant changes one thing of PAPER, except "mn".
VARIANTS: dict[str, tuple[str, list[str], str | None]] = {
    "sup": ("cpu_grid_supervised", [], None),
    # every labelled subject but the validation ones (the same validation and test subjects): what labels on all
    # the unlabelled subjects would give supervised training at the same budget, the ceiling of any method
    "full": ("cpu_grid_supervised", [], None),
    # supervised with M&N's learning-rate restart: a cosine over the supervised stage's epochs, then another over the
    # rest, the curve M&N's 3D model sees. The fairer control for M&N's gain (mn_bu0 gained +0.026 on seed 0 alone)
    "sup_restart": ("cpu_grid_supervised", ["models.net.optim.restart_epochs=[{sup_epochs}]"], None),
    "mn_paper": (PAPER, [KEEP], None),
    "bu0": (PAPER, ["method.params.lrg=fixed", "method.params.fixed_ratio=0"], "mn_paper"),  # the schedule alone
    "wu0": (PAPER, ["method.params.w_u=0"], "mn_paper"),  # starvation: unlabelled items take places, teach nothing
    "oracle": (PAPER, ["method.params.oracle_pseudo=true"], "mn_paper"),  # perfect pseudo-masks: the ceiling
    "no_refresh": (PAPER, ["method.params.fg_refresh_every=0"], "mn_paper"),
    "agree_refresh": (PAPER, ["method.params.fg_refresh=agree"], "mn_paper"),
    "sq_dice": (PAPER, ["method.params.soft_dice=squared"], "mn_paper"),
    "floor1": (PAPER, ["method.params.min_labeled=1"], "mn_paper"),
    "on_top": (PAPER, ["method.params.unlabeled_on_top=true"], "mn_paper"),
    "ensemble": (PAPER, ["method.params.pseudo=ensemble"], "mn_paper"),
    "confidence": (PAPER, ["method.params.pseudo_weight=confidence"], "mn_paper"),
    "mn": (ENSEMBLE, [KEEP], None),  # the grid's recipe until 2026-12-08 (the rows below change one thing of it)
    # the grid's recipe since (preset cpu_grid_mn): mn_unet2d_lesion_rest in one run, rare classes from the labels
    "grid_mn": ("cpu_grid_mn", [KEEP], None),
    # the same controls for the default recipe: the schedule alone, and a labelled batch that never shrinks with
    # crops aimed only where both models agree
    "mn_bu0": (ENSEMBLE, ["method.params.lrg=fixed", "method.params.fixed_ratio=0"], "mn"),
    "mn_top_agree": (ENSEMBLE, ["method.params.unlabeled_on_top=true", "method.params.fg_refresh=agree"], "mn"),
    # two answers to the default recipe's white/grey-matter loss (-0.01 against supervised, 2026-12-02), which
    # mn_bu0 does not have (so the pseudo-masks cause it): at least 2 labelled items in every batch, and each
    # voxel's unlabelled loss weighted by the pseudo-mask's confidence
    "mn_floor2": (ENSEMBLE, ["method.params.min_labeled=2"], "mn"),
    "mn_conf": (ENSEMBLE, ["method.params.pseudo_weight=confidence"], "mn"),
    # the 2D partner is the weaker model on white/grey matter (validation Dice 0.65/0.77 against the 3D model's
    # 0.70/0.80 at mn's best checkpoint): its share in the ensemble pseudo-mask lowered to a quarter
    "mn_w25": (ENSEMBLE, ["method.params.partner_weight=0.25"], "mn"),
    # no foreground refresh: at 1,500 updates the 3D model predicts lesions, and the refresh aims a third of the
    # unlabelled crops at them, where the ensemble pseudo-mask halves the lesion (cause 2; at 500 updates no run
    # predicted a lesion, so no_refresh could not show it)
    "mn_no_refresh": (ENSEMBLE, ["method.params.fg_refresh_every=0"], "mn"),
    # L_u only where both models' argmax agree: the trained model is never pulled towards a class its partner
    # disputes (the white/grey-matter loss at 4 labelled starts with the first unlabelled items, 2026-12-02)
    "mn_agree": (ENSEMBLE, ["method.params.pseudo_weight=agree"], "mn"),
    # at 4 labelled: the starvation control for the default recipe (unlabelled items take batch places and teach
    # nothing), and the Dice form for probability targets (cause 1) where the 3D model's white matter falls
    "mn_wu0": (ENSEMBLE, ["method.params.w_u=0"], "mn"),
    "mn_sq": (ENSEMBLE, ["method.params.soft_dice=squared"], "mn"),
    # the labelled loss at full weight and a full labelled batch (b_l = B), the unlabelled items on top: whether the
    # late white-matter fall is the labelled loss losing weight while the learning rate is low
    "mn_top": (ENSEMBLE, ["method.params.unlabeled_on_top=true"], "mn"),
    # a target better than the model it teaches: at 4 labelled the ensemble pseudo-mask is 0.020 white-matter Dice
    # below the 3D model (pseudo_quality.py); both halves from moving averages (the self half a mean teacher)
    "mn_ema": (ENSEMBLE, ["method.params.generator=ema"], "mn"),
    # the partner out of the 3D model's target: P is its own moving average only (partner_weight 0), the same loss
    # and batches. If white matter still falls, fitting any pseudo-mask costs it; if not, the partner does
    "mn_self_ema": (ENSEMBLE, ["method.params.generator=ema", "method.params.partner_weight=0"], "mn"),
    # the partner out of the target with live (not averaged) generators: P is the 3D model's own eval-mode softmax.
    # The partner never predicts a lesion voxel in the unlabelled subjects (pseudo_quality.py, every checkpoint and
    # seed at 4 labelled), so the lesion any target holds is the 3D model's own; mn_self_ema's average delayed it
    "mn_self": (ENSEMBLE, ["method.params.partner_weight=0"], "mn"),
    # what mn_self_ema against mn suggests: the lesion's target from the ensemble (the partner brings it), the other
    # classes' from the 3D model itself (the partner costs them white matter)
    "mn_lesion_partner": (ENSEMBLE, ["method.params.partner_weight_by_class=[0,0,0,0.5]"], "mn"),
    # mn_self_ema keeps white/grey matter, the partner brings the lesion: the self half from the 3D model's moving
    # average and the partner only in the lesion (both generators moving averages)
    # mn_lesion_partner without the renormalisation that shrinks the lesion where only the partner says lesion
    # (partner 0.8, self 0.2: 0.38 instead of the plain mean's 0.5, so white matter wins): the lesion keeps the plain
    # mean's mass, the other classes share the rest in the 3D model's own proportions
    "mn_lesion_rest": (ENSEMBLE, LESION_REST, "mn"),
    # mn_lesion_rest with a cap on the lesion's pseudo-mask share: the last checkpoints of mn_lesion_rest predict
    # 3x (4 labelled) and 24x (2 labelled) the true lesion volume in the unlabelled subjects, grown from their own
    # targets; alignment on the lesion only and only downwards lowers it where the target over-predicts it
    "mn_lesion_cap": (ENSEMBLE, [*LESION_REST, "method.params.pseudo_align=labels",
                                      "method.params.align_classes=[3]", "method.params.align_down_only=true"], "mn"),
    # the lesion by its prior rather than its argmax: mn_lesion_rest with the target's lesion share aligned (up and
    # down) to the labelled crops'. Where the 3D model ranks the lesion but its argmax holds a tenth of the true
    # volume (late start, seed 2: ranked Dice 0.32, pseudo_quality.py --ranked), the scaled lesion takes the voxels it
    # ranks highest
    "mn_lesion_align": (ENSEMBLE, [*LESION_REST, "method.params.pseudo_align=labels",
                                        "method.params.align_classes=[3]"], "mn"),
    "mn_lesion_partner_ema": (ENSEMBLE, ["method.params.partner_weight_by_class=[0,0,0,0.5]",
                                              "method.params.generator=ema"], "mn"),
    # the ensemble's class frequencies aligned to the labelled crops' (ReMixMatch distribution alignment): at 4
    # labelled the lesion share of the target starts at a tenth of the labels' and ends at five times it
    "mn_align": (ENSEMBLE, ["method.params.pseudo_align=labels"], "mn"),
    "mn_lesion_partner_align": (ENSEMBLE, ["method.params.partner_weight_by_class=[0,0,0,0.5]",
                                                "method.params.pseudo_align=labels"], "mn"),
    # the ceiling of the grid's recipe: the unlabelled subjects' true labels as P, the same batches and schedule.
    # What it gains over supervised at 4 labelled is all any pseudo-mask could give there
    "mn_oracle": (ENSEMBLE, ["method.params.oracle_pseudo=true"], "mn"),
    # true lesions in every target: a cube of a labelled crop pasted into each unlabelled item, its labels the target
    # there (BCP's inward copy-paste), with the grid's ensemble target and with mn_lesion_rest's
    "mn_paste": (ENSEMBLE, ["method.params.copy_paste=labels"], "mn"),
    "mn_lesion_rest_paste": (ENSEMBLE, [*LESION_REST, "method.params.copy_paste=labels"], "mn"),
    # one warm-up + cosine over the whole run instead of a restart at co-training: the restart alone costs supervised
    # training the lesion (sup_restart, 3 seeds at 2 labelled), and every 4-labelled variant with it lost seed 0's
    # lesion; stage 1 differs (its learning rate does not fall to lr_final), so no base
    "mn_single": (ENSEMBLE, [KEEP, "method.params.schedule=single"], None),
    # the 2D partner on slices enlarged to 64 px (2x) without stochastic depth: stage 1 differs, so no base
    "scale2d": (PAPER, [KEEP, "models.net2d.kwargs.input_scale=auto", "models.net2d.kwargs.auto_side=64",
                        "models.net2d.kwargs.drop_connect_rate=0.0"], None),
    # the 2D partner alone on labels for 30 more epochs first (600 updates that cost no 3D update)
    "pre2d": (PAPER, ["method.params.pre2d_epochs=30", "train.epochs={pre2d_epochs}"], None),
    # a 2D partner that fits these crops: a 2D UNet from scratch (4 levels of 16-128 filters, a 4 x 4 bottleneck on
    # 32 px slices) instead of EfficientNet-Lite0, whose stride 32 leaves 1 x 1 and which stays 0.08-0.11
    # white-matter Dice below the 3D UNet trained alone. Stage 1 differs, so no base
    "mn_unet2d": (ENSEMBLE, [KEEP, "models.net2d.name=unet2d",
                                  "models.net2d.kwargs={{depth: 4, base_filters: 16}}",
                                  "models.net2d.finetune="], None),
    # mn_unet2d's partner with mn_lesion_rest's target: with the 2D UNet the lesion grows on seed 0 at 4 labelled
    # (test lesion +0.026 against supervised, where every EfficientNet-partnered run lost it) but white matter falls
    # (-0.035); mn_lesion_rest keeps white and grey matter the 3D model's own
    "mn_unet2d_lesion_rest": (ENSEMBLE, LESION_REST, "mn_unet2d"),
    "mt": ("cpu_grid_mean_teacher", [], None),
}


THREADS = {"n": 1}  # threads per training job (--threads): jobs x threads should not exceed the cores


def _train(cmd: list[str], log_file: Path, test: bool = True) -> int:
    threads = str(THREADS["n"])
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "a") as fh:
        return subprocess.run([sys.executable, "-m", "mnseg", "train", *cmd, *(["--test"] if test else []),
                               "--no-progress"], env=env, stdout=fh, stderr=subprocess.STDOUT).returncode


# A base that only branches need (not asked for as a variant itself) trains stage 1 and one co-training epoch
# (train.epochs must exceed sup_epochs), in OUT/runs/<base>_stage1/, unscored: its epoch-sup_epochs checkpoint is
# the one a full base run would keep (tests/benchmarks/test_diagnose_mn.py), at a fraction of the cost.
STAGE1 = "_stage1"


def snapshot(run_dir: Path, sup_epochs: int) -> Path:
    """A run's end-of-stage-1 checkpoint (train.keep_epochs), what branches start from."""
    return run_dir / "checkpoints" / f"epoch{sup_epochs}.pt"


def base_dir(out: Path, base: str, n: int, seed: int, sup_epochs: int) -> Path:
    """The base run to branch from: the full base run where its stage-1 snapshot exists, else the stage-1 one."""
    full = out / "runs" / base / f"n{n}_seed{seed}"
    if snapshot(full, sup_epochs).exists():
        return full
    return out / "runs" / f"{base}{STAGE1}" / f"n{n}_seed{seed}"


def full_epochs(preset: str, overrides: list[str]) -> int:
    """train.epochs of a run of ``preset`` with ``overrides``: what a branch of a stage-1-only base trains to."""
    from mnseg.config.schema import load_config, resolve_preset

    return load_config(resolve_preset(preset), overrides).train.epochs


def _branch(run_dir: Path, base_dir: Path, overrides: list[str], sup_epochs: int) -> None:
    """A new run directory holding the base run's stage-1 state (its epoch ``sup_epochs``), with this variant's
    settings in config.yaml."""
    import shutil

    import yaml

    from mnseg.config.schema import Config, apply_overrides, read_yaml

    kept = snapshot(base_dir, sup_epochs)
    if not kept.exists():
        raise RuntimeError(f"{kept} missing: the base run must finish first")
    tmp = run_dir.with_name(run_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "checkpoints").mkdir(parents=True)
    for name in ("plans.json", "split.json", "env.json"):
        shutil.copy(base_dir / name, tmp / name)
    with open(base_dir / "history.csv") as fh:
        (tmp / "history.csv").write_text("".join(fh.readlines()[: sup_epochs + 1]))
    cfg = Config.from_dict(apply_overrides(read_yaml(base_dir / "config.yaml"), overrides + ["train.keep_epochs=[]"]))
    (tmp / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    shutil.copy(kept, tmp / "checkpoints" / "last.pt")
    tmp.rename(run_dir)


ALL_LABELLED = {"full"}


def labelled_count(dataset: Path, variant: str, n: int) -> int:
    """n, or for the ceiling every imagesTr subject but the 2 validation ones."""
    return len(list((dataset / "labelsTr").glob("*.nii*"))) - 2 if variant in ALL_LABELLED else n


def own_overrides(variant: str, budget: dict, extra=(), branch: bool = False) -> list[str]:
    """The variant's overrides under ``budget``; a run that does not branch also gets the budget's and ``extra``
    (a branch keeps its base's settings)."""
    preset, overrides, _ = VARIANTS[variant]
    fields = {"sup_epochs": budget["sup_epochs"], "pre2d_epochs": budget["mn_epochs"] + 30}
    overrides = [o.format(**fields) for o in overrides]
    if branch:
        return overrides
    return [*budget["mn" if "cpu_grid_mn" in Path(preset).stem else "other"], *overrides, *extra]


def run_one(dataset: Path, out: Path, variant: str, n: int, seed: int, cache: Path, log, budget: dict,
            extra=(), stage1_only: bool = False) -> Path:
    """Train (or resume, or branch) one cell under ``budget`` (an entry of BUDGETS); return its run directory.
    ``stage1_only``: a base for branches only, trained to its stage-1 snapshot (STAGE1)."""
    preset, overrides, base = VARIANTS[variant]
    sup = budget["sup_epochs"]
    overrides = own_overrides(variant, budget, extra, branch=bool(base))
    labelled = labelled_count(dataset, variant, n)
    run_dir = out / "runs" / f"{variant}{STAGE1 if stage1_only else ''}" / f"n{labelled}_seed{seed}"
    done = snapshot(run_dir, sup) if stage1_only else run_dir / "test_predictions" / "summary.json"
    if done.exists():
        return run_dir
    if stage1_only:
        overrides = [*overrides, f"train.epochs={sup + 1}"]
    os.environ["MNSEG_CACHE_DIR"] = str(cache)
    t0 = time.time()
    log_file = run_dir.parent / f"{run_dir.name}.log"
    if base and not (run_dir / "checkpoints" / "last.pt").exists():
        base_run = base_dir(out, base, n, seed, sup)
        if base_run.parent.name.endswith(STAGE1):  # back to the full run's length, as the full base would have
            full = full_epochs(VARIANTS[base][0], own_overrides(base, budget, extra, branch=False))
            overrides = [f"train.epochs={full}", *overrides]
        _branch(run_dir, base_run, overrides, sup)
    if (run_dir / "checkpoints" / "last.pt").exists():
        rc = _train(["--resume", str(run_dir)], log_file, test=not stage1_only)
    else:
        rc = _train([str(dataset), "--config", preset, "--num-labeled", str(labelled),
                     "--num-val", "2", "--seed", str(seed),
                     "--run-dir", str(run_dir), "--overwrite", *overrides], log_file, test=not stage1_only)
    log(f"{variant} n={n} seed={seed}: rc={rc} ({(time.time() - t0) / 60:.1f} min)")
    if rc != 0:
        raise RuntimeError(f"{variant} n={n} seed={seed} failed, see {log_file}")
    return run_dir


def read_run(run_dir: Path) -> dict:
    """Validation Dice (last epoch), test Dice per class, and M&N's lesion shares over its 3D co-training."""
    with open(run_dir / "history.csv") as fh:
        rows = list(csv.DictReader(fh))
    val = [float(r["val_dice"]) for r in rows if r.get("val_dice")]
    val_epochs = [int(r["epoch"]) + 1 for r in rows if r.get("val_dice")]
    summary = json.loads((run_dir / "test_predictions" / "summary.json").read_text())
    classes = [c for c in summary["metric_per_case"][0]["metrics"]]
    per_class = {c: float(np.mean([m["metrics"][c]["dice"] for m in summary["metric_per_case"]])) for c in classes}
    best = int(np.argmax(val)) if val else 0
    out = {"val_dice": val[-1] if val else float("nan"), "best_val": val[best] if val else float("nan"),
           "best_epoch": val_epochs[best] if val else 0, **{f"test_{c}": v for c, v in per_class.items()}}
    out["test_fg_mean"] = float(np.mean(list(per_class.values())))
    co3d = [r for r in rows if r["phase"] == "cotrain-3d"]
    for key in ("pseudo_share_3", "label_share_3", "b_u"):
        vals = [float(r[key]) for r in co3d if r.get(key)]
        out[key] = float(np.mean(vals)) if vals else float("nan")
    return out


def merged_rows(out: Path, results: list[dict]) -> list[dict]:
    """The rows already in OUT/diagnosis.csv (another call's, e.g. a second process sharing OUT) with this call's
    results in place of those of the same (variant, n, seed), so no call drops another's rows."""
    def key(row):
        return str(row["variant"]), str(row["n"]), str(row["seed"])

    def typed(row):  # the CSV's strings back to the numbers read_run gives
        return {k: v if k == "variant" else int(v) if k in ("n", "seed", "best_epoch") else float(v)
                for k, v in row.items()}

    new = {key(r) for r in results}
    old = []
    if (out / "diagnosis.csv").exists():
        with open(out / "diagnosis.csv", newline="") as fh:
            old = [typed(r) for r in csv.DictReader(fh) if key(r) not in new and set(r) == set(results[0])]
    return old + results


def write_tables(out: Path, results: list[dict]) -> None:
    results = merged_rows(out, results)
    keys = list(results[0])
    with open(out / "diagnosis.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(results)
    lines = ["| variant | n | seed | val Dice, last | best val (epoch) | test WM | test GM | test lesion | "
             "test fg mean | lesion pseudo/label share | mean b_u (3D) |", "|" + "---|" * 11]
    for r in results:
        share = (f"{r['pseudo_share_3']:.5f} / {r['label_share_3']:.5f}" if np.isfinite(r["pseudo_share_3"])
                 else "")
        b_u = f"{r['b_u']:.2f}" if np.isfinite(r["b_u"]) else ""
        lines.append(f"| {r['variant']} | {r['n']} | {r['seed']} | {r['val_dice']:.4f} | {r['best_val']:.4f} "
                     f"({r['best_epoch']}) | {r['test_white_matter']:.4f} "
                     f"| {r['test_grey_matter']:.4f} | {r['test_lesion']:.4f} | {r['test_fg_mean']:.4f} | {share} "
                     f"| {b_u} |")
    (out / "diagnosis.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dataset", type=Path, help="default OUT/data/Dataset921_MNIStrong3mm, synthesized if absent")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--num-labeled", type=int, default=2)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1,
                        help="threads per job (default 1); --jobs 1 --threads 2 gives one run both cores, so each "
                             "result comes in half the time and the next variant can be chosen on it")
    parser.add_argument("--budget", choices=list(BUDGETS), default="long")
    parser.add_argument("--spacing", default="3", help="of the synthesized dataset (default 3 mm)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every run that does not branch (e.g. train.epochs=75)")
    args = parser.parse_args(argv)
    budget = BUDGETS[args.budget]
    THREADS["n"] = max(args.threads, 1)
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    out = args.out.resolve()
    dataset = args.dataset or out / "data" / "Dataset921_MNIStrong3mm"
    if not (dataset / "dataset.json").exists():
        # every imagesTr subject beyond the labelled and validation ones is unlabelled, and has a label on disk
        # that only the oracle variant reads
        subprocess.run([sys.executable, "-m", "mnseg", "synth", str(dataset), "--variation", "strong", "--n-labeled",
                        "22", "--n-unlabeled", "0", "--n-test", "10", "--spacing", args.spacing], check=True)
    cells = [(v, args.num_labeled, s) for s in seeds for v in variants]
    needed = {(VARIANTS[v][2], n, s) for v, n, s in cells if VARIANTS[v][2]}
    sup = budget["sup_epochs"]
    missing = sorted(c for c in needed - set(cells)
                     if not snapshot(base_dir(out, *c, sup), sup).exists())
    # bases before branches; a base no cell asks for trains its stage 1 only
    first = [(*c, False) for c in cells if not VARIANTS[c[0]][2]] + [(*c, True) for c in missing]
    then = [(*c, False) for c in cells if VARIANTS[c[0]][2]]
    dirs = {}
    for stage in (first, then):
        with ThreadPoolExecutor(args.jobs) as pool:
            train = lambda c: run_one(dataset, out, *c[:3], out / "cache", print, budget, args.set,  # noqa: E731
                                      stage1_only=c[3])
            dirs.update(zip((c[:3] for c in stage), pool.map(train, stage)))
    results = [{"variant": v, "n": labelled_count(dataset, v, n), "seed": s, **read_run(dirs[(v, n, s)])}
               for v, n, s in cells]
    write_tables(out, results)
    print((out / "diagnosis.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
