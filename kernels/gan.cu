// pixel_norm CUDA kernels: one reduction row per warp (channels innermost, S == 1) or one tile
// of 32 columns x all channels per block (S > 1). Each row is read once from DRAM to sum, and
// re-read from L1/L2 to write (the tile of a block is at most a few hundred KiB in flight).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "common.h"
#include "cuda_common.cuh"
#include "gan.h"

namespace genfast {
namespace gan {
namespace {

using cuda::Cvt;
constexpr const char* kFamily = "pixel_norm";

template <typename T>
struct KernelArgs {
  T* out;
  const T* x;
  const T* dy;
  int64_t outer, C, S;
  float eps;
};

constexpr int kWarpsPerBlock = 8;
constexpr int kThreads = 32 * kWarpsPerBlock;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// S == 1: row `row` is C contiguous elements; one warp per row. VEC > 1 loads 16-byte vectors
// (the launcher checks C % VEC == 0 and 16-byte alignment).
template <typename T, int M, int VEC>
__global__ void __launch_bounds__(kThreads) rows_kernel(KernelArgs<T> p) {
  const int64_t row = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= p.outer) return;
  const int64_t base = row * p.C;
  float sumsq = 0.0f, sumdx = 0.0f;
  for (int64_t c = int64_t(lane) * VEC; c < p.C; c += 32 * VEC) {
    alignas(16) T xs[VEC], ds[VEC];
    if (VEC > 1) {
      *reinterpret_cast<uint4*>(xs) = __ldg(reinterpret_cast<const uint4*>(p.x + base + c));
      if (M == PN_GRAD) *reinterpret_cast<uint4*>(ds) = __ldg(reinterpret_cast<const uint4*>(p.dy + base + c));
    } else {
      xs[0] = p.x[base + c];
      if (M == PN_GRAD) ds[0] = p.dy[base + c];
    }
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float xv = Cvt<T>::to(xs[k]);
      sumsq += xv * xv;
      if (M == PN_GRAD) sumdx += xv * Cvt<T>::to(ds[k]);
    }
  }
  sumsq = warp_sum(sumsq);
  if (M == PN_GRAD) sumdx = warp_sum(sumdx);
  const float inv_c = 1.0f / float(p.C);
  const float r = rsqrtf(sumsq * inv_c + p.eps);
  const float k3 = r * r * r * sumdx * inv_c;
  for (int64_t c = int64_t(lane) * VEC; c < p.C; c += 32 * VEC) {
    alignas(16) T xs[VEC], ds[VEC], os[VEC];
    if (VEC > 1) {
      *reinterpret_cast<uint4*>(xs) = *reinterpret_cast<const uint4*>(p.x + base + c);
      if (M == PN_GRAD) *reinterpret_cast<uint4*>(ds) = *reinterpret_cast<const uint4*>(p.dy + base + c);
    } else {
      xs[0] = p.x[base + c];
      if (M == PN_GRAD) ds[0] = p.dy[base + c];
    }
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float xv = Cvt<T>::to(xs[k]);
      os[k] = Cvt<T>::from(M == PN_FORWARD ? xv * r : r * Cvt<T>::to(ds[k]) - k3 * xv);
    }
    if (VEC > 1)
      *reinterpret_cast<uint4*>(p.out + base + c) = *reinterpret_cast<const uint4*>(os);
    else
      p.out[base + c] = os[0];
  }
}

// S > 1: block (32, 8) handles columns s0 .. s0 + 31 of one outer index; threadIdx.y strides
// over the channels; partial sums meet in shared memory.
template <typename T, int M>
__global__ void __launch_bounds__(kThreads) columns_kernel(KernelArgs<T> p, int64_t tiles_per_outer) {
  __shared__ float s_sumsq[kWarpsPerBlock][32];
  __shared__ float s_sumdx[kWarpsPerBlock][32];
  const int64_t o = int64_t(blockIdx.x) / tiles_per_outer;
  const int64_t s = (int64_t(blockIdx.x) % tiles_per_outer) * 32 + threadIdx.x;
  const bool active = s < p.S;
  const int64_t base = o * p.C * p.S + s;
  float sumsq = 0.0f, sumdx = 0.0f;
  if (active) {
    for (int64_t c = threadIdx.y; c < p.C; c += kWarpsPerBlock) {
      const float xv = Cvt<T>::to(__ldg(p.x + base + c * p.S));
      sumsq += xv * xv;
      if (M == PN_GRAD) sumdx += xv * Cvt<T>::to(__ldg(p.dy + base + c * p.S));
    }
  }
  s_sumsq[threadIdx.y][threadIdx.x] = sumsq;
  s_sumdx[threadIdx.y][threadIdx.x] = sumdx;
  __syncthreads();
  sumsq = 0.0f;
  sumdx = 0.0f;
#pragma unroll
  for (int k = 0; k < kWarpsPerBlock; ++k) {
    sumsq += s_sumsq[k][threadIdx.x];
    sumdx += s_sumdx[k][threadIdx.x];
  }
  if (!active) return;
  const float inv_c = 1.0f / float(p.C);
  const float r = rsqrtf(sumsq * inv_c + p.eps);
  const float k3 = r * r * r * sumdx * inv_c;
  for (int64_t c = threadIdx.y; c < p.C; c += kWarpsPerBlock) {
    const float xv = Cvt<T>::to(p.x[base + c * p.S]);
    const float v = M == PN_FORWARD ? xv * r : r * Cvt<T>::to(p.dy[base + c * p.S]) - k3 * xv;
    p.out[base + c * p.S] = Cvt<T>::from(v);
  }
}

template <typename T, int M>
void launch(const PixelNormArgs& a) {
  KernelArgs<T> p;
  p.out = static_cast<T*>(a.out);
  p.x = static_cast<const T*>(a.x);
  p.dy = static_cast<const T*>(a.dy);
  p.outer = a.outer;
  p.C = a.C;
  p.S = a.S;
  p.eps = float(a.eps);
  auto stream = reinterpret_cast<cudaStream_t>(a.stream);
  if (a.S == 1) {
    const int64_t blocks = (a.outer + kWarpsPerBlock - 1) / kWarpsPerBlock;
    if (blocks > 0x7fffffffLL) throw std::invalid_argument("genfast pixel_norm (CUDA): tensor too large");
    constexpr int VEC = 16 / sizeof(T);
    auto aligned = [](const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; };
    const bool vec = a.C % VEC == 0 && aligned(p.out) && aligned(p.x) && (M == PN_FORWARD || aligned(p.dy));
    cuda::launch_kernel(vec ? rows_kernel<T, M, VEC> : rows_kernel<T, M, 1>, unsigned(blocks), kThreads, 0, stream,
                        kFamily, "kernel launch", p);
  } else {
    const int64_t tiles_per_outer = (a.S + 31) / 32;
    const int64_t blocks = a.outer * tiles_per_outer;
    if (blocks > 0x7fffffffLL) throw std::invalid_argument("genfast pixel_norm (CUDA): tensor too large");
    cuda::launch_kernel(columns_kernel<T, M>, unsigned(blocks), dim3(32, kWarpsPerBlock), 0, stream, kFamily,
                        "kernel launch", p, tiles_per_outer);
  }
}

template <typename T>
void by_mode(const PixelNormArgs& a) {
  if (a.mode == PN_FORWARD) return launch<T, PN_FORWARD>(a);
  if (a.mode == PN_GRAD) return launch<T, PN_GRAD>(a);
  throw std::invalid_argument("genfast pixel_norm (CUDA): unknown mode " + std::to_string(a.mode));
}

}  // namespace

void pixel_norm_cuda(const PixelNormArgs& a) {
  if (a.outer * a.C * a.S == 0) return;
#ifndef GENFAST_CUDA_EMULATION
  cuda::DeviceGuard guard(a.device);
#endif
  switch (a.dtype) {
    case F32: return by_mode<float>(a);
    case F16: return by_mode<__half>(a);
    case BF16: return by_mode<__nv_bfloat16>(a);
  }
  throw std::invalid_argument(std::string("genfast pixel_norm (CUDA): unsupported dtype ") + dtype_name(a.dtype));
}

}  // namespace gan
}  // namespace genfast
