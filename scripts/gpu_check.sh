#!/usr/bin/env bash
# GPU check of the block-sparse attention kernel (issue 5): correctness at
# realistic shapes, then forward+backward timings against XLA and Pallas mha.
# One command, under 5 minutes on one H200:   scripts/gpu_check.sh
# Tiny shapes in interpret mode (any machine): scripts/gpu_check.sh --dry_run
# Extra arguments go to python -m kernels_pallas.gpu_check (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
# The machine's python3 unless it lacks jax and the project venv exists.
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import jax' 2>/dev/null && [ -x .venv/bin/python ]; then
  PYTHON=.venv/bin/python
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"$PYTHON" -m kernels_pallas.gpu_check "$@"
# Then the paper's comparison on this GPU (Capybara- and UltraFeedback-like, ~1B model, bf16).
if [ "${1:-}" = --dry_run ]; then scripts/gpu_benchmark.sh --dry_run; else scripts/gpu_benchmark.sh; fi
