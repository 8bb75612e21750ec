#!/usr/bin/env bash
# One command for a GPU machine: build, all tests (GPU tests included), full benchmarks.
# The lent machines have no network: torch, triton, cmake, ninja, pybind11 and
# scikit-build-core must already be installed there. Results go to $OUT (default gpu_results).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_results}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
status=0
echo "== build" | tee "$OUT/build.txt"
start=$(date +%s)
pip install --no-build-isolation -e . >>"$OUT/build.txt" 2>&1 || { tail -40 "$OUT/build.txt"; exit 1; }
echo "build took $(( $(date +%s) - start )) s" | tee -a "$OUT/build.txt"
python -m genfast info | tee "$OUT/info.txt"
echo "== tests"
python -m pytest tests -q -p no:cacheprovider >"$OUT/tests.txt" 2>&1 || status=1
tail -15 "$OUT/tests.txt"
echo "== bench"
python -m genfast bench ${BENCH_ARGS:-} --out "$OUT" >"$OUT/bench.txt" 2>&1 || status=1
cat "$OUT/bench.txt"
exit $status
