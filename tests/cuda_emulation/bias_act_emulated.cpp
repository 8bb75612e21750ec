// The CUDA bias_act kernels (kernels/bias_act.cu) and their real bindings
// (csrc/bias_act_bindings.cpp) compiled as host C++ over the SIMT emulator (cuda_emulation.h)
// into the Python module bias_act_emulated. Built by tests/cuda_emulation/build.py.
#define GENFAST_WITH_CUDA 1
#define GENFAST_CUDA_EMULATION 1

#include "bias_act.cu"
#include "bias_act_bindings.cpp"

// The bindings also bind the C++ CPU kernels, which this module does not compile.
void genfast::bias_act::bias_act_cpu(const Args&) { throw std::logic_error("bias_act_emulated: no CPU kernels here"); }

PYBIND11_MODULE(bias_act_emulated, m) {
  for (genfast::Binder bind : genfast::binders()) bind(m);
}
