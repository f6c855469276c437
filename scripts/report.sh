#!/usr/bin/env bash
# Reproduces docs/results/embedded: every method against full on the embedded model (SmolLM2-135M, CPU, float32)
# at 1k, 2k and 4k tokens, then README.md + summary.png gathered from the JSONs:
#   needle grid (single and multi-key), RULER-style variable tracking and common-word extraction, next-token
#   fidelity (top-1 agreement, KL) and decode perplexity (prose, code, 256 targets), FreeKV's budget sweep.
# 53 minutes on this 2-core CPU (2026-11-22, with the test-suite running beside it for 6 of them).
# Trimmed to fit: 2 depths per length, 1 prompt per RULER task and length; fidelity, perplexity and the sweep at 2k.
# The exact methods (offload, kvpr) run in fidelity and perplexity, where they must show agreement 1, KL 0 and a
# zero delta; their token identity with full is the test suite's (tests/test_exact.py, tests/test_embedded.py).
# Usage: bash scripts/report.sh [OUT_DIR]      SMOKE=1 bash scripts/report.sh /tmp/smoke   (tiny sizes, minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
OUT=${1:-docs/results/embedded}
# FreeKV at a quarter and at half of each prompt's length (its defaults otherwise: sink and window a sixteenth of
# the budget each, pages of 32); SpeCache at 2 and 1 bits
APPROX="freekv:budget=0.25,freekv:budget=0.5,specache:bits=2,specache:bits=1"
EXACT="offload,kvpr"
# Variants that trade device memory for fidelity, in fidelity and perplexity only: SpeCache with key groups of 32
# tokens, FreeKV with pages of 8 tokens (4x the digest memory)
VARIANTS="specache:bits=2:group_size=32,freekv:budget=0.25:page_size=8"
LENGTHS=1k,2k,4k DEPTHS=0.25,0.75 CONTEXT=2k TARGETS=256 NEW=64 SWEEP=256,512,1024
if [ "${SMOKE:-0}" = 1 ]; then
  LENGTHS=768 DEPTHS=0.5 CONTEXT=768 TARGETS=8 NEW=4 SWEEP=256
fi
kvtier eval needle --methods "full,$APPROX" --kinds single,multikey --lengths "$LENGTHS" --depths "$DEPTHS" \
  --seed 0 --max-new-tokens 20 --out "$OUT" --overwrite
kvtier eval ruler --methods "full,$APPROX" --tasks vt,cwe --lengths "$LENGTHS" --samples 1 --seed 0 --out "$OUT" --overwrite
kvtier eval fidelity --methods "full,$EXACT,$APPROX,$VARIANTS" --texts prose,code --lengths "$CONTEXT" --new-tokens "$NEW" \
  --seed 0 --out "$OUT" --overwrite
kvtier eval ppl --methods "full,$EXACT,$APPROX,$VARIANTS" --texts prose,code --context "$CONTEXT" --targets "$TARGETS" \
  --out "$OUT" --overwrite
kvtier eval sweep --method freekv --values "$SWEEP" --lengths "$CONTEXT" --depths "$DEPTHS" --context "$CONTEXT" \
  --targets "$TARGETS" --out "$OUT" --overwrite
kvtier eval report --dir "$OUT" --title "Every method against full on the embedded model (CPU, float32)" \
  --command "bash scripts/report.sh" \
  --note "offload and kvpr (exact) appear in fidelity and perplexity only; their token identity with full is \
tested (tests/test_exact.py, tests/test_embedded.py). The memory-for-fidelity variants $VARIANTS also appear there only. \
Perplexity and fidelity decode one token at a time (SpeCache fetches by the current query there); the needle \
and RULER answers come from kvtier.generate (SpeCache's speculative two-token step). FreeKV budgets given as fractions are that share of each \
prompt's length. Lengths $LENGTHS, depths $DEPTHS; fidelity, perplexity and the \
budget sweep at $CONTEXT tokens."
