// pybind11 bindings of the group_norm family (see csrc/bindings.h and kernels/group_norm.h).
//
// Each entry point takes its tensors as TensorViews (csrc/tensor_view.h), by name, and the
// call's static configuration as one GroupNormOptions (named fields, all required). The
// bindings derive N, C, S and the memory layout (NCHW or NHWC) from x and check every other
// view against it: a missing, swapped or mis-shaped tensor raises here instead of reaching a
// kernel.
#include <pybind11/pybind11.h>

#include <sstream>
#include <stdexcept>
#include <string>

#include "bindings.h"
#include "common.h"
#include "dense_layout.h"
#include "group_norm.h"
#include "tensor_view.h"

namespace py = pybind11;
using namespace genfast;

namespace {

// What a call's signature fixes (genfast/ops/group_norm.py builds one per signature).
struct GroupNormOptions {
  int64_t num_groups = 1;
  double eps = 1e-5;  // the forward's; the backward reads the saved statistics
  bool silu = false;
};

std::string repr(const GroupNormOptions& o) {
  std::ostringstream s;
  s << "GroupNormOptions(num_groups=" << o.num_groups << ", eps=" << o.eps << ", silu=" << (o.silu ? "True" : "False")
    << ")";
  return s.str();
}

// x (N, C, *spatial) NHWC: memory order c, then the spatial dimensions last to first, then n.
bool channels_last(const TensorView& x) {
  int64_t expected = 1;
  auto check = [&](int d) {
    if (x.shape[d] != 1 && x.strides[d] != expected) return false;
    expected *= x.shape[d];
    return true;
  };
  if (!check(1)) return false;
  for (int d = x.ndim - 1; d >= 2; --d)
    if (!check(d)) return false;
  return check(0);
}

group_norm::Shape make_shape(const char* fn, const TensorView& x, const GroupNormOptions& o) {
  expect_float_dtype(fn, "x", x);
  if (x.ndim < 2) fail_value(fn, "x must have shape (N, C, *), got " + describe(x));
  group_norm::Shape s{};
  s.dtype = x.dtype;
  s.N = x.size(0);
  s.C = x.size(1);
  s.G = o.num_groups;
  s.S = 1;
  for (int d = 2; d < x.ndim; ++d) s.S *= x.size(d);
  if (s.C % s.G != 0)
    fail_value(fn, "the " + std::to_string(s.C) +
                       " channels of x are not divisible by options.num_groups=" + std::to_string(s.G));
  if (x.contiguous())
    s.channels_last = false;  // checked first: a layout that is both reads as NCHW
  else if (channels_last(x))
    s.channels_last = true;
  else
    fail_value(fn, "x must be contiguous (NCHW) or channels_last (NHWC), got " + describe(x));
  return s;
}

// mean, rstd: (N, G) in the statistics type (float64 for float64 x, else float32).
void expect_stats(const char* fn, const char* name, const TensorView& t, const TensorView& x,
                  const group_norm::Shape& s) {
  expect_dtype(fn, name, t, x.dtype == F64 ? F64 : F32);
  expect_shape(fn, name, t, {s.N, s.G});
  expect_contiguous(fn, name, t);
  expect_same_device(fn, name, t, x);
}

// weight, bias, dweight, dbias: optional, (C,) in x's dtype.
void expect_per_channel(const char* fn, const char* name, const TensorView& t, const TensorView& x,
                        const group_norm::Shape& s) {
  if (!t.present) return;
  expect_dtype(fn, name, t, x.dtype);
  expect_shape(fn, name, t, {s.C});
  expect_contiguous(fn, name, t);
  expect_same_device(fn, name, t, x);
}

// A float32 scratch buffer of at least `floats` elements.
void expect_scratch(const char* fn, const char* name, const TensorView& t, const TensorView& x, int64_t floats) {
  expect_dtype(fn, name, t, F32);
  expect_contiguous(fn, name, t);
  expect_same_device(fn, name, t, x);
  if (t.numel() < floats)
    fail_value(fn, std::string(name) + " must hold at least " + std::to_string(floats) + " floats, got " + describe(t));
}

group_norm::ForwardArgs make_forward(const char* fn, const TensorView& x, const TensorView& y, const TensorView& mean,
                                     const TensorView& rstd, const TensorView& weight, const TensorView& bias,
                                     const GroupNormOptions& o) {
  group_norm::ForwardArgs a{};
  a.shape = make_shape(fn, x, o);
  expect_layout_of(fn, "y", y, x);
  expect_stats(fn, "mean", mean, x, a.shape);
  expect_stats(fn, "rstd", rstd, x, a.shape);
  expect_per_channel(fn, "weight", weight, x, a.shape);
  expect_per_channel(fn, "bias", bias, x, a.shape);
  a.x = x.data;
  a.weight = weight.data;
  a.bias = bias.data;
  a.y = y.data;
  a.mean = mean.data;
  a.rstd = rstd.data;
  a.eps = o.eps;
  a.silu = o.silu;
  return a;
}

group_norm::BackwardArgs make_backward(const char* fn, const TensorView& dy, const TensorView& x,
                                       const TensorView& mean, const TensorView& rstd, const TensorView& dx,
                                       const TensorView& weight, const TensorView& bias, const GroupNormOptions& o) {
  group_norm::BackwardArgs a{};
  a.shape = make_shape(fn, x, o);
  expect_layout_of(fn, "dy", dy, x);
  expect_layout_of(fn, "dx", dx, x);
  expect_stats(fn, "mean", mean, x, a.shape);
  expect_stats(fn, "rstd", rstd, x, a.shape);
  expect_per_channel(fn, "weight", weight, x, a.shape);
  expect_per_channel(fn, "bias", bias, x, a.shape);
  a.dy = dy.data;
  a.x = x.data;
  a.mean = mean.data;
  a.rstd = rstd.data;
  a.weight = weight.data;
  a.bias = bias.data;
  a.dx = dx.data;
  a.silu = o.silu;
  return a;
}

int checked_threads(const char* fn, int num_threads) {
  if (num_threads < 1) fail_value(fn, "num_threads must be >= 1, got " + std::to_string(num_threads));
  return num_threads;
}

bool empty(const group_norm::Shape& s) { return s.N == 0 || s.C == 0 || s.S == 0; }

}  // namespace

GENFAST_REGISTER_BINDINGS(group_norm) {
  py::class_<GroupNormOptions>(m, "GroupNormOptions", "Options of one group_norm call (all keyword, all required).")
      .def(py::init([](int64_t num_groups, double eps, bool silu) {
             const char* fn = "GroupNormOptions";
             if (num_groups < 1) fail_value(fn, "num_groups must be >= 1, got " + std::to_string(num_groups));
             if (!(eps >= 0)) fail_value(fn, "eps must be >= 0");
             return GroupNormOptions{num_groups, eps, silu};
           }),
           py::kw_only(), py::arg("num_groups"), py::arg("eps"), py::arg("silu"))
      .def_readonly("num_groups", &GroupNormOptions::num_groups)
      .def_readonly("eps", &GroupNormOptions::eps)
      .def_readonly("silu", &GroupNormOptions::silu)
      .def("__repr__", &repr);

  m.def(
      "group_norm_fwd_cpu",
      [](const TensorView& x, const TensorView& y, const TensorView& mean, const TensorView& rstd,
         const TensorView& weight, const TensorView& bias, const GroupNormOptions& options, int num_threads) {
        const char* fn = "group_norm_fwd_cpu";
        expect_cpu(fn, "x", x);
        auto a = make_forward(fn, x, y, mean, rstd, weight, bias, options);
        a.num_threads = checked_threads(fn, num_threads);
        if (empty(a.shape)) return;
        py::gil_scoped_release release;
        group_norm::group_norm_forward_cpu(a);
      },
      py::arg("x"), py::arg("y"), py::arg("mean"), py::arg("rstd"), py::arg("weight"), py::arg("bias"),
      py::arg("options"), py::arg("num_threads"));
  m.def(
      "group_norm_bwd_cpu",
      [](const TensorView& dy, const TensorView& x, const TensorView& mean, const TensorView& rstd,
         const TensorView& dx, const TensorView& weight, const TensorView& bias, const TensorView& dweight,
         const TensorView& dbias, const GroupNormOptions& options, int num_threads) {
        const char* fn = "group_norm_bwd_cpu";
        expect_cpu(fn, "x", x);
        auto a = make_backward(fn, dy, x, mean, rstd, dx, weight, bias, options);
        expect_per_channel(fn, "dweight", dweight, x, a.shape);
        expect_per_channel(fn, "dbias", dbias, x, a.shape);
        a.dweight = dweight.data;
        a.dbias = dbias.data;
        a.num_threads = checked_threads(fn, num_threads);
        if (empty(a.shape)) return;
        py::gil_scoped_release release;
        group_norm::group_norm_backward_cpu(a);
      },
      py::arg("dy"), py::arg("x"), py::arg("mean"), py::arg("rstd"), py::arg("dx"), py::kw_only(), py::arg("weight"),
      py::arg("bias"), py::arg("dweight"), py::arg("dbias"), py::arg("options"), py::arg("num_threads"));

#ifdef GENFAST_WITH_CUDA
  m.def(
      "group_norm_cuda_workspace",
      [](const TensorView& x, const GroupNormOptions& options) {
        return group_norm::forward_workspace_floats(make_shape("group_norm_cuda_workspace", x, options));
      },
      "Floats of workspace group_norm_fwd_cuda needs for x", py::arg("x"), py::kw_only(), py::arg("options"));
  m.def(
      "group_norm_fwd_cuda",
      [](const TensorView& x, const TensorView& y, const TensorView& mean, const TensorView& rstd,
         const TensorView& weight, const TensorView& bias, const TensorView& workspace, const GroupNormOptions& options,
         uintptr_t stream) {
        const char* fn = "group_norm_fwd_cuda";
        expect_cuda(fn, "x", x);
        if (x.dtype == F64) fail_type(fn, "the CUDA kernels take float32, float16 or bfloat16, got x " + describe(x));
        auto a = make_forward(fn, x, y, mean, rstd, weight, bias, options);
        expect_scratch(fn, "workspace", workspace, x, group_norm::forward_workspace_floats(a.shape));
        a.workspace = workspace.data;
        a.stream = stream;
        a.device = x.device < 0 ? 0 : x.device;  // the CPU-hosted emulation runs on CPU tensors
        if (empty(a.shape)) return;
        py::gil_scoped_release release;
        group_norm::group_norm_forward_cuda(a);
      },
      py::arg("x"), py::arg("y"), py::arg("mean"), py::arg("rstd"), py::kw_only(), py::arg("weight"), py::arg("bias"),
      py::arg("workspace"), py::arg("options"), py::arg("stream"));
  m.def(
      "group_norm_bwd_cuda",
      [](const TensorView& dy, const TensorView& x, const TensorView& mean, const TensorView& rstd,
         const TensorView& dx, const TensorView& weight, const TensorView& bias, const TensorView& sums,
         const GroupNormOptions& options, uintptr_t stream) {
        const char* fn = "group_norm_bwd_cuda";
        expect_cuda(fn, "x", x);
        if (x.dtype == F64) fail_type(fn, "the CUDA kernels take float32, float16 or bfloat16, got x " + describe(x));
        auto a = make_backward(fn, dy, x, mean, rstd, dx, weight, bias, options);
        const auto& s = a.shape;
        expect_scratch(fn, "sums", sums, x, 2 * s.N * s.C + 2 * s.N * s.G);
        a.sums = sums.data;
        a.stream = stream;
        a.device = x.device < 0 ? 0 : x.device;
        if (empty(a.shape)) return;
        py::gil_scoped_release release;
        group_norm::group_norm_backward_cuda(a);
      },
      py::arg("dy"), py::arg("x"), py::arg("mean"), py::arg("rstd"), py::arg("dx"), py::kw_only(), py::arg("weight"),
      py::arg("bias"), py::arg("sums"), py::arg("options"), py::arg("stream"));
#endif
}
