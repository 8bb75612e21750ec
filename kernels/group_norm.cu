// GroupNorm (+ SiLU) CUDA kernels, forward and backward, NCHW and NHWC (see group_norm.h and
// genfast/ops/group_norm.py for the algorithm). No libtorch: raw pointers, sizes, a stream.
//
// Forward, three launches:
//   1. partial moments: (mean, M2) of x - shift (shift: one element of the group) for pieces
//      of every group, merged inside a block with Chan's formula (corrected two-pass per
//      16-byte vector, or Welford per element):
//        NCHW: a group is one contiguous run of D * S elements; grid (chunk, n * G)
//        NHWC: block (32 x 8): x = channels (a 16-byte vector each), y = rows; grid
//              (row chunk, channel block, n); one partial per (n, c, row chunk)
//   2. finalize: one block per (n, group) merges its partials (shifted sums) -> mean, rstd
//   3. normalize: elementwise, 16-byte vectors, y = (x - mean) * rstd * w + b, SiLU
// Backward, three launches (+ a memset): per-(n, c) sums A = sum(dz xhat), B = sum(dz)
// (block reduction + atomicAdd), per-(n, group) coefficients, elementwise dx.
// Statistics in float; indices in 64 bits where a tensor can pass 2^31 elements.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "common.h"
#include "cuda_common.cuh"
#include "group_norm.h"

namespace genfast {
namespace group_norm {
namespace {

using cuda::Cvt;
constexpr const char* kFamily = "group_norm";

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRowsNHWC = 64;  // rows per block of the NHWC reductions
constexpr int kLanesY = 8;     // row lanes of the NHWC blocks (blockDim = 32 x 8)

template <typename T>
constexpr int vec_of() {
  return 16 / int(sizeof(T));
}

struct Plan {
  int64_t chunk;  // elements (NCHW, of the flat group) or rows (NHWC) per partial
  int64_t len;    // what the chunks split: D * S (NCHW) or S (NHWC)
  int64_t K;      // chunks
  int64_t partials_per_group;
  int64_t partials;
};

Plan make_plan(const Shape& s) {
  const int vec = s.dtype == F32 ? 4 : 8;
  const int64_t D = s.C / s.G;
  Plan p;
  if (!s.channels_last) {
    p.len = D * s.S;
    p.chunk = int64_t(kThreads) * vec * 2;
    p.K = (p.len + p.chunk - 1) / p.chunk;
    p.partials_per_group = p.K;
    p.partials = s.N * s.G * p.K;
  } else {
    p.len = s.S;
    p.chunk = kRowsNHWC;
    p.K = (s.S + p.chunk - 1) / p.chunk;
    p.partials_per_group = D * p.K;
    p.partials = s.N * s.C * p.K;
  }
  return p;
}

struct Moments {
  float count, mean, m2;
};

__device__ __forceinline__ Moments merge(Moments a, Moments b) {
  if (b.count == 0.f) return a;
  if (a.count == 0.f) return b;
  const float n = a.count + b.count, delta = b.mean - a.mean, fb = b.count / n;
  return {n, a.mean + delta * fb, a.m2 + b.m2 + delta * delta * a.count * fb};
}

__device__ __forceinline__ Moments warp_merge(Moments m) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    Moments o;
    o.count = __shfl_down_sync(0xffffffffu, m.count, offset);
    o.mean = __shfl_down_sync(0xffffffffu, m.mean, offset);
    o.m2 = __shfl_down_sync(0xffffffffu, m.m2, offset);
    m = merge(m, o);
  }
  return m;
}

// Merge over a 1-D block of kThreads; the result is valid in thread 0.
__device__ Moments block_merge(Moments m) {
  __shared__ Moments warps[kWarps];
  m = warp_merge(m);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warps[warp] = m;
  __syncthreads();
  if (warp == 0) {
    m = lane < kWarps ? warps[lane] : Moments{0.f, 0.f, 0.f};
    m = warp_merge(m);
  }
  return m;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over a 1-D block of kThreads; valid in thread 0.
__device__ float block_sum(float v) {
  __shared__ float warps[kWarps];
  v = warp_sum(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // the shared array may still be read by a previous call
  if (lane == 0) warps[warp] = v;
  __syncthreads();
  if (warp == 0) v = warp_sum(lane < kWarps ? warps[lane] : 0.f);
  return v;
}

template <typename T, int VEC>
__device__ __forceinline__ void load_vec(float (&dst)[VEC], const T* src) {
  alignas(16) T tmp[VEC];
  *reinterpret_cast<uint4*>(tmp) = __ldg(reinterpret_cast<const uint4*>(src));
#pragma unroll
  for (int k = 0; k < VEC; ++k) dst[k] = Cvt<T>::to(tmp[k]);
}

__device__ __forceinline__ float sigmoidf_(float z) { return 1.f / (1.f + __expf(-z)); }

// ----------------------------------------------------------------------------- forward

// NCHW: 1-D grid of N * G * K blocks; block (group, k) reduces chunk k of the contiguous group.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    moments_nchw(const T* __restrict__ x, float* __restrict__ pmean, float* __restrict__ pm2, int64_t len,
                 int64_t chunk, int64_t K, bool vector_ok) {
  constexpr int VEC = vec_of<T>();
  const int64_t group = int64_t(blockIdx.x) / K, k = int64_t(blockIdx.x) % K;
  const int64_t begin = k * chunk, end = min(len, begin + chunk);
  const T* base = x + group * len;
  const float shift = Cvt<T>::to(base[0]);  // see finalize: moments of x - shift
  Moments m{0.f, 0.f, 0.f};
  if (vector_ok) {  // len, chunk multiples of VEC and x 16-byte aligned
    for (int64_t i = begin + int64_t(threadIdx.x) * VEC; i < end; i += int64_t(kThreads) * VEC) {
      float v[VEC];
      load_vec<T, VEC>(v, base + i);
      float s = 0.f;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        v[j] -= shift;
        s += v[j];
      }
      const float mean0 = s * (1.f / VEC);
      // Corrected two-pass: the deviations' sum repairs the rounding of the first mean.
      float d1 = 0.f, d2 = 0.f;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float d = v[j] - mean0;
        d1 += d;
        d2 += d * d;
      }
      m = merge(m, Moments{float(VEC), mean0 + d1 * (1.f / VEC), fmaxf(d2 - d1 * d1 * (1.f / VEC), 0.f)});
    }
  } else {
    for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
      const float v = Cvt<T>::to(base[i]) - shift;
      m.count += 1.f;
      const float delta = v - m.mean;
      m.mean += delta / m.count;
      m.m2 += delta * (v - m.mean);
    }
  }
  m = block_merge(m);
  if (threadIdx.x == 0) {
    pmean[group * K + k] = m.mean;
    pm2[group * K + k] = m.m2;
  }
}

// NHWC: block (32, kLanesY), grid (K, channel blocks, N). Thread x owns VEC channels.
template <typename T>
__global__ void __launch_bounds__(32 * kLanesY)
    moments_nhwc(const T* __restrict__ x, float* __restrict__ pmean, float* __restrict__ pm2, int64_t S, int64_t C,
                 int64_t D, bool vector_ok) {
  constexpr int VEC = vec_of<T>();
  constexpr int WIDTH = 32 * VEC;
  __shared__ float sh_mean[kLanesY][WIDTH], sh_m2[kLanesY][WIDTH];
  __shared__ float sh_count[kLanesY];
  const int64_t n = blockIdx.z, k = blockIdx.x, K = gridDim.x;
  const int64_t c0 = int64_t(blockIdx.y) * WIDTH + int64_t(threadIdx.x) * VEC;
  const int64_t r_begin = k * kRowsNHWC, r_end = min(S, r_begin + kRowsNHWC);
  float mean[VEC], m2[VEC], shift[VEC], count = 0.f;
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    mean[j] = m2[j] = 0.f;
    const int64_t c = c0 + j < C ? c0 + j : C - 1;
    shift[j] = Cvt<T>::to(x[n * S * C + (c / D) * D]);  // see finalize: moments of x - shift
  }
  for (int64_t r = r_begin + threadIdx.y; r < r_end; r += kLanesY) {
    const T* row = x + (n * S + r) * C;
    float v[VEC];
    if (vector_ok && c0 + VEC <= C) {
      load_vec<T, VEC>(v, row + c0);
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) v[j] = c0 + j < C ? Cvt<T>::to(row[c0 + j]) : 0.f;
    }
    count += 1.f;
    const float inv = 1.f / count;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {  // Welford
      const float value = v[j] - shift[j];
      const float delta = value - mean[j];
      mean[j] += delta * inv;
      m2[j] += delta * (value - mean[j]);
    }
  }
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    sh_mean[threadIdx.y][threadIdx.x * VEC + j] = mean[j];
    sh_m2[threadIdx.y][threadIdx.x * VEC + j] = m2[j];
  }
  if (threadIdx.x == 0) sh_count[threadIdx.y] = count;
  __syncthreads();
  // Each thread of the block merges one channel over the row lanes.
  for (int t = threadIdx.y * 32 + threadIdx.x; t < WIDTH; t += 32 * kLanesY) {
    const int64_t c = int64_t(blockIdx.y) * WIDTH + t;
    if (c >= C) continue;
    Moments m{0.f, 0.f, 0.f};
    for (int y = 0; y < kLanesY; ++y) m = merge(m, Moments{sh_count[y], sh_mean[y][t], sh_m2[y][t]});
    pmean[(n * C + c) * K + k] = m.mean;
    pm2[(n * C + c) * K + k] = m.m2;
  }
}

// One block per (n, group): merge its P partials, contiguous from ng * P. Partial p covers
// min(chunk, len - (p % K) * chunk) elements (NCHW: of the group; NHWC: rows of one channel).
// The partials are moments of x - shift, shift = x[n, first channel of the group, s = 0]:
// values of the size of the data's spread, so float32 partial means lose nothing to a large mean.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    finalize(const T* __restrict__ x, const float* __restrict__ pmean, const float* __restrict__ pm2,
             float* __restrict__ mean_out, float* __restrict__ rstd_out, int64_t P, int64_t K, int64_t chunk,
             int64_t len, float M, float eps, int64_t G, int64_t D, int64_t S, int64_t C, bool channels_last) {
  const int64_t ng = blockIdx.x, n = ng / G, g = ng % G;
  const float* pmv = pmean + ng * P;
  const float* pm2v = pm2 + ng * P;
  const float shift = Cvt<T>::to(x[channels_last ? n * S * C + g * D : ng * D * S]);
  float acc = 0.f;
  for (int64_t p = threadIdx.x; p < P; p += kThreads) acc += float(min(chunk, len - (p % K) * chunk)) * pmv[p];
  __shared__ float mean_sh;
  acc = block_sum(acc);
  if (threadIdx.x == 0) mean_sh = acc / M;
  __syncthreads();
  const float mean = mean_sh;
  acc = 0.f;
  for (int64_t p = threadIdx.x; p < P; p += kThreads) {
    const float d = pmv[p] - mean;
    acc += pm2v[p] + float(min(chunk, len - (p % K) * chunk)) * d * d;
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) {
    mean_out[ng] = shift + mean;
    rstd_out[ng] = rsqrtf(acc / M + eps);
  }
}

// Position of element i: channel c and sample n, walked element by element.
template <typename Index>
struct Walker {
  Index n, c, r;  // r: position within the run of equal channel (NCHW) or the row (NHWC)
  __device__ __forceinline__ void start(Index i, Index C, Index S, bool channels_last) {
    if (channels_last) {
      c = i % C;
      const Index q = i / C;
      n = q / S;
      r = q - n * S;
    } else {
      r = i % S;
      const Index q = i / S;
      c = q % C;
      n = q / C;
    }
  }
  __device__ __forceinline__ void next(Index C, Index S, bool channels_last) {
    if (channels_last) {
      if (++c == C) {
        c = 0;
        if (++r == S) {
          r = 0;
          ++n;
        }
      }
    } else {
      if (++r == S) {
        r = 0;
        if (++c == C) {
          c = 0;
          ++n;
        }
      }
    }
  }
};

template <typename T>
struct ElementArgs {
  const T* x;
  const T* dy;
  T* out;
  const T* w;
  const T* b;
  const float* mean;
  const float* rstd;
  const float* coef;  // backward: (sum_g w A, sum_g w B) per (n, g)
  int64_t total, C, S, G, D;
  float inv_m;
  bool channels_last, aligned;
};

// Forward (BACKWARD = false): y = silu?((x - mean) * rstd * w + b).
// Backward: dx = rstd * (w dz - (sum_wb + xhat * sum_wa) / M).
template <typename T, bool SILU, bool BACKWARD, typename Index>
__global__ void __launch_bounds__(kThreads) elementwise(ElementArgs<T> p) {
  constexpr int VEC = vec_of<T>();
  const Index total = Index(p.total);
  const Index i0 = (Index(blockIdx.x) * kThreads + Index(threadIdx.x)) * VEC;
  if (i0 >= total) return;
  const bool full = p.aligned && i0 + VEC <= total;
  float xs[VEC], dys[VEC];
  if (full) {
    load_vec<T, VEC>(xs, p.x + i0);
    if (BACKWARD) load_vec<T, VEC>(dys, p.dy + i0);
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      xs[k] = i0 + k < total ? Cvt<T>::to(p.x[i0 + k]) : 0.f;
      if (BACKWARD) dys[k] = i0 + k < total ? Cvt<T>::to(p.dy[i0 + k]) : 0.f;
    }
  }
  Walker<Index> at;
  const Index C = Index(p.C), S = Index(p.S), G = Index(p.G), D = Index(p.D);
  at.start(i0, C, S, p.channels_last);
  alignas(16) T outs[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    // Past the end (the tail vector) the walker's sample is N: its statistics do not exist.
    if (!full && i0 + k >= total) break;
    const Index stat = at.n * G + at.c / D;
    const float mean = __ldg(p.mean + stat), rstd = __ldg(p.rstd + stat);
    const float w = p.w ? Cvt<T>::to(__ldg(p.w + at.c)) : 1.f;
    const float b = p.b ? Cvt<T>::to(__ldg(p.b + at.c)) : 0.f;
    const float xhat = (xs[k] - mean) * rstd;
    float result;
    if (!BACKWARD) {
      result = xhat * w + b;
      if (SILU) result = result * sigmoidf_(result);
    } else {
      float dz = dys[k];
      if (SILU) {
        const float z = xhat * w + b, s = sigmoidf_(z);
        dz *= s * (1.f + z * (1.f - s));
      }
      const float sum_wa = __ldg(p.coef + 2 * stat), sum_wb = __ldg(p.coef + 2 * stat + 1);
      result = rstd * (w * dz - (sum_wb + xhat * sum_wa) * p.inv_m);
    }
    outs[k] = Cvt<T>::from(result);
    at.next(C, S, p.channels_last);
  }
  if (full) {
    *reinterpret_cast<uint4*>(p.out + i0) = *reinterpret_cast<const uint4*>(outs);
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k)
      if (i0 + k < total) p.out[i0 + k] = outs[k];
  }
}

// ----------------------------------------------------------------------------- backward

template <bool SILU>
__device__ __forceinline__ void accumulate(float x, float dy, float mean, float rstd, float w, float b, float& a,
                                           float& bsum) {
  const float xhat = (x - mean) * rstd;
  float dz = dy;
  if (SILU) {
    const float z = xhat * w + b, s = sigmoidf_(z);
    dz *= s * (1.f + z * (1.f - s));
  }
  a += dz * xhat;
  bsum += dz;
}

// NCHW: grid (K, C, N); block sums chunk k of the row (n, c) and adds into sums.
template <typename T, bool SILU>
__global__ void __launch_bounds__(kThreads)
    grad_sums_nchw(const T* __restrict__ x, const T* __restrict__ dy, const float* __restrict__ mean_in,
                   const float* __restrict__ rstd_in, const T* __restrict__ w, const T* __restrict__ b,
                   float* __restrict__ sums, int64_t N, int64_t S, int64_t G, int64_t D, int64_t chunk,
                   bool vector_ok) {
  constexpr int VEC = vec_of<T>();
  const int64_t n = blockIdx.z, c = blockIdx.y, C = int64_t(gridDim.y);
  const int64_t begin = int64_t(blockIdx.x) * chunk, end = min(S, begin + chunk);
  const int64_t row = (n * C + c) * S;
  const float mean = mean_in[n * G + c / D], rstd = rstd_in[n * G + c / D];
  const float wc = w ? Cvt<T>::to(w[c]) : 1.f, bc = b ? Cvt<T>::to(b[c]) : 0.f;
  float a = 0.f, bs = 0.f;
  if (vector_ok) {
    for (int64_t i = begin + int64_t(threadIdx.x) * VEC; i < end; i += int64_t(kThreads) * VEC) {
      float xv[VEC], dv[VEC];
      load_vec<T, VEC>(xv, x + row + i);
      load_vec<T, VEC>(dv, dy + row + i);
#pragma unroll
      for (int j = 0; j < VEC; ++j) accumulate<SILU>(xv[j], dv[j], mean, rstd, wc, bc, a, bs);
    }
  } else {
    for (int64_t i = begin + threadIdx.x; i < end; i += kThreads)
      accumulate<SILU>(Cvt<T>::to(x[row + i]), Cvt<T>::to(dy[row + i]), mean, rstd, wc, bc, a, bs);
  }
  a = block_sum(a);
  bs = block_sum(bs);
  if (threadIdx.x == 0) {
    atomicAdd(sums + n * C + c, a);
    atomicAdd(sums + N * C + n * C + c, bs);
  }
}

// NHWC: block (32, kLanesY), grid (K, channel blocks, N).
template <typename T, bool SILU>
__global__ void __launch_bounds__(32 * kLanesY)
    grad_sums_nhwc(const T* __restrict__ x, const T* __restrict__ dy, const float* __restrict__ mean_in,
                   const float* __restrict__ rstd_in, const T* __restrict__ w, const T* __restrict__ b,
                   float* __restrict__ sums, int64_t N, int64_t S, int64_t C, int64_t G, int64_t D, bool vector_ok) {
  constexpr int VEC = vec_of<T>();
  constexpr int WIDTH = 32 * VEC;
  __shared__ float sh_a[kLanesY][WIDTH], sh_b[kLanesY][WIDTH];
  const int64_t n = blockIdx.z;
  const int64_t c0 = int64_t(blockIdx.y) * WIDTH + int64_t(threadIdx.x) * VEC;
  const int64_t r_begin = int64_t(blockIdx.x) * kRowsNHWC, r_end = min(S, r_begin + kRowsNHWC);
  float mean[VEC], rstd[VEC], wc[VEC], bc[VEC], a[VEC], bs[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    const int64_t c = c0 + j < C ? c0 + j : C - 1;
    mean[j] = mean_in[n * G + c / D];
    rstd[j] = rstd_in[n * G + c / D];
    wc[j] = w ? Cvt<T>::to(w[c]) : 1.f;
    bc[j] = b ? Cvt<T>::to(b[c]) : 0.f;
    a[j] = bs[j] = 0.f;
  }
  for (int64_t r = r_begin + threadIdx.y; r < r_end; r += kLanesY) {
    const int64_t off = (n * S + r) * C;
    float xv[VEC], dv[VEC];
    if (vector_ok && c0 + VEC <= C) {
      load_vec<T, VEC>(xv, x + off + c0);
      load_vec<T, VEC>(dv, dy + off + c0);
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        xv[j] = c0 + j < C ? Cvt<T>::to(x[off + c0 + j]) : 0.f;
        dv[j] = c0 + j < C ? Cvt<T>::to(dy[off + c0 + j]) : 0.f;
      }
    }
#pragma unroll
    for (int j = 0; j < VEC; ++j) accumulate<SILU>(xv[j], dv[j], mean[j], rstd[j], wc[j], bc[j], a[j], bs[j]);
  }
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    sh_a[threadIdx.y][threadIdx.x * VEC + j] = a[j];
    sh_b[threadIdx.y][threadIdx.x * VEC + j] = bs[j];
  }
  __syncthreads();
  for (int t = threadIdx.y * 32 + threadIdx.x; t < WIDTH; t += 32 * kLanesY) {
    const int64_t c = int64_t(blockIdx.y) * WIDTH + t;
    if (c >= C) continue;
    float sa = 0.f, sb = 0.f;
    for (int y = 0; y < kLanesY; ++y) {
      sa += sh_a[y][t];
      sb += sh_b[y][t];
    }
    atomicAdd(sums + n * C + c, sa);
    atomicAdd(sums + N * C + n * C + c, sb);
  }
}

// One thread per (n, group): coef = (sum_c w_c A[n, c], sum_c w_c B[n, c]).
template <typename T>
__global__ void group_coefficients(const float* __restrict__ sums, const T* __restrict__ w, float* __restrict__ coef,
                                   int64_t N, int64_t C, int64_t G) {
  const int64_t ng = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (ng >= N * G) return;
  const int64_t D = C / G, n = ng / G, g = ng % G;
  float sa = 0.f, sb = 0.f;
  for (int64_t c = g * D; c < (g + 1) * D; ++c) {
    const float wc = w ? Cvt<T>::to(w[c]) : 1.f;
    sa += wc * sums[n * C + c];
    sb += wc * sums[N * C + n * C + c];
  }
  coef[2 * ng] = sa;
  coef[2 * ng + 1] = sb;
}

// ----------------------------------------------------------------------------- host

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

template <typename T, bool SILU, bool BACKWARD>
void launch_elementwise(const ElementArgs<T>& p, cudaStream_t stream) {
  constexpr int VEC = vec_of<T>();
  const int64_t blocks = (p.total + int64_t(kThreads) * VEC - 1) / (int64_t(kThreads) * VEC);
  if (blocks > 0x7fffffffLL) throw std::invalid_argument("genfast group_norm (CUDA): tensor too large");
  if (cuda::int32_index_fits(p.total + int64_t(kThreads) * VEC))
    cuda::launch_kernel(elementwise<T, SILU, BACKWARD, int32_t>, unsigned(blocks), kThreads, 0, stream, kFamily,
                        "elementwise launch", p);
  else
    cuda::launch_kernel(elementwise<T, SILU, BACKWARD, int64_t>, unsigned(blocks), kThreads, 0, stream, kFamily,
                        "elementwise launch", p);
}

void check_grid(int64_t y, int64_t z) {
  if (y > 65535 || z > 65535)
    throw std::invalid_argument("genfast group_norm (CUDA): too many samples or channels for one launch grid");
}

template <typename T>
void forward(const ForwardArgs& a) {
  constexpr int VEC = vec_of<T>();
  const Shape& s = a.shape;
  const Plan plan = make_plan(s);
  const int64_t D = s.C / s.G;
  auto stream = reinterpret_cast<cudaStream_t>(a.stream);
  const T* x = static_cast<const T*>(a.x);
  float* work = static_cast<float*>(a.workspace);  // forward_workspace_floats(shape) floats
  float* pmean = work;
  float* pm2 = work + plan.partials;
  if (!s.channels_last) {
    const int64_t blocks = s.N * s.G * plan.K;
    if (blocks > 0x7fffffffLL) throw std::invalid_argument("genfast group_norm (CUDA): tensor too large");
    const bool vector_ok = aligned16(x) && plan.len % VEC == 0;
    cuda::launch_kernel(moments_nchw<T>, unsigned(blocks), kThreads, 0, stream, kFamily, "moments launch", x, pmean,
                        pm2, plan.len, plan.chunk, plan.K, vector_ok);
  } else {
    const int64_t width = 32 * VEC;
    check_grid((s.C + width - 1) / width, s.N);
    const bool vector_ok = aligned16(x) && s.C % VEC == 0;
    dim3 grid(unsigned(plan.K), unsigned((s.C + width - 1) / width), unsigned(s.N));
    cuda::launch_kernel(moments_nhwc<T>, grid, dim3(32, kLanesY), 0, stream, kFamily, "moments launch", x, pmean, pm2,
                        s.S, s.C, D, vector_ok);
  }
  // NHWC partials of one group: D channels x K chunks of rows; NCHW: K chunks of the group.
  cuda::launch_kernel(finalize<T>, unsigned(s.N * s.G), kThreads, 0, stream, kFamily, "finalize launch", x, pmean, pm2,
                      static_cast<float*>(a.mean), static_cast<float*>(a.rstd), plan.partials_per_group, plan.K,
                      plan.chunk, plan.len, float(D * s.S), float(a.eps), s.G, D, s.S, s.C, s.channels_last);

  ElementArgs<T> p{};
  p.x = x;
  p.out = static_cast<T*>(a.y);
  p.w = static_cast<const T*>(a.weight);
  p.b = static_cast<const T*>(a.bias);
  p.mean = static_cast<const float*>(a.mean);
  p.rstd = static_cast<const float*>(a.rstd);
  p.total = s.N * s.C * s.S;
  p.C = s.C;
  p.S = s.S;
  p.G = s.G;
  p.D = D;
  p.channels_last = s.channels_last;
  p.aligned = aligned16(p.x) && aligned16(p.out);
  if (a.silu)
    launch_elementwise<T, true, false>(p, stream);
  else
    launch_elementwise<T, false, false>(p, stream);
}

template <typename T, bool SILU>
void backward(const BackwardArgs& a) {
  constexpr int VEC = vec_of<T>();
  const Shape& s = a.shape;
  const int64_t D = s.C / s.G;
  auto stream = reinterpret_cast<cudaStream_t>(a.stream);
  const T* x = static_cast<const T*>(a.x);
  const T* dy = static_cast<const T*>(a.dy);
  const T* w = static_cast<const T*>(a.weight);
  const T* b = static_cast<const T*>(a.bias);
  const float* mean = static_cast<const float*>(a.mean);
  const float* rstd = static_cast<const float*>(a.rstd);
  float* sums = static_cast<float*>(a.sums);  // [2, N, C] then coef [N, G, 2]
  float* coef = sums + 2 * s.N * s.C;
  cuda::check(cudaMemsetAsync(sums, 0, size_t(2 * s.N * s.C) * sizeof(float), stream), kFamily, "cudaMemsetAsync");
  if (!s.channels_last) {
    check_grid(s.C, s.N);
    const int64_t chunk = int64_t(kThreads) * VEC * 2;
    const bool vector_ok = aligned16(x) && aligned16(dy) && s.S % VEC == 0;
    dim3 grid(unsigned((s.S + chunk - 1) / chunk), unsigned(s.C), unsigned(s.N));
    cuda::launch_kernel(grad_sums_nchw<T, SILU>, grid, kThreads, 0, stream, kFamily, "grad sums launch", x, dy, mean,
                        rstd, w, b, sums, s.N, s.S, s.G, D, chunk, vector_ok);
  } else {
    const int64_t width = 32 * VEC;
    check_grid((s.C + width - 1) / width, s.N);
    const bool vector_ok = aligned16(x) && aligned16(dy) && s.C % VEC == 0;
    dim3 grid(unsigned((s.S + kRowsNHWC - 1) / kRowsNHWC), unsigned((s.C + width - 1) / width), unsigned(s.N));
    cuda::launch_kernel(grad_sums_nhwc<T, SILU>, grid, dim3(32, kLanesY), 0, stream, kFamily, "grad sums launch", x, dy,
                        mean, rstd, w, b, sums, s.N, s.S, s.C, s.G, D, vector_ok);
  }
  const int64_t groups = s.N * s.G;
  cuda::launch_kernel(group_coefficients<T>, unsigned((groups + kThreads - 1) / kThreads), kThreads, 0, stream, kFamily,
                      "coefficients launch", sums, w, coef, s.N, s.C, s.G);

  ElementArgs<T> p{};
  p.x = x;
  p.dy = dy;
  p.out = static_cast<T*>(a.dx);
  p.w = w;
  p.b = b;
  p.mean = mean;
  p.rstd = rstd;
  p.coef = coef;
  p.total = s.N * s.C * s.S;
  p.C = s.C;
  p.S = s.S;
  p.G = s.G;
  p.D = D;
  p.inv_m = 1.f / float(D * s.S);
  p.channels_last = s.channels_last;
  p.aligned = aligned16(p.x) && aligned16(p.dy) && aligned16(p.out);
  launch_elementwise<T, SILU, true>(p, stream);
}

template <typename T>
void backward_typed(const BackwardArgs& a) {
  a.silu ? backward<T, true>(a) : backward<T, false>(a);
}

}  // namespace

int64_t forward_workspace_floats(const Shape& shape) { return 2 * make_plan(shape).partials; }

void group_norm_forward_cuda(const ForwardArgs& a) {
  if (a.shape.N == 0 || a.shape.S == 0) return;
#ifndef GENFAST_CUDA_EMULATION
  cuda::DeviceGuard guard(a.device);
#endif
  switch (a.shape.dtype) {
    case F32: return forward<float>(a);
    case F16: return forward<__half>(a);
    case BF16: return forward<__nv_bfloat16>(a);
  }
  throw std::invalid_argument(std::string("genfast group_norm (CUDA): unsupported dtype ") + dtype_name(a.shape.dtype));
}

void group_norm_backward_cuda(const BackwardArgs& a) {
  if (a.shape.N == 0 || a.shape.S == 0) return;
#ifndef GENFAST_CUDA_EMULATION
  cuda::DeviceGuard guard(a.device);
#endif
  switch (a.shape.dtype) {
    case F32: return backward_typed<float>(a);
    case F16: return backward_typed<__half>(a);
    case BF16: return backward_typed<__nv_bfloat16>(a);
  }
  throw std::invalid_argument(std::string("genfast group_norm (CUDA): unsupported dtype ") + dtype_name(a.shape.dtype));
}

}  // namespace group_norm
}  // namespace genfast
