// bias_act CUDA kernels: one fused, memory-bound pass; 16-byte vector loads and stores.
// The dense tensor is seen as [outer, C, S] (see bias_act.h); each thread handles one vector
// of 16 bytes, finds its channel with one division and then steps through the vector.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "bias_act.h"
#include "common.h"
#include "cuda_common.cuh"

namespace genfast {
namespace bias_act {
namespace {

using cuda::Cvt;
constexpr const char* kFamily = "bias_act";

template <typename T>
struct KernelArgs {
  T* out;
  const T* x;
  const T* b;
  const T* dy;
  const T* ddx;
  int64_t n, C, S;
  float alpha, gain, clamp;
  bool aligned;  // every tensor pointer is 16-byte aligned: vector loads allowed
};

constexpr int kThreads = 256;

template <int VEC, typename T>
__device__ __forceinline__ void load(T (&dst)[VEC], const T* src, bool full, int64_t i0, int64_t n) {
  if (full) {
    *reinterpret_cast<uint4*>(dst) = __ldg(reinterpret_cast<const uint4*>(src + i0));
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) dst[k] = i0 + k < n ? src[i0 + k] : T(0.0f);
  }
}

template <typename T, int A, int M, typename Index>
__global__ void __launch_bounds__(kThreads) bias_act_kernel(KernelArgs<T> p) {
  constexpr int VEC = 16 / sizeof(T);
  const Index n = Index(p.n);
  const Index i0 = (Index(blockIdx.x) * kThreads + Index(threadIdx.x)) * VEC;
  if (i0 >= n) return;
  const bool full = p.aligned && i0 + VEC <= n;

  alignas(16) T xs[VEC], dys[VEC], ddxs[VEC];  // read and written as uint4
  load<VEC>(xs, p.x, full, i0, n);
  if (M >= GRAD) load<VEC>(dys, p.dy, full, i0, n);
  if (M == GRAD2) load<VEC>(ddxs, p.ddx, full, i0, n);

  // Channel of the first element; then walk: a row of S elements shares one channel.
  Index c = 0, r = 0;
  const Index S = Index(p.S), C = Index(p.C);
  if (p.b != nullptr) {
    const Index q = i0 / S;
    r = i0 - q * S;
    c = q % C;
  }
  alignas(16) T outs[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    const float bias = p.b != nullptr ? Cvt<T>::to(__ldg(p.b + c)) : 0.0f;
    const float dyv = M >= GRAD ? Cvt<T>::to(dys[k]) : 0.0f;
    const float ddxv = M == GRAD2 ? Cvt<T>::to(ddxs[k]) : 0.0f;
    outs[k] = Cvt<T>::from(apply<A, M, float>(Cvt<T>::to(xs[k]), bias, dyv, ddxv, p.alpha, p.gain, p.clamp));
    if (++r == S) {
      r = 0;
      if (++c == C) c = 0;
    }
  }
  if (full) {
    *reinterpret_cast<uint4*>(p.out + i0) = *reinterpret_cast<const uint4*>(outs);
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k)
      if (i0 + k < n) p.out[i0 + k] = outs[k];
  }
}

template <typename T, int A, int M>
void launch(const Args& a) {
  KernelArgs<T> p;
  p.out = static_cast<T*>(a.out);
  p.x = static_cast<const T*>(a.x);
  p.b = static_cast<const T*>(a.b);
  p.dy = static_cast<const T*>(a.dy);
  p.ddx = static_cast<const T*>(a.ddx);
  p.n = a.n;
  p.C = a.C;
  p.S = a.S;
  p.alpha = float(a.p.alpha);
  p.gain = float(a.p.gain);
  p.clamp = float(a.p.clamp);
  auto aligned = [](const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; };
  p.aligned = aligned(p.out) && aligned(p.x) && (M < GRAD || aligned(p.dy)) && (M < GRAD2 || aligned(p.ddx));

  constexpr int VEC = 16 / sizeof(T);
  const int64_t vectors = (a.n + VEC - 1) / VEC;
  const int64_t blocks = (vectors + kThreads - 1) / kThreads;
  if (blocks > 0x7fffffffLL) throw std::invalid_argument("genfast bias_act (CUDA): tensor too large");
  auto stream = reinterpret_cast<cudaStream_t>(a.stream);
  // 32-bit indexing is cheaper; 64-bit whenever an index could pass 2^31.
  if (cuda::int32_index_fits(a.n + int64_t(kThreads) * VEC))
    cuda::launch_kernel(bias_act_kernel<T, A, M, int32_t>, unsigned(blocks), kThreads, 0, stream, kFamily,
                        "kernel launch", p);
  else
    cuda::launch_kernel(bias_act_kernel<T, A, M, int64_t>, unsigned(blocks), kThreads, 0, stream, kFamily,
                        "kernel launch", p);
}

template <typename T>
void by_act(const Args& a) {
  with_act_and_mode(a.act, a.mode,
                    [&](auto act, auto mode) { launch<T, decltype(act)::value, decltype(mode)::value>(a); });
}

}  // namespace

void bias_act_cuda(const Args& a) {
  if (a.n == 0) return;
#ifndef GENFAST_CUDA_EMULATION
  cuda::DeviceGuard guard(a.device);
#endif
  switch (a.dtype) {
    case F32: return by_act<float>(a);
    case F16: return by_act<__half>(a);
    case BF16: return by_act<__nv_bfloat16>(a);
  }
  throw std::invalid_argument(std::string("genfast bias_act (CUDA): unsupported dtype ") + dtype_name(a.dtype));
}

}  // namespace bias_act
}  // namespace genfast
