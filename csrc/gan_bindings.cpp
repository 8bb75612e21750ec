// pybind11 bindings of the GAN-layer family: pixel_norm (see csrc/bindings.h).
//
// Each entry point takes its tensors as TensorViews (csrc/tensor_view.h), by name, and the
// call's static configuration as one PixelNormOptions (named fields, all required; the mode by
// name). The bindings check every view against x and derive the kernels' [outer, C, S]
// geometry from x itself: a missing, swapped or mis-shaped tensor raises here instead of
// reaching a kernel.
#include <pybind11/pybind11.h>

#include <sstream>
#include <stdexcept>
#include <string>

#include "bindings.h"
#include "common.h"
#include "dense_layout.h"
#include "gan.h"
#include "tensor_view.h"

namespace py = pybind11;
using namespace genfast;

namespace {

// What a call's signature fixes (genfast/ops/gan.py builds one per signature).
struct PixelNormOptions {
  std::string mode;  // "forward" or "grad"
  int64_t dim = 1;   // the normalised dimension of x (>= 0)
  double eps = 1e-8;
  int mode_code = gan::PN_FORWARD;
};

std::string repr(const PixelNormOptions& o) {
  std::ostringstream s;
  s << "PixelNormOptions(mode='" << o.mode << "', dim=" << o.dim << ", eps=" << o.eps << ")";
  return s.str();
}

gan::PixelNormArgs make_args(const char* fn, const TensorView& out, const TensorView& x, const TensorView& dy,
                             const PixelNormOptions& o) {
  expect_float_dtype(fn, "x", x);
  expect_dense(fn, "x", x);
  expect_layout_of(fn, "out", out, x);
  if (o.mode_code == gan::PN_GRAD)
    expect_layout_of(fn, "dy", dy, x);
  else if (dy.present)
    fail_value(fn, "dy must be None in forward mode");
  if (o.dim >= x.ndim) fail_value(fn, "options.dim=" + std::to_string(o.dim) + " is out of range for x " + describe(x));
  gan::PixelNormArgs a{};
  a.mode = o.mode_code;
  a.dtype = x.dtype;
  const int64_t n = x.numel(), C = x.size(o.dim);
  if (C == 1) {  // every element is its own row
    a.outer = n;
    a.C = 1;
    a.S = 1;
  } else {
    a.C = C;
    a.S = x.stride(o.dim);
    a.outer = n / (C * a.S);
  }
  a.out = out.data;
  a.x = x.data;
  a.dy = dy.data;
  a.eps = o.eps;
  return a;
}

}  // namespace

GENFAST_REGISTER_BINDINGS(gan) {
  py::dict modes;
  modes["forward"] = static_cast<int>(gan::PN_FORWARD);
  modes["grad"] = static_cast<int>(gan::PN_GRAD);
  m.attr("PIXEL_NORM_MODES") = modes;

  py::class_<PixelNormOptions>(m, "PixelNormOptions", "Options of one pixel_norm call (all keyword, all required).")
      .def(py::init([](const std::string& mode, int64_t dim, double eps) {
             const char* fn = "PixelNormOptions";
             PixelNormOptions o{mode, dim, eps};
             if (mode == "forward")
               o.mode_code = gan::PN_FORWARD;
             else if (mode == "grad")
               o.mode_code = gan::PN_GRAD;
             else
               fail_value(fn, "unknown mode '" + mode + "'; expected one of forward, grad");
             if (dim < 0) fail_value(fn, "dim must be >= 0 (normalise it first), got " + std::to_string(dim));
             if (!(eps >= 0)) fail_value(fn, "eps must be >= 0");
             return o;
           }),
           py::kw_only(), py::arg("mode"), py::arg("dim"), py::arg("eps"))
      .def_readonly("mode", &PixelNormOptions::mode)
      .def_readonly("dim", &PixelNormOptions::dim)
      .def_readonly("eps", &PixelNormOptions::eps)
      .def("__repr__", &repr);

  m.def(
      "pixel_norm_cpu",
      [](const TensorView& out, const TensorView& x, const TensorView& dy, const PixelNormOptions& options,
         int num_threads) {
        const char* fn = "pixel_norm_cpu";
        expect_cpu(fn, "x", x);
        auto a = make_args(fn, out, x, dy, options);
        if (num_threads < 1) fail_value(fn, "num_threads must be >= 1, got " + std::to_string(num_threads));
        a.num_threads = num_threads;
        if (x.numel() == 0) return;
        py::gil_scoped_release release;
        gan::pixel_norm_cpu(a);
      },
      py::arg("out"), py::arg("x"), py::kw_only(), py::arg("dy"), py::arg("options"), py::arg("num_threads"));

#ifdef GENFAST_WITH_CUDA
  m.def(
      "pixel_norm_cuda",
      [](const TensorView& out, const TensorView& x, const TensorView& dy, const PixelNormOptions& options,
         uintptr_t stream) {
        const char* fn = "pixel_norm_cuda";
        expect_cuda(fn, "x", x);
        if (x.dtype == F64) fail_type(fn, "the CUDA kernels take float32, float16 or bfloat16, got x " + describe(x));
        auto a = make_args(fn, out, x, dy, options);
        a.stream = stream;
        a.device = x.device < 0 ? 0 : x.device;  // the CPU-hosted emulation runs on CPU tensors
        if (x.numel() == 0) return;
        py::gil_scoped_release release;
        gan::pixel_norm_cuda(a);
      },
      py::arg("out"), py::arg("x"), py::kw_only(), py::arg("dy"), py::arg("options"), py::arg("stream"));
#endif
}
