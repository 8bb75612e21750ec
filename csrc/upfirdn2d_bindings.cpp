// pybind11 bindings of the upfirdn2d family (see csrc/bindings.h, kernels/upfirdn2d.h).
//
// upfirdn2d_cpu / upfirdn2d_cuda take out, x and the prepared filter g as TensorViews, by name,
// and the factors and padding as one Upfirdn2dOptions (named fields, all keyword, all
// required). Sizes, dtype, the filter's taps (1-D: separable) and the memory format (NCHW or
// channels_last, the same for x and out) are read from the views and checked before any kernel.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <sstream>
#include <string>

#include "bindings.h"
#include "common.h"
#include "tensor_view.h"
#include "upfirdn2d.h"

namespace py = pybind11;
using namespace genfast;

// Named namespace + py::module_local(): the tests' CUDA emulation module binds it too, and an
// options object of either module must reach the other's entry points.
namespace genfast {
namespace upfirdn2d {
struct Upfirdn2dOptions {
  int64_t upx = 1, upy = 1, downx = 1, downy = 1;
  int64_t padx0 = 0, padx1 = 0, pady0 = 0, pady1 = 0;  // negative: crop
};
}  // namespace upfirdn2d
}  // namespace genfast
using genfast::upfirdn2d::Upfirdn2dOptions;

namespace {

// NHWC in memory: strides (H*W*C, 1, W*C, C), size-1 dimensions excepted.
bool channels_last_dense(const TensorView& t) {
  if (t.ndim != 4) return false;
  const int64_t n = t.shape[0], c = t.shape[1], h = t.shape[2], w = t.shape[3];
  const int64_t want[4] = {h * w * c, 1, w * c, c};
  for (int d = 0; d < 4; ++d)
    if (t.shape[d] != 1 && t.strides[d] != want[d]) return false;
  (void)n;
  return true;
}

upfirdn2d::Args make_args(const char* fn, bool cuda, const TensorView& out, const TensorView& x, const TensorView& g,
                          const Upfirdn2dOptions& o) {
  expect_float_dtype(fn, "x", x);
  expect_ndim(fn, "x", x, 4);
  if (cuda)
    expect_cuda(fn, "x", x);
  else
    expect_cpu(fn, "x", x);
  const bool channels_last = !x.contiguous();
  if (channels_last && !channels_last_dense(x))
    fail_value(fn, "x must be contiguous or channels_last (dense), got " + describe(x));
  expect_dtype(fn, "g", g, F32);
  if (g.ndim != 1 && g.ndim != 2) fail_value(fn, "g must be 1-D (separable) or 2-D, got " + describe(g));
  expect_contiguous(fn, "g", g);
  expect_same_device(fn, "g", g, x);
  upfirdn2d::Args a{};
  a.dtype = x.dtype;
  a.n = x.size(0);
  a.c = x.size(1);
  a.h = x.size(2);
  a.w = x.size(3);
  a.separable = g.ndim == 1;
  a.fh = g.size(0);
  a.fw = a.separable ? g.size(0) : g.size(1);
  if (a.fh < 1 || a.fw < 1) fail_value(fn, "g must have at least one tap, got " + describe(g));
  a.upx = o.upx;
  a.upy = o.upy;
  a.downx = o.downx;
  a.downy = o.downy;
  a.padx0 = o.padx0;
  a.padx1 = o.padx1;
  a.pady0 = o.pady0;
  a.pady1 = o.pady1;
  a.oh = upfirdn2d::floor_div(a.h * a.upy + a.pady0 + a.pady1 - a.fh, a.downy) + 1;
  a.ow = upfirdn2d::floor_div(a.w * a.upx + a.padx0 + a.padx1 - a.fw, a.downx) + 1;
  if (a.oh < 0 || a.ow < 0)
    fail_value(fn, "the options and g leave no output for x " + describe(x) + " (negative size)");
  expect_dtype(fn, "out", out, x.dtype);
  expect_shape(fn, "out", out, {a.n, a.c, a.oh, a.ow});
  expect_same_device(fn, "out", out, x);
  if (channels_last ? !channels_last_dense(out) : !out.contiguous())
    fail_value(fn, std::string("out must be ") + (channels_last ? "channels_last" : "contiguous") +
                       " (dense) like x, got " + describe(out));
  a.channels_last = channels_last;
  a.out = out.data;
  a.x = x.data;
  a.g = g.ptr<const float>();
  return a;
}

int checked_threads(const char* fn, int num_threads) {
  if (num_threads < 1) fail_value(fn, "num_threads must be >= 1, got " + std::to_string(num_threads));
  return num_threads;
}

}  // namespace

GENFAST_REGISTER_BINDINGS(upfirdn2d) {
  py::class_<Upfirdn2dOptions>(m, "Upfirdn2dOptions", py::module_local(),
                               "Factors and padding of upfirdn2d_* (all keyword, all required).")
      .def(py::init([](int64_t upx, int64_t upy, int64_t downx, int64_t downy, int64_t padx0, int64_t padx1,
                       int64_t pady0, int64_t pady1) {
             if (upx < 1 || upy < 1 || downx < 1 || downy < 1)
               fail_value("Upfirdn2dOptions", "up and down factors must be >= 1");
             return Upfirdn2dOptions{upx, upy, downx, downy, padx0, padx1, pady0, pady1};
           }),
           py::kw_only(), py::arg("upx"), py::arg("upy"), py::arg("downx"), py::arg("downy"), py::arg("padx0"),
           py::arg("padx1"), py::arg("pady0"), py::arg("pady1"))
      .def_readonly("upx", &Upfirdn2dOptions::upx)
      .def_readonly("upy", &Upfirdn2dOptions::upy)
      .def_readonly("downx", &Upfirdn2dOptions::downx)
      .def_readonly("downy", &Upfirdn2dOptions::downy)
      .def_readonly("padx0", &Upfirdn2dOptions::padx0)
      .def_readonly("padx1", &Upfirdn2dOptions::padx1)
      .def_readonly("pady0", &Upfirdn2dOptions::pady0)
      .def_readonly("pady1", &Upfirdn2dOptions::pady1)
      .def("__repr__", [](const Upfirdn2dOptions& o) {
        std::ostringstream s;
        s << "Upfirdn2dOptions(upx=" << o.upx << ", upy=" << o.upy << ", downx=" << o.downx << ", downy=" << o.downy
          << ", padx0=" << o.padx0 << ", padx1=" << o.padx1 << ", pady0=" << o.pady0 << ", pady1=" << o.pady1 << ")";
        return s.str();
      });

  m.def(
      "upfirdn2d_cpu",
      [](const TensorView& out, const TensorView& x, const TensorView& g, const Upfirdn2dOptions& options,
         int num_threads) {
        const char* fn = "upfirdn2d_cpu";
        auto a = make_args(fn, false, out, x, g, options);
        a.num_threads = checked_threads(fn, num_threads);
        py::gil_scoped_release release;
        upfirdn2d::upfirdn2d_cpu(a);
      },
      py::arg("out"), py::arg("x"), py::arg("g"), py::kw_only(), py::arg("options"), py::arg("num_threads"));

#ifdef GENFAST_WITH_CUDA
  m.def(
      "upfirdn2d_cuda",
      [](const TensorView& out, const TensorView& x, const TensorView& g, const Upfirdn2dOptions& options,
         uintptr_t stream) {
        const char* fn = "upfirdn2d_cuda";
        auto a = make_args(fn, true, out, x, g, options);
        a.stream = stream;
        a.device = x.device < 0 ? 0 : x.device;  // the CPU-hosted emulation runs on CPU tensors
        py::gil_scoped_release release;
        upfirdn2d::upfirdn2d_cuda(a);
      },
      py::arg("out"), py::arg("x"), py::arg("g"), py::kw_only(), py::arg("options"), py::arg("stream"));
#endif
}
