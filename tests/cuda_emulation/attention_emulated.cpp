// The CUDA attention kernels (kernels/attention.cu) and their real pybind11 bindings
// (csrc/attention_bindings.cpp), compiled as host C++ over the SIMT emulator
// (cuda_emulation.h) into a Python module, attention_emulated, with the same
// attention_forward_cuda(params) entry point as genfast._C. Built and used by
// tests/test_attention_cuda_emulated.py.
#define GENFAST_WITH_CUDA 1
#define GENFAST_CUDA_EMULATION 1

#include "attention.cu"
#include "attention_bindings.cpp"

namespace genfast {
namespace attention {
// The bindings also bind the C++ CPU kernels (csrc/attention_cpu.cpp), which this module does
// not compile: the tests only call attention_forward_cuda.
void forward_cpu(const Params&) { throw std::logic_error("attention_emulated: the CPU kernels are not in this module"); }
void backward_cpu(const Params&) { throw std::logic_error("attention_emulated: the CPU kernels are not in this module"); }
}  // namespace attention
}  // namespace genfast

PYBIND11_MODULE(attention_emulated, m) {
  for (genfast::Binder bind : genfast::binders()) bind(m);
}
