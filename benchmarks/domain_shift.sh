#!/bin/bash
# Domain adaptation on a shifted target (issue 20): supervised training on the source scanner's labelled scans,
# against the same run with DANN (domain.dann_weight), with entropy on the target (domain.target_entropy_weight),
# and with test-time adaptation at prediction (--adapt entropy, TENT). Each is scored on the target domain
# (imagesTarget/labelsTarget; the labels are read only here, by mnseg evaluate) and on the source test subjects.
#
#   bash benchmarks/domain_shift.sh [OUT]        # default OUT=domain_shift; about 25 min on one CPU core
#
# Data: mnseg synth --domain-shift, 3 mm, 4 labelled source subjects (2 trained on, 2 unused by these runs),
# 4 source test subjects, 6 target subjects (unlabelled in training). Preset cpu_grid_supervised shortened to
# EPOCHS (default 25) x 20 updates of B = 4. Writes OUT/table.md.
set -eu
OUT=${1:-domain_shift}
EPOCHS=${EPOCHS:-25}
SEED=${SEED:-0}
DATA=$OUT/data/Dataset922_MNIShift3mm
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${OMP_NUM_THREADS:-1} MNSEG_CACHE_DIR=$OUT/cache
[ -f "$DATA/dataset.json" ] || mnseg synth "$DATA" --domain-shift --n-labeled 4 --n-unlabeled 0 --n-test 4 \
  --n-target 6 --spacing 3 --seed "$SEED"
COMMON=(--config cpu_grid_supervised --num-labeled 2 --num-val 0 --seed "$SEED" --no-progress
        train.epochs="$EPOCHS" train.val_every=0 ${EXTRA:-})  # EXTRA: more overrides (a smoke test's)
declare -A SETTINGS=([sup]="" [dann]="domain.dann_weight=0.1" [entropy]="domain.target_entropy_weight=0.1")
score() {  # RUN NAME [predict options...]: predict and score the target and the source test subjects
  local run=$1 name=$2; shift 2
  for part in Target Ts; do
    local pred=$OUT/pred/$name/$part
    if [ ! -f "$pred/summary.json" ]; then
      mnseg predict -i "$DATA/images$part" -o "$pred" -m "$run" --checkpoint last --no-progress --overwrite "$@"
      mnseg evaluate "$pred" "$DATA/labels$part" --dataset-json "$DATA/dataset.json" > /dev/null
    fi
  done
}
for name in sup dann entropy; do
  run=$OUT/runs/$name
  if [ ! -f "$run/checkpoints/last.pt" ] || ! grep -q "^$((EPOCHS - 1))," "$run/history.csv" 2>/dev/null; then
    if [ -f "$run/checkpoints/last.pt" ]; then
      mnseg train --resume "$run" --no-progress
    else
      # shellcheck disable=SC2086
      mnseg train "$DATA" "${COMMON[@]}" --run-dir "$run" --overwrite ${SETTINGS[$name]}
    fi
  fi
  score "$run" "$name"
done
score "$OUT/runs/sup" tent --adapt entropy --adapt-steps "${ADAPT_STEPS:-10}"
python - "$OUT" "${ADAPT_STEPS:-10}" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = ["| run | target fg Dice | target WM | target GM | target lesion | source test fg Dice |", "|---|---|---|---|---|---|"]
names = {"sup": "supervised", "dann": "supervised + DANN (0.1)", "entropy": "supervised + target entropy (0.1)",
         "tent": f"supervised, TENT at prediction ({sys.argv[2]} steps)"}
for key, label in names.items():
    t = json.loads((out / "pred" / key / "Target" / "summary.json").read_text())
    s = json.loads((out / "pred" / key / "Ts" / "summary.json").read_text())
    m = {c: v["dice"] for c, v in t["mean"].items()}
    rows.append(f"| {label} | {t['foreground_mean']['dice']:.4f} | {m.get('white_matter', float('nan')):.4f} | "
                f"{m.get('grey_matter', float('nan')):.4f} | {m.get('lesion', float('nan')):.4f} | "
                f"{s['foreground_mean']['dice']:.4f} |")
(out / "table.md").write_text("\n".join(rows) + "\n")
print("\n".join(rows))
PY
