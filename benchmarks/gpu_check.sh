#!/usr/bin/env bash
# The GPU check, one command (under 8 minutes on a CUDA machine):
#   benchmarks/gpu_check.sh [--dry] [OUT.json]
# runs benchmarks/full_size.py (Sana-600M, Gemma-2-2b in bf16, DC-AE f32c32; training in bf16
# autocast, which train.mixed_precision=auto picks on CUDA) and benchmarks/run.py --quick, then
# writes one JSON (default gpu_check.json): GPU model, s/step, images/s, peak memory, and both
# scripts' own JSON lines. --dry (any machine, ~20 s): full_size.py --quick (the same phases on
# tiny models, plus the full-size plan) and an import check of run.py; no figures to report.
# PYTHON picks the interpreter (default: python); per-script limits FULL_S / RUN_S (seconds).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1
dry=0
out=gpu_check.json
for arg in "$@"; do
  case "$arg" in
    --dry) dry=1 ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    -*) echo "error: unknown option $arg; use --dry and/or an output path" >&2; exit 2 ;;
    *) out=$arg ;;
  esac
done
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

if [ "$dry" = 0 ] && ! "$PYTHON" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())'; then
  echo "error: no CUDA device visible to torch; run on a GPU machine, or use --dry" >&2
  exit 3
fi
started=$(date +%s)
if [ "$dry" = 1 ]; then
  "$PYTHON" benchmarks/full_size.py --quick --json "$tmp/full.json" > "$tmp/full.log" 2>&1 \
    || { tail -30 "$tmp/full.log" >&2; exit 1; }
  "$PYTHON" benchmarks/run.py --help > "$tmp/run.log" 2>&1 || { cat "$tmp/run.log" >&2; exit 1; }
  echo '{"dry": true}' > "$tmp/run.json"
else
  timeout "${FULL_S:-330}" "$PYTHON" benchmarks/full_size.py --root "$tmp" --json "$tmp/full.json" \
    > "$tmp/full.log" 2>&1 || { tail -30 "$tmp/full.log" >&2; exit 1; }
  timeout "${RUN_S:-130}" "$PYTHON" benchmarks/run.py --quick --json "$tmp/run.json" \
    > "$tmp/run.log" 2>&1 || { tail -30 "$tmp/run.log" >&2; exit 1; }
fi
cat "$tmp/full.log" "$tmp/run.log"

"$PYTHON" - "$tmp/full.json" "$tmp/run.json" "$out" "$dry" "$started" <<'PY'
import json, subprocess, sys, time

full_path, run_path, out, dry, started = sys.argv[1:]
full = json.load(open(full_path))
run = json.load(open(run_path))
try:
    gpu = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
except (OSError, subprocess.CalledProcessError):
    gpu = None
result = {
    "dry": dry == "1",
    "gpu": gpu,
    "full_size_s_per_step": full.get("s_per_step"),
    "full_size_s_per_step_checkpointing": full.get("s_per_step_checkpointing"),
    "full_size_images_per_s": round(1 / full["s_per_step"], 3) if full.get("s_per_step") else None,
    "full_size_peak_gpu_gb": full.get("peak_gpu_gb"),
    "full_size_peak_rss_gb": full.get("peak_rss_gb"),
    "sample_images_per_s": run.get("images_per_s"),
    "seconds": round(time.time() - int(started), 1),
    "full_size": full,
    "run": run,
}
line = json.dumps(result)
open(out, "w").write(line + "\n")
print(line)
PY
