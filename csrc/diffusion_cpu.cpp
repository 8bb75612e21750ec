// Diffusion kernels on the CPU: one OpenMP-parallel pass each. Work is split into tasks of
// at most kChunk elements of one sample; a task converts its slice of every input to the
// compute type in a small on-stack buffer (one conversion loop per dtype, so mixed input
// dtypes cost no per-element branch), computes on the buffers and converts back. All loops
// over a chunk are branch-free and vectorise.
#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

#include "bias_act_math.h"  // host_logf: a vectorisable logf
#include "common.h"
#include "cpu_isa.h"
#include "diffusion.h"
#ifdef GENFAST_WITH_OPENMP
#include <omp.h>
#endif

namespace genfast {
namespace diffusion {
namespace {

constexpr int64_t kChunk = 1024;
constexpr int64_t kMinElementsPerThread = 1 << 15;

int thread_count(int requested, int64_t n) {
  return int(std::max<int64_t>(1, std::min<int64_t>(requested, n / kMinElementsPerThread)));
}

template <typename F>
inline void load(F* __restrict dst, const Operand& o, int64_t begin, int64_t len) {
  switch (o.dtype) {
    case F32: {
      const float* __restrict s = static_cast<const float*>(o.ptr) + begin;
      for (int64_t i = 0; i < len; ++i) dst[i] = F(s[i]);
      return;
    }
    case F64: {
      const double* __restrict s = static_cast<const double*>(o.ptr) + begin;
      for (int64_t i = 0; i < len; ++i) dst[i] = F(s[i]);
      return;
    }
    case F16: {
      const half_t* __restrict s = static_cast<const half_t*>(o.ptr) + begin;
      for (int64_t i = 0; i < len; ++i) dst[i] = F(to_float(s[i]));
      return;
    }
    case BF16: {
      const bf16_t* __restrict s = static_cast<const bf16_t*>(o.ptr) + begin;
      for (int64_t i = 0; i < len; ++i) dst[i] = F(to_float(s[i]));
      return;
    }
  }
  throw std::invalid_argument("genfast diffusion: unsupported input dtype " + std::string(dtype_name(o.dtype)));
}

template <typename F>
inline void store(void* p, int dtype, const F* __restrict src, int64_t begin, int64_t len) {
  switch (dtype) {
    case F32: {
      float* __restrict d = static_cast<float*>(p) + begin;
      for (int64_t i = 0; i < len; ++i) d[i] = float(src[i]);
      return;
    }
    case F64: {
      double* __restrict d = static_cast<double*>(p) + begin;
      for (int64_t i = 0; i < len; ++i) d[i] = double(src[i]);
      return;
    }
    case F16: {
      half_t* __restrict d = static_cast<half_t*>(p) + begin;
      for (int64_t i = 0; i < len; ++i) d[i] = to_half(float(src[i]));
      return;
    }
    case BF16: {
      bf16_t* __restrict d = static_cast<bf16_t*>(p) + begin;
      for (int64_t i = 0; i < len; ++i) d[i] = to_bf16(float(src[i]));
      return;
    }
  }
  throw std::invalid_argument("genfast diffusion: unsupported output dtype " + std::string(dtype_name(dtype)));
}

// One element of a small table (coefficients, clamp bounds, schedules).
inline double read_scalar(const Operand& o, int64_t i) {
  switch (o.dtype) {
    case F32: return static_cast<const float*>(o.ptr)[i];
    case F64: return static_cast<const double*>(o.ptr)[i];
    case F16: return to_float(static_cast<const half_t*>(o.ptr)[i]);
    case BF16: return to_float(static_cast<const bf16_t*>(o.ptr)[i]);
  }
  throw std::invalid_argument("genfast diffusion: unsupported table dtype " + std::string(dtype_name(o.dtype)));
}

// cos(2 pi u) for u in [0, 1): fold to [0, pi/2] and a degree-10 Taylor polynomial (error
// < 5e-7, plenty for noise), so the noise loop vectorises.
inline float cos_2pi(float u) {
  float t = u - float(int(u + 0.5f));  // [-0.5, 0.5]
  t = t < 0 ? -t : t;                  // cos is even
  const bool flip = t > 0.25f;         // cos(2 pi t) = -cos(2 pi (0.5 - t))
  const float r = (flip ? 0.5f - t : t) * 6.283185307179586f;
  const float r2 = r * r;
  float p = -2.7557319e-7f;
  p = p * r2 + 2.4801587e-5f;
  p = p * r2 - 1.3888889e-3f;
  p = p * r2 + 4.1666668e-2f;
  p = p * r2 - 0.5f;
  p = p * r2 + 1.0f;
  return flip ? -p : p;
}

// Standard normal noise for elements [begin, begin + len): Box-Muller on Philox uniforms.
// Not inlined into the ISA clones: compiled once, so every kernel (sampler_step, add_noise) and
// every clone draws bit-identical noise for a (seed, offset); inlined, the compiler contracted
// it into FMAs differently per call site (1-ulp differences between the kernels on AVX2).
template <typename F>
__attribute__((noinline)) void normal_noise(F* __restrict dst, uint64_t seed, int64_t begin, int64_t len) {
  for (int64_t i = 0; i < len; ++i) {
    float u1, u2;
    philox_uniforms(seed, uint64_t(begin + i), u1, u2);
    dst[i] = F(std::sqrt(-2.0f * bias_act::host_logf(u1)) * cos_2pi(u2));
  }
}

// Runs fn(b, begin, len) over every chunk of every sample, in parallel.
template <typename Fn>
void for_each_chunk(int64_t n, int64_t per_sample, int num_threads, Fn&& fn) {
  if (n == 0) return;
  const int64_t samples = n / per_sample;
  const int64_t chunks = (per_sample + kChunk - 1) / kChunk;
  const int64_t tasks = samples * chunks;
  parallel_for_static(tasks, thread_count(num_threads, n), [&](int64_t task) {
    const int64_t b = task / chunks;
    const int64_t offset = (task % chunks) * kChunk;
    fn(b, b * per_sample + offset, std::min(kChunk, per_sample - offset));
  });
}

// ------------------------------------------------------------------------------ sampler_step

template <typename F>
GF_CPU_KERNEL void step_chunk(const StepArgs& a, int64_t b, int64_t begin, int64_t len) {
  alignas(64) F x[kChunk], m[kChunk], t[kChunk], x0[kChunk], prev[kChunk], aux[kChunk];
  F c[NUM_COLS];
  for (int k = 0; k < NUM_COLS; ++k) c[k] = F(read_scalar(a.coefs, b * a.coef_stride + k));
  load(x, a.x, begin, len);
  load(m, a.m, begin, len);
  if (a.m_uncond.ptr) {  // classifier-free guidance: m = uncond + g * (cond - uncond)
    const F g = F(a.guidance_scale);
    load(t, a.m_uncond, begin, len);
    for (int64_t i = 0; i < len; ++i) m[i] = t[i] + g * (m[i] - t[i]);
  }
  for (int64_t i = 0; i < len; ++i) x0[i] = c[X0_FROM_SAMPLE] * x[i] + c[X0_FROM_MODEL] * m[i];
  const F r = a.clamp.ptr ? F(read_scalar(a.clamp, b)) : F(a.clamp_value);
  if (a.clamp.ptr || a.clamp_value >= 0) {
    // Comparisons rather than min/max so that NaN propagates like torch.clamp.
    for (int64_t i = 0; i < len; ++i) x0[i] = x0[i] < -r ? -r : (x0[i] > r ? r : x0[i]);
    if (a.x0_rescale)
      for (int64_t i = 0; i < len; ++i) x0[i] = x0[i] / r;
  }
  for (int64_t i = 0; i < len; ++i) {
    prev[i] = c[PREV_X0] * x0[i] + c[PREV_SAMPLE] * x[i] + c[PREV_MODEL] * m[i];
    aux[i] = c[AUX_X0] * x0[i] + c[AUX_SAMPLE] * x[i] + c[AUX_MODEL] * m[i];
  }
  if (a.h1.ptr) {
    load(t, a.h1, begin, len);
    for (int64_t i = 0; i < len; ++i) {
      prev[i] += c[PREV_HIST1] * t[i];
      aux[i] += c[AUX_HIST1] * t[i];
    }
  }
  if (a.h2.ptr) {
    load(t, a.h2, begin, len);
    for (int64_t i = 0; i < len; ++i) {
      prev[i] += c[PREV_HIST2] * t[i];
      aux[i] += c[AUX_HIST2] * t[i];
    }
  }
  if (a.z.ptr || a.has_seed) {
    if (a.z.ptr)
      load(t, a.z, begin, len);
    else
      normal_noise(t, a.seed, begin, len);
    for (int64_t i = 0; i < len; ++i) prev[i] += c[PREV_NOISE] * t[i];
  }
  store(a.prev, a.prev_dtype, prev, begin, len);
  if (a.aux) store(a.aux, a.aux_dtype, aux, begin, len);
}

// -------------------------------------------------------------------------------- add_noise

template <typename F>
GF_CPU_KERNEL void noise_chunk(const NoiseArgs& a, int64_t b, int64_t begin, int64_t len) {
  alignas(64) F x[kChunk], z[kChunk], out[kChunk];
  int64_t step = a.timesteps[b];
  step = step < 0 ? 0 : (step >= a.table_len ? a.table_len - 1 : step);  // validated on the host when free
  const F sa = F(read_scalar(a.signal, step)), sn = F(read_scalar(a.noise_scale, step));
  load(x, a.x0, begin, len);
  if (a.noise.ptr)
    load(z, a.noise, begin, len);
  else
    normal_noise(z, a.seed, begin, len);
  for (int64_t i = 0; i < len; ++i) out[i] = sa * x[i] + sn * z[i];
  store(a.noisy, a.out_dtype, out, begin, len);
  switch (a.target_kind) {
    case TARGET_NONE: return;
    case TARGET_EPSILON: return store(a.target, a.out_dtype, z, begin, len);
    case TARGET_SAMPLE: return store(a.target, a.out_dtype, x, begin, len);
    case TARGET_V:
      for (int64_t i = 0; i < len; ++i) out[i] = sa * z[i] - sn * x[i];
      break;
    case TARGET_FLOW:
      for (int64_t i = 0; i < len; ++i) out[i] = z[i] - x[i];
      break;
  }
  store(a.target, a.out_dtype, out, begin, len);
}

// ---------------------------------------------------------------------------- per-sample sums

// Sums of one chunk into acc[width], in double.
template <typename F>
GF_CPU_KERNEL void sums_chunk(const SumsArgs& a, int64_t begin, int64_t len, double* acc) {
  alignas(64) F u[kChunk], v[kChunk];
  load(u, a.a, begin, len);
  load(v, a.b, begin, len);
  if (a.mode == SUMS_LOSS) {
    double s = 0.0;
#ifdef GENFAST_WITH_OPENMP
#pragma omp simd reduction(+ : s)
#endif
    for (int64_t i = 0; i < len; ++i) {
      const double d = double(u[i]) - double(v[i]);
      s += d * d;
    }
    acc[0] = s;
  } else {
    const F g = F(a.scale);
    double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
#ifdef GENFAST_WITH_OPENMP
#pragma omp simd reduction(+ : s0, s1, s2, s3)
#endif
    for (int64_t i = 0; i < len; ++i) {
      const double c = double(v[i]);
      const double cfg = double(u[i] + g * (v[i] - u[i]));
      s0 += c;
      s1 += c * c;
      s2 += cfg;
      s3 += cfg * cfg;
    }
    acc[0] = s0;
    acc[1] = s1;
    acc[2] = s2;
    acc[3] = s3;
  }
}

template <typename F>
void sums(const SumsArgs& a) {
  const int width = sums_width(a.mode);
  const int64_t samples = a.n / a.per_sample;
  const int64_t chunks = (a.per_sample + kChunk - 1) / kChunk;
  // Partial sums per chunk, added up in chunk order: deterministic for any thread count.
  std::vector<double> partial(size_t(samples * chunks * width), 0.0);
  for_each_chunk(a.n, a.per_sample, a.num_threads, [&](int64_t b, int64_t begin, int64_t len) {
    const int64_t chunk = (begin - b * a.per_sample) / kChunk;
    GF_CPU_DISPATCH(sums_chunk<F>(a, begin, len, partial.data() + (b * chunks + chunk) * width));
  });
  for (int64_t b = 0; b < samples; ++b)
    for (int k = 0; k < width; ++k) {
      double s = 0.0;
      for (int64_t c = 0; c < chunks; ++c) s += partial[size_t((b * chunks + c) * width + k)];
      a.out[b * width + k] = s;
    }
}

// ---------------------------------------------------------------------------------- combine

template <typename F>
GF_CPU_KERNEL void combine_chunk(const CombineArgs& a, int64_t b, int64_t begin, int64_t len) {
  alignas(64) F u[kChunk], v[kChunk];
  load(u, a.a, begin, len);
  load(v, a.b, begin, len);
  const F f = a.factor.ptr ? F(read_scalar(a.factor, b)) : F(1);
  const F alpha = F(a.alpha), beta = F(a.beta);
  for (int64_t i = 0; i < len; ++i) u[i] = f * (alpha * u[i] + beta * (v[i] - u[i]));
  store(a.out, a.out_dtype, u, begin, len);
  if (a.out2) {
    for (int64_t i = 0; i < len; ++i) u[i] = -u[i];
    store(a.out2, a.out2_dtype, u, begin, len);
  }
}

}  // namespace

void sampler_step_cpu(const StepArgs& a) {
  for_each_chunk(a.n, a.per_sample, a.num_threads, [&](int64_t b, int64_t begin, int64_t len) {
    if (a.compute_f64)
      GF_CPU_DISPATCH(step_chunk<double>(a, b, begin, len));
    else
      GF_CPU_DISPATCH(step_chunk<float>(a, b, begin, len));
  });
}

void add_noise_cpu(const NoiseArgs& a) {
  for_each_chunk(a.n, a.per_sample, a.num_threads, [&](int64_t b, int64_t begin, int64_t len) {
    if (a.compute_f64)
      GF_CPU_DISPATCH(noise_chunk<double>(a, b, begin, len));
    else
      GF_CPU_DISPATCH(noise_chunk<float>(a, b, begin, len));
  });
}

void per_sample_sums_cpu(const SumsArgs& a) {
  if (a.n == 0) return;
  const bool f64 = a.a.dtype == F64 || a.b.dtype == F64;
  if (f64)
    sums<double>(a);
  else
    sums<float>(a);
}

void combine_cpu(const CombineArgs& a) {
  for_each_chunk(a.n, a.per_sample, a.num_threads, [&](int64_t b, int64_t begin, int64_t len) {
    if (a.compute_f64)
      GF_CPU_DISPATCH(combine_chunk<double>(a, b, begin, len));
    else
      GF_CPU_DISPATCH(combine_chunk<float>(a, b, begin, len));
  });
}

void timestep_embedding_cpu(const EmbedArgs& a) {
  // diffusers get_timestep_embedding, in float32 with the same operation order.
  const int64_t half = a.dim / 2;
  const float log_period = -float(std::log(a.max_period));
  const float denominator = float(double(half) - a.downscale_freq_shift);
  const float scale = float(a.scale);
  std::vector<float> freqs(static_cast<size_t>(half));
  for (int64_t j = 0; j < half; ++j) freqs[size_t(j)] = std::exp(log_period * float(j) / denominator);
  std::vector<float> row(static_cast<size_t>(a.dim));
  for (int64_t r = 0; r < a.count; ++r) {
    const float t = a.timesteps.dtype == INT64_CODE ? float(static_cast<const int64_t*>(a.timesteps.ptr)[r])
                                                    : float(read_scalar(a.timesteps, r));
    for (int64_t j = 0; j < half; ++j) {
      const float arg = scale * (t * freqs[size_t(j)]);
      const float s = std::sin(arg), c = std::cos(arg);
      row[size_t(j)] = a.flip_sin_to_cos ? c : s;
      row[size_t(half + j)] = a.flip_sin_to_cos ? s : c;
    }
    if (a.dim % 2) row[size_t(a.dim - 1)] = 0.0f;
    store(a.out, a.out_dtype, row.data(), r * a.dim, a.dim);
  }
}

}  // namespace diffusion
}  // namespace genfast
