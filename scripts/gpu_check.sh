#!/usr/bin/env bash
# Issue 14: the CUDA path verified and the speed table measured, as one prepared command on an H100/H200.
#
#   bash scripts/gpu_check.sh [OUT_DIR]     (default: $OUT where the device tool sets it, else runs/gpu-check)
#
# Stages, in order; each one that would not finish inside the time budget (BUDGET_S seconds from the start,
# default 540: one 10-minute device command with room to write the summary) is skipped and says so:
#   1. env      wheels brought along in .whl/ (the GPU machine has no package registry) into /tmp/site, then
#               `kvtier info`;
#   2. tests    the CUDA tests (pytest -m cuda) and the kernel equivalence tests (tests/test_kernels.py, native
#               on CUDA), logs tests-cuda.log and tests-kernels.log;
#   3. bench    llama-3.1-8b shape, random weights, bf16, 32k x batch 1: hf-dynamic, hf-offload, full, offload,
#               freekv (budget 2048), specache. Each row's decode steps also run under
#               torch.cuda.set_sync_debug_mode("error") (its `sync_debug`);
#   4. kvpr     as time allows: kvpr on the llama-2-7b (multi-head) shape at 8k x batch 16, beside full,
#               offload and hf-offload;
#   5. big      only with BIG=1 (prefill of half a million tokens takes minutes): 128k x BIG_BATCH (default 4;
#               8 on a 141 GB H200) of llama-3.1-8b, where full must report "does not fit";
# then OUT_DIR/<device>-<date>.json (python -m kvtier.bench.gpu_check): versions, test counts, every bench row
# beside full and hf-offload of its run, and each stage's outcome. Copy it (and the bench JSON) to bench/results/.
#
# On the device tool: carry .whl only where a package is missing there (its README says how to fetch wheels);
# the command is `bash scripts/gpu_check.sh` with timeout_s 600.
# GPU_CHECK_DRY=1 runs every stage on this CPU with the tiny-llama shape at 1k (what the test suite checks).
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
BUDGET_S=${BUDGET_S:-540}
DEST=${1:-${OUT:-runs/gpu-check}}
mkdir -p "$DEST/bench"
if [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null || PY=python
STAGES=()

left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }
# run_stage NAME NEEDS_S CMD...: run CMD under a timeout of what is left, if at least NEEDS_S seconds are left
run_stage() {
  local name=$1 needs=$2; shift 2
  local remaining; remaining=$(left)
  if [ "$remaining" -lt "$needs" ]; then
    echo "== $name: skipped, ${remaining}s left of ${BUDGET_S}s (needs about ${needs}s)"
    STAGES+=(--stage "$name=skipped: ${remaining}s left, needs about ${needs}s")
    return
  fi
  echo "== $name ($(date -u +%H:%M:%S), ${remaining}s left)"
  timeout --kill-after=10 "$((remaining - 15))" "$@"
  local rc=$?
  if [ $rc -eq 0 ]; then STAGES+=(--stage "$name=ran"); else STAGES+=(--stage "$name=failed (rc $rc)"); fi
}

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi

if [ "${GPU_CHECK_DRY:-0}" = 1 ]; then
  DEVICE=(--device cpu)
  SHAPE_8B=(--model-config tiny-llama)
  SHAPE_MHA=(--model-config tiny-mha)
  CTX_MAIN=1k; CTX_KVPR=1k; BATCH_KVPR=2; CTX_BIG=2k
  STEPS=(--decode-steps 2 --warmup 1)
  CUDA_TESTS=(tests/test_kernels.py -k enabled_follows)
  KERNEL_TESTS=(tests/test_kernels.py -k "recall_pages_into_strided")
else
  DEVICE=(--device cuda --dtype bfloat16)
  SHAPE_8B=(--model-config llama-3.1-8b --random-weights)
  SHAPE_MHA=(--model-config llama-2-7b --random-weights)
  CTX_MAIN=32k; CTX_KVPR=8k; BATCH_KVPR=16; CTX_BIG=128k
  STEPS=(--decode-steps 16 --warmup 4)
  CUDA_TESTS=(-m cuda tests)
  KERNEL_TESTS=(tests/test_kernels.py)
fi
BENCH=("$PY" -m kvtier.cli bench "${DEVICE[@]}" --out "$DEST/bench" "${STEPS[@]}")

run_stage env 5 bash -c "'$PY' -m kvtier.cli info | tee '$DEST/info.txt'; nvidia-smi -L 2>/dev/null || true"
run_stage tests-cuda 60 bash -c "set -o pipefail; '$PY' -m pytest -q -p no:cacheprovider ${CUDA_TESTS[*]@Q} 2>&1 | tee '$DEST/tests-cuda.log'"
run_stage tests-kernels 60 bash -c "set -o pipefail; '$PY' -m pytest -q -p no:cacheprovider ${KERNEL_TESTS[*]@Q} 2>&1 | tee '$DEST/tests-kernels.log'"
run_stage bench-32k 150 "${BENCH[@]}" "${SHAPE_8B[@]}" --contexts "$CTX_MAIN" --batch 1 \
  --methods hf-dynamic,hf-offload,full,offload,freekv:budget=2048,specache
run_stage kvpr 120 "${BENCH[@]}" "${SHAPE_MHA[@]}" --contexts "$CTX_KVPR" --batch "$BATCH_KVPR" \
  --methods full,offload,kvpr,hf-offload
if [ "${BIG:-0}" = 1 ]; then
  run_stage big 240 "${BENCH[@]}" "${SHAPE_8B[@]}" --contexts "$CTX_BIG" --batch "${BIG_BATCH:-4}" \
    --methods full,freekv:budget=2048 --decode-steps 4 --warmup 1 --prefill-chunk 4096
else
  STAGES+=(--stage "big=skipped: BIG=1 not given")
fi

# the device tool brings back at most 8 files: the summary, the info and logs, the bench JSON; PNGs stay
rm -f "$DEST"/bench/*.png
"$PY" -m kvtier.bench.gpu_check "$DEST" "${STAGES[@]}" --command "bash scripts/gpu_check.sh (BUDGET_S=$BUDGET_S BIG=${BIG:-0})"
