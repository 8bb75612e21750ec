#!/usr/bin/env bash
# One command for a GPU machine: build, all tests (GPU tests included), full benchmarks.
# The device tool allows 10 minutes per command: select stages and ops with
#   STAGES="build tests" | STAGES="bench" BENCH_ARGS="attention --quick" | STAGES="demo"
# (default: build tests bench). The demo needs scikit-learn on the machine.
# The lent machines have no network: torch, triton, cmake, ninja, pybind11 and
# scikit-build-core must already be installed there. Results go to $OUT (default gpu_results).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_results}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
STAGES="${STAGES:-build tests bench}"
status=0
if [[ " $STAGES " == *" build "* ]]; then
  echo "== build" | tee "$OUT/build.txt"
  start=$(date +%s)
  pip install --no-build-isolation -e . -C cmake.define.GENFAST_WITH_CUDA=ON >>"$OUT/build.txt" 2>&1 \
    || { tail -40 "$OUT/build.txt"; exit 1; }
  echo "build took $(( $(date +%s) - start )) s" | tee -a "$OUT/build.txt"
fi
python -m genfast info | tee "$OUT/info.txt"
if [[ " $STAGES " == *" tests "* ]]; then
  echo "== tests"
  python -m pytest tests -q -p no:cacheprovider >"$OUT/tests.txt" 2>&1 || status=1
  tail -15 "$OUT/tests.txt"
fi
if [[ " $STAGES " == *" bench "* ]]; then
  echo "== bench"
  python -m genfast bench ${BENCH_ARGS:-} --out "$OUT" >"$OUT/bench.txt" 2>&1 || status=1
  cat "$OUT/bench.txt"
fi
if [[ " $STAGES " == *" demo "* ]]; then
  echo "== demo"
  python -m genfast demo --out "$OUT/demo" 2>"$OUT/demo_progress.txt" | tee "$OUT/demo.txt" || status=1
fi
exit $status
