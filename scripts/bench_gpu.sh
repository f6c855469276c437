#!/usr/bin/env bash
# Issue 7's GPU benchmark rows, in parts that each fit one 10-minute command on an H100/H200:
#
#   bash scripts/bench_gpu.sh PART      (bash scripts/bench_gpu.sh list  shows the parts)
#
# Every part writes bench/results/bench-<model>-<contexts>-b<batches>-<device>-<date>.json and a PNG beside it;
# commit those files. The first part on a machine measures the host->device rate and matmul rate (kvtier
# profile, a few seconds) and caches them; later parts report, and KVPR plans with, that same profile.
#
# Host memory: the offloaded methods keep the whole cache in pinned host memory (llama-3.1-8b: 128 KiB per
# token; llama-2-7b: 512 KiB per token, and KVPR adds 256 KiB of layer inputs per token on a multi-head model).
# 128k x batch 4 is 64 GiB; llama-2-7b at 4k x 32 is 64 GiB + 32 GiB, more than a 128 GiB machine can pin, so
# that grid point is its own part (mha-big) and may be killed for host memory.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-bench/results}"

bench() { python -m kvtier.cli bench --random-weights --device cuda --out "$OUT" "$@"; }

part="${1:-list}"
case "$part" in
  32k)          # freekv within 1.25x of full, >= 8x less device KV, >= 5x faster than hf-offload; specache 1.5x
    bench --model-config llama-3.1-8b --contexts 32k --batch 1 \
          --methods full,offload,kvpr,freekv:budget=2048,specache,hf-dynamic,hf-offload ;;
  8k)           # the same methods at 8k, batch 1 and 4
    bench --model-config llama-3.1-8b --contexts 8k --batch 1,4 \
          --methods full,offload,kvpr,freekv:budget=2048,specache,hf-dynamic,hf-offload ;;
  128k-full|128k-offload|128k-kvpr|128k-freekv|128k-specache)
    # 128k x 4: full does not fit on an 80 GB H100 (64 GiB of KV + 16 GB of weights); kvtier's methods run.
    # One method per part: prefill of 512k tokens takes minutes.
    method="${part#128k-}"
    [ "$method" = freekv ] && method="freekv:budget=2048"
    bench --model-config llama-3.1-8b --contexts 128k --batch 4 --methods "$method" \
          --decode-steps 8 --warmup 2 --prefill-chunk 4096 ;;
  mha-4k)       # kvpr >= 30% lower decode latency than hf-offload on the multi-head shape
    bench --model-config llama-2-7b --contexts 4k --batch 8,16 --methods full,offload,kvpr,hf-offload ;;
  mha-8k)
    bench --model-config llama-2-7b --contexts 8k --batch 8 --methods full,offload,kvpr,hf-offload ;;
  mha-big)      # 4k x 32: 64 GiB of KV (+ 32 GiB of KVPR inputs) in host memory; may not fit the host
    bench --model-config llama-2-7b --contexts 4k --batch 32 --methods kvpr,hf-offload --decode-steps 8 --warmup 2 ;;
  qwen)         # grouped-query 7:1
    bench --model-config qwen2.5-7b --contexts 8k,32k --batch 1 \
          --methods full,offload,kvpr,freekv:budget=2048,specache,hf-offload ;;
  list|*)
    echo "parts (one per command, each under 10 minutes):"
    echo "  32k 8k 128k-full 128k-offload 128k-kvpr 128k-freekv 128k-specache mha-4k mha-8k mha-big qwen"
    [ "$part" = list ] || exit 2 ;;
esac
