// VAE reparameterisation + KL on the CPU: one OpenMP-parallel pass per direction over
// (row, chunk) tasks; the KL partial of each chunk is summed in double.
#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "bias_act_math.h"  // gf_exp: a libm-free exp the compiler vectorises
#include "common.h"
#include "cpu_isa.h"
#include "vae.h"

namespace genfast {
namespace vae {
namespace {

constexpr int64_t kMinElementsPerThread = 1 << 15;

int threads_for(const Args& a) {
  return int(std::max<int64_t>(1, std::min<int64_t>(a.num_threads, a.rows * a.cols / kMinElementsPerThread)));
}

template <typename T>
GF_CPU_KERNEL void forward_task(const Args& a, int64_t row, int64_t chunk) {
  using F = typename Compute<T>::type;
  const int64_t begin = chunk * kChunkCols, end = std::min(a.cols, begin + kChunkCols);
  const int64_t base = row * a.cols;
  const T* __restrict mu = static_cast<const T*>(a.mu) + base;
  const T* __restrict lv = static_cast<const T*>(a.logvar) + base;
  if (a.z != nullptr) {
    const T* __restrict eps = static_cast<const T*>(a.eps) + base;
    T* __restrict z = static_cast<T*>(a.z) + base;
    for (int64_t i = begin; i < end; ++i) {
      const F m = F(to_float(mu[i])), l = F(to_float(lv[i]));
      z[i] = from_compute<T>(m + bias_act::gf_exp(l * F(0.5)) * F(to_float(eps[i])));
    }
  }
  if (a.kl_partial != nullptr) {
    double sum = 0.0;
#ifdef GENFAST_WITH_OPENMP
#pragma omp simd reduction(+ : sum)
#endif
    for (int64_t i = begin; i < end; ++i) {
      const F m = F(to_float(mu[i])), l = F(to_float(lv[i]));
      sum += double(F(1) + l - m * m - bias_act::gf_exp(l));
    }
    static_cast<F*>(a.kl_partial)[row * num_chunks(a.cols) + chunk] = F(-0.5 * sum);
  }
}

template <typename T>
GF_CPU_KERNEL void backward_task(const Args& a, int64_t row, int64_t chunk) {
  using F = typename Compute<T>::type;
  const int64_t begin = chunk * kChunkCols, end = std::min(a.cols, begin + kChunkCols);
  const int64_t base = row * a.cols;
  const T* __restrict mu = static_cast<const T*>(a.mu) + base;
  const T* __restrict lv = static_cast<const T*>(a.logvar) + base;
  const T* __restrict eps = static_cast<const T*>(a.eps) + base;
  const T* __restrict dz = a.dz ? static_cast<const T*>(a.dz) + base : nullptr;
  T* __restrict dmu = static_cast<T*>(a.dmu) + base;
  T* __restrict dlv = static_cast<T*>(a.dlogvar) + base;
  const F dkl = a.dkl ? static_cast<const F*>(a.dkl)[row] : F(0);
  if (dz != nullptr) {
    for (int64_t i = begin; i < end; ++i) {
      const F m = F(to_float(mu[i])), l = F(to_float(lv[i])), g = F(to_float(dz[i]));
      const F sigma = bias_act::gf_exp(l * F(0.5));
      dmu[i] = from_compute<T>(g + dkl * m);
      dlv[i] = from_compute<T>(F(0.5) * (g * F(to_float(eps[i])) * sigma + dkl * (sigma * sigma - F(1))));
    }
  } else {
    for (int64_t i = begin; i < end; ++i) {
      const F m = F(to_float(mu[i])), l = F(to_float(lv[i]));
      dmu[i] = from_compute<T>(dkl * m);
      dlv[i] = from_compute<T>(F(0.5) * dkl * (bias_act::gf_exp(l) - F(1)));
    }
  }
}

template <typename T, bool Forward>
void run(const Args& a) {
  const int64_t chunks = num_chunks(a.cols);
  const int64_t tasks = a.rows * chunks;
#ifdef GENFAST_WITH_OPENMP
#pragma omp parallel for schedule(static) num_threads(threads_for(a))
#endif
  for (int64_t t = 0; t < tasks; ++t) {
    if (Forward)
      GF_CPU_DISPATCH(forward_task<T>(a, t / chunks, t % chunks));
    else
      GF_CPU_DISPATCH(backward_task<T>(a, t / chunks, t % chunks));
  }
}

template <bool Forward>
void by_dtype(const Args& a) {
  if (a.rows == 0 || a.cols == 0) return;
  switch (a.dtype) {
    case F32: return run<float, Forward>(a);
    case F64: return run<double, Forward>(a);
    case F16: return run<half_t, Forward>(a);
    case BF16: return run<bf16_t, Forward>(a);
  }
  throw std::invalid_argument(std::string("vae: unsupported dtype ") + dtype_name(a.dtype));
}

}  // namespace

void forward_cpu(const Args& a) { by_dtype<true>(a); }
void backward_cpu(const Args& a) { by_dtype<false>(a); }

}  // namespace vae
}  // namespace genfast
