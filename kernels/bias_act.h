// Entry points of the bias_act kernels, shared by the bindings (csrc/module.cpp), the CPU
// kernels (csrc/bias_act_cpu.cpp) and the CUDA kernels (kernels/bias_act.cu).
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

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
  void* db;  // CPU GRAD mode only: if set, also write db[c] = sum of out over channel c
  const void* x;
  const void* b;
  const void* dy;
  const void* ddx;
  Params p;
  int num_threads;   // CPU only
  uintptr_t stream;  // CUDA only: the cudaStream_t to launch on
  int device;        // CUDA only: device index
};

// Calls fn(std::integral_constant<int, act>, std::integral_constant<int, mode>) for the runtime
// act and mode, so each backend instantiates its kernel for every combination in one line.
template <int A, typename Fn>
void with_mode(int mode, Fn&& fn) {
  switch (mode) {
    case FORWARD: return fn(std::integral_constant<int, A>{}, std::integral_constant<int, FORWARD>{});
    case GRAD: return fn(std::integral_constant<int, A>{}, std::integral_constant<int, GRAD>{});
    case GRAD2: return fn(std::integral_constant<int, A>{}, std::integral_constant<int, GRAD2>{});
  }
  throw std::invalid_argument("bias_act: unknown mode " + std::to_string(mode));
}

template <typename Fn>
void with_act_and_mode(int act, int mode, Fn&& fn) {
  switch (act) {
    case LINEAR: return with_mode<LINEAR>(mode, fn);
    case RELU: return with_mode<RELU>(mode, fn);
    case LRELU: return with_mode<LRELU>(mode, fn);
    case TANH: return with_mode<TANH>(mode, fn);
    case SIGMOID: return with_mode<SIGMOID>(mode, fn);
    case ELU: return with_mode<ELU>(mode, fn);
    case SELU: return with_mode<SELU>(mode, fn);
    case SOFTPLUS: return with_mode<SOFTPLUS>(mode, fn);
    case SWISH: return with_mode<SWISH>(mode, fn);
  }
  throw std::invalid_argument("bias_act: unknown activation code " + std::to_string(act));
}

void bias_act_cpu(const Args& a);
#ifdef GENFAST_WITH_CUDA
void bias_act_cuda(const Args& a);  // throws std::runtime_error on a CUDA error
#endif

}  // namespace bias_act
}  // namespace genfast
