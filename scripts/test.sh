#!/usr/bin/env bash
# Set up, then run the whole test-suite (CUDA tests skip without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m pytest -q --durations=15 "$@"
