#!/bin/bash
# Does self-supervised pretraining pay at 2 labelled subjects (issue 20)? On the CPU grid's data (strong variation,
# 3 mm, 22 labelled subjects whose images are the unlabelled pool, 10 test subjects never seen before scoring):
#  1. each pretext task (rotation, contrastive, reconstruction, clustering) pretrains the grid's 16-filter 3D UNet
#     on the imagesTr images (no label read), 500 updates of 4 crops of 32^3;
#  2. supervised training at 2 labelled (seed 0's split, 2 validation subjects) starts from each, at the budget of
#     benchmarks/methods_cpu.sh (cpu_grid_supervised, 25 epochs of 20 updates), beside the same run from scratch;
#  3. M&N (presets/cpu_grid_mn_ensemble.yaml, the grid's M&N when this ran, at 10 + 30 epochs, the diagnosis's short budget) from scratch and with its 3D UNet started
#     from the task whose supervised run had the best validation Dice (chosen on validation, never on test).
# One run at a time with one thread; each run's test Dice is in RUN/test_predictions/summary.json. SEEDS (default 0)
# repeats steps 2 and 3 on other splits (runs/<name> for seed 0, runs/<name>_seed<S> for the others), each
# starting from the same pretrained encoders (pretraining reads no label and no split); the pretext task for M&N is
# chosen on each seed's own validation Dice.
#
#   bash benchmarks/pretrain_cpu.sh [OUT]          # default OUT=pretrain_cpu; run again to continue
#   SEEDS="1 2" bash benchmarks/pretrain_cpu.sh OUT   # the same rows on seeds 1 and 2
#   SCRATCH_ONLY=1 SEEDS="1 2" bash benchmarks/pretrain_cpu.sh OUT   # only the runs from scratch (no pretraining
#       needed): on the second core while another call pretrains; a later call skips them
#   TASKS=reconstruction SEEDS="1 2" bash benchmarks/pretrain_cpu.sh OUT   # seed 0's choice only (what the table
#       over seeds measures: supervised and M&N, each from scratch and from reconstruction)
# The paired table over seeds (from the kept runs, no training):
#   python benchmarks/compare_runs.py --baseline "sup=OUT/runs/supervised_scratch*" \
#     --run "sup+rec=OUT/runs/supervised_reconstruction*" --run "mn=OUT/runs/mn_scratch*" ...
set -eu
OUT=${1:-pretrain_cpu}
. "$(dirname "$0")/grid_data.sh"
NET=(models.net.name=unet3d "models.net.kwargs={depth: 4, base_filters: 16}" models.net.optim.lr=2.0e-3
     models.net.optim.warmup_epochs=1)
read -ra TASKS <<< "${TASKS:-rotation contrastive reconstruction clustering}"  # TASKS="reconstruction": that one only
PRE_EPOCHS=25
train() {  # RUN ARGS...: train (or resume) one run unless it is finished
  local run=$1; shift
  [ -f "$run/test_predictions/summary.json" ] && return 0
  if [ -f "$run/checkpoints/last.pt" ]; then mnseg train --resume "$run" --test --no-progress
  else mnseg train "$DATA" --run-dir "$run" --overwrite "$@"; fi
}
for_seed() {  # SEED: its run-name suffix (TAG) and the supervised and M&N settings on its split (SUP, MN)
  TAG=$([ "$1" = 0 ] && echo "" || echo "_seed$1")
  local split=(--num-labeled 2 --num-val 2 --seed "$1" --test --no-progress)
  SUP=(--config cpu_grid_supervised "${split[@]}" train.epochs=25 train.val_every=5)
  MN=(--config "$(dirname "$0")/presets/cpu_grid_mn_ensemble.yaml" "${split[@]}" train.epochs=40 method.params.sup_epochs=10 train.val_every=5)
}
scratch() {  # the runs that start from scratch, for the seed for_seed last set
  train "$OUT/runs/supervised_scratch$TAG" "${SUP[@]}"
  train "$OUT/runs/mn_scratch$TAG" "${MN[@]}"
}
if [ -n "${SCRATCH_ONLY:-}" ]; then
  for seed in ${SEEDS:-0}; do for_seed "$seed"; scratch; done
  exit 0
fi
for task in "${TASKS[@]}"; do
  pre=$OUT/pretrain/$task
  if [ "$(cat "$pre/history.csv" 2>/dev/null | wc -l)" -le "$PRE_EPOCHS" ]; then  # not all its epochs yet
    if [ -f "$pre/checkpoints/last.pt" ]; then mnseg pretrain --resume "$pre" --no-progress
    else mnseg pretrain "$DATA" --task "$task" -o "$pre" --overwrite --epochs "$PRE_EPOCHS" --iters-per-epoch 20 \
      --patch-size 32,32,32 --no-progress "${NET[@]}"; fi
  fi
done
for seed in ${SEEDS:-0}; do
  for_seed "$seed"
  scratch
  for task in "${TASKS[@]}"; do
    train "$OUT/runs/supervised_$task$TAG" "${SUP[@]}" "models.net.init=$OUT/pretrain/$task/checkpoints/last.pt"
  done
  best=$(python - "$OUT/runs" "$TAG" "${TASKS[@]}" <<'PY'
import csv, sys
from pathlib import Path
def best_val(run):
    rows = [r for r in csv.DictReader(open(Path(run) / "history.csv")) if r.get("val_dice")]
    return max(float(r["val_dice"]) for r in rows)
print(max(sys.argv[3:], key=lambda t: best_val(Path(sys.argv[1]) / f"supervised_{t}{sys.argv[2]}")))
PY
)
  echo "seed $seed: pretext task with the best validation Dice: $best"
  train "$OUT/runs/mn_$best$TAG" "${MN[@]}" "models.net3d.init=$OUT/pretrain/$best/checkpoints/last.pt"
done
