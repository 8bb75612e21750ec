// pybind11 bindings of the upfirdn2d family (see csrc/bindings.h).
#include <stdexcept>

#include "bindings.h"
#include "common.h"
#include "upfirdn2d.h"

namespace py = pybind11;
using namespace genfast;

namespace {

upfirdn2d::Args make_upfirdn2d_args(int dtype, uintptr_t out, uintptr_t x, uintptr_t g, int64_t n, int64_t c,
                                    int64_t h, int64_t w, int64_t oh, int64_t ow, int64_t fh, int64_t fw,
                                    bool separable, bool channels_last, int64_t upx, int64_t upy, int64_t downx,
                                    int64_t downy, int64_t padx0, int64_t padx1, int64_t pady0, int64_t pady1) {
  if (n < 0 || c < 0 || h < 0 || w < 0 || oh < 0 || ow < 0 || fh < 1 || fw < 1 || upx < 1 || upy < 1 ||
      downx < 1 || downy < 1 || (separable && fh != fw))
    throw std::invalid_argument("upfirdn2d: bad sizes");
  // The output sizes must be the ones the arguments imply (the Python side computes them).
  if (oh != upfirdn2d::floor_div(h * upy + pady0 + pady1 - fh, downy) + 1 ||
      ow != upfirdn2d::floor_div(w * upx + padx0 + padx1 - fw, downx) + 1)
    throw std::invalid_argument("upfirdn2d: output size does not match the arguments");
  upfirdn2d::Args a{};
  a.dtype = dtype;
  a.out = mptr(out);
  a.x = cptr(x);
  a.g = static_cast<const float*>(cptr(g));
  a.n = n; a.c = c; a.h = h; a.w = w; a.oh = oh; a.ow = ow; a.fh = fh; a.fw = fw;
  a.separable = separable; a.channels_last = channels_last;
  a.upx = upx; a.upy = upy; a.downx = downx; a.downy = downy;
  a.padx0 = padx0; a.padx1 = padx1; a.pady0 = pady0; a.pady1 = pady1;
  return a;
}

}  // namespace

GENFAST_REGISTER_BINDINGS(upfirdn2d) {
  m.def(
      "upfirdn2d_cpu",
      [](int dtype, uintptr_t out, uintptr_t x, uintptr_t g, int64_t n, int64_t c, int64_t h, int64_t w, int64_t oh,
         int64_t ow, int64_t fh, int64_t fw, bool separable, bool channels_last, int64_t upx, int64_t upy,
         int64_t downx, int64_t downy, int64_t padx0, int64_t padx1, int64_t pady0, int64_t pady1, int num_threads) {
        auto a = make_upfirdn2d_args(dtype, out, x, g, n, c, h, w, oh, ow, fh, fw, separable, channels_last, upx, upy,
                                     downx, downy, padx0, padx1, pady0, pady1);
        a.num_threads = num_threads;
        py::gil_scoped_release release;
        upfirdn2d::upfirdn2d_cpu(a);
      },
      py::arg("dtype"), py::arg("out"), py::arg("x"), py::arg("g"), py::arg("n"), py::arg("c"), py::arg("h"),
      py::arg("w"), py::arg("oh"), py::arg("ow"), py::arg("fh"), py::arg("fw"), py::arg("separable"),
      py::arg("channels_last"), py::arg("upx"), py::arg("upy"), py::arg("downx"), py::arg("downy"), py::arg("padx0"),
      py::arg("padx1"), py::arg("pady0"), py::arg("pady1"), py::arg("num_threads"));

#ifdef GENFAST_WITH_CUDA
  m.def(
      "upfirdn2d_cuda",
      [](int dtype, uintptr_t out, uintptr_t x, uintptr_t g, int64_t n, int64_t c, int64_t h, int64_t w, int64_t oh,
         int64_t ow, int64_t fh, int64_t fw, bool separable, bool channels_last, int64_t upx, int64_t upy,
         int64_t downx, int64_t downy, int64_t padx0, int64_t padx1, int64_t pady0, int64_t pady1, uintptr_t stream,
         int device) {
        auto a = make_upfirdn2d_args(dtype, out, x, g, n, c, h, w, oh, ow, fh, fw, separable, channels_last, upx, upy,
                                     downx, downy, padx0, padx1, pady0, pady1);
        a.stream = stream;
        a.device = device;
        py::gil_scoped_release release;
        upfirdn2d::upfirdn2d_cuda(a);
      },
      py::arg("dtype"), py::arg("out"), py::arg("x"), py::arg("g"), py::arg("n"), py::arg("c"), py::arg("h"),
      py::arg("w"), py::arg("oh"), py::arg("ow"), py::arg("fh"), py::arg("fw"), py::arg("separable"),
      py::arg("channels_last"), py::arg("upx"), py::arg("upy"), py::arg("downx"), py::arg("downy"), py::arg("padx0"),
      py::arg("padx1"), py::arg("pady0"), py::arg("pady1"), py::arg("stream"), py::arg("device"));
#endif
}
