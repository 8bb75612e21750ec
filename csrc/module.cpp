// genfast._C: pybind11 bindings. Every function takes raw addresses (ints), sizes, dtype
// codes and, for CUDA, the stream handle and device index; the Python wrappers validate
// everything before calling. Nothing here links libtorch.
#include <pybind11/pybind11.h>

#include <string>

#include "bias_act.h"
#include "common.h"

#ifdef GENFAST_WITH_CUDA
#include "cuda_runtime_info.h"
#endif

namespace py = pybind11;
using namespace genfast;

namespace {

const void* cptr(uintptr_t p) { return reinterpret_cast<const void*>(p); }

bias_act::Args make_bias_act_args(int mode, int act, int dtype, int64_t n, int64_t C, int64_t S,
                                  uintptr_t out, uintptr_t db, uintptr_t x, uintptr_t b, uintptr_t dy,
                                  uintptr_t ddx, double alpha, double gain, double clamp) {
  if (n < 0 || C < 1 || S < 1) throw std::invalid_argument("bias_act: bad sizes");
  bias_act::Args a{};
  a.mode = mode; a.act = act; a.dtype = dtype;
  a.n = n; a.C = C; a.S = S;
  a.out = reinterpret_cast<void*>(out);
  a.db = reinterpret_cast<void*>(db);
  a.x = cptr(x); a.b = cptr(b); a.dy = cptr(dy); a.ddx = cptr(ddx);
  a.p = bias_act::Params{alpha, gain, clamp};
  return a;
}

py::dict build_info() {
  py::dict d;
#ifdef GENFAST_WITH_CUDA
  d["cuda"] = true;
  d["cuda_archs"] = std::string(GENFAST_CUDA_ARCHS);
  d["cuda_runtime_version"] = cuda_runtime_version();
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

  m.def(
      "bias_act_cpu",
      [](int mode, int act, int dtype, int64_t n, int64_t C, int64_t S, uintptr_t out,
         uintptr_t db, uintptr_t x, uintptr_t b, uintptr_t dy, uintptr_t ddx, double alpha, double gain,
         double clamp, int num_threads) {
        auto a = make_bias_act_args(mode, act, dtype, n, C, S, out, db, x, b, dy, ddx, alpha, gain, clamp);
        a.num_threads = num_threads;
        py::gil_scoped_release release;
        bias_act::bias_act_cpu(a);
      },
      py::arg("mode"), py::arg("act"), py::arg("dtype"), py::arg("n"), py::arg("C"), py::arg("S"),
      py::arg("out"), py::arg("db"), py::arg("x"), py::arg("b"), py::arg("dy"), py::arg("ddx"), py::arg("alpha"),
      py::arg("gain"), py::arg("clamp"), py::arg("num_threads"));

#ifdef GENFAST_WITH_CUDA
  m.def(
      "bias_act_cuda",
      [](int mode, int act, int dtype, int64_t n, int64_t C, int64_t S, uintptr_t out,
         uintptr_t x, uintptr_t b, uintptr_t dy, uintptr_t ddx, double alpha, double gain,
         double clamp, uintptr_t stream, int device) {
        auto a = make_bias_act_args(mode, act, dtype, n, C, S, out, 0, x, b, dy, ddx, alpha, gain, clamp);
        a.stream = stream;
        a.device = device;
        py::gil_scoped_release release;
        bias_act::bias_act_cuda(a);
      },
      py::arg("mode"), py::arg("act"), py::arg("dtype"), py::arg("n"), py::arg("C"), py::arg("S"),
      py::arg("out"), py::arg("x"), py::arg("b"), py::arg("dy"), py::arg("ddx"), py::arg("alpha"),
      py::arg("gain"), py::arg("clamp"), py::arg("stream"), py::arg("device"));
#endif
}
