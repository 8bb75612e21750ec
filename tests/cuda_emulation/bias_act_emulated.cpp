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
  // Tests: force the launchers' 64-bit index path; count the launches that took it.
  m.def("set_force_int64_index", [](bool force) { gf_emu::force_int64_index() = force; });
  m.def("int64_index_launches", [] { return gf_emu::int64_index_launches(); });
}
