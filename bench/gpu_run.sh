#!/usr/bin/env bash
# GPU benchmark for a session that has the lent H200 (one call of the `run` device tool):
#   run(command="bash bench/gpu_run.sh", timeout_s=540)
# The device image has torch, transformers and timm but not open_clip: install the wheels
# carried in bench/wheels (open_clip_torch 3.3.0, ftfy, wcwidth; ~2.3 MB) without touching
# the network, install this repo without dependencies, then run bench/gpu_bench.py, which
# writes gpu_bench.json + gpu_bench.txt under $OUT and stops starting stages after
# GPU_BENCH_BUDGET_S (default 420 s) so the whole call stays under 8 minutes.
# Extra arguments go to gpu_bench.py (e.g. `bash bench/gpu_run.sh --batch 16`).
# `bash bench/gpu_run.sh --trials [bench_trials.py args]` runs the sweep-trial benchmark instead
# (start-up eager vs lazy vs reused process, Ray's share both ways, per-epoch from the cache, K concurrent trials per GPU, projection);
# on a machine without CUDA it runs on the CPU: `bash bench/gpu_run.sh --trials --tiny` (smoke check).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/bench_out}"
mkdir -p "$OUT"
export OUT HF_HUB_OFFLINE=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
PY="${PYTHON:-python}"
command -v "$PY" >/dev/null || PY=python3
{
  echo "== $(date -u +%FT%TZ) $(hostname)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || true
  "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.cuda.is_available())'
} 2>&1 | tee "$OUT/env.txt"

t0=$(date +%s)
if [ "${SSVP_SKIP_INSTALL:-0}" = "1" ]; then
  :  # a prepared environment (e.g. the project's venv for a CPU smoke check): install nothing
elif ! "$PY" -c 'import open_clip' 2>/dev/null; then
  "$PY" -m pip install --no-deps --no-index bench/wheels/*.whl 2>&1 | tail -3 | tee -a "$OUT/env.txt"
fi
# editable install without build isolation (no network for setuptools); PYTHONPATH as fallback
if [ "${SSVP_SKIP_INSTALL:-0}" != "1" ] && ! "$PY" -m pip install --no-deps --no-index --no-build-isolation -e . >>"$OUT/env.txt" 2>&1; then
  echo "pip install -e . failed (see env.txt); using PYTHONPATH" | tee -a "$OUT/env.txt"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c 'import open_clip, transformers, ssvp; print("open_clip", open_clip.__version__, "transformers", transformers.__version__)' 2>&1 | tee -a "$OUT/env.txt"
echo "install took $(( $(date +%s) - t0 )) s" | tee -a "$OUT/env.txt"

if [ "${1:-}" = "--trials" ]; then
  # trial start-up (eager vs lazy build vs reused process), per-epoch from the cache, K = 1, 2, 4 concurrent trials
  # on the one GPU (each with 1/K of its memory), and the 100-trial projection (bench/bench_trials.py).
  # Weight files (random values, real formats, ~2.9 GB) are written under $OUT/../ssvp_weights.
  shift
  dev=cuda; "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' || dev=cpu
  timeout "${GPU_BENCH_BUDGET_S:-480}" "$PY" bench/bench_trials.py --device "$dev" --weights "${SSVP_BENCH_WEIGHTS:-/tmp/ssvp_weights}" \
    --work /tmp/ssvp_bench_trials --json "$OUT/bench_trials.json" --max-rss-gib 100 "$@" 2>&1 | tee "$OUT/bench_trials.log"
  rc=${PIPESTATUS[0]}
  echo "bench_trials exit $rc, total $(( $(date +%s) - t0 )) s" | tee -a "$OUT/env.txt"
  exit "$rc"
fi
"$PY" bench/gpu_bench.py --out "$OUT" --budget-s "${GPU_BENCH_BUDGET_S:-420}" "$@" 2>&1 | tee "$OUT/gpu_bench.log"
rc=${PIPESTATUS[0]}
echo "gpu_bench exit $rc, total $(( $(date +%s) - t0 )) s" | tee -a "$OUT/env.txt"
exit "$rc"
