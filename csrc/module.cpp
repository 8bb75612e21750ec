// genfast._C: pybind11 bindings. Entry points take tensors as TensorViews (csrc/tensor_view.h:
// read from torch tensors through the Python tensor protocol) and, for CUDA, the stream
// handle; the Python wrappers validate the user's arguments first. Nothing here links libtorch.
//
// Op families bind themselves from csrc/<family>_bindings.cpp (GENFAST_REGISTER_BINDINGS);
// this file holds only the module and the build/runtime queries.
#include <pybind11/pybind11.h>

#include <string>

#include "bindings.h"
#include "common.h"
#include "cpu_isa.h"
#include "tensor_view.h"

#ifdef GENFAST_WITH_CUDA
#include "cuda_runtime_info.h"
#endif

namespace py = pybind11;

namespace {

py::dict build_info() {
  py::dict d;
#ifdef GENFAST_WITH_CUDA
  d["cuda"] = true;
  d["cuda_archs"] = std::string(GENFAST_CUDA_ARCHS);
  d["cuda_runtime_version"] = genfast::cuda_runtime_version();
#else
  d["cuda"] = false;
  d["cuda_archs"] = std::string();
  d["cuda_runtime_version"] = 0;
#endif
#ifdef GENFAST_WITH_OPENMP
  d["openmp"] = true;
#else
  d["openmp"] = false;
#endif
#ifdef GF_CPU_HAVE_CLONES
  d["cpu_clones"] = std::string("baseline avx2 avx512");
#else
  d["cpu_clones"] = std::string("baseline");
#endif
  return d;
}

// The CPU kernels' instruction-set clone in use, the widest this CPU runs, and its flags.
py::dict cpu_isa_info() {
  py::dict d;
  d["isa"] = std::string(genfast::cpu_isa_name(genfast::cpu_isa()));
  d["widest"] = std::string(genfast::cpu_isa_name(genfast::cpu_isa_supported()));
  d["flags"] = genfast::cpu_isa_flags();
  return d;
}

// Number of devices the extension's own (static) CUDA runtime sees, or the reason it sees
// none (e.g. a driver older than the runtime it was built with).
py::tuple py_cuda_device_count() {
#ifdef GENFAST_WITH_CUDA
  std::string error;
  int count = genfast::cuda_device_count(&error);
  return py::make_tuple(count, error);
#else
  return py::make_tuple(0, std::string("genfast was built without a CUDA compiler"));
#endif
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "genfast native kernels (C++ CPU kernels, and CUDA kernels when built with nvcc)";
  m.def("build_info", &build_info);
  m.def("cuda_device_count", &py_cuda_device_count);
  m.def("cpu_isa_info", &cpu_isa_info);
  // std::invalid_argument (unknown name, or wider than this CPU) arrives as ValueError.
  m.def("set_cpu_isa", &genfast::set_cpu_isa, py::arg("name"));
  genfast::bind_tensor_view(m);  // _C.DTYPE_CODES
  for (genfast::Binder bind : genfast::binders()) bind(m);
}
