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
python -m pytest tests -q -x -p no:cacheprovider 2>&1 | tee "$OUT/tests.txt" | tail -15 || status=1
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
echo "== bench"
python -m genfast bench ${BENCH_ARGS:-} --out "$OUT" 2>&1 | tee "$OUT/bench.txt" || status=1
exit $status
