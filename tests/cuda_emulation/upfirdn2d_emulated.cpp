// The CUDA upfirdn2d kernels (kernels/upfirdn2d.cu) and their real bindings
// (csrc/upfirdn2d_bindings.cpp) compiled as host C++ over the SIMT emulator (cuda_emulation.h)
// into the Python module upfirdn2d_emulated. Built by tests/cuda_emulation/build.py.
#define GENFAST_WITH_CUDA 1
#define GENFAST_CUDA_EMULATION 1

#include "upfirdn2d.cu"
#include "upfirdn2d_bindings.cpp"

// The bindings also bind the C++ CPU kernels, which this module does not compile.
void genfast::upfirdn2d::upfirdn2d_cpu(const Args&) { throw std::logic_error("upfirdn2d_emulated: no CPU kernels here"); }

PYBIND11_MODULE(upfirdn2d_emulated, m) {
  for (genfast::Binder bind : genfast::binders()) bind(m);
}
