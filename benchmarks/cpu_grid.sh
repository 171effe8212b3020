#!/bin/bash
# The CPU label-efficiency grid (issue 15): supervised, M&N and mean teacher at 2 and 4 labelled subjects,
# seeds 0, 1, 2, on the strong demo data at 3 mm (10 test subjects, 2 labelled subjects held out per run for
# validation), presets cpu_grid_<method> (the same 1,500 updates of the 3D network for every method).
# Two runs at a time, one thread each (both cores of a 2-core machine). One core, uncontended, 2026-12-02: supervised
# about 15 min, M&N about 30, mean teacher about 37, so the 18 runs take about 4 hours (M&N's cells under today's
# cpu_grid_mn, 2D UNet partner: about 45 min each, two at a time, 2026-12-08); finished cells are kept, so
# a second call continues where the first stopped. (At 500 updates the grid fit 90 minutes, but there every label
# together gained only +0.025 Dice and no run learned the lesion, so no method could show a gain.)
#
#   bash benchmarks/cpu_grid.sh [OUT]            # default OUT=grid_cpu; run again to continue
#
# Then keep the small files of every cell, so the tables can be remade without training (--report-only):
#   rsync -a --include='*/' --include='summary.json' --include='config.yaml' --include='split.json' \
#     --include='timing.json' --include='history.csv' --exclude='*' OUT/bench/runs/ benchmarks/results/Dataset921_MNIStrong3mm/runs/
set -eu
OUT=${1:-grid_cpu}
. "$(dirname "$0")/grid_data.sh"
mnseg benchmark "$DATA" --methods "${METHODS:-supervised,mn,mean_teacher}" --num-labeled "${COUNTS:-2,4}" \
  --seeds "${SEEDS:-0,1,2}" --preset cpu_grid --num-val 2 --no-upper-bound --jobs "${JOBS:-2}" --device cpu \
  --no-progress -o "$OUT/bench"
