// pixel_norm on the CPU: each reduction row is read once to sum (and, for the gradient, to
// sum dy * x), then again from cache to write. Rows are processed in tiles small enough to stay
// in L1/L2: for S == 1 (channels innermost) a row is C contiguous elements; for S > 1 a tile is
// up to kTile neighbouring columns s of one outer index, summed as vectors across C.
#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "common.h"
#include "cpu_isa.h"
#include "gan.h"
#ifdef GENFAST_WITH_OPENMP
#include <omp.h>
#endif

namespace genfast {
namespace gan {
namespace {

constexpr int64_t kTile = 64;  // columns per tile when S > 1
constexpr int64_t kMinElementsPerThread = 1 << 15;

// Accumulation in double: the sums stay exact enough for any C, and on a bandwidth-bound
// op the wider adds cost nothing measurable.
template <typename T, int M>
GF_CPU_KERNEL void contiguous_rows(const PixelNormArgs& a, int64_t row_begin, int64_t row_end) {
  const T* __restrict x = static_cast<const T*>(a.x);
  const T* __restrict dy = static_cast<const T*>(a.dy);
  T* __restrict out = static_cast<T*>(a.out);
  using F = typename Compute<T>::type;
  const int64_t C = a.C;
  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t base = row * C;
    double sumsq = 0.0, sumdx = 0.0;
#ifdef GENFAST_WITH_OPENMP
#pragma omp simd reduction(+ : sumsq, sumdx)
#endif
    for (int64_t c = 0; c < C; ++c) {
      const double xv = double(to_float(x[base + c]));
      sumsq += xv * xv;
      if (M == PN_GRAD) sumdx += xv * double(to_float(dy[base + c]));
    }
    const double r = 1.0 / std::sqrt(sumsq / double(C) + a.eps);
    if (M == PN_FORWARD) {
      const F rf = F(r);
      for (int64_t c = 0; c < C; ++c) out[base + c] = from_compute<T>(F(to_float(x[base + c])) * rf);
    } else {
      const F rf = F(r), k = F(r * r * r * sumdx / double(C));
      for (int64_t c = 0; c < C; ++c)
        out[base + c] = from_compute<T>(rf * F(to_float(dy[base + c])) - k * F(to_float(x[base + c])));
    }
  }
}

template <typename T, int M>
GF_CPU_KERNEL void column_tile(const PixelNormArgs& a, int64_t o, int64_t s0, int64_t width) {
  const T* __restrict x = static_cast<const T*>(a.x);
  const T* __restrict dy = static_cast<const T*>(a.dy);
  T* __restrict out = static_cast<T*>(a.out);
  using F = typename Compute<T>::type;
  const int64_t C = a.C, S = a.S;
  double sumsq[kTile], sumdx[kTile];
  F r[kTile], k[kTile];
  for (int64_t j = 0; j < width; ++j) sumsq[j] = sumdx[j] = 0.0;
  const int64_t base = o * C * S + s0;
  for (int64_t c = 0; c < C; ++c) {
    const T* xr = x + base + c * S;
    const T* dr = dy + base + c * S;
#ifdef GENFAST_WITH_OPENMP
#pragma omp simd
#endif
    for (int64_t j = 0; j < width; ++j) {
      const double xv = double(to_float(xr[j]));
      sumsq[j] += xv * xv;
      if (M == PN_GRAD) sumdx[j] += xv * double(to_float(dr[j]));
    }
  }
  for (int64_t j = 0; j < width; ++j) {
    const double rr = 1.0 / std::sqrt(sumsq[j] / double(C) + a.eps);
    r[j] = F(rr);
    k[j] = F(rr * rr * rr * sumdx[j] / double(C));
  }
  for (int64_t c = 0; c < C; ++c) {
    const T* xr = x + base + c * S;
    const T* dr = dy + base + c * S;
    T* orow = out + base + c * S;
    if (M == PN_FORWARD) {
      for (int64_t j = 0; j < width; ++j) orow[j] = from_compute<T>(F(to_float(xr[j])) * r[j]);
    } else {
      for (int64_t j = 0; j < width; ++j)
        orow[j] = from_compute<T>(r[j] * F(to_float(dr[j])) - k[j] * F(to_float(xr[j])));
    }
  }
}

template <typename T, int M>
void run(const PixelNormArgs& a) {
  const int64_t n = a.outer * a.C * a.S;
  const int threads = int(std::max<int64_t>(1, std::min<int64_t>(a.num_threads, n / kMinElementsPerThread)));
  (void)threads;
  if (a.S == 1) {
    // Tasks of whole rows, about 8192 elements each.
    const int64_t rows_per_task = std::max<int64_t>(1, 8192 / a.C);
    const int64_t tasks = (a.outer + rows_per_task - 1) / rows_per_task;
#ifdef GENFAST_WITH_OPENMP
#pragma omp parallel for schedule(static) num_threads(threads)
#endif
    for (int64_t t = 0; t < tasks; ++t)
      GF_CPU_DISPATCH(contiguous_rows<T, M>(a, t * rows_per_task, std::min(a.outer, (t + 1) * rows_per_task)));
  } else {
    const int64_t tiles_per_outer = (a.S + kTile - 1) / kTile;
    const int64_t tasks = a.outer * tiles_per_outer;
#ifdef GENFAST_WITH_OPENMP
#pragma omp parallel for schedule(static) num_threads(threads)
#endif
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t o = t / tiles_per_outer, s0 = (t % tiles_per_outer) * kTile;
      GF_CPU_DISPATCH(column_tile<T, M>(a, o, s0, std::min(kTile, a.S - s0)));
    }
  }
}

template <typename T>
void by_mode(const PixelNormArgs& a) {
  if (a.mode == PN_FORWARD) return run<T, PN_FORWARD>(a);
  if (a.mode == PN_GRAD) return run<T, PN_GRAD>(a);
  throw std::invalid_argument("pixel_norm: unknown mode " + std::to_string(a.mode));
}

}  // namespace

void pixel_norm_cpu(const PixelNormArgs& a) {
  if (a.outer * a.C * a.S == 0) return;
  switch (a.dtype) {
    case F32: return by_mode<float>(a);
    case F64: return by_mode<double>(a);
    case F16: return by_mode<half_t>(a);
    case BF16: return by_mode<bf16_t>(a);
  }
  throw std::invalid_argument(std::string("pixel_norm: unsupported dtype ") + dtype_name(a.dtype));
}

}  // namespace gan
}  // namespace genfast
