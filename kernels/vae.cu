// VAE reparameterisation + KL CUDA kernels (see vae.h). One block per (row, chunk of
// kChunkCols columns): coalesced loads, the chunk's KL partial reduced in the block.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "common.h"
#include "cuda_common.cuh"
#include "vae.h"

namespace genfast {
namespace vae {
namespace {

constexpr int kThreads = 256;
constexpr const char* kFamily = "vae";

__device__ __forceinline__ float load(const float* p, int64_t i) { return __ldg(p + i); }
__device__ __forceinline__ float load(const __half* p, int64_t i) { return __half2float(p[i]); }
__device__ __forceinline__ float load(const __nv_bfloat16* p, int64_t i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ void store(float* p, int64_t i, float v) { p[i] = v; }
__device__ __forceinline__ void store(__half* p, int64_t i, float v) { p[i] = __float2half_rn(v); }
__device__ __forceinline__ void store(__nv_bfloat16* p, int64_t i, float v) { p[i] = __float2bfloat16_rn(v); }

__device__ float block_sum(float v) {
  __shared__ float warp_sums[kThreads / 32];
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  v = threadIdx.x < kThreads / 32 ? warp_sums[threadIdx.x] : 0.0f;
  if (warp == 0)
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) forward_kernel(Args a) {
  const int64_t chunks = num_chunks(a.cols);
  const int64_t row = int64_t(blockIdx.x) / chunks, chunk = int64_t(blockIdx.x) % chunks;
  const int64_t base = row * a.cols;
  const int64_t end = min(a.cols, (chunk + 1) * kChunkCols);
  const T* mu = static_cast<const T*>(a.mu) + base;
  const T* lv = static_cast<const T*>(a.logvar) + base;
  const T* eps = static_cast<const T*>(a.eps) + base;
  T* z = a.z ? static_cast<T*>(a.z) + base : nullptr;
  float kl = 0.0f;
  for (int64_t i = chunk * kChunkCols + threadIdx.x; i < end; i += kThreads) {
    const float m = load(mu, i), l = load(lv, i);
    const float var = expf(l);
    if (z) store(z, i, fmaf(expf(0.5f * l), load(eps, i), m));
    kl += 1.0f + l - m * m - var;
  }
  if (a.kl_partial != nullptr) {
    kl = block_sum(kl);
    if (threadIdx.x == 0) static_cast<float*>(a.kl_partial)[blockIdx.x] = -0.5f * kl;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) backward_kernel(Args a) {
  const int64_t chunks = num_chunks(a.cols);
  const int64_t row = int64_t(blockIdx.x) / chunks, chunk = int64_t(blockIdx.x) % chunks;
  const int64_t base = row * a.cols;
  const int64_t end = min(a.cols, (chunk + 1) * kChunkCols);
  const T* mu = static_cast<const T*>(a.mu) + base;
  const T* lv = static_cast<const T*>(a.logvar) + base;
  const T* eps = static_cast<const T*>(a.eps) + base;
  const T* dz = a.dz ? static_cast<const T*>(a.dz) + base : nullptr;
  T* dmu = static_cast<T*>(a.dmu) + base;
  T* dlv = static_cast<T*>(a.dlogvar) + base;
  const float dkl = a.dkl ? static_cast<const float*>(a.dkl)[row] : 0.0f;
  for (int64_t i = chunk * kChunkCols + threadIdx.x; i < end; i += kThreads) {
    const float m = load(mu, i), l = load(lv, i);
    const float sigma = expf(0.5f * l);
    const float g = dz ? load(dz, i) : 0.0f;
    store(dmu, i, g + dkl * m);
    store(dlv, i, 0.5f * (g * load(eps, i) * sigma + dkl * (sigma * sigma - 1.0f)));
  }
}

template <bool Forward>
void launch(const Args& a) {
  if (a.rows == 0 || a.cols == 0) return;
#ifndef GENFAST_CUDA_EMULATION
  cuda::DeviceGuard guard(a.device);
#endif
  const int64_t blocks = a.rows * num_chunks(a.cols);
  if (blocks > 0x7fffffffLL) throw std::invalid_argument("genfast vae (CUDA): tensor too large");
  auto stream = reinterpret_cast<cudaStream_t>(a.stream);
  auto go = [&](auto tag) {
    using T = decltype(tag);
    cuda::launch_kernel(Forward ? forward_kernel<T> : backward_kernel<T>, unsigned(blocks), kThreads, 0, stream,
                        kFamily, "kernel launch", a);
  };
  switch (a.dtype) {
    case F32: go(float{}); break;
    case F16: go(__half{}); break;
    case BF16: go(__nv_bfloat16{}); break;
    default: throw std::invalid_argument(std::string("genfast vae (CUDA): unsupported dtype ") + dtype_name(a.dtype));
  }
}

}  // namespace

void forward_cuda(const Args& a) { launch<true>(a); }
void backward_cuda(const Args& a) { launch<false>(a); }

}  // namespace vae
}  // namespace genfast
