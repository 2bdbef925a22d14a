#!/usr/bin/env bash
# One prepared run for a lent GPU, under ten minutes (one device call; a 15-minute lease then has
# the machine's start and a short rerun left): install fastattn, say which GPU and versions, run
# the test suite on CUDA (16 pytest-xdist workers: kernel compiles set its pace), then
# `python -m bench --quick` (parity at one size per op, the host-overhead table, the ceilings, the
# quick sweep: attention d128 plain / causal / mask / GQA / score modifiers, norms, embeddings,
# decode, within the time the tests left). All of it lands in one folder, $OUT (default
# bench/results/<date>_<gpu>):
#   gpu_check.log                 everything printed, the exit codes last
#   summary.md, results.json, results.csv, attention.png, norm.png, embedding.png, decode.png
#                                 (python -m bench)
# A failing or timed-out test run does not stop the benchmark. Exit status 0 when both passed.
#   bash bench/gpu_check.sh [tests|bench]     OUT=/tmp/run bash bench/gpu_check.sh
# The first run (2026-12-04, H200, bench/results/2026-12-04_NVIDIA-H200): the whole suite is about
# 4,000 worker-seconds of mostly compiles (721 tests in 200 s on 8 workers, the remaining 377 in
# 170 s on 14); the full `python -m bench` spent 252 s on parity alone, the quick one 43 s on
# the parity of two ops. Each limit below ends its step with SIGINT, so that what ran is printed.
set -uo pipefail
cd "$(dirname "$0")/.."
START=$SECONDS
PHASE=${1:-all}
case "$PHASE" in all|tests|bench) ;; *) echo "usage: $0 [tests|bench]" >&2; exit 2 ;; esac
TESTS=0 BENCH=0
TESTS_S=$([ "$PHASE" = tests ] && echo 540 || echo 255)   # seconds each step may take:
BENCH_S=$([ "$PHASE" = bench ] && echo 540 || echo 285)   # both within one 600 s call
if [ -z "${OUT:-}" ]; then
  GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 \
        | tr -cs 'A-Za-z0-9' '-' | sed 's/-*$//')
  OUT="bench/results/$(date +%F)_${GPU:-gpu}"
fi
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

{
  echo "== gpu_check $(date -u +%FT%TZ), commit ${FASTATTN_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo '?')}"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python3 -m pip install --quiet --no-deps --no-build-isolation -e . 2>&1 | tail -3
  python3 -c "import torch, triton, fastattn; print('torch', torch.__version__, '| CUDA', \
torch.version.cuda, '| triton', triton.__version__, '| fastattn', fastattn.__version__, '|', \
torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA DEVICE')"

  if [ "$PHASE" != bench ]; then
    # The static Hopper check compiles without a GPU and runs in CI: not here.
    XDIST=$(python3 -c "import xdist" 2>/dev/null && echo "-n 16")
    echo "== tests (python3 -m pytest tests -q $XDIST)"
    timeout -s INT -k 15 $TESTS_S python3 -m pytest tests -q -p no:cacheprovider --durations=10 \
      $XDIST --ignore tests/test_hopper_static.py --continue-on-collection-errors -rfE --tb=short
    TESTS=$?
    echo "tests exit $TESTS at $((SECONDS - START)) s"
  fi

  if [ "$PHASE" != tests ]; then
    # The sweep gets what is left of BENCH_S after ~150 s of parity, host table and ceilings;
    # python -m bench skips the cases past its budget (and says so) rather than overrun.
    BUDGET=$((BENCH_S - 150))
    ((BUDGET < 60)) && BUDGET=60
    echo "== bench (python3 -m bench --quick --out $OUT --budget-s $BUDGET)"
    timeout -s INT -k 15 $BENCH_S python3 -m bench --quick --out "$OUT" --budget-s "$BUDGET"
    BENCH=$?
    echo "bench exit $BENCH at $((SECONDS - START)) s"
  fi
  echo "== exit codes: tests $TESTS, bench $BENCH (124: timed out); files in $OUT:"
  ls -l "$OUT"
  ((TESTS == 0 && BENCH == 0))
} 2>&1 | tee "$OUT/gpu_check.log"
