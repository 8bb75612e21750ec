// Tiny kernels that exercise the emulator's own fault checks (tests/test_emulation_cuda_emulated.py):
// each takes addresses from Python, so a test can hand it a misaligned or overrunning one and
// expect the fault that the hardware would raise. Built by tests/cuda_emulation/build.py.
#define GENFAST_WITH_CUDA 1
#define GENFAST_CUDA_EMULATION 1

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <vector>

#include "cuda_common.cuh"

namespace {

constexpr const char* kFamily = "emulation checks";

__global__ void ldg_float4_kernel(const float* p, float* out) {
  const float4 v = __ldg(reinterpret_cast<const float4*>(p));
  *out = v.x + v.y + v.z + v.w;
}

// One warp: lane l gives the address of row l of four 8 x 8 b16 matrices (16-byte rows) that
// start `offset` bytes into shared memory; out[l] = the lane's register of matrix 0.
__global__ void ldmatrix_kernel(int offset, uint32_t* out) {
  GF_DYNAMIC_SHARED(unsigned char, smem);
  uint16_t* rows = reinterpret_cast<uint16_t*>(smem + offset);
  for (int i = threadIdx.x; i < 32 * 8; i += 32) rows[i] = uint16_t(i);
  __syncwarp();
  uint32_t r[4];
  gf_emu::ldmatrix<4, false>(r, rows + threadIdx.x * 8);
  out[threadIdx.x] = r[0];
}

__global__ void cp_async_kernel(const unsigned char* src, int bytes, int dst_offset, unsigned char* out) {
  GF_DYNAMIC_SHARED(unsigned char, smem);
  gf_emu::cp_async(smem + dst_offset, src, bytes, bytes);
  gf_emu::cp_async_commit();
  gf_emu::cp_async_wait(0);
  for (int i = 0; i < bytes; ++i) out[i] = smem[dst_offset + i];
}

__global__ void sum_kernel(const float* p, long long n, float* out) {
  float s = 0.0f;
  for (long long i = 0; i < n; ++i) s += p[i];
  *out = s;
}

}  // namespace

PYBIND11_MODULE(checks_emulated, m) {
  using genfast::cuda::launch_kernel;
  m.def("ldg_float4", [](uintptr_t p) {
    float out = 0.0f;
    launch_kernel(ldg_float4_kernel, 1, 1, 0, nullptr, kFamily, "ldg", reinterpret_cast<const float*>(p), &out);
    return out;
  });
  m.def("ldmatrix", [](int offset) {
    std::vector<uint32_t> out(32);
    launch_kernel(ldmatrix_kernel, 1, 32, 32 * 16 + 16, nullptr, kFamily, "ldmatrix", offset, out.data());
    return out;
  });
  m.def("cp_async", [](uintptr_t src, int bytes, int dst_offset) {
    std::vector<unsigned char> out(32);
    launch_kernel(cp_async_kernel, 1, 1, 64, nullptr, kFamily, "cp.async", reinterpret_cast<const unsigned char*>(src),
                  bytes, dst_offset, out.data());
    out.resize(bytes > 0 && bytes <= 32 ? bytes : 0);
    return pybind11::bytes(reinterpret_cast<const char*>(out.data()), out.size());
  });
  m.def("sum", [](uintptr_t p, long long n) {
    float out = 0.0f;
    launch_kernel(sum_kernel, 1, 1, 0, nullptr, kFamily, "sum", reinterpret_cast<const float*>(p), n, &out);
    return out;
  });
}
