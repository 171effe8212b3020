#!/bin/bash
# Domain adaptation on a shifted target (issue 20): supervised training on the source scanner's labelled scans,
# against the same run with DANN (domain.dann_weight), with entropy on the target (domain.target_entropy_weight),
# and with test-time adaptation at prediction (--adapt entropy, TENT). Each is scored on the target domain
# (imagesTarget/labelsTarget; the labels are read only here, by mnseg evaluate) and on the source test subjects,
# for every training seed in SEEDS, then compared with supervised over (seed, target subject) pairs.
#
#   bash benchmarks/domain_shift.sh [OUT]        # default OUT=domain_shift; about 25 min a seed on one CPU core
#   SEEDS="0 1 2" JOBS=2 bash benchmarks/domain_shift.sh OUT   # run again to continue; JOBS seeds at a time
#
# Data (one dataset for every seed, made with --seed DATA_SEED): mnseg synth --domain-shift, 3 mm, 4 labelled
# source subjects (2 trained on, 2 unused by these runs), 4 source test subjects, 6 target subjects (unlabelled in
# training). Preset cpu_grid_supervised shortened to EPOCHS (default 25) x 20 updates of B = 4. Writes
# OUT/table.md (benchmarks/domain_shift_table.py); per-run folders OUT/runs/<name>/seed<S>, scores
# OUT/pred/<name>/seed<S>/{Target,Ts}/summary.json.
set -eu
OUT=${1:-domain_shift}
EPOCHS=${EPOCHS:-25}
SEEDS=${SEEDS:-0 1 2}
JOBS=${JOBS:-1}
DATA=$OUT/data/Dataset922_MNIShift3mm
HERE=$(cd "$(dirname "$0")" && pwd)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${OMP_NUM_THREADS:-1} MNSEG_CACHE_DIR=$OUT/cache
[ -f "$DATA/dataset.json" ] || mnseg synth "$DATA" --domain-shift --n-labeled 4 --n-unlabeled 0 --n-test 4 \
  --n-target 6 --spacing 3 --seed "${DATA_SEED:-0}"
declare -A SETTINGS=([sup]="" [dann]="domain.dann_weight=0.1" [entropy]="domain.target_entropy_weight=0.1")
score() {  # RUN NAME SEED [predict options...]: predict and score the target and the source test subjects
  local run=$1 name=$2 seed=$3; shift 3
  for part in Target Ts; do
    local pred=$OUT/pred/$name/seed$seed/$part
    if [ ! -f "$pred/summary.json" ]; then
      mnseg predict -i "$DATA/images$part" -o "$pred" -m "$run" --checkpoint last --no-progress --overwrite "$@"
      mnseg evaluate "$pred" "$DATA/labels$part" --dataset-json "$DATA/dataset.json" > /dev/null
    fi
  done
}
one_seed() {  # SEED: train, predict and score every run of one seed
  local seed=$1 name run
  for name in sup dann entropy; do
    run=$OUT/runs/$name/seed$seed
    if [ ! -f "$run/checkpoints/last.pt" ] || ! grep -q "^$((EPOCHS - 1))," "$run/history.csv" 2>/dev/null; then
      if [ -f "$run/checkpoints/last.pt" ]; then
        mnseg train --resume "$run" --no-progress
      else
        # shellcheck disable=SC2086
        mnseg train "$DATA" --config cpu_grid_supervised --num-labeled 2 --num-val 0 --seed "$seed" --no-progress \
          train.epochs="$EPOCHS" train.val_every=0 ${EXTRA:-} --run-dir "$run" --overwrite ${SETTINGS[$name]}
      fi  # EXTRA: more overrides (a smoke test's)
    fi
    score "$run" "$name" "$seed"
  done
  score "$OUT/runs/sup/seed$seed" tent "$seed" --adapt entropy --adapt-steps "${ADAPT_STEPS:-10}"
}
running=0
for seed in $SEEDS; do
  one_seed "$seed" > "$OUT/seed$seed.log" 2>&1 &
  running=$((running + 1))
  if [ "$running" -ge "$JOBS" ]; then wait -n; running=$((running - 1)); fi
done
wait
python "$HERE/domain_shift_table.py" "$OUT" --adapt-steps "${ADAPT_STEPS:-10}" | tee "$OUT/table.md"
