#!/usr/bin/env bash
# Quickstart main job: set up, then run a long needle prompt on the embedded model through every method.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
kvtier demo "$@"
