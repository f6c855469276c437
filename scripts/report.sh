#!/usr/bin/env bash
# Reproduces docs/results/embedded-2k: every approximate method against full on the embedded model at a 2k
# context (needle grid, decode perplexity on prose and code), and FreeKV's budget sweep. Runs on a CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
OUT=${1:-docs/results/embedded-2k}
M="freekv:budget=512,freekv:budget=512:page_size=8,freekv:budget=1024,specache:bits=2,specache:bits=1"
kvtier eval needle --methods "full,$M" --lengths 2k --depths 0.1,0.3,0.5,0.7,0.9 --seed 1 --out "$OUT"
kvtier eval ppl --methods "full,$M" --texts prose,code --context 2k --targets 256 --out "$OUT"
kvtier eval sweep --method freekv --values 320,512,1024,2048 --lengths 2k --depths 0.1,0.5,0.9 --context 2k \
  --targets 256 --out "$OUT"
