// pybind11 bindings of the filtered_lrelu family (see csrc/bindings.h, kernels/filtered_lrelu.h).
//
// filtered_lrelu_cpu / filtered_lrelu_cuda take the tensors as TensorViews, by name (x and out
// with any strides, the optional bias and sign record, the prepared filters g1 and g2), and the
// chain's geometry and activation as one FilteredLReLUOptions (named fields, all keyword, all
// required; the mode by name). Sizes, strides, dtype and the filters' taps (1-D: separable)
// are read from the views and checked before any kernel runs.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <sstream>
#include <string>

#include "bindings.h"
#include "common.h"
#include "filtered_lrelu.h"
#include "tensor_view.h"

namespace py = pybind11;
using namespace genfast;

// Named namespace + py::module_local(): the tests' CUDA emulation module binds it too, and an
// options object of either module must reach the other's entry points.
namespace genfast {
namespace filtered_lrelu {
// The chain of kernels/filtered_lrelu.h: T = upfirdn(in, g1, up, pad (pad1_x, pad1_y)) of
// (tmp_h, tmp_w) pixels, activated (ACT) or masked (MASK), then upfirdn(T', g2, down, pad
// (pad2_x, pad2_y)) into out.
struct FilteredLReLUOptions {
  int mode = filtered_lrelu::ACT;
  int64_t up = 1, pad1_x = 0, pad1_y = 0, tmp_h = 0, tmp_w = 0;
  int64_t down = 1, pad2_x = 0, pad2_y = 0;
  double gain = 1.0, slope = 0.2, clamp = -1.0;  // clamp < 0: none (ACT only)
};
}  // namespace filtered_lrelu
}  // namespace genfast
using genfast::filtered_lrelu::FilteredLReLUOptions;

namespace {

const char* const kModeNames[] = {"act", "mask"};

int mode_code(const std::string& name) {
  for (int mode : {filtered_lrelu::ACT, filtered_lrelu::MASK})
    if (name == kModeNames[mode]) return mode;
  fail_value("FilteredLReLUOptions", "mode must be 'act' or 'mask', got '" + name + "'");
}

void set_filter(const char* fn, const char* name, const TensorView& g, const TensorView& x, const float*& ptr,
                int& taps_h, int& taps_w, bool& separable) {
  expect_dtype(fn, name, g, F32);
  if (g.ndim != 1 && g.ndim != 2)
    fail_value(fn, std::string(name) + " must be 1-D (separable) or 2-D, got " + describe(g));
  expect_contiguous(fn, name, g);
  expect_same_device(fn, name, g, x);
  if (g.numel() < 1) fail_value(fn, std::string(name) + " must have at least one tap, got " + describe(g));
  ptr = g.ptr<const float>();
  separable = g.ndim == 1;
  taps_h = static_cast<int>(g.size(0));
  taps_w = static_cast<int>(separable ? g.size(0) : g.size(1));
}

filtered_lrelu::Args make_args(const char* fn, bool cuda, const TensorView& out, const TensorView& x,
                               const TensorView& b, const TensorView& signs, const TensorView& g1, const TensorView& g2,
                               const FilteredLReLUOptions& o) {
  expect_float_dtype(fn, "x", x);
  expect_ndim(fn, "x", x, 4);
  if (cuda)
    expect_cuda(fn, "x", x);
  else
    expect_cpu(fn, "x", x);
  const int64_t n = x.size(0), c = x.size(1);
  expect_dtype(fn, "out", out, x.dtype);
  expect_shape(fn, "out", out, {n, c, -1, -1});
  expect_same_device(fn, "out", out, x);
  filtered_lrelu::Args a{};
  a.mode = o.mode;
  a.dtype = x.dtype;
  a.N = n;
  a.C = c;
  a.in_h = x.size(2);
  a.in_w = x.size(3);
  for (int d = 0; d < 4; ++d) {
    a.in_s[d] = x.stride(d);
    a.out_s[d] = out.stride(d);
  }
  a.out = out.data;
  a.x = x.data;
  if (b.present) {
    if (o.mode != filtered_lrelu::ACT) fail_value(fn, "b is added in mode 'act' only, got " + describe(b));
    expect_dtype(fn, "b", b, x.dtype);
    expect_shape(fn, "b", b, {c});
    expect_contiguous(fn, "b", b);
    expect_same_device(fn, "b", b, x);
    a.b = b.data;
  }
  if (signs.present || o.mode == filtered_lrelu::MASK) {  // written in ACT mode when given, read in MASK mode
    expect_dtype(fn, "signs", signs, U8);
    expect_shape(fn, "signs", signs, {n, c, o.tmp_h, o.tmp_w});
    expect_contiguous(fn, "signs", signs);
    expect_same_device(fn, "signs", signs, x);
    a.signs = signs.ptr<uint8_t>();
  }
  set_filter(fn, "g1", g1, x, a.g1, a.g1h, a.g1w, a.g1_sep);
  set_filter(fn, "g2", g2, x, a.g2, a.g2h, a.g2w, a.g2_sep);
  a.u1 = o.up;
  a.p1x = o.pad1_x;
  a.p1y = o.pad1_y;
  a.th = o.tmp_h;
  a.tw = o.tmp_w;
  a.d2 = o.down;
  a.p2x = o.pad2_x;
  a.p2y = o.pad2_y;
  a.oh = out.size(2);
  a.ow = out.size(3);
  a.gain = o.gain;
  a.slope = o.slope;
  a.clamp = o.mode == filtered_lrelu::ACT ? o.clamp : -1.0;
  return a;
}

int checked_threads(const char* fn, int num_threads) {
  if (num_threads < 1) fail_value(fn, "num_threads must be >= 1, got " + std::to_string(num_threads));
  return num_threads;
}

}  // namespace

GENFAST_REGISTER_BINDINGS(filtered_lrelu) {
  {
    py::dict codes;  // the sign record's bytes, shared by every backend
    codes["positive"] = static_cast<int>(filtered_lrelu::POSITIVE);
    codes["negative"] = static_cast<int>(filtered_lrelu::NEGATIVE);
    codes["clamped"] = static_cast<int>(filtered_lrelu::CLAMPED);
    m.attr("FILTERED_LRELU_SIGN_CODES") = codes;
  }

  py::class_<FilteredLReLUOptions>(m, "FilteredLReLUOptions", py::module_local(),
                                   "Geometry and activation of filtered_lrelu_* (all keyword, all required).")
      .def(
          py::init([](const std::string& mode, int64_t up, int64_t pad1_x, int64_t pad1_y, int64_t tmp_h, int64_t tmp_w,
                      int64_t down, int64_t pad2_x, int64_t pad2_y, double gain, double slope, double clamp) {
            const char* fn = "FilteredLReLUOptions";
            const int code = mode_code(mode);
            if (up < 1 || down < 1) fail_value(fn, "up and down must be >= 1");
            if (tmp_h < 0 || tmp_w < 0) fail_value(fn, "tmp_h and tmp_w must be >= 0");
            if (gain != gain || slope != slope || clamp != clamp)
              fail_value(fn, "gain, slope and clamp must not be NaN");
            return FilteredLReLUOptions{code, up,     pad1_x, pad1_y, tmp_h, tmp_w,
                                        down, pad2_x, pad2_y, gain,   slope, clamp};
          }),
          py::kw_only(), py::arg("mode"), py::arg("up"), py::arg("pad1_x"), py::arg("pad1_y"), py::arg("tmp_h"),
          py::arg("tmp_w"), py::arg("down"), py::arg("pad2_x"), py::arg("pad2_y"), py::arg("gain"), py::arg("slope"),
          py::arg("clamp"))
      .def_property_readonly("mode", [](const FilteredLReLUOptions& o) { return std::string(kModeNames[o.mode]); })
      .def_readonly("up", &FilteredLReLUOptions::up)
      .def_readonly("pad1_x", &FilteredLReLUOptions::pad1_x)
      .def_readonly("pad1_y", &FilteredLReLUOptions::pad1_y)
      .def_readonly("tmp_h", &FilteredLReLUOptions::tmp_h)
      .def_readonly("tmp_w", &FilteredLReLUOptions::tmp_w)
      .def_readonly("down", &FilteredLReLUOptions::down)
      .def_readonly("pad2_x", &FilteredLReLUOptions::pad2_x)
      .def_readonly("pad2_y", &FilteredLReLUOptions::pad2_y)
      .def_readonly("gain", &FilteredLReLUOptions::gain)
      .def_readonly("slope", &FilteredLReLUOptions::slope)
      .def_readonly("clamp", &FilteredLReLUOptions::clamp)
      .def("__repr__", [](const FilteredLReLUOptions& o) {
        std::ostringstream s;
        s << "FilteredLReLUOptions(mode='" << kModeNames[o.mode] << "', up=" << o.up << ", pad1_x=" << o.pad1_x
          << ", pad1_y=" << o.pad1_y << ", tmp_h=" << o.tmp_h << ", tmp_w=" << o.tmp_w << ", down=" << o.down
          << ", pad2_x=" << o.pad2_x << ", pad2_y=" << o.pad2_y << ", gain=" << o.gain << ", slope=" << o.slope
          << ", clamp=" << o.clamp << ")";
        return s.str();
      });

  m.def(
      "filtered_lrelu_cpu",
      [](const TensorView& out, const TensorView& x, const TensorView& b, const TensorView& signs, const TensorView& g1,
         const TensorView& g2, const FilteredLReLUOptions& options, int num_threads) {
        const char* fn = "filtered_lrelu_cpu";
        auto a = make_args(fn, false, out, x, b, signs, g1, g2, options);
        a.num_threads = checked_threads(fn, num_threads);
        py::gil_scoped_release release;
        filtered_lrelu::filtered_lrelu_cpu(a);
      },
      py::arg("out"), py::arg("x"), py::kw_only(), py::arg("b"), py::arg("signs"), py::arg("g1"), py::arg("g2"),
      py::arg("options"), py::arg("num_threads"));

#ifdef GENFAST_WITH_CUDA
  m.def(
      "filtered_lrelu_cuda",
      [](const TensorView& out, const TensorView& x, const TensorView& b, const TensorView& signs, const TensorView& g1,
         const TensorView& g2, const FilteredLReLUOptions& options, uintptr_t stream) {
        const char* fn = "filtered_lrelu_cuda";
        auto a = make_args(fn, true, out, x, b, signs, g1, g2, options);
        a.stream = stream;
        a.device = x.device < 0 ? 0 : x.device;  // the CPU-hosted emulation runs on CPU tensors
        py::gil_scoped_release release;
        filtered_lrelu::filtered_lrelu_cuda(a);
      },
      py::arg("out"), py::arg("x"), py::kw_only(), py::arg("b"), py::arg("signs"), py::arg("g1"), py::arg("g2"),
      py::arg("options"), py::arg("stream"));
#endif
}
