// Entry points of the GAN-layer kernels (pixel_norm), shared by the bindings
// (csrc/gan_bindings.cpp), the CPU kernels (csrc/gan_cpu.cpp) and the CUDA kernels (kernels/gan.cu).
#pragma once
#include <cstdint>

namespace genfast {
namespace gan {

enum PixelNormMode : int { PN_FORWARD = 0, PN_GRAD = 1 };

// pixel_norm over one dimension of a dense tensor seen as [outer, C, S] in memory (C = the
// normalised dimension's size, S = its stride): every (o, s) is one reduction row of C
// elements, element (o, c, s) at o * C * S + c * S + s.
//   PN_FORWARD: out = x * r,  r = rsqrt(mean_c x^2 + eps)
//   PN_GRAD:    out = dx = r * dy - x * r^3 * mean_c(dy * x)
struct PixelNormArgs {
  int mode;
  int dtype;  // genfast::DType
  int64_t outer, C, S;
  void* out;
  const void* x;
  const void* dy;  // PN_GRAD only
  double eps;
  int num_threads;   // CPU only
  uintptr_t stream;  // CUDA only
  int device;        // CUDA only
};

void pixel_norm_cpu(const PixelNormArgs& a);
#ifdef GENFAST_WITH_CUDA
void pixel_norm_cuda(const PixelNormArgs& a);  // throws std::runtime_error on a CUDA error
#endif

}  // namespace gan
}  // namespace genfast
