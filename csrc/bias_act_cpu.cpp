// bias_act on the CPU: one fused, OpenMP-parallel pass over a dense tensor.
// The tensor is seen as [outer, C, S] in memory (S = stride of the bias dimension), so the
// channel of element i is (i / S) % C; it is computed once per row of S, not per element.
#include "bias_act.h"

#include <algorithm>

#include "bias_act_math.h"
#include "common.h"
#ifdef GENFAST_WITH_OPENMP
#include <omp.h>
#endif

namespace genfast {
namespace bias_act {
namespace {

// Below this many elements threading costs more than it saves.
constexpr int64_t kMinElementsPerThread = 1 << 15;

template <typename T, int A, int M>
void run(const Args& a) {
  using F = typename Compute<T>::type;
  // The output is always a fresh tensor: it never overlaps the inputs.
  const T* __restrict x = static_cast<const T*>(a.x);
  const T* __restrict b = static_cast<const T*>(a.b);
  const T* __restrict dy = static_cast<const T*>(a.dy);
  const T* __restrict ddx = static_cast<const T*>(a.ddx);
  T* __restrict out = static_cast<T*>(a.out);
  const F alpha = F(a.p.alpha), gain = F(a.p.gain), clamp = F(a.p.clamp);
  const int64_t S = a.S, C = a.C;
  const int64_t rows = a.n / S;  // rows of S elements; every row has one channel
  // Work is split into chunks of whole rows, or into pieces of one long row when S is large.
  const int64_t chunk = std::max<int64_t>(1, 8192 / S);           // rows per chunk
  const int64_t split = S > 8192 ? (S + 8191) / 8192 : 1;          // pieces per row
  const int64_t tasks = (rows + chunk - 1) / chunk * split;
  int threads = a.num_threads;
  threads = int(std::max<int64_t>(1, std::min<int64_t>(threads, a.n / kMinElementsPerThread)));

#ifdef GENFAST_WITH_OPENMP
#pragma omp parallel for schedule(static) num_threads(threads)
#endif
  for (int64_t task = 0; task < tasks; ++task) {
    const int64_t row_block = task / split, piece = task % split;
    const int64_t row_end = std::min(rows, (row_block + 1) * chunk);
    const int64_t piece_len = (S + split - 1) / split;
    const int64_t col_begin = piece * piece_len;
    const int64_t col_end = std::min(S, col_begin + piece_len);
    for (int64_t row = row_block * chunk; row < row_end; ++row) {
      const F bias = b ? F(to_float(b[row % C])) : F(0);
      const int64_t base = row * S;
      for (int64_t i = base + col_begin; i < base + col_end; ++i) {
        const F xv = F(to_float(x[i]));
        const F dyv = M >= GRAD ? F(to_float(dy[i])) : F(0);
        const F ddxv = M == GRAD2 ? F(to_float(ddx[i])) : F(0);
        out[i] = from_compute<T>(apply<A, M, F>(xv, bias, dyv, ddxv, alpha, gain, clamp));
      }
    }
  }
}

template <typename T>
void by_act(const Args& a) {
  with_act_and_mode(a.act, a.mode, [&](auto act, auto mode) { run<T, decltype(act)::value, decltype(mode)::value>(a); });
}

}  // namespace

void bias_act_cpu(const Args& a) {
  if (a.n == 0) return;
  switch (a.dtype) {
    case F32: return by_act<float>(a);
    case F64: return by_act<double>(a);
    case F16: return by_act<half_t>(a);
    case BF16: return by_act<bf16_t>(a);
  }
  throw std::invalid_argument(std::string("bias_act: unsupported dtype ") + dtype_name(a.dtype));
}

}  // namespace bias_act
}  // namespace genfast
