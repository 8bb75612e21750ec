// pybind11 bindings of the filtered_lrelu family (see csrc/bindings.h, kernels/filtered_lrelu.h).
#include <pybind11/stl.h>

#include <stdexcept>
#include <vector>

#include "bindings.h"
#include "common.h"
#include "filtered_lrelu.h"

namespace py = pybind11;
using namespace genfast;

namespace {

filtered_lrelu::Args make_args(int mode, int dtype, int64_t n, int64_t c, int64_t h, int64_t w,
                               const std::vector<int64_t>& in_s, uintptr_t out, const std::vector<int64_t>& out_s,
                               uintptr_t x, uintptr_t b, uintptr_t signs, uintptr_t g1, int g1h, int g1w, bool g1_sep,
                               uintptr_t g2, int g2h, int g2w, bool g2_sep, const std::vector<int64_t>& plan,
                               double gain, double slope, double clamp) {
  if (in_s.size() != 4 || out_s.size() != 4 || plan.size() != 10)
    throw std::invalid_argument("filtered_lrelu: expected 4 input strides, 4 output strides and 10 plan values");
  if (n < 0 || c < 0 || h < 0 || w < 0 || g1h < 1 || g1w < 1 || g2h < 1 || g2w < 1)
    throw std::invalid_argument("filtered_lrelu: bad sizes");
  filtered_lrelu::Args a{};
  a.mode = mode; a.dtype = dtype;
  a.N = n; a.C = c; a.in_h = h; a.in_w = w;
  for (int i = 0; i < 4; ++i) { a.in_s[i] = in_s[i]; a.out_s[i] = out_s[i]; }
  a.out = mptr(out); a.x = cptr(x); a.b = cptr(b);
  a.signs = static_cast<uint8_t*>(mptr(signs));
  a.g1 = static_cast<const float*>(cptr(g1)); a.g1h = g1h; a.g1w = g1w; a.g1_sep = g1_sep;
  a.g2 = static_cast<const float*>(cptr(g2)); a.g2h = g2h; a.g2w = g2w; a.g2_sep = g2_sep;
  a.u1 = plan[0]; a.p1x = plan[1]; a.p1y = plan[2]; a.th = plan[3]; a.tw = plan[4];
  a.d2 = plan[5]; a.p2x = plan[6]; a.p2y = plan[7]; a.oh = plan[8]; a.ow = plan[9];
  if (a.u1 < 1 || a.d2 < 1) throw std::invalid_argument("filtered_lrelu: up/down factors must be >= 1");
  a.gain = gain; a.slope = slope; a.clamp = clamp;
  return a;
}

}  // namespace

GENFAST_REGISTER_BINDINGS(filtered_lrelu) {
  m.def(
      "filtered_lrelu_cpu",
      [](int mode, int dtype, int64_t n, int64_t c, int64_t h, int64_t w, std::vector<int64_t> in_s, uintptr_t out,
         std::vector<int64_t> out_s, uintptr_t x, uintptr_t b, uintptr_t signs, uintptr_t g1, int g1h, int g1w,
         bool g1_sep, uintptr_t g2, int g2h, int g2w, bool g2_sep, std::vector<int64_t> plan, double gain,
         double slope, double clamp, int num_threads) {
        auto a = make_args(mode, dtype, n, c, h, w, in_s, out, out_s, x, b, signs, g1, g1h, g1w, g1_sep, g2, g2h,
                           g2w, g2_sep, plan, gain, slope, clamp);
        a.num_threads = num_threads;
        py::gil_scoped_release release;
        filtered_lrelu::filtered_lrelu_cpu(a);
      });

#ifdef GENFAST_WITH_CUDA
  m.def(
      "filtered_lrelu_cuda",
      [](int mode, int dtype, int64_t n, int64_t c, int64_t h, int64_t w, std::vector<int64_t> in_s, uintptr_t out,
         std::vector<int64_t> out_s, uintptr_t x, uintptr_t b, uintptr_t signs, uintptr_t g1, int g1h, int g1w,
         bool g1_sep, uintptr_t g2, int g2h, int g2w, bool g2_sep, std::vector<int64_t> plan, double gain,
         double slope, double clamp, uintptr_t stream, int device) {
        auto a = make_args(mode, dtype, n, c, h, w, in_s, out, out_s, x, b, signs, g1, g1h, g1w, g1_sep, g2, g2h,
                           g2w, g2_sep, plan, gain, slope, clamp);
        a.stream = stream;
        a.device = device;
        py::gil_scoped_release release;
        filtered_lrelu::filtered_lrelu_cuda(a);
      });
#endif
}
