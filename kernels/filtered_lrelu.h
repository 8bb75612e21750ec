// Entry points of the filtered_lrelu kernels, shared by the bindings
// (csrc/filtered_lrelu_bindings.cpp), the CPU kernels (csrc/filtered_lrelu_cpu.cpp) and the
// CUDA kernels (kernels/filtered_lrelu.cu).
//
// Every kernel runs one generic fused chain per (n, c) plane (see genfast/ops/filtered_lrelu.py):
//   T   = upfirdn(in (+ bias), g1, up = u1, left/top padding p1x/p1y)   -> th x tw
//   T'  = ACT:  clamp(lrelu(T) * gain), code written to `signs` (if not null)
//         MASK: T * {gain, gain * slope, 0}[code read from `signs`]
//   out = upfirdn(T' zero outside T, g2, down = d2, left/top padding p2x/p2y) -> oh x ow
// g1/g2 are float32 correlation kernels: 1-D (separable: along x, then y) or 2-D row-major.
// Sign record: uint8 [N, C, th, tw] contiguous; 0 positive, 1 negative (z <= 0), 2 clamped.
#pragma once
#include <cstdint>

namespace genfast {
namespace filtered_lrelu {

enum Mode : int { ACT = 0, MASK = 1 };
enum Code : uint8_t { POSITIVE = 0, NEGATIVE = 1, CLAMPED = 2 };

struct Args {
  int mode;
  int dtype;  // genfast::DType
  int64_t N, C;
  int64_t in_h, in_w;
  int64_t in_s[4];  // element strides of the input (N, C, H, W)
  int64_t out_s[4];
  void* out;
  const void* x;
  const void* b;   // ACT only, may be null
  uint8_t* signs;  // ACT: written when not null; MASK: read
  const float* g1;
  int g1h, g1w;
  bool g1_sep;
  const float* g2;
  int g2h, g2w;
  bool g2_sep;
  // Geometry of the chain.
  int64_t u1, p1x, p1y, th, tw, d2, p2x, p2y, oh, ow;
  double gain, slope, clamp;  // clamp < 0: none
  int num_threads;            // CPU only
  uintptr_t stream;           // CUDA only
  int device;                 // CUDA only
};

void filtered_lrelu_cpu(const Args& a);
#ifdef GENFAST_WITH_CUDA
void filtered_lrelu_cuda(const Args& a);  // throws std::runtime_error on a CUDA error
#endif

// floor(a / b) and ceil(a / b) for b > 0 and any sign of a.
inline int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }
inline int64_t ceil_div(int64_t a, int64_t b) { return a >= 0 ? (a + b - 1) / b : -((-a) / b); }

}  // namespace filtered_lrelu
}  // namespace genfast
