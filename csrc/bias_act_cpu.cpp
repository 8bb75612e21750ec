// bias_act on the CPU: one fused, OpenMP-parallel pass over a dense tensor.
// The tensor is seen as [outer, C, S] in memory (S = stride of the bias dimension), so the
// channel of element i is (i / S) % C; it is computed once per row of S, not per element.
#include "bias_act.h"

#include <algorithm>
#include <vector>

#include "bias_act_math.h"
#include "common.h"
#include "cpu_isa.h"
#ifdef GENFAST_WITH_OPENMP
#include <omp.h>
#endif

namespace genfast {
namespace bias_act {
namespace {

// Below this many elements threading costs more than it saves.
constexpr int64_t kMinElementsPerThread = 1 << 15;
// Work unit: whole rows up to this many elements, or pieces of this size of one long row.
constexpr int64_t kChunk = 8192;

int thread_index() {
#ifdef GENFAST_WITH_OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// The tensor is processed as a matrix of rows in memory order, in one of two shapes:
//   channel on rows:    [n / S, S], row r has bias index r % C     (e.g. NCHW, dim = 1)
//   channel on columns: [n / C, C], column c has bias index c      (S == 1, e.g. channels_last)
// Without a bias the Python side passes C = 1, S = n: one long row, split into pieces.
struct Plan {
  bool on_cols;
  int64_t C, row_len, rows;
  int64_t chunk;  // rows per task
  int64_t split;  // pieces per row (rows longer than kChunk)
  int64_t piece_len;
  int64_t tasks;
};

Plan make_plan(const Args& a) {
  Plan p;
  p.C = a.C;
  p.on_cols = a.S == 1 && a.C > 1;
  p.row_len = p.on_cols ? a.C : a.S;
  p.rows = a.n / p.row_len;
  p.chunk = std::max<int64_t>(1, kChunk / p.row_len);
  p.split = p.row_len > kChunk ? (p.row_len + kChunk - 1) / kChunk : 1;
  p.piece_len = (p.row_len + p.split - 1) / p.split;
  p.tasks = (p.rows + p.chunk - 1) / p.chunk * p.split;
  return p;
}

// One task: a chunk of rows, or one piece of a long row. `acc` (per thread, C doubles)
// receives the bias gradient when it is fused (GRAD mode), else it is null.
template <typename T, int A, int M>
GF_CPU_KERNEL void run_task(const Args& a, const Plan& p, int64_t task, double* acc) {
  using F = typename Compute<T>::type;
  // The output is always a fresh tensor: it never overlaps the inputs.
  const T* __restrict x = static_cast<const T*>(a.x);
  const T* __restrict b = static_cast<const T*>(a.b);
  const T* __restrict dy = static_cast<const T*>(a.dy);
  const T* __restrict ddx = static_cast<const T*>(a.ddx);
  T* __restrict out = static_cast<T*>(a.out);
  const F alpha = F(a.p.alpha), gain = F(a.p.gain), clamp = F(a.p.clamp);
  auto element = [&](int64_t i, F bias) {
    const F xv = F(to_float(x[i]));
    const F dyv = M >= GRAD ? F(to_float(dy[i])) : F(0);
    const F ddxv = M == GRAD2 ? F(to_float(ddx[i])) : F(0);
    return from_compute<T>(apply<A, M, F>(xv, bias, dyv, ddxv, alpha, gain, clamp));
  };
  const int64_t row_end = std::min(p.rows, (task / p.split + 1) * p.chunk);
  const int64_t col_begin = (task % p.split) * p.piece_len;
  const int64_t col_end = std::min(p.row_len, col_begin + p.piece_len);
  for (int64_t row = task / p.split * p.chunk; row < row_end; ++row) {
    const int64_t base = row * p.row_len;
    T* __restrict o = out + base;
    if (p.on_cols) {
      for (int64_t c = col_begin; c < col_end; ++c) o[c] = element(base + c, F(to_float(b[c])));
      if (acc)
        for (int64_t c = col_begin; c < col_end; ++c) acc[c] += double(to_float(o[c]));
    } else {
      const int64_t channel = b ? row % p.C : 0;
      const F bias = b ? F(to_float(b[channel])) : F(0);
      for (int64_t c = col_begin; c < col_end; ++c) o[c] = element(base + c, bias);
      if (acc) {
        double sum = 0.0;  // the row was just written: this pass reads from cache
#ifdef GENFAST_WITH_OPENMP
#pragma omp simd reduction(+ : sum)
#endif
        for (int64_t c = col_begin; c < col_end; ++c) sum += double(to_float(o[c]));
        acc[channel] += sum;
      }
    }
  }
}

template <typename T, int A, int M>
void run(const Args& a) {
  const Plan p = make_plan(a);
  const int threads = int(std::max<int64_t>(1, std::min<int64_t>(a.num_threads, a.n / kMinElementsPerThread)));
  // Fused bias gradient: per-thread partial sums per channel, in double, added up at the end.
  const bool want_db = M == GRAD && a.db != nullptr && a.b != nullptr;
  std::vector<double> partial(want_db ? size_t(threads) * size_t(p.C) : 0, 0.0);

  parallel_for_static(p.tasks, threads, [&](int64_t task) {
    double* acc = want_db ? partial.data() + size_t(thread_index()) * size_t(p.C) : nullptr;
    GF_CPU_DISPATCH(run_task<T, A, M>(a, p, task, acc));
  });
  if (want_db) {
    T* db = static_cast<T*>(a.db);
    for (int64_t c = 0; c < p.C; ++c) {
      double sum = 0.0;
      for (int t = 0; t < threads; ++t) sum += partial[size_t(t) * size_t(p.C) + size_t(c)];
      db[c] = from_compute<T>(typename Compute<T>::type(sum));
    }
  }
}

template <typename T>
void by_act(const Args& a) {
  with_act_and_mode(a.act, a.mode,
                    [&](auto act, auto mode) { run<T, decltype(act)::value, decltype(mode)::value>(a); });
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
