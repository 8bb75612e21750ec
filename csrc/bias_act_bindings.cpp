// pybind11 bindings of the bias_act family (see csrc/bindings.h).
//
// Each entry point takes its tensors as TensorViews (csrc/tensor_view.h), by name, and the
// call's static configuration as one BiasActOptions (named fields, all required; the mode and
// the activation by name). The bindings check every view against x (dtype, shape, strides,
// device) and derive the kernel's [outer, C, S] geometry from x itself: a missing, swapped or
// mis-shaped tensor raises here instead of reaching a kernel.
#include <pybind11/pybind11.h>

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

#include "bias_act.h"
#include "bindings.h"
#include "common.h"
#include "dense_layout.h"
#include "tensor_view.h"

namespace py = pybind11;
using namespace genfast;

namespace {

// Names of the kernels' enumerations (kernels/bias_act_math.h), exported as dicts so Python
// never keeps a numbering of its own.
const std::pair<const char*, int> kModes[] = {
    {"forward", bias_act::FORWARD}, {"grad", bias_act::GRAD}, {"grad2", bias_act::GRAD2}};
const std::pair<const char*, int> kActivations[] = {
    {"linear", bias_act::LINEAR}, {"relu", bias_act::RELU},         {"lrelu", bias_act::LRELU},
    {"tanh", bias_act::TANH},     {"sigmoid", bias_act::SIGMOID},   {"elu", bias_act::ELU},
    {"selu", bias_act::SELU},     {"softplus", bias_act::SOFTPLUS}, {"swish", bias_act::SWISH}};

template <size_t N>
py::dict names_dict(const std::pair<const char*, int> (&table)[N]) {
  py::dict d;
  for (const auto& [name, code] : table) d[name] = code;
  return d;
}

template <size_t N>
int code_of(const char* fn, const char* what, const std::string& name, const std::pair<const char*, int> (&table)[N]) {
  std::string known;
  for (const auto& [n, code] : table) {
    if (name == n) return code;
    known += (known.empty() ? "" : ", ") + std::string(n);
  }
  fail_value(fn, std::string("unknown ") + what + " '" + name + "'; expected one of " + known);
}

// What a call's signature fixes (genfast/ops/bias_act.py builds one per signature).
struct BiasActOptions {
  std::string mode;  // "forward", "grad" or "grad2"
  std::string act;   // activation name
  int64_t dim = 1;   // the dimension of x that b runs along (>= 0)
  double alpha = 0.0;
  double gain = 1.0;
  double clamp = -1.0;  // < 0: no clamp
  int mode_code = 0, act_code = 0;
};

std::string repr(const BiasActOptions& o) {
  std::ostringstream s;
  s << "BiasActOptions(mode='" << o.mode << "', act='" << o.act << "', dim=" << o.dim << ", alpha=" << o.alpha
    << ", gain=" << o.gain << ", clamp=" << o.clamp << ")";
  return s.str();
}

void expect_absent(const char* fn, const char* name, const TensorView& t, const BiasActOptions& o) {
  if (t.present) fail_value(fn, std::string(name) + " must be None in " + o.mode + " mode");
}

// The common part of both entries; db is CPU only (the CUDA path sums in Python).
bias_act::Args make_args(const char* fn, const TensorView& out, const TensorView& x, const TensorView& b,
                         const TensorView& dy, const TensorView& ddx, const TensorView& db, const BiasActOptions& o) {
  expect_float_dtype(fn, "x", x);
  expect_dense(fn, "x", x);
  expect_layout_of(fn, "out", out, x);
  const bool needs_dy = o.mode_code != bias_act::FORWARD, needs_ddx = o.mode_code == bias_act::GRAD2;
  if (needs_dy)
    expect_layout_of(fn, "dy", dy, x);
  else
    expect_absent(fn, "dy", dy, o);
  if (needs_ddx)
    expect_layout_of(fn, "ddx", ddx, x);
  else
    expect_absent(fn, "ddx", ddx, o);
  bias_act::Args a{};
  a.mode = o.mode_code;
  a.act = o.act_code;
  a.dtype = x.dtype;
  a.n = x.numel();
  a.C = 1;
  a.S = a.n;  // without a bias: one channel spanning everything
  if (b.present) {
    if (o.dim >= x.ndim)
      fail_value(fn, "options.dim=" + std::to_string(o.dim) + " is out of range for x " + describe(x));
    expect_dtype(fn, "b", b, x.dtype);
    expect_shape(fn, "b", b, {x.size(o.dim)});
    expect_contiguous(fn, "b", b);
    expect_same_device(fn, "b", b, x);
    if (x.size(o.dim) != 1) {
      a.C = x.size(o.dim);
      a.S = x.stride(o.dim);
    }
  }
  if (db.present) {
    if (o.mode_code != bias_act::GRAD || !b.present) fail_value(fn, "db is only written in grad mode with a bias b");
    expect_dtype(fn, "db", db, x.dtype);
    expect_shape(fn, "db", db, {b.size(0)});
    expect_contiguous(fn, "db", db);
    expect_same_device(fn, "db", db, x);
  }
  a.out = out.data;
  a.db = db.data;
  a.x = x.data;
  a.b = b.data;
  a.dy = dy.data;
  a.ddx = ddx.data;
  a.p = bias_act::Params{o.alpha, o.gain, o.clamp};
  return a;
}

}  // namespace

GENFAST_REGISTER_BINDINGS(bias_act) {
  m.attr("BIAS_ACT_MODES") = names_dict(kModes);
  m.attr("BIAS_ACT_ACTIVATIONS") = names_dict(kActivations);

  py::class_<BiasActOptions>(m, "BiasActOptions", "Options of one bias_act call (all keyword, all required).")
      .def(py::init([](const std::string& mode, const std::string& act, int64_t dim, double alpha, double gain,
                       double clamp) {
             const char* fn = "BiasActOptions";
             BiasActOptions o{mode, act, dim, alpha, gain, clamp};
             o.mode_code = code_of(fn, "mode", mode, kModes);
             o.act_code = code_of(fn, "act", act, kActivations);
             if (dim < 0) fail_value(fn, "dim must be >= 0 (normalise it first), got " + std::to_string(dim));
             if (!(alpha == alpha) || !(gain == gain) || !(clamp == clamp))
               fail_value(fn, "alpha, gain and clamp must not be NaN");
             return o;
           }),
           py::kw_only(), py::arg("mode"), py::arg("act"), py::arg("dim"), py::arg("alpha"), py::arg("gain"),
           py::arg("clamp"))
      .def_readonly("mode", &BiasActOptions::mode)
      .def_readonly("act", &BiasActOptions::act)
      .def_readonly("dim", &BiasActOptions::dim)
      .def_readonly("alpha", &BiasActOptions::alpha)
      .def_readonly("gain", &BiasActOptions::gain)
      .def_readonly("clamp", &BiasActOptions::clamp)
      .def("__repr__", &repr);

  m.def(
      "bias_act_cpu",
      [](const TensorView& out, const TensorView& x, const TensorView& b, const TensorView& dy, const TensorView& ddx,
         const TensorView& db, const BiasActOptions& options, int num_threads) {
        const char* fn = "bias_act_cpu";
        expect_cpu(fn, "x", x);
        auto a = make_args(fn, out, x, b, dy, ddx, db, options);
        if (num_threads < 1) fail_value(fn, "num_threads must be >= 1, got " + std::to_string(num_threads));
        a.num_threads = num_threads;
        if (a.n == 0) return;
        py::gil_scoped_release release;
        bias_act::bias_act_cpu(a);
      },
      py::arg("out"), py::arg("x"), py::arg("b"), py::arg("dy"), py::arg("ddx"), py::arg("db"), py::arg("options"),
      py::arg("num_threads"));

#ifdef GENFAST_WITH_CUDA
  m.def(
      "bias_act_cuda",
      [](const TensorView& out, const TensorView& x, const TensorView& b, const TensorView& dy, const TensorView& ddx,
         const BiasActOptions& options, uintptr_t stream) {
        const char* fn = "bias_act_cuda";
        expect_cuda(fn, "x", x);
        if (x.dtype == F64) fail_type(fn, "the CUDA kernels take float32, float16 or bfloat16, got x " + describe(x));
        auto a = make_args(fn, out, x, b, dy, ddx, TensorView{}, options);
        a.stream = stream;
        a.device = x.device < 0 ? 0 : x.device;  // the CPU-hosted emulation runs on CPU tensors
        if (a.n == 0) return;
        py::gil_scoped_release release;
        bias_act::bias_act_cuda(a);
      },
      py::arg("out"), py::arg("x"), py::kw_only(), py::arg("b"), py::arg("dy"), py::arg("ddx"), py::arg("options"),
      py::arg("stream"));
#endif
}
