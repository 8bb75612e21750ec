// Helpers shared by the CUDA kernel families: error checks that throw (the bindings turn them
// into Python exceptions), a guard that switches to the tensors' device for one launch, and
// float <-> storage-type conversion. Header-only, device code compiled by nvcc only.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#ifdef GENFAST_CUDA_EMULATION
#include "cuda_emulation.h"  // tests/cuda_emulation: the kernels' source run on the CPU
#endif

// Dynamic shared memory of a kernel (the emulator supplies its own definition).
#ifndef GF_DYNAMIC_SHARED
#define GF_DYNAMIC_SHARED(type, name) extern __shared__ __align__(16) type name[]
#endif

namespace genfast {
namespace cuda {

// Throws std::runtime_error("genfast <family> (CUDA): <what>: <CUDA's message>").
inline void check(cudaError_t err, const char* family, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("genfast ") + family + " (CUDA): " + what + ": " + cudaGetErrorString(err));
}

// Makes `device` current for the scope (launches go to the current device), then restores.
struct DeviceGuard {
  int previous = -1;
  explicit DeviceGuard(int device) {
    check(cudaGetDevice(&previous), "device guard", "cudaGetDevice");
    if (previous != device) check(cudaSetDevice(device), "device guard", "cudaSetDevice");
  }
  ~DeviceGuard() {
    int current = -1;
    if (cudaGetDevice(&current) == cudaSuccess && current != previous) cudaSetDevice(previous);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;
};

// A launcher's cap on a grid dimension, beyond which its kernel's grid-stride loop covers the
// rest. The emulation caps at 3 blocks, so that its tests run those loops on small tensors.
constexpr long long grid_cap(long long cap) {
#ifdef GENFAST_CUDA_EMULATION
  return cap < 3 ? cap : 3;
#else
  return cap;
#endif
}

// Whether a kernel may index with int32 (cheaper): `bound` is one past the largest index it
// forms. The emulation can force the 64-bit path (gf_emu::force_int64_index), so its tests run
// the int64 instantiations on small tensors, and counts the launches that take it.
inline bool int32_index_fits(long long bound) {
  const bool fits = bound < (1LL << 31);
#ifdef GENFAST_CUDA_EMULATION
  if (gf_emu::force_int64_index() || !fits) {
    ++gf_emu::int64_index_launches();
    return false;
  }
#endif
  return fits;
}

// Launches kernel<<<grid, block, shared_bytes, stream>>>(args...) and checks the launch
// ("genfast <family> (CUDA): <what>: ..."); under GENFAST_CUDA_EMULATION the kernel runs on
// the CPU emulator instead (tests/cuda_emulation).
template <typename Kernel, typename... Args>
void launch_kernel(Kernel kernel, dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t stream, const char* family,
                   const char* what, const Args&... args) {
#ifdef GENFAST_CUDA_EMULATION
  (void)stream, (void)family, (void)what;
  gf_emu::check_dynamic_shared(kernel, shared_bytes);
  gf_emu::launch(kernel, grid, block, shared_bytes, args...);
#else
  // clang-format reads .cuh as C++ and would split the launch's >>>:
  // clang-format off
  kernel<<<grid, block, shared_bytes, stream>>>(args...);
  // clang-format on
  check(cudaGetLastError(), family, what);
#endif
}

// Storage type <-> float (all arithmetic is done in float; in double for double).
template <typename T>
struct Cvt;
template <>
struct Cvt<float> {
  static __device__ __forceinline__ float to(float v) { return v; }
  static __device__ __forceinline__ float from(float v) { return v; }
};
template <>
struct Cvt<double> {  // the families that also run float64 (arithmetic in double)
  static __device__ __forceinline__ double to(double v) { return v; }
  static __device__ __forceinline__ double from(double v) { return v; }
};
template <>
struct Cvt<__half> {
  static __device__ __forceinline__ float to(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from(float v) { return __float2half_rn(v); }
};
template <>
struct Cvt<__nv_bfloat16> {
  static __device__ __forceinline__ float to(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from(float v) { return __float2bfloat16_rn(v); }
};

}  // namespace cuda
}  // namespace genfast
