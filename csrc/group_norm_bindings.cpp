// pybind11 bindings of the group_norm family (see csrc/bindings.h and kernels/group_norm.h).
#include <stdexcept>

#include "bindings.h"
#include "common.h"
#include "group_norm.h"

namespace py = pybind11;
using namespace genfast;

namespace {

group_norm::Shape make_shape(int dtype, int64_t N, int64_t C, int64_t S, int64_t G, bool channels_last) {
  if (N < 0 || C < 1 || S < 0 || G < 1 || C % G != 0) throw std::invalid_argument("group_norm: bad sizes");
  return group_norm::Shape{dtype, N, C, S, G, channels_last};
}

group_norm::ForwardArgs make_forward(int dtype, int64_t N, int64_t C, int64_t S, int64_t G, bool channels_last,
                                     uintptr_t x, uintptr_t w, uintptr_t b, uintptr_t y, uintptr_t mean,
                                     uintptr_t rstd, double eps, bool silu) {
  group_norm::ForwardArgs a{};
  a.shape = make_shape(dtype, N, C, S, G, channels_last);
  a.x = cptr(x); a.weight = cptr(w); a.bias = cptr(b);
  a.y = mptr(y); a.mean = mptr(mean); a.rstd = mptr(rstd);
  a.eps = eps; a.silu = silu;
  return a;
}

group_norm::BackwardArgs make_backward(int dtype, int64_t N, int64_t C, int64_t S, int64_t G, bool channels_last,
                                       uintptr_t dy, uintptr_t x, uintptr_t mean, uintptr_t rstd, uintptr_t w,
                                       uintptr_t b, uintptr_t dx, bool silu) {
  group_norm::BackwardArgs a{};
  a.shape = make_shape(dtype, N, C, S, G, channels_last);
  a.dy = cptr(dy); a.x = cptr(x); a.mean = cptr(mean); a.rstd = cptr(rstd);
  a.weight = cptr(w); a.bias = cptr(b);
  a.dx = mptr(dx);
  a.silu = silu;
  return a;
}

}  // namespace

GENFAST_REGISTER_BINDINGS(group_norm) {
  m.def(
      "group_norm_fwd_cpu",
      [](int dtype, int64_t N, int64_t C, int64_t S, int64_t G, bool channels_last, uintptr_t x, uintptr_t w,
         uintptr_t b, uintptr_t y, uintptr_t mean, uintptr_t rstd, double eps, bool silu, int num_threads) {
        auto a = make_forward(dtype, N, C, S, G, channels_last, x, w, b, y, mean, rstd, eps, silu);
        a.num_threads = num_threads;
        py::gil_scoped_release release;
        group_norm::group_norm_forward_cpu(a);
      },
      py::arg("dtype"), py::arg("N"), py::arg("C"), py::arg("S"), py::arg("G"), py::arg("channels_last"),
      py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("y"), py::arg("mean"), py::arg("rstd"),
      py::arg("eps"), py::arg("silu"), py::arg("num_threads"));
  m.def(
      "group_norm_bwd_cpu",
      [](int dtype, int64_t N, int64_t C, int64_t S, int64_t G, bool channels_last, uintptr_t dy, uintptr_t x,
         uintptr_t mean, uintptr_t rstd, uintptr_t w, uintptr_t b, uintptr_t dx, uintptr_t dw, uintptr_t db,
         bool silu, int num_threads) {
        auto a = make_backward(dtype, N, C, S, G, channels_last, dy, x, mean, rstd, w, b, dx, silu);
        a.dweight = mptr(dw);
        a.dbias = mptr(db);
        a.num_threads = num_threads;
        py::gil_scoped_release release;
        group_norm::group_norm_backward_cpu(a);
      },
      py::arg("dtype"), py::arg("N"), py::arg("C"), py::arg("S"), py::arg("G"), py::arg("channels_last"),
      py::arg("dy"), py::arg("x"), py::arg("mean"), py::arg("rstd"), py::arg("weight"), py::arg("bias"),
      py::arg("dx"), py::arg("dweight"), py::arg("dbias"), py::arg("silu"), py::arg("num_threads"));

#ifdef GENFAST_WITH_CUDA
  m.def(
      "group_norm_fwd_cuda",
      [](int dtype, int64_t N, int64_t C, int64_t S, int64_t G, bool channels_last, uintptr_t x, uintptr_t w,
         uintptr_t b, uintptr_t y, uintptr_t mean, uintptr_t rstd, double eps, bool silu, uintptr_t workspace,
         uintptr_t stream, int device) {
        auto a = make_forward(dtype, N, C, S, G, channels_last, x, w, b, y, mean, rstd, eps, silu);
        a.workspace = mptr(workspace);
        a.stream = stream;
        a.device = device;
        py::gil_scoped_release release;
        group_norm::group_norm_forward_cuda(a);
      },
      py::arg("dtype"), py::arg("N"), py::arg("C"), py::arg("S"), py::arg("G"), py::arg("channels_last"),
      py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("y"), py::arg("mean"), py::arg("rstd"),
      py::arg("eps"), py::arg("silu"), py::arg("workspace"), py::arg("stream"), py::arg("device"));
  m.def(
      "group_norm_cuda_workspace",
      [](int dtype, int64_t N, int64_t C, int64_t S, int64_t G, bool channels_last) {
        return group_norm::forward_workspace_floats(make_shape(dtype, N, C, S, G, channels_last));
      },
      "Floats of workspace group_norm_fwd_cuda needs", py::arg("dtype"), py::arg("N"), py::arg("C"), py::arg("S"),
      py::arg("G"), py::arg("channels_last"));
  m.def(
      "group_norm_bwd_cuda",
      [](int dtype, int64_t N, int64_t C, int64_t S, int64_t G, bool channels_last, uintptr_t dy, uintptr_t x,
         uintptr_t mean, uintptr_t rstd, uintptr_t w, uintptr_t b, uintptr_t dx, uintptr_t sums, bool silu,
         uintptr_t stream, int device) {
        auto a = make_backward(dtype, N, C, S, G, channels_last, dy, x, mean, rstd, w, b, dx, silu);
        a.sums = mptr(sums);
        a.stream = stream;
        a.device = device;
        py::gil_scoped_release release;
        group_norm::group_norm_backward_cuda(a);
      },
      py::arg("dtype"), py::arg("N"), py::arg("C"), py::arg("S"), py::arg("G"), py::arg("channels_last"),
      py::arg("dy"), py::arg("x"), py::arg("mean"), py::arg("rstd"), py::arg("weight"), py::arg("bias"),
      py::arg("dx"), py::arg("sums"), py::arg("silu"), py::arg("stream"), py::arg("device"));
#endif
}
