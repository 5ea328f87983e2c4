#!/usr/bin/env bash
# GPU benchmark (issue 8): prefix sharing vs paired DPO on real hardware.
# Capybara-like and UltraFeedback-like workloads at the paper's lengths, a
# ~0.9B-parameter Llama in bfloat16, attention_impl=pallas, the four modes
# interleaved; a few minutes on one H100/H200.
#   scripts/gpu_benchmark.sh [OUT_DIR] [--config.KEY=VALUE ...]
#   scripts/gpu_benchmark.sh --dry_run   # tiny shapes, kernels in interpret mode (CPU)
# Writes OUT_DIR/results.json, table.md, chart.png and summary.json (default
# runs/bench/gpu); prints the table, then the JSON summary as the last line.
set -euo pipefail
cd "$(dirname "$0")/.."
# The machine's python3 unless it lacks jax and the project venv exists.
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import jax' 2>/dev/null && [ -x .venv/bin/python ]; then
  PYTHON=.venv/bin/python
fi
OUT=runs/bench/gpu
EXTRA=()
if [ "${1:-}" = "--dry_run" ]; then
  shift
  OUT=${TMPDIR:-/tmp}/gpu_benchmark_dry_run
  EXTRA=(--config.model.vocab_size=128 --config.model.hidden_size=32
         --config.model.num_layers=1 --config.model.num_heads=2 --config.model.num_kv_heads=1
         --config.model.head_dim=16 --config.model.mlp_dim=64 --config.length_scale=0.05
         --config.tokens_per_step=128 --config.steps=1 --config.logprob_chunk=64)
elif [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; then
  OUT=$1
  shift
fi
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"$PYTHON" -m prefix_dpo.benchmark --config configs/bench/gpu.py --out "$OUT" \
  ${EXTRA[@]+"${EXTRA[@]}"} "$@" > "$OUT/summary.json"
cat "$OUT/table.md"
cat "$OUT/summary.json"
