#!/usr/bin/env bash
# One prepared run for a lent GPU, about six minutes (a 15-minute lease leaves room to rerun it):
# install fastattn, say which GPU and versions, run the test suite on CUDA, then `python -m bench`
# (parity, ceilings, the sweep with its time budget cut to what the tests left: attention, norms,
# embeddings, then the decode sweep, KV-cache steps contiguous and paged, B 1-64 x cache 1k-128k,
# MHA and GQA 8:1, against SDPA, fastattn's prefill kernel and FlexAttention, its B1 32k GQA
# target point first and the longest caches next). All of it lands in one folder, $OUT (default
# bench/results/<date>_<gpu>):
#   gpu_check.log                 everything printed, the exit codes last
#   summary.md, results.json, results.csv, attention.png, norm.png, embedding.png, decode.png
#                                 (python -m bench)
# A failing or timed-out test run does not stop the benchmark. Exit status 0 when both passed.
#   bash bench/gpu_check.sh                       OUT=/tmp/run bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
START=$SECONDS
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

  # Kernel compiles set the pace on a GPU: 8 pytest workers (pytest-xdist, in the GPU image) where
  # it is installed. The static Hopper check compiles without a GPU and runs in CI: not here.
  # SIGINT at the limit, so that pytest still prints what failed so far.
  XDIST=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8")
  echo "== tests (python3 -m pytest tests -q $XDIST)"
  timeout -s INT -k 15 200 python3 -m pytest tests -q -p no:cacheprovider --durations=10 $XDIST \
    --ignore tests/test_hopper_static.py --continue-on-collection-errors -rfE --tb=short
  TESTS=$?
  echo "tests exit $TESTS at $((SECONDS - START)) s"

  # The sweep gets what is left of ~5.5 minutes after the tests, less ~60 s for parity, ceilings
  # and files; python -m bench skips the cases past its budget (and says so) rather than overrun.
  # The decode sweep has 20% of it (18-48 s) plus what the other families leave (bench/__main__.py
  # SHARES); all of it (58 cases measured, 6 over its memory budget) is estimated at 1-2 minutes,
  # not yet timed on a GPU; a cut drops the short caches (they run last).
  BUDGET=$((330 - (SECONDS - START) - 60))
  ((BUDGET < 90)) && BUDGET=90
  ((BUDGET > 240)) && BUDGET=240
  echo "== bench (python3 -m bench --out $OUT --budget-s $BUDGET)"
  timeout -s INT -k 15 300 python3 -m bench --out "$OUT" --budget-s "$BUDGET"
  BENCH=$?
  echo "bench exit $BENCH at $((SECONDS - START)) s"
  echo "== exit codes: tests $TESTS, bench $BENCH (124: timed out); files in $OUT:"
  ls -l "$OUT"
  ((TESTS == 0 && BENCH == 0))
} 2>&1 | tee "$OUT/gpu_check.log"
