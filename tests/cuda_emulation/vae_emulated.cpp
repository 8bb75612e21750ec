// The CUDA VAE kernels (kernels/vae.cu) and their real bindings (csrc/vae_bindings.cpp)
// compiled as host C++ over the SIMT emulator (cuda_emulation.h) into the Python module
// vae_emulated. Built by tests/cuda_emulation/build.py.
#define GENFAST_WITH_CUDA 1
#define GENFAST_CUDA_EMULATION 1

#include "vae.cu"
#include "vae_bindings.cpp"

// The bindings also bind the C++ CPU kernels, which this module does not compile.
void genfast::vae::forward_cpu(const Args&) { throw std::logic_error("vae_emulated: no CPU kernels here"); }
void genfast::vae::backward_cpu(const Args&) { throw std::logic_error("vae_emulated: no CPU kernels here"); }

PYBIND11_MODULE(vae_emulated, m) {
  for (genfast::Binder bind : genfast::binders()) bind(m);
}
