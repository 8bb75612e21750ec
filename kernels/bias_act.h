// Entry points of the bias_act kernels, shared by the bindings (csrc/module.cpp), the CPU
// kernels (csrc/bias_act_cpu.cpp) and the CUDA kernels (kernels/bias_act.cu).
#pragma once
#include <cstdint>

#include "bias_act_math.h"

namespace genfast {
namespace bias_act {

// A dense tensor of n elements seen as [n / (C * S), C, S] in memory: the bias index of
// element i is (i / S) % C. All tensors share that layout. Unused pointers are null.
struct Args {
  int mode;   // Mode
  int act;    // Act
  int dtype;  // genfast::DType
  int64_t n, C, S;
  void* out;
  const void* x;
  const void* b;
  const void* dy;
  const void* ddx;
  Params p;
  int num_threads;    // CPU only
  uintptr_t stream;   // CUDA only: the cudaStream_t to launch on
  int device;         // CUDA only: device index
};

void bias_act_cpu(const Args& a);
#ifdef GENFAST_WITH_CUDA
void bias_act_cuda(const Args& a);  // throws std::runtime_error on a CUDA error
#endif

}  // namespace bias_act
}  // namespace genfast
