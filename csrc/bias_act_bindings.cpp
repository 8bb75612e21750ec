// pybind11 bindings of the bias_act family (see csrc/bindings.h).
#include <stdexcept>

#include "bias_act.h"
#include "bindings.h"
#include "common.h"

namespace py = pybind11;
using namespace genfast;

namespace {

bias_act::Args make_bias_act_args(int mode, int act, int dtype, int64_t n, int64_t C, int64_t S,
                                  uintptr_t out, uintptr_t db, uintptr_t x, uintptr_t b, uintptr_t dy,
                                  uintptr_t ddx, double alpha, double gain, double clamp) {
  if (n < 0 || C < 1 || S < 1) throw std::invalid_argument("bias_act: bad sizes");
  bias_act::Args a{};
  a.mode = mode; a.act = act; a.dtype = dtype;
  a.n = n; a.C = C; a.S = S;
  a.out = mptr(out);
  a.db = mptr(db);
  a.x = cptr(x); a.b = cptr(b); a.dy = cptr(dy); a.ddx = cptr(ddx);
  a.p = bias_act::Params{alpha, gain, clamp};
  return a;
}

}  // namespace

GENFAST_REGISTER_BINDINGS(bias_act) {
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
