// The CUDA GroupNorm kernels (kernels/group_norm.cu) and their real bindings
// (csrc/group_norm_bindings.cpp) compiled as host C++ over the SIMT emulator (cuda_emulation.h)
// into the Python module group_norm_emulated. Built by tests/cuda_emulation/build.py.
#define GENFAST_WITH_CUDA 1
#define GENFAST_CUDA_EMULATION 1

#include "group_norm.cu"
#include "group_norm_bindings.cpp"

// The bindings also bind the C++ CPU kernels, which this module does not compile.
void genfast::group_norm::group_norm_forward_cpu(const ForwardArgs&) {
  throw std::logic_error("group_norm_emulated: no CPU kernels here");
}
void genfast::group_norm::group_norm_backward_cpu(const BackwardArgs&) {
  throw std::logic_error("group_norm_emulated: no CPU kernels here");
}

PYBIND11_MODULE(group_norm_emulated, m) {
  for (genfast::Binder bind : genfast::binders()) bind(m);
  // Tests: force the launchers' 64-bit index path; count the launches that took it.
  m.def("set_force_int64_index", [](bool force) { gf_emu::force_int64_index() = force; });
  m.def("int64_index_launches", [] { return gf_emu::int64_index_launches(); });
}
