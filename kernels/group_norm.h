// Entry points of the group_norm kernels (GroupNorm + optional SiLU), shared by the bindings
// (csrc/group_norm_bindings.cpp), the CPU kernels (csrc/group_norm_cpu.cpp) and the CUDA
// kernels (kernels/group_norm.cu). See genfast/ops/group_norm.py for the algorithm.
//
// x is N x C x S (S = product of the spatial sizes) in one of two memory layouts:
//   channels_last = false (NCHW): element (n, c, s) at (n * C + c) * S + s
//   channels_last = true  (NHWC): element (n, c, s) at (n * S + s) * C + c
// G groups of D = C / G channels. mean and rstd are N x G, float (double for float64 x).
// Every x-sized tensor (x, y, dy, dx) shares the layout; weight and bias are C-long or null.
#pragma once
#include <cstdint>

namespace genfast {
namespace group_norm {

struct Shape {
  int dtype;  // genfast::DType
  int64_t N, C, S, G;
  bool channels_last;
};

struct ForwardArgs {
  Shape shape;
  const void* x;
  const void* weight;  // null: 1
  const void* bias;    // null: 0
  void* y;
  void* mean;
  void* rstd;
  double eps;
  bool silu;
  int num_threads;   // CPU only
  void* workspace;   // CUDA only: forward_workspace_floats(shape) floats for the partial moments
  uintptr_t stream;  // CUDA only: the cudaStream_t to launch on
  int device;        // CUDA only
};

struct BackwardArgs {
  Shape shape;
  const void* dy;
  const void* x;
  const void* mean;
  const void* rstd;
  const void* weight;
  const void* bias;  // needed to recompute the SiLU input
  void* dx;
  // CPU: dweight / dbias (C elements of x's dtype; null: not wanted).
  void* dweight;
  void* dbias;
  // CUDA: 2 N C + 2 N G floats: first [2, N, C] receiving A = sum(dz * xhat) and B = sum(dz)
  // per (n, c) (the caller sums them over n for dweight and dbias), then scratch.
  void* sums;
  bool silu;
  int num_threads;
  uintptr_t stream;
  int device;
};

void group_norm_forward_cpu(const ForwardArgs& a);
void group_norm_backward_cpu(const BackwardArgs& a);
#ifdef GENFAST_WITH_CUDA
int64_t forward_workspace_floats(const Shape& shape);
void group_norm_forward_cuda(const ForwardArgs& a);  // throw std::runtime_error on a CUDA error
void group_norm_backward_cuda(const BackwardArgs& a);
#endif

}  // namespace group_norm
}  // namespace genfast
