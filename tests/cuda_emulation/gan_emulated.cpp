// The CUDA pixel_norm kernels (kernels/gan.cu) and their real bindings (csrc/gan_bindings.cpp)
// compiled as host C++ over the SIMT emulator (cuda_emulation.h) into the Python module
// gan_emulated. Built by tests/cuda_emulation/build.py.
#define GENFAST_WITH_CUDA 1
#define GENFAST_CUDA_EMULATION 1

#include "gan.cu"
#include "gan_bindings.cpp"

// The bindings also bind the C++ CPU kernels, which this module does not compile.
void genfast::gan::pixel_norm_cpu(const PixelNormArgs&) { throw std::logic_error("gan_emulated: no CPU kernels here"); }

PYBIND11_MODULE(gan_emulated, m) {
  for (genfast::Binder bind : genfast::binders()) bind(m);
}
