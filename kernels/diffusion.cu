// Diffusion CUDA kernels (see kernels/diffusion.h): memory-bound single passes.
// Each thread handles groups of 4 consecutive elements in a grid-stride loop, with one
// vector load per operand and group when every pointer is aligned to 4 elements of its own
// dtype (16 bytes for float32, 8 for 16-bit types, 32 for float64); scalar loads otherwise
// and on the tail. Indices are 64-bit. Operands carry their own dtype, converted in
// registers (the switch on a dtype code is uniform across the grid). Arithmetic in float.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <stdexcept>
#include <string>

#include "common.h"
#include "cuda_common.cuh"
#include "diffusion.h"

namespace genfast {
namespace diffusion {
namespace {

constexpr int kThreads = 256;
constexpr int kVec = 4;
constexpr int kSumsChunk = static_cast<int>(CUDA_SUMS_CHUNK);  // diffusion.h

constexpr const char* kFamily = "diffusion";

int itemsize(int dtype) { return dtype == F64 ? 8 : (dtype == F32 ? 4 : 2); }

bool aligned(const void* p, int dtype) {
  return p == nullptr || (reinterpret_cast<uintptr_t>(p) % uintptr_t(kVec * itemsize(dtype))) == 0;
}

unsigned grid_for(int64_t groups) {
  // Grid-stride: enough blocks to fill any current GPU several times, never more than needed.
  const int64_t blocks = (groups + kThreads - 1) / kThreads;
  const int64_t cap = cuda::grid_cap(65536);
  return unsigned(blocks < cap ? (blocks > 0 ? blocks : 1) : cap);
}

// ------------------------------------------------------------------------- loads and stores

__device__ __forceinline__ float load1(const Operand& o, int64_t i) {
  switch (o.dtype) {
    case F32: return __ldg(static_cast<const float*>(o.ptr) + i);
    case F16: return __half2float(__ldg(static_cast<const __half*>(o.ptr) + i));
    case BF16: return __bfloat162float(__ldg(static_cast<const __nv_bfloat16*>(o.ptr) + i));
    default: return float(__ldg(static_cast<const double*>(o.ptr) + i));
  }
}

// dst[k] = o[i0 + k] for k < 4 (0 beyond n); one vector load when `vec`.
__device__ __forceinline__ void load4(float (&dst)[kVec], const Operand& o, int64_t i0, int64_t n, bool vec) {
  if (vec) {
    switch (o.dtype) {
      case F32: {
        const float4 v = __ldg(reinterpret_cast<const float4*>(static_cast<const float*>(o.ptr) + i0));
        dst[0] = v.x;
        dst[1] = v.y;
        dst[2] = v.z;
        dst[3] = v.w;
        return;
      }
      case F16: {
        const uint2 raw = __ldg(reinterpret_cast<const uint2*>(static_cast<const __half*>(o.ptr) + i0));
        const __half2* h = reinterpret_cast<const __half2*>(&raw);
        const float2 a = __half22float2(h[0]), b = __half22float2(h[1]);
        dst[0] = a.x;
        dst[1] = a.y;
        dst[2] = b.x;
        dst[3] = b.y;
        return;
      }
      case BF16: {
        const uint2 raw = __ldg(reinterpret_cast<const uint2*>(static_cast<const __nv_bfloat16*>(o.ptr) + i0));
        const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
        const float2 a = __bfloat1622float2(h[0]), b = __bfloat1622float2(h[1]);
        dst[0] = a.x;
        dst[1] = a.y;
        dst[2] = b.x;
        dst[3] = b.y;
        return;
      }
      default: {
        const double2* p = reinterpret_cast<const double2*>(static_cast<const double*>(o.ptr) + i0);
        const double2 a = __ldg(p), b = __ldg(p + 1);
        dst[0] = float(a.x);
        dst[1] = float(a.y);
        dst[2] = float(b.x);
        dst[3] = float(b.y);
        return;
      }
    }
  }
#pragma unroll
  for (int k = 0; k < kVec; ++k) dst[k] = i0 + k < n ? load1(o, i0 + k) : 0.0f;
}

__device__ __forceinline__ void store4(void* p, int dtype, const float (&src)[kVec], int64_t i0, int64_t n, bool vec) {
  switch (dtype) {
    case F32: {
      float* d = static_cast<float*>(p) + i0;
      if (vec) {
        *reinterpret_cast<float4*>(d) = make_float4(src[0], src[1], src[2], src[3]);
        return;
      }
#pragma unroll
      for (int k = 0; k < kVec; ++k)
        if (i0 + k < n) d[k] = src[k];
      return;
    }
    case F16: {
      __half* d = static_cast<__half*>(p) + i0;
      if (vec) {
        __half2 h[2] = {__floats2half2_rn(src[0], src[1]), __floats2half2_rn(src[2], src[3])};
        *reinterpret_cast<uint2*>(d) = *reinterpret_cast<const uint2*>(h);
        return;
      }
#pragma unroll
      for (int k = 0; k < kVec; ++k)
        if (i0 + k < n) d[k] = __float2half_rn(src[k]);
      return;
    }
    case BF16: {
      __nv_bfloat16* d = static_cast<__nv_bfloat16*>(p) + i0;
      if (vec) {
        __nv_bfloat162 h[2] = {__floats2bfloat162_rn(src[0], src[1]), __floats2bfloat162_rn(src[2], src[3])};
        *reinterpret_cast<uint2*>(d) = *reinterpret_cast<const uint2*>(h);
        return;
      }
#pragma unroll
      for (int k = 0; k < kVec; ++k)
        if (i0 + k < n) d[k] = __float2bfloat16_rn(src[k]);
      return;
    }
    default: {
      double* d = static_cast<double*>(p) + i0;
      if (vec) {
        reinterpret_cast<double2*>(d)[0] = make_double2(src[0], src[1]);
        reinterpret_cast<double2*>(d)[1] = make_double2(src[2], src[3]);
        return;
      }
#pragma unroll
      for (int k = 0; k < kVec; ++k)
        if (i0 + k < n) d[k] = src[k];
      return;
    }
  }
}

// Box-Muller. The square root is x * rsqrtf(x) (within 3 ulp; Triton's tl.sqrt is approximate
// too): sqrtf's IEEE slow path is a subroutine call, and ptxas spilled the registers live across
// those calls (4-24 B of stack in add_noise / sampler_step). x = -2 ln(u1) is in [0, 176].
// Not inlined: inlined into sampler_step_kernel, logf's code made ptxas spill 16 B of live
// registers on sm_90a (a call costs little beside Philox, a log and a cospi per element). The
// host-compiled emulation (tests/cuda_emulation) has no __noinline__ and needs none.
#ifdef GENFAST_CUDA_EMULATION
#define GF_NOISE_NOINLINE
#else
#define GF_NOISE_NOINLINE __noinline__
#endif
__device__ GF_NOISE_NOINLINE float normal_noise(uint64_t seed, int64_t index) {
  float u1, u2;
  philox_uniforms(seed, uint64_t(index), u1, u2);
  const float x = -2.0f * logf(u1);
  return (x > 0.0f ? x * rsqrtf(x) : 0.0f) * cospif(2.0f * u2);
}

// Walks the samples of the 4 elements of a group: sample b of element i0 + k, with one
// division per group.
struct SampleWalk {
  int64_t b, r, per_sample;
  __device__ SampleWalk(int64_t i0, int64_t per_sample_) : per_sample(per_sample_) {
    b = i0 / per_sample;
    r = i0 - b * per_sample;
  }
  __device__ bool next() {  // true when the next element starts a new sample
    if (++r == per_sample) {
      r = 0;
      ++b;
      return true;
    }
    return false;
  }
};

// --------------------------------------------------------------------------- sampler_step

__device__ __forceinline__ void load_row(float (&c)[NUM_COLS], const StepArgs& a, int64_t b) {
#pragma unroll
  for (int k = 0; k < 13; ++k) c[k] = load1(a.coefs, b * a.coef_stride + k);
}

__global__ void __launch_bounds__(kThreads) sampler_step_kernel(const StepArgs a, bool vec) {
  const int64_t groups = (a.n + kVec - 1) / kVec;
  const bool has_clamp = a.clamp.ptr != nullptr || a.clamp_value >= 0;
  for (int64_t g = int64_t(blockIdx.x) * kThreads + threadIdx.x; g < groups; g += int64_t(gridDim.x) * kThreads) {
    const int64_t i0 = g * kVec;
    const bool full = vec && i0 + kVec <= a.n;
    float x[kVec], m[kVec], t[kVec], prev[kVec], aux[kVec];
    load4(x, a.x, i0, a.n, full);
    load4(m, a.m, i0, a.n, full);
    if (a.m_uncond.ptr) {
      load4(t, a.m_uncond, i0, a.n, full);
      const float gs = float(a.guidance_scale);
#pragma unroll
      for (int k = 0; k < kVec; ++k) m[k] = t[k] + gs * (m[k] - t[k]);
    }
    float h1[kVec], h2[kVec], z[kVec];
    if (a.h1.ptr) load4(h1, a.h1, i0, a.n, full);
    if (a.h2.ptr) load4(h2, a.h2, i0, a.n, full);
    if (a.z.ptr) load4(z, a.z, i0, a.n, full);
    SampleWalk walk(i0, a.per_sample);
    float c[NUM_COLS];
    load_row(c, a, walk.b);
    float r = a.clamp.ptr ? load1(a.clamp, walk.b) : float(a.clamp_value);
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      if (k > 0 && walk.next() && i0 + k < a.n) {  // a new sample inside the group
        load_row(c, a, walk.b);
        if (a.clamp.ptr) r = load1(a.clamp, walk.b);
      }
      float x0 = c[X0_FROM_SAMPLE] * x[k] + c[X0_FROM_MODEL] * m[k];
      if (has_clamp) {
        x0 = x0 < -r ? -r : (x0 > r ? r : x0);  // NaN propagates, like torch.clamp
        // __fdividef (2 ulp; r is a clamp threshold, far below its 2^126 limit): an IEEE division's
        // slow path is a subroutine call, and ptxas spilled 24 B of live registers around the calls.
        if (a.x0_rescale) x0 = __fdividef(x0, r);
      }
      float p = c[PREV_X0] * x0 + c[PREV_SAMPLE] * x[k] + c[PREV_MODEL] * m[k];
      float q = c[AUX_X0] * x0 + c[AUX_SAMPLE] * x[k] + c[AUX_MODEL] * m[k];
      if (a.h1.ptr) {
        p += c[PREV_HIST1] * h1[k];
        q += c[AUX_HIST1] * h1[k];
      }
      if (a.h2.ptr) {
        p += c[PREV_HIST2] * h2[k];
        q += c[AUX_HIST2] * h2[k];
      }
      if (a.z.ptr)
        p += c[PREV_NOISE] * z[k];
      else if (a.has_seed && i0 + k < a.n)
        p += c[PREV_NOISE] * normal_noise(a.seed, i0 + k);
      prev[k] = p;
      aux[k] = q;
    }
    store4(a.prev, a.prev_dtype, prev, i0, a.n, full);
    if (a.aux) store4(a.aux, a.aux_dtype, aux, i0, a.n, full);
  }
}

// ------------------------------------------------------------------------------ add_noise

__global__ void __launch_bounds__(kThreads) add_noise_kernel(const NoiseArgs a, bool vec) {
  const int64_t groups = (a.n + kVec - 1) / kVec;
  for (int64_t g = int64_t(blockIdx.x) * kThreads + threadIdx.x; g < groups; g += int64_t(gridDim.x) * kThreads) {
    const int64_t i0 = g * kVec;
    const bool full = vec && i0 + kVec <= a.n;
    float x[kVec], z[kVec], noisy[kVec], tgt[kVec];
    load4(x, a.x0, i0, a.n, full);
    if (a.noise.ptr)
      load4(z, a.noise, i0, a.n, full);
    else
#pragma unroll
      for (int k = 0; k < kVec; ++k) z[k] = i0 + k < a.n ? normal_noise(a.seed, i0 + k) : 0.0f;
    SampleWalk walk(i0, a.per_sample);
    float sa = 0.0f, sn = 0.0f;
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      if (k == 0 || walk.next()) {
        int64_t step = walk.b * a.per_sample < a.n ? __ldg(a.timesteps + walk.b) : 0;
        step = step < 0 ? 0 : (step >= a.table_len ? a.table_len - 1 : step);  // host-validated when free
        sa = load1(a.signal, step);
        sn = load1(a.noise_scale, step);
      }
      noisy[k] = sa * x[k] + sn * z[k];
      switch (a.target_kind) {
        case TARGET_EPSILON: tgt[k] = z[k]; break;
        case TARGET_V: tgt[k] = sa * z[k] - sn * x[k]; break;
        case TARGET_SAMPLE: tgt[k] = x[k]; break;
        default: tgt[k] = z[k] - x[k]; break;
      }
    }
    store4(a.noisy, a.out_dtype, noisy, i0, a.n, full);
    if (a.target_kind != TARGET_NONE) store4(a.target, a.out_dtype, tgt, i0, a.n, full);
  }
}

// -------------------------------------------------------------------------- per-sample sums

template <int W>
__device__ __forceinline__ void block_sum_store(double (&acc)[W], double* out) {
  __shared__ double partial[kThreads / 32][4];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int k = 0; k < W; ++k) {
    double v = acc[k];
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
    if (lane == 0) partial[warp][k] = v;
  }
  __syncthreads();
  if (threadIdx.x < W) {
    double s = 0.0;
    for (int w = 0; w < kThreads / 32; ++w) s += partial[w][threadIdx.x];
    out[threadIdx.x] = s;
  }
}

// Block (chunk, b) sums elements [chunk * kSumsChunk, +kSumsChunk) of sample b into
// out[(b * chunks + chunk) * W + k]; `vec`: pointers aligned and per_sample % 4 == 0.
template <int MODE>
__global__ void __launch_bounds__(kThreads) sums_kernel(const SumsArgs a, bool vec) {
  constexpr int W = MODE == SUMS_LOSS ? 1 : 4;
  const int64_t b = blockIdx.y, chunk = blockIdx.x;
  const int64_t begin = b * a.per_sample + chunk * kSumsChunk;
  const int64_t end = min(begin + int64_t(kSumsChunk), (b + 1) * a.per_sample);
  const float g = float(a.scale);
  double acc[W];
#pragma unroll
  for (int k = 0; k < W; ++k) acc[k] = 0.0;
  for (int64_t i0 = begin + int64_t(threadIdx.x) * kVec; i0 < end; i0 += int64_t(kThreads) * kVec) {
    const bool full = vec && i0 + kVec <= end;
    float u[kVec], v[kVec];
    load4(u, a.a, i0, end, full);
    load4(v, a.b, i0, end, full);
    // Per-group float partials, added into double accumulators.
    float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      if (MODE == SUMS_LOSS) {
        const float d = u[k] - v[k];
        s0 += d * d;
      } else {
        const float cfg = i0 + k < end ? u[k] + g * (v[k] - u[k]) : 0.0f;
        s0 += v[k];
        s1 += v[k] * v[k];
        s2 += cfg;
        s3 += cfg * cfg;
      }
    }
    acc[0] += s0;
    if (MODE != SUMS_LOSS) {
      acc[1] += s1;
      acc[2] += s2;
      acc[3] += s3;
    }
  }
  block_sum_store<W>(acc, a.out + (b * a.chunks + chunk) * W);
}

// -------------------------------------------------------------------------------- combine

__global__ void __launch_bounds__(kThreads) combine_kernel(const CombineArgs a, bool vec) {
  const int64_t groups = (a.n + kVec - 1) / kVec;
  const float alpha = float(a.alpha), beta = float(a.beta);
  for (int64_t g = int64_t(blockIdx.x) * kThreads + threadIdx.x; g < groups; g += int64_t(gridDim.x) * kThreads) {
    const int64_t i0 = g * kVec;
    const bool full = vec && i0 + kVec <= a.n;
    float u[kVec], v[kVec], out[kVec];
    load4(u, a.a, i0, a.n, full);
    load4(v, a.b, i0, a.n, full);
    SampleWalk walk(i0, a.per_sample);
    float f = a.factor.ptr && i0 < a.n ? load1(a.factor, walk.b) : 1.0f;
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      if (k > 0 && walk.next() && a.factor.ptr && i0 + k < a.n) f = load1(a.factor, walk.b);
      out[k] = f * (alpha * u[k] + beta * (v[k] - u[k]));
    }
    store4(a.out, a.out_dtype, out, i0, a.n, full);
    if (a.out2) {
#pragma unroll
      for (int k = 0; k < kVec; ++k) out[k] = -out[k];
      store4(a.out2, a.out2_dtype, out, i0, a.n, full);
    }
  }
}

// ----------------------------------------------------------------------- timestep embedding

// sinf / cosf of a float argument without their slow path for large arguments (Payne-Hanek
// reduction through a local array: the kernel's 32-byte stack frame): arg / pi is formed and
// reduced modulo 2 in double (exact for |arg| < 2^40 or so), then sinpif / cospif, whose
// reduction is exact. The float rounding of the reduced turn adds at most pi * 2^-25.
__device__ __forceinline__ float sin_or_cos(float arg, bool cosine) {
  const double half_turns = double(arg) * 0.318309886183790671537767526745;  // arg / pi
  const float r = float(half_turns - 2.0 * rint(0.5 * half_turns));          // in [-1, 1]
  return cosine ? cospif(r) : sinpif(r);
}

__global__ void __launch_bounds__(kThreads) embedding_kernel(const EmbedArgs a, float log_period, float denominator) {
  const int64_t total = a.count * a.dim, half = a.dim / 2;
  const float scale = float(a.scale);
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < total; i += int64_t(gridDim.x) * kThreads) {
    const int64_t row = i / a.dim, col = i - row * a.dim;
    const int64_t j = col < half ? col : col - half;
    // diffusers' float32 order: exp(-ln(P) * j / (half - shift)), then (t * freq) * scale.
    const float freq = expf(log_period * float(j) / denominator);
    const float t = a.timesteps.dtype == INT64_CODE ? float(__ldg(static_cast<const long long*>(a.timesteps.ptr) + row))
                                                    : load1(a.timesteps, row);
    const float arg = scale * (t * freq);
    float value = 0.0f;
    if (col < half)
      value = sin_or_cos(arg, a.flip_sin_to_cos);
    else if (col < 2 * half)
      value = sin_or_cos(arg, !a.flip_sin_to_cos);
    const float v[kVec] = {value, 0.0f, 0.0f, 0.0f};
    store4(a.out, a.out_dtype, v, i, i + 1, false);
  }
}

}  // namespace

void sampler_step_cuda(const StepArgs& a) {
  if (a.n == 0) return;
#ifndef GENFAST_CUDA_EMULATION
  cuda::DeviceGuard guard(a.device);
#endif
  const bool vec = aligned(a.prev, a.prev_dtype) && aligned(a.aux, a.aux_dtype) && aligned(a.x.ptr, a.x.dtype) &&
                   aligned(a.m.ptr, a.m.dtype) && aligned(a.m_uncond.ptr, a.m_uncond.dtype) &&
                   aligned(a.h1.ptr, a.h1.dtype) && aligned(a.h2.ptr, a.h2.dtype) && aligned(a.z.ptr, a.z.dtype);
  cuda::launch_kernel(sampler_step_kernel, grid_for((a.n + kVec - 1) / kVec), kThreads, 0,
                      reinterpret_cast<cudaStream_t>(a.stream), kFamily, "sampler_step launch", a, vec);
}

void add_noise_cuda(const NoiseArgs& a) {
  if (a.n == 0) return;
#ifndef GENFAST_CUDA_EMULATION
  cuda::DeviceGuard guard(a.device);
#endif
  const bool vec = aligned(a.noisy, a.out_dtype) && aligned(a.target, a.out_dtype) && aligned(a.x0.ptr, a.x0.dtype) &&
                   aligned(a.noise.ptr, a.noise.dtype);
  cuda::launch_kernel(add_noise_kernel, grid_for((a.n + kVec - 1) / kVec), kThreads, 0,
                      reinterpret_cast<cudaStream_t>(a.stream), kFamily, "add_noise launch", a, vec);
}

void per_sample_sums_cuda(const SumsArgs& a) {
  if (a.n == 0) return;
#ifndef GENFAST_CUDA_EMULATION
  cuda::DeviceGuard guard(a.device);
#endif
  const int64_t samples = a.n / a.per_sample;
  const int64_t chunks = (a.per_sample + kSumsChunk - 1) / kSumsChunk;
  if (chunks != a.chunks) throw std::invalid_argument("per_sample_sums (CUDA): chunk count mismatch");
  if (samples > 65535 || chunks > 0x7fffffffLL) throw std::invalid_argument("per_sample_sums (CUDA): grid too large");
  const bool vec = a.per_sample % kVec == 0 && aligned(a.a.ptr, a.a.dtype) && aligned(a.b.ptr, a.b.dtype);
  const dim3 grid{static_cast<unsigned>(chunks), static_cast<unsigned>(samples), 1u};
  auto stream = reinterpret_cast<cudaStream_t>(a.stream);
  cuda::launch_kernel(a.mode == SUMS_LOSS ? sums_kernel<SUMS_LOSS> : sums_kernel<SUMS_CFG>, grid, kThreads, 0, stream,
                      kFamily, "per_sample_sums launch", a, vec);
}

void combine_cuda(const CombineArgs& a) {
  if (a.n == 0) return;
#ifndef GENFAST_CUDA_EMULATION
  cuda::DeviceGuard guard(a.device);
#endif
  const bool vec = aligned(a.out, a.out_dtype) && aligned(a.out2, a.out2_dtype) && aligned(a.a.ptr, a.a.dtype) &&
                   aligned(a.b.ptr, a.b.dtype);
  cuda::launch_kernel(combine_kernel, grid_for((a.n + kVec - 1) / kVec), kThreads, 0,
                      reinterpret_cast<cudaStream_t>(a.stream), kFamily, "combine launch", a, vec);
}

void timestep_embedding_cuda(const EmbedArgs& a) {
  if (a.count == 0) return;
#ifndef GENFAST_CUDA_EMULATION
  cuda::DeviceGuard guard(a.device);
#endif
  const float log_period = -float(std::log(a.max_period));
  const float denominator = float(double(a.dim / 2) - a.downscale_freq_shift);
  cuda::launch_kernel(embedding_kernel, grid_for(a.count * a.dim), kThreads, 0,
                      reinterpret_cast<cudaStream_t>(a.stream), kFamily, "timestep_embedding launch", a, log_period,
                      denominator);
}

}  // namespace diffusion
}  // namespace genfast
