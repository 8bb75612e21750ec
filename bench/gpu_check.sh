#!/usr/bin/env bash
# The first GPU hour, planned as ONE device call of at most 9 minutes on a fresh H100 with no
# network: every stage has its own timeout, so a hang in one still leaves the others' results.
#   build (sm_90a only)  <= 240 s   pip install -e . for one architecture (a third of the 80+90a build)
#   info                 <=  30 s   python -m genfast info: versions, GPU, backends that can run
#   compile-check        <=  40 s   CUDA resource usage of the fresh build (registers, stack) for sm_90a
#   tests                <= 150 s   the GPU tests most likely to find bugs: attention CUDA and Triton
#                                   (bf16, D128 first), then the gpu-marked tests of one file per family
#   bench                <=  80 s   quick attention, diffusion and GAN benches (no torch.compile baseline)
# Total <= 540 s. Output (one file per stage) goes under $OUT (default gpu_results).
# Select stages with STAGES="build info tests" etc.; the lent machines must already have torch,
# triton, cmake, ninja, pybind11 and scikit-build-core installed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_results}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
STAGES="${STAGES:-build info compile-check tests bench}"
status=0

stage() {  # stage NAME SECONDS COMMAND...: run under its own timeout, log to $OUT/NAME.txt
  local name=$1 limit=$2
  shift 2
  [[ " $STAGES " == *" $name "* ]] || return 0
  echo "== $name (limit ${limit}s)"
  local start rc
  start=$(date +%s)
  timeout --signal=TERM --kill-after=10 "$limit" "$@" >"$OUT/$name.txt" 2>&1
  rc=$?
  echo "$name: exit $rc after $(( $(date +%s) - start )) s" | tee -a "$OUT/$name.txt" "$OUT/summary.txt"
  [[ $rc -eq 124 ]] && echo "$name: TIMED OUT" | tee -a "$OUT/summary.txt"
  tail -15 "$OUT/$name.txt"
  [[ $rc -eq 0 ]] || status=1
  return $rc
}

stage build 240 pip install --no-build-isolation --no-deps -e . -C cmake.define.GENFAST_WITH_CUDA=ON \
  -C cmake.define.CMAKE_CUDA_ARCHITECTURES=90a || { echo "build failed: later stages use what is installed"; }
stage info 30 python -m genfast info
# Triton on the device compiles on first use anyway; here only the CUDA extension's resources.
stage compile-check 40 python -m genfast compile-check --arch 90 --families vae --dtypes bf16
# GENFAST_AUTOTUNE=quick: the Triton forward tunes one config of each kind (pointer, TMA,
# warp-specialized, persistent) per key; the full list compiles up to 30 per key, minutes per
# key on a fresh machine. The bench records the setting in its metadata ("autotune").
export GENFAST_AUTOTUNE=quick
stage tests 150 python -m pytest -q -p no:cacheprovider -m gpu \
  tests/test_attention_cuda.py tests/test_attention_triton.py tests/test_attention_paged.py \
  tests/test_bias_act.py tests/test_group_norm.py tests/test_filtered_lrelu.py tests/test_upfirdn2d.py \
  tests/test_diffusion_ops.py tests/test_gan_ops.py tests/test_vae.py
stage bench 80 python -m genfast bench attention diffusion gan --quick --no-compile --no-plot --out "$OUT/bench"
cat "$OUT/summary.txt" 2>/dev/null
exit $status
