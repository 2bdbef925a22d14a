#!/usr/bin/env bash
# One prepared run for a lent GPU: install, run the whole test suite on CUDA, then the parity check
# and benchmark sweep. Everything it prints and writes lands in $OUT (or bench/results/).
#   bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results}"
mkdir -p "$OUT"
python3 -m pip install --quiet --no-deps --no-build-isolation -e . 2>&1 | tail -2
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -m pytest tests -q -x --durations=15 2>&1 | tee "$OUT/tests.txt" | tail -25
python3 bench/run.py 2>&1 | tee "$OUT/bench.txt" | tail -80
cp bench/results/*.md "$OUT/" 2>/dev/null || true
