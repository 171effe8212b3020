# Sourced by the CPU benchmark scripts (cpu_grid.sh, methods_cpu.sh, pretrain_cpu.sh) with OUT set: one thread per
# run, the preprocessing cache under OUT, and the CPU grid's data made once in OUT/data (the strong variation at
# 3 mm: 22 labelled subjects, 10 test subjects), its folder in DATA.
set -eu
DATA=$OUT/data/Dataset921_MNIStrong3mm
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 MNSEG_CACHE_DIR=${MNSEG_CACHE_DIR:-$OUT/cache}
[ -f "$DATA/dataset.json" ] || mnseg synth "$DATA" --variation strong --n-labeled 22 --n-unlabeled 0 --n-test 10 \
  --spacing 3
