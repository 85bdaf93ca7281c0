#!/usr/bin/env bash
# One GPU session's checks and measurements, in the order they matter, each under its own
# time limit, every output kept under $OUT (the log, and the saved tables for the
# performance page under $OUT/bench_overhead/):
#
#   1. the CUDA tests (CUDA graphs against the eager path and the float64 reference, no
#      host sync with and without graphs, every other test that runs on a GPU);
#   2. profile_step: host µs, launches and GPU µs per hook, with and without CUDA graphs;
#   3. host_cost: host µs per step in SI's hooks for 6, 16 and 64 tensors, graphs or not;
#   4. bench_overhead: the per-step table (MLPs, deep MLP, ResNet-18) and ResNet-18 inside
#      Avalanche's Naive, float32, then the per-step table under AMP.
#
# On the GPU machine:   OUT=$OUT tools/gpu_session.sh
# Tried on a CPU first: DEVICE=cpu QUICK=1 OUT=/tmp/gpu_session tools/gpu_session.sh
set -u
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-/tmp/gpu_session}
PY=${PY:-python3}
QUICK=${QUICK:-}
mkdir -p "$OUT/bench_overhead"
LOG="$OUT/log"
export PYTHONUNBUFFERED=1

step() {  # step SECONDS command...: a limit per step, so one that hangs leaves time to the rest
    local limit=$1
    shift
    echo "== $(date +%T) $*" | tee -a "$LOG"
    timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
    echo "== exit ${PIPESTATUS[0]}" | tee -a "$LOG"
}

$PY -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, \
torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')" | tee -a "$LOG"

if [ "$DEVICE" = cuda ]; then
    step 120 $PY -m pytest -q -p no:cacheprovider -k "cuda" tests
else  # what runs of it without a GPU
    step 150 $PY -m pytest -q -p no:cacheprovider tests/test_graphs.py tests/test_no_host_sync.py
fi

STEPS=30; RESNET=--resnet; REPEATS=5
if [ -n "$QUICK" ]; then STEPS=1; REPEATS=1; fi
PROFILE_MODELS=()
if [ -n "$QUICK" ]; then PROFILE_MODELS=(--models "MLP 784-1000-1000"); fi
step 150 $PY -m experiments.profile_step --device "$DEVICE" --steps $STEPS \
    "${PROFILE_MODELS[@]}" --save gpu-profile-graphs

step 60 $PY -m experiments.host_cost --device "$DEVICE" $([ -n "$QUICK" ] && echo --repeats 1) \
    --save gpu-host-cost

VARIANTS=('SIPlugin total' 'SIPlugin total, CUDA graphs' 'SIPlugin task'
          'SIPlugin task, CUDA graphs' 'SIPlugin delta_params' 'SIPlugin sos'
          'Avalanche SI plugin')
QUICKFLAG=()
if [ -n "$QUICK" ]; then QUICKFLAG=(--quick); fi
step 180 $PY -m experiments.bench_overhead --device "$DEVICE" --no-mnist $RESNET \
    --repeats $REPEATS "${QUICKFLAG[@]}" --variants "${VARIANTS[@]}" --save gpu-graphs
step 80 $PY -m experiments.bench_overhead --device "$DEVICE" --no-mnist --no-strategy --amp \
    --repeats $REPEATS --quick --variants "${VARIANTS[@]:0:6}" --save gpu-graphs-amp

cp results/bench_overhead/gpu-profile-graphs.txt results/bench_overhead/gpu-host-cost.txt \
    results/bench_overhead/gpu-graphs.* \
    results/bench_overhead/gpu-graphs-amp.* "$OUT/bench_overhead/" 2>/dev/null
echo "== done $(date +%T)" | tee -a "$LOG"
