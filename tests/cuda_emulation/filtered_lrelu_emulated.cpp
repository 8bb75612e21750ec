// The CUDA filtered_lrelu kernels (kernels/filtered_lrelu.cu) and their real bindings
// (csrc/filtered_lrelu_bindings.cpp) compiled as host C++ over the SIMT emulator
// (cuda_emulation.h) into the Python module filtered_lrelu_emulated. Built by
// tests/cuda_emulation/build.py.
#define GENFAST_WITH_CUDA 1
#define GENFAST_CUDA_EMULATION 1

#include "filtered_lrelu.cu"
#include "filtered_lrelu_bindings.cpp"

// The bindings also bind the C++ CPU kernels, which this module does not compile.
void genfast::filtered_lrelu::filtered_lrelu_cpu(const Args&) {
  throw std::logic_error("filtered_lrelu_emulated: no CPU kernels here");
}

PYBIND11_MODULE(filtered_lrelu_emulated, m) {
  for (genfast::Binder bind : genfast::binders()) bind(m);
}
