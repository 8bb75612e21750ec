// Entry points of the upfirdn2d kernels, shared by the bindings (csrc/upfirdn2d_bindings.cpp),
// the CPU kernels (csrc/upfirdn2d_cpu.cpp) and the CUDA kernels (kernels/upfirdn2d.cu).
//
// Every kernel computes, per axis, y[o] = sum_k u[o * down + k] * g[k], with u the input
// after zero insertion (up - 1 zeros after each pixel) and zero padding (pad0 before; negative
// crops). g is the prepared float32 correlation filter (flip and gain already applied by the
// Python side): [fh, fw] for a full filter, or [taps] applied along x then along y.
#pragma once
#include <cstdint>

namespace genfast {
namespace upfirdn2d {

struct Args {
  int dtype;  // genfast::DType
  void* out;
  const void* x;
  const float* g;
  int64_t n, c, h, w;  // input sizes
  int64_t oh, ow;      // output sizes (validated by Python)
  int64_t fh, fw;      // filter taps (fh == fw for a separable filter)
  bool separable;      // g is 1-D: applied along x, then along y
  bool channels_last;  // x and out are NHWC in memory (else NCHW); both dense
  int64_t upx, upy, downx, downy;
  int64_t padx0, padx1, pady0, pady1;
  int num_threads;   // CPU only
  uintptr_t stream;  // CUDA only: the cudaStream_t to launch on
  int device;        // CUDA only: device index
};

// Floor division and positive remainder for possibly negative numerators.
inline int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }
inline int64_t ceil_div(int64_t a, int64_t b) { return -floor_div(-a, b); }

void upfirdn2d_cpu(const Args& a);
#ifdef GENFAST_WITH_CUDA
void upfirdn2d_cuda(const Args& a);  // throws std::runtime_error on a CUDA error
#endif

}  // namespace upfirdn2d
}  // namespace genfast
