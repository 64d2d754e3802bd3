#!/usr/bin/env bash
# The main job: install, train the built-in shapes model, sample a grid, score it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}
.venv/bin/sanakit train "$@"
.venv/bin/sanakit sample --checkpoint=work/shapes --num_images=6 --out=work/shapes/samples.png \
  --prompt="a red circle" --prompt="a green square" --prompt="a blue triangle" \
  --prompt="a yellow circle" --prompt="a magenta square" --prompt="a cyan triangle"
.venv/bin/sanakit eval --checkpoint=work/shapes
