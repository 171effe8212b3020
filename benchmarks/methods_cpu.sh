#!/bin/bash
# Each method of issue 19 (new or changed against its paper) at 2 labelled subjects on the CPU, against supervised
# training with the same labels, the same split (seed 0) and the same 500 updates of the 3D network: presets
# cpu_grid_<method> (the CPU grid's 16-filter 3D UNet, 32^3 crops at 3 mm, B labelled + B unlabelled patches) at
# 25 epochs of 20 iterations, the budget of the first CPU diagnosis (benchmarks/diagnose_mn.py --budget short).
# DAN (adversarial, formulation=dan) is a second grid beside the first, sharing its supervised cell.
# One run at a time with one thread (JOBS=2: two, both cores of a 2-core machine).
#
#   bash benchmarks/methods_cpu.sh [OUT]          # default OUT=methods_cpu; run again to continue
#
# Tables: OUT/bench/results.md, OUT/bench_dan/results.md. Keep the small files of each cell as cpu_grid.sh says.
set -eu
OUT=${1:-methods_cpu}
. "$(dirname "$0")/grid_data.sh"
COMMON=(--num-labeled 2 --seeds 0 --preset cpu_grid --num-val 2 --no-upper-bound --set train.epochs=25
        --set train.val_every=5 --jobs "${JOBS:-1}" --device cpu --no-progress)
mnseg benchmark "$DATA" --methods "${METHODS:-adversarial,arco,dual_contrast,pi_model,ua_mt}" "${COMMON[@]}" \
  -o "$OUT/bench"
mkdir -p "$OUT/bench_dan/runs/supervised"
[ -e "$OUT/bench_dan/runs/supervised/n2_seed0" ] || cp -r "$OUT/bench/runs/supervised/n2_seed0" \
  "$OUT/bench_dan/runs/supervised/"
mnseg benchmark "$DATA" --methods adversarial --set-method adversarial:method.params.formulation=dan \
  --set-method adversarial:models.disc.kwargs.use_image=true "${COMMON[@]}" -o "$OUT/bench_dan"
