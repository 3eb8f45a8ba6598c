#!/usr/bin/env bash
# The prepared GPU check (issue 21): one script, at most ~8 minutes on one GPU.
#
#   experiments/gpu_check.sh OUTPUT_DIR
#
# Runs where the project and its dependencies already import (it installs nothing and needs
# no network: the offline tiny CLIP and digits are built locally on first use):
#   1. pytest -m gpu: captured vs eager steps (FLoRA, FedFFT), device preprocessing vs CLIP's
#      processor, fp32/bf16/fp16 runs that learn, cached vs uncached training;
#   2. flora bench --device cuda --compile ab (each method eager, then compiled and captured in
#      CUDA graphs), ViT-B/32 shapes: FLoRA and FedFFT in fp32 and in bf16-mixed, then the
#      other methods in fp32, as far as the budget goes; after the fp32 pair, flora bench
#      --parallel_clients '[10]' (a round of 10 cached-FLoRA clients, 1 at a time with the step
#      captured in CUDA graphs vs 10 at a time eager).
# Each step gets a timeout from what is left of the budget (GPU_CHECK_SECONDS, default 480);
# a step that does not fit is skipped and says so. The bench reports are copied to dated files
# under docs/results/ (and to OUTPUT_DIR, so they come back from a lent machine).
# DEVICE=cpu ARCH=tiny run the same steps on a CPU (a dry run of this script).
set -uo pipefail

OUT=${1:?usage: experiments/gpu_check.sh OUTPUT_DIR}
DEVICE=${DEVICE:-cuda}
ARCH=${ARCH:-vit-b-32}
BUDGET=${GPU_CHECK_SECONDS:-480}
mkdir -p "$OUT" docs/results
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
START=$(date +%s)
STATUS=0

left() { echo $((BUDGET - ($(date +%s) - START))); }

step() {  # step NAME MIN_SECONDS MAX_SECONDS COMMAND...
    local name=$1 need=$2 cap=$3
    shift 3
    local remaining
    remaining=$(left)
    if ((remaining < need)); then
        echo "[gpu_check] $name: skipped (${remaining}s left of ${BUDGET}s, needs ${need}s)" | tee -a "$OUT/gpu_check.log"
        STATUS=1
        return
    fi
    local limit=$((remaining < cap ? remaining : cap))
    echo "[gpu_check] $name (timeout ${limit}s): $*" | tee -a "$OUT/gpu_check.log"
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$OUT/$name.log"
    echo "[gpu_check] $name: exit $rc after $(($(date +%s) - START))s" | tee -a "$OUT/gpu_check.log"
    ((rc == 0)) || STATUS=1
}

python -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" | tee "$OUT/gpu_check.log"

step pytest_gpu 60 200 python -m pytest -m gpu -q -p no:cacheprovider -rA tests/integration/test_gpu.py tests/clip/test_preprocess.py

BENCH=(python -m flora_lightning bench --device "$DEVICE" --arch "$ARCH" --compile ab
    --loop_overhead false --steps 5 --warmup 2 --min_timed_seconds 0.5 --results docs/results)
# Most telling first: each bench writes its own report, so a step cut short loses only itself.
step bench_fp32 90 200 "${BENCH[@]}" --precision 32-true --methods '[FLoRA, FedFFT]' \
    --out "$OUT/bench-fp32"
# issue 23: a round of 10 cached-FLoRA clients one at a time (the step captured in CUDA graphs,
# the baseline) vs 10 at a time (eager: the batched fit is not captured)
step bench_parallel 60 150 python -m flora_lightning bench --device "$DEVICE" --arch "$ARCH" \
    --parallel_clients '[10]' --parallel_round_clients 10 --results docs/results \
    --out "$OUT/bench-parallel"
step bench_bf16 90 200 "${BENCH[@]}" --precision bf16-mixed --methods '[FLoRA, FedFFT]' \
    --out "$OUT/bench-bf16"
step bench_fp32_rest 120 240 "${BENCH[@]}" --precision 32-true \
    --methods '[FLoRA-uncached, FedLC, FedVMLC, FedAA]' --out "$OUT/bench-fp32-rest"

cp docs/results/"$(date +%F)"-bench-"$ARCH"-"$DEVICE"-* "$OUT"/ 2>/dev/null
cp docs/results/"$(date +%F)"-bench-parallel-clients-"$ARCH"-"$DEVICE".* "$OUT"/ 2>/dev/null
echo "[gpu_check] done in $(($(date +%s) - START))s, status $STATUS" | tee -a "$OUT/gpu_check.log"
exit $STATUS
