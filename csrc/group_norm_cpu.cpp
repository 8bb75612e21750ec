// GroupNorm (+ SiLU) on the CPU, forward and backward, OpenMP-parallel and vectorisable.
//
// NCHW: one task per (n, group): the group is one contiguous run of D * S elements, read three
//   times while it sits in cache (sum, squared deviations, output).
// NHWC: tasks are blocks of rows (spatial positions) of one sample, every channel of a row
//   contiguous, so the inner loops run over channels. Each block computes exact two-pass
//   statistics per group over its rows; blocks are merged with Chan's formula.
// Statistics in double for float64 input, else float inner sums merged in double: never
// E[x^2] - E[x]^2, so a large mean does not cancel.
#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

#include "bias_act_math.h"  // gf_exp: a vectorisable exp for the SiLU
#include "common.h"
#include "cpu_isa.h"
#include "group_norm.h"
#ifdef GENFAST_WITH_OPENMP
#include <omp.h>
#endif

namespace genfast {
namespace group_norm {
namespace {

using bias_act::gf_exp;

// Elements per task of the NHWC loops (rows x channels), sized for L2.
constexpr int64_t kBlockElements = 16384;
// Inner float sums run over at most this many elements before going into a double.
constexpr int64_t kInner = 2048;

int threads_for(int num_threads, int64_t work_elements, int64_t tasks) {
  const int64_t by_size = std::max<int64_t>(1, work_elements / (1 << 15));
  return int(std::max<int64_t>(1, std::min<int64_t>({int64_t(num_threads), by_size, tasks})));
}

template <typename F>
inline F sigmoid(F z) {
  return F(1) / (F(1) + gf_exp(-z));
}

// d silu(z) / dz
template <typename F>
inline F silu_grad(F z) {
  const F s = sigmoid(z);
  return s * (F(1) + z * (F(1) - s));
}

template <typename T>
inline auto load(const T* p, int64_t i) -> typename Compute<T>::type {
  return typename Compute<T>::type(to_float(p[i]));
}

// sum(x[i] - shift) and sum((x[i] - shift)^2) over n contiguous elements.
template <typename T>
inline void shifted_sums(const T* __restrict x, int64_t n, double shift, double& s1, double& s2) {
  using F = typename Compute<T>::type;
  const F m = F(shift);
  for (int64_t begin = 0; begin < n; begin += kInner) {
    const int64_t end = std::min(n, begin + kInner);
    F a = 0, b = 0;
#ifdef GENFAST_WITH_OPENMP
#pragma omp simd reduction(+ : a, b)
#endif
    for (int64_t i = begin; i < end; ++i) {
      const F d = load(x, i) - m;
      a += d;
      b += d * d;
    }
    s1 += double(a);
    s2 += double(b);
  }
}

template <typename T>
inline double plain_sum(const T* __restrict x, int64_t n) {
  using F = typename Compute<T>::type;
  double total = 0;
  for (int64_t begin = 0; begin < n; begin += kInner) {
    const int64_t end = std::min(n, begin + kInner);
    F a = 0;
#ifdef GENFAST_WITH_OPENMP
#pragma omp simd reduction(+ : a)
#endif
    for (int64_t i = begin; i < end; ++i) a += load(x, i);
    total += double(a);
  }
  return total;
}

// (mean, M2) of n values: two-pass, with the rounding of the mean corrected.
template <typename T>
inline void two_pass(const T* x, int64_t n, double& mean, double& m2) {
  mean = plain_sum(x, n) / double(n);
  double s1 = 0, s2 = 0;
  shifted_sums(x, n, mean, s1, s2);
  mean += s1 / double(n);
  m2 = std::max(0.0, s2 - s1 * s1 / double(n));
}

template <typename T>
using StatT = typename Compute<T>::type;  // float, or double for float64

template <typename T>
void fill_affine(const void* w, const void* b, int64_t C, std::vector<StatT<T>>& wt, std::vector<StatT<T>>& bt) {
  wt.assign(size_t(C), StatT<T>(1));
  bt.assign(size_t(C), StatT<T>(0));
  for (int64_t c = 0; c < C; ++c) {
    if (w) wt[c] = load(static_cast<const T*>(w), c);
    if (b) bt[c] = load(static_cast<const T*>(b), c);
  }
}

struct Moments {
  double count, mean, m2;
};

// Chan et al.: merge the (count, mean, M2) of two disjoint sets.
inline Moments merge(const Moments& a, const Moments& b) {
  if (a.count == 0) return b;
  if (b.count == 0) return a;
  const double n = a.count + b.count, delta = b.mean - a.mean;
  return {n, a.mean + delta * (b.count / n), a.m2 + b.m2 + delta * delta * (a.count * b.count / n)};
}

// Rows per NHWC task: about kBlockElements elements, at most 256 rows (float inner sums).
int64_t rows_per_block(int64_t C, int64_t S) {
  return std::min<int64_t>(S, std::max<int64_t>(1, std::min<int64_t>(256, kBlockElements / C)));
}

// ----------------------------------------------------------------------------- forward

template <typename T, bool SILU>
GF_CPU_KERNEL void forward_group_nchw(const ForwardArgs& a, int64_t n, int64_t g) {
  using F = StatT<T>;
  const Shape& sh = a.shape;
  const int64_t D = sh.C / sh.G, S = sh.S, L = D * S;
  const int64_t offset = (n * sh.C + g * D) * S;
  const T* __restrict x = static_cast<const T*>(a.x) + offset;
  T* __restrict y = static_cast<T*>(a.y) + offset;
  const T* w = static_cast<const T*>(a.weight);
  const T* b = static_cast<const T*>(a.bias);
  double mean, m2;
  two_pass(x, L, mean, m2);
  const double rstd = 1.0 / std::sqrt(m2 / double(L) + a.eps);
  static_cast<F*>(a.mean)[n * sh.G + g] = F(mean);
  static_cast<F*>(a.rstd)[n * sh.G + g] = F(rstd);
  const F m = F(mean);
  for (int64_t c = 0; c < D; ++c) {
    const int64_t channel = g * D + c;
    const F k = F(rstd * (w ? double(load(w, channel)) : 1.0));
    const F bb = b ? load(b, channel) : F(0);
    const T* __restrict xr = x + c * S;
    T* __restrict yr = y + c * S;
    for (int64_t s = 0; s < S; ++s) {
      F z = (load(xr, s) - m) * k + bb;
      if (SILU) z = z * sigmoid(z);
      yr[s] = from_compute<T>(z);
    }
  }
}

// Exact two-pass moments of every group over rows [r0, r1) of sample n (NHWC).
template <typename T>
GF_CPU_KERNEL void block_moments_nhwc(const ForwardArgs& a, int64_t n, int64_t r0, int64_t r1, Moments* out,
                                      StatT<T>* scratch) {
  using F = StatT<T>;
  const Shape& sh = a.shape;
  const int64_t C = sh.C, G = sh.G, D = C / G;
  const T* __restrict x = static_cast<const T*>(a.x) + (n * sh.S + r0) * C;
  const int64_t rows = r1 - r0;
  F* __restrict acc = scratch;
  F* __restrict acc2 = scratch + C;
  F* __restrict shift = scratch + 2 * C;
  for (int64_t c = 0; c < C; ++c) acc[c] = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const T* __restrict row = x + r * C;
    for (int64_t c = 0; c < C; ++c) acc[c] += load(row, c);
  }
  const double count = double(rows * D);
  for (int64_t g = 0; g < G; ++g) {
    double total = 0;
    for (int64_t c = g * D; c < (g + 1) * D; ++c) total += double(acc[c]);
    out[g].mean = total / count;
    for (int64_t c = g * D; c < (g + 1) * D; ++c) shift[c] = F(out[g].mean);
  }
  for (int64_t c = 0; c < C; ++c) acc[c] = acc2[c] = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const T* __restrict row = x + r * C;
    for (int64_t c = 0; c < C; ++c) {
      const F d = load(row, c) - shift[c];
      acc[c] += d;
      acc2[c] += d * d;
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    double s1 = 0, s2 = 0;
    for (int64_t c = g * D; c < (g + 1) * D; ++c) {
      s1 += double(acc[c]);
      s2 += double(acc2[c]);
    }
    out[g].count = count;
    out[g].mean += s1 / count;
    out[g].m2 = std::max(0.0, s2 - s1 * s1 / count);
  }
}

template <typename T, bool SILU>
GF_CPU_KERNEL void normalize_block_nhwc(const ForwardArgs& a, int64_t n, int64_t r0, int64_t r1,
                                        const StatT<T>* __restrict cm, const StatT<T>* __restrict ck,
                                        const StatT<T>* __restrict cb) {
  using F = StatT<T>;
  const int64_t C = a.shape.C;
  const T* __restrict x = static_cast<const T*>(a.x) + (n * a.shape.S + r0) * C;
  T* __restrict y = static_cast<T*>(a.y) + (n * a.shape.S + r0) * C;
  for (int64_t r = 0; r < r1 - r0; ++r) {
    const T* __restrict row = x + r * C;
    T* __restrict out = y + r * C;
    for (int64_t c = 0; c < C; ++c) {
      F z = (load(row, c) - cm[c]) * ck[c] + cb[c];
      if (SILU) z = z * sigmoid(z);
      out[c] = from_compute<T>(z);
    }
  }
}

template <typename T, bool SILU>
void forward(const ForwardArgs& a) {
  using F = StatT<T>;
  const Shape& sh = a.shape;
  const int64_t N = sh.N, C = sh.C, S = sh.S, G = sh.G, D = C / G;
  const int64_t total = N * C * S;
  if (!sh.channels_last) {
    const int64_t tasks = N * G;
    parallel_for_dynamic(tasks, threads_for(a.num_threads, total, tasks),
                         [&](int64_t t) { GF_CPU_DISPATCH(forward_group_nchw<T, SILU>(a, t / G, t % G)); });
    return;
  }
  const int64_t R = rows_per_block(C, S), blocks = (S + R - 1) / R, tasks = N * blocks;
  const int threads = threads_for(a.num_threads, total, tasks);
  std::vector<Moments> parts(size_t(tasks * G));
  std::vector<F> scratch(size_t(threads) * size_t(3 * C));
#ifdef GENFAST_WITH_OPENMP
#pragma omp parallel for schedule(static) num_threads(threads)
#endif
  for (int64_t t = 0; t < tasks; ++t) {
#ifdef GENFAST_WITH_OPENMP
    const int tid = omp_get_thread_num();
#else
    const int tid = 0;
#endif
    const int64_t n = t / blocks, r0 = (t % blocks) * R;
    GF_CPU_DISPATCH(block_moments_nhwc<T>(a, n, r0, std::min(S, r0 + R), parts.data() + t * G,
                                          scratch.data() + size_t(tid) * 3 * C));
  }
  // Merge the blocks of each (n, g), then build the per-channel tables of each sample.
  std::vector<F> wt, bt;
  fill_affine<T>(a.weight, a.bias, C, wt, bt);
  std::vector<F> cm(size_t(N * C)), ck(size_t(N * C));
  F* mean_out = static_cast<F*>(a.mean);
  F* rstd_out = static_cast<F*>(a.rstd);
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t g = 0; g < G; ++g) {
      Moments m{0, 0, 0};
      for (int64_t blk = 0; blk < blocks; ++blk) m = merge(m, parts[size_t((n * blocks + blk) * G + g)]);
      const double rstd = 1.0 / std::sqrt(m.m2 / m.count + a.eps);
      mean_out[n * G + g] = F(m.mean);
      rstd_out[n * G + g] = F(rstd);
      for (int64_t c = g * D; c < (g + 1) * D; ++c) {
        cm[size_t(n * C + c)] = F(m.mean);
        ck[size_t(n * C + c)] = F(rstd * double(wt[c]));
      }
    }
  }
#ifdef GENFAST_WITH_OPENMP
#pragma omp parallel for schedule(static) num_threads(threads)
#endif
  for (int64_t t = 0; t < tasks; ++t) {
    const int64_t n = t / blocks, r0 = (t % blocks) * R;
    GF_CPU_DISPATCH(
        normalize_block_nhwc<T, SILU>(a, n, r0, std::min(S, r0 + R), cm.data() + n * C, ck.data() + n * C, bt.data()));
  }
}

// ----------------------------------------------------------------------------- backward

// dL/dz from dL/dy, with z recomputed from x when the SiLU is fused.
template <typename F, bool SILU>
inline F grad_z(F dy, F xhat, F w, F b) {
  if (!SILU) return dy;
  return dy * silu_grad(xhat * w + b);
}

// With the SiLU fused, dz = dy * silu'(z) costs an exp per element. A group of at most this many
// elements keeps its dz (per thread, in the compute type) from the sums pass for the dx pass,
// instead of computing it twice; larger groups would not stay in L2, so they recompute.
constexpr int64_t kKeepDzElements = int64_t(1) << 18;

// dz_keep: scratch of D * S elements for the group's dz, or null to recompute it.
template <typename T, bool SILU>
GF_CPU_KERNEL void backward_group_nchw(const BackwardArgs& a, int64_t n, int64_t g, double* A, double* B,
                                       StatT<T>* __restrict dz_keep) {
  using F = StatT<T>;
  const Shape& sh = a.shape;
  const int64_t D = sh.C / sh.G, S = sh.S;
  const int64_t offset = (n * sh.C + g * D) * S;
  const T* __restrict x = static_cast<const T*>(a.x) + offset;
  const T* __restrict dy = static_cast<const T*>(a.dy) + offset;
  T* __restrict dx = static_cast<T*>(a.dx) + offset;
  const T* w = static_cast<const T*>(a.weight);
  const T* b = static_cast<const T*>(a.bias);
  const F m = static_cast<const F*>(a.mean)[n * sh.G + g];
  const F r = static_cast<const F*>(a.rstd)[n * sh.G + g];
  double sum_wa = 0, sum_wb = 0;
  for (int64_t c = 0; c < D; ++c) {
    const int64_t channel = g * D + c;
    const F wc = w ? load(w, channel) : F(1), bc = b ? load(b, channel) : F(0);
    const T* __restrict xr = x + c * S;
    const T* __restrict dyr = dy + c * S;
    F* __restrict keep = dz_keep ? dz_keep + c * S : nullptr;
    double sa = 0, sb = 0;
    for (int64_t begin = 0; begin < S; begin += kInner) {
      const int64_t end = std::min(S, begin + kInner);
      F pa = 0, pb = 0;
      if (keep) {
#ifdef GENFAST_WITH_OPENMP
#pragma omp simd reduction(+ : pa, pb)
#endif
        for (int64_t s = begin; s < end; ++s) {
          const F xh = (load(xr, s) - m) * r;
          const F dz = grad_z<F, SILU>(load(dyr, s), xh, wc, bc);
          keep[s] = dz;
          pa += dz * xh;
          pb += dz;
        }
      } else {
#ifdef GENFAST_WITH_OPENMP
#pragma omp simd reduction(+ : pa, pb)
#endif
        for (int64_t s = begin; s < end; ++s) {
          const F xh = (load(xr, s) - m) * r;
          const F dz = grad_z<F, SILU>(load(dyr, s), xh, wc, bc);
          pa += dz * xh;
          pb += dz;
        }
      }
      sa += double(pa);
      sb += double(pb);
    }
    A[n * sh.C + channel] = sa;
    B[n * sh.C + channel] = sb;
    sum_wa += double(wc) * sa;
    sum_wb += double(wc) * sb;
  }
  const double M = double(D * S);
  const F k0 = F(-double(r) * sum_wb / M), kx = F(-double(r) * sum_wa / M);
  for (int64_t c = 0; c < D; ++c) {
    const int64_t channel = g * D + c;
    const F wc = w ? load(w, channel) : F(1), bc = b ? load(b, channel) : F(0);
    const F kz = r * wc;
    const T* __restrict xr = x + c * S;
    const T* __restrict dyr = dy + c * S;
    T* __restrict dxr = dx + c * S;
    if (dz_keep) {
      const F* __restrict keep = dz_keep + c * S;
      for (int64_t s = 0; s < S; ++s) dxr[s] = from_compute<T>(keep[s] * kz + k0 + (load(xr, s) - m) * r * kx);
      continue;
    }
    for (int64_t s = 0; s < S; ++s) {
      const F xh = (load(xr, s) - m) * r;
      const F dz = grad_z<F, SILU>(load(dyr, s), xh, wc, bc);
      dxr[s] = from_compute<T>(dz * kz + k0 + xh * kx);
    }
  }
}

// Per-channel sums A = sum(dz * xhat), B = sum(dz) over rows [r0, r1) of sample n (NHWC).
template <typename T, bool SILU>
GF_CPU_KERNEL void block_sums_nhwc(const BackwardArgs& a, int64_t n, int64_t r0, int64_t r1,
                                   const StatT<T>* __restrict cm, const StatT<T>* __restrict cr,
                                   const StatT<T>* __restrict cw, const StatT<T>* __restrict cb, double* __restrict A,
                                   double* __restrict B, StatT<T>* __restrict scratch) {
  using F = StatT<T>;
  const int64_t C = a.shape.C;
  const int64_t offset = (n * a.shape.S + r0) * C;
  const T* __restrict x = static_cast<const T*>(a.x) + offset;
  const T* __restrict dy = static_cast<const T*>(a.dy) + offset;
  F* __restrict pa = scratch;
  F* __restrict pb = scratch + C;
  for (int64_t c = 0; c < C; ++c) pa[c] = pb[c] = 0;
  for (int64_t r = 0; r < r1 - r0; ++r) {
    const T* __restrict xrow = x + r * C;
    const T* __restrict dyrow = dy + r * C;
    for (int64_t c = 0; c < C; ++c) {
      const F xh = (load(xrow, c) - cm[c]) * cr[c];
      const F dz = grad_z<F, SILU>(load(dyrow, c), xh, cw[c], cb[c]);
      pa[c] += dz * xh;
      pb[c] += dz;
    }
  }
  for (int64_t c = 0; c < C; ++c) {
    A[c] = double(pa[c]);
    B[c] = double(pb[c]);
  }
}

template <typename T, bool SILU>
GF_CPU_KERNEL void dx_block_nhwc(const BackwardArgs& a, int64_t n, int64_t r0, int64_t r1,
                                 const StatT<T>* __restrict cm, const StatT<T>* __restrict cr,
                                 const StatT<T>* __restrict cw, const StatT<T>* __restrict cb,
                                 const StatT<T>* __restrict kz, const StatT<T>* __restrict k0,
                                 const StatT<T>* __restrict kx) {
  using F = StatT<T>;
  const int64_t C = a.shape.C;
  const int64_t offset = (n * a.shape.S + r0) * C;
  const T* __restrict x = static_cast<const T*>(a.x) + offset;
  const T* __restrict dy = static_cast<const T*>(a.dy) + offset;
  T* __restrict dx = static_cast<T*>(a.dx) + offset;
  for (int64_t r = 0; r < r1 - r0; ++r) {
    const T* __restrict xrow = x + r * C;
    const T* __restrict dyrow = dy + r * C;
    T* __restrict out = dx + r * C;
    for (int64_t c = 0; c < C; ++c) {
      const F xh = (load(xrow, c) - cm[c]) * cr[c];
      const F dz = grad_z<F, SILU>(load(dyrow, c), xh, cw[c], cb[c]);
      out[c] = from_compute<T>(dz * kz[c] + k0[c] + xh * kx[c]);
    }
  }
}

template <typename T, bool SILU>
void backward(const BackwardArgs& a) {
  using F = StatT<T>;
  const Shape& sh = a.shape;
  const int64_t N = sh.N, C = sh.C, S = sh.S, G = sh.G, D = C / G;
  const int64_t total = N * C * S;
  std::vector<double> A(size_t(N * C)), B(size_t(N * C));
  if (!sh.channels_last) {
    const int64_t tasks = N * G, L = D * S;
    const int threads = threads_for(a.num_threads, total, tasks);
    const bool keep_dz = SILU && L <= kKeepDzElements;
    std::vector<F> dz_scratch(keep_dz ? size_t(threads) * size_t(L) : 0);
#ifdef GENFAST_WITH_OPENMP
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
#endif
    for (int64_t t = 0; t < tasks; ++t) {
#ifdef GENFAST_WITH_OPENMP
      const int tid = omp_get_thread_num();
#else
      const int tid = 0;
#endif
      F* keep = keep_dz ? dz_scratch.data() + size_t(tid) * size_t(L) : nullptr;
      GF_CPU_DISPATCH(backward_group_nchw<T, SILU>(a, t / G, t % G, A.data(), B.data(), keep));
    }
  } else {
    const int64_t R = rows_per_block(C, S), blocks = (S + R - 1) / R, tasks = N * blocks;
    const int threads = threads_for(a.num_threads, total, tasks);
    std::vector<F> wt, bt;
    fill_affine<T>(a.weight, a.bias, C, wt, bt);
    const F* mean = static_cast<const F*>(a.mean);
    const F* rstd = static_cast<const F*>(a.rstd);
    std::vector<F> cm(size_t(N * C)), cr(size_t(N * C));
    for (int64_t n = 0; n < N; ++n)
      for (int64_t c = 0; c < C; ++c) {
        cm[size_t(n * C + c)] = mean[n * G + c / D];
        cr[size_t(n * C + c)] = rstd[n * G + c / D];
      }
    std::vector<double> partA(size_t(tasks * C)), partB(size_t(tasks * C));
    std::vector<F> scratch(size_t(threads) * size_t(2 * C));
#ifdef GENFAST_WITH_OPENMP
#pragma omp parallel for schedule(static) num_threads(threads)
#endif
    for (int64_t t = 0; t < tasks; ++t) {
#ifdef GENFAST_WITH_OPENMP
      const int tid = omp_get_thread_num();
#else
      const int tid = 0;
#endif
      const int64_t n = t / blocks, r0 = (t % blocks) * R;
      GF_CPU_DISPATCH(block_sums_nhwc<T, SILU>(a, n, r0, std::min(S, r0 + R), cm.data() + n * C, cr.data() + n * C,
                                               wt.data(), bt.data(), partA.data() + t * C, partB.data() + t * C,
                                               scratch.data() + size_t(tid) * 2 * C));
    }
    for (int64_t n = 0; n < N; ++n)
      for (int64_t blk = 0; blk < blocks; ++blk)
        for (int64_t c = 0; c < C; ++c) {
          A[size_t(n * C + c)] += partA[size_t((n * blocks + blk) * C + c)];
          B[size_t(n * C + c)] += partB[size_t((n * blocks + blk) * C + c)];
        }
    // dx = dz * kz + k0 + xhat * kx, with per-(n, c) coefficients.
    std::vector<F> kz(size_t(N * C)), k0(size_t(N * C)), kx(size_t(N * C));
    const double M = double(D * S);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t g = 0; g < G; ++g) {
        double sum_wa = 0, sum_wb = 0;
        for (int64_t c = g * D; c < (g + 1) * D; ++c) {
          sum_wa += double(wt[c]) * A[size_t(n * C + c)];
          sum_wb += double(wt[c]) * B[size_t(n * C + c)];
        }
        const double r = double(rstd[n * G + g]);
        for (int64_t c = g * D; c < (g + 1) * D; ++c) {
          kz[size_t(n * C + c)] = F(r * double(wt[c]));
          k0[size_t(n * C + c)] = F(-r * sum_wb / M);
          kx[size_t(n * C + c)] = F(-r * sum_wa / M);
        }
      }
#ifdef GENFAST_WITH_OPENMP
#pragma omp parallel for schedule(static) num_threads(threads)
#endif
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t n = t / blocks, r0 = (t % blocks) * R;
      const size_t o = size_t(n * C);
      GF_CPU_DISPATCH(dx_block_nhwc<T, SILU>(a, n, r0, std::min(S, r0 + R), cm.data() + o, cr.data() + o, wt.data(),
                                             bt.data(), kz.data() + o, k0.data() + o, kx.data() + o));
    }
  }
  T* dw = static_cast<T*>(a.dweight);
  T* db = static_cast<T*>(a.dbias);
  for (int64_t c = 0; c < C; ++c) {
    double sa = 0, sb = 0;
    for (int64_t n = 0; n < N; ++n) {
      sa += A[size_t(n * C + c)];
      sb += B[size_t(n * C + c)];
    }
    if (dw) dw[c] = from_compute<T>(F(sa));
    if (db) db[c] = from_compute<T>(F(sb));
  }
}

template <typename T>
void forward_typed(const ForwardArgs& a) {
  a.silu ? forward<T, true>(a) : forward<T, false>(a);
}

template <typename T>
void backward_typed(const BackwardArgs& a) {
  a.silu ? backward<T, true>(a) : backward<T, false>(a);
}

void check_shape(const Shape& s) {
  if (s.N < 0 || s.C < 1 || s.S < 0 || s.G < 1 || s.C % s.G != 0) throw std::invalid_argument("group_norm: bad sizes");
}

}  // namespace

void group_norm_forward_cpu(const ForwardArgs& a) {
  check_shape(a.shape);
  if (a.shape.N == 0 || a.shape.S == 0) return;
  switch (a.shape.dtype) {
    case F32: return forward_typed<float>(a);
    case F64: return forward_typed<double>(a);
    case F16: return forward_typed<half_t>(a);
    case BF16: return forward_typed<bf16_t>(a);
  }
  throw std::invalid_argument(std::string("group_norm: unsupported dtype ") + dtype_name(a.shape.dtype));
}

void group_norm_backward_cpu(const BackwardArgs& a) {
  check_shape(a.shape);
  if (a.shape.N == 0 || a.shape.S == 0) return;
  switch (a.shape.dtype) {
    case F32: return backward_typed<float>(a);
    case F64: return backward_typed<double>(a);
    case F16: return backward_typed<half_t>(a);
    case BF16: return backward_typed<bf16_t>(a);
  }
  throw std::invalid_argument(std::string("group_norm: unsupported dtype ") + dtype_name(a.shape.dtype));
}

}  // namespace group_norm
}  // namespace genfast
