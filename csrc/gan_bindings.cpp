// pybind11 bindings of the GAN-layer family (see csrc/bindings.h).
#include <stdexcept>

#include "bindings.h"
#include "common.h"
#include "gan.h"

namespace py = pybind11;
using namespace genfast;

namespace {

gan::PixelNormArgs make_pixel_norm_args(int mode, int dtype, int64_t outer, int64_t C, int64_t S, uintptr_t out,
                                        uintptr_t x, uintptr_t dy, double eps) {
  if (outer < 0 || C < 1 || S < 1) throw std::invalid_argument("pixel_norm: bad sizes");
  if (mode == gan::PN_GRAD && dy == 0) throw std::invalid_argument("pixel_norm: the gradient needs dy");
  gan::PixelNormArgs a{};
  a.mode = mode; a.dtype = dtype;
  a.outer = outer; a.C = C; a.S = S;
  a.out = mptr(out); a.x = cptr(x); a.dy = cptr(dy);
  a.eps = eps;
  return a;
}

}  // namespace

GENFAST_REGISTER_BINDINGS(gan) {
  m.def(
      "pixel_norm_cpu",
      [](int mode, int dtype, int64_t outer, int64_t C, int64_t S, uintptr_t out, uintptr_t x, uintptr_t dy,
         double eps, int num_threads) {
        auto a = make_pixel_norm_args(mode, dtype, outer, C, S, out, x, dy, eps);
        a.num_threads = num_threads;
        py::gil_scoped_release release;
        gan::pixel_norm_cpu(a);
      },
      py::arg("mode"), py::arg("dtype"), py::arg("outer"), py::arg("C"), py::arg("S"), py::arg("out"), py::arg("x"),
      py::arg("dy"), py::arg("eps"), py::arg("num_threads"));

#ifdef GENFAST_WITH_CUDA
  m.def(
      "pixel_norm_cuda",
      [](int mode, int dtype, int64_t outer, int64_t C, int64_t S, uintptr_t out, uintptr_t x, uintptr_t dy,
         double eps, uintptr_t stream, int device) {
        auto a = make_pixel_norm_args(mode, dtype, outer, C, S, out, x, dy, eps);
        a.stream = stream;
        a.device = device;
        py::gil_scoped_release release;
        gan::pixel_norm_cuda(a);
      },
      py::arg("mode"), py::arg("dtype"), py::arg("outer"), py::arg("C"), py::arg("S"), py::arg("out"), py::arg("x"),
      py::arg("dy"), py::arg("eps"), py::arg("stream"), py::arg("device"));
#endif
}
