#!/usr/bin/env bash
# Create .venv and install sanakit with pinned dependencies (idempotent).
# Without CUDA, torch==2.13.0 is installed first so pip takes the CPU wheel, not a multi-GB
# CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  # first and alone: here it resolves to the CPU wheel on local disk
  .venv/bin/pip install -q torch==2.13.0
fi
.venv/bin/pip install -q -e ".[test]"
