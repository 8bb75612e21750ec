// pybind11 bindings of the VAE family (see csrc/bindings.h and kernels/vae.h).
#include <stdexcept>

#include "bindings.h"
#include "vae.h"

namespace py = pybind11;
using namespace genfast;

namespace {

vae::Args make_args(int dtype, int64_t rows, int64_t cols, uintptr_t mu, uintptr_t logvar, uintptr_t eps) {
  if (rows < 0 || cols < 0) throw std::invalid_argument("vae: bad sizes");
  vae::Args a{};
  a.dtype = dtype; a.rows = rows; a.cols = cols;
  a.mu = cptr(mu); a.logvar = cptr(logvar); a.eps = cptr(eps);
  return a;
}

}  // namespace

GENFAST_REGISTER_BINDINGS(vae) {
  m.attr("vae_chunk_cols") = vae::kChunkCols;
  m.def("vae_forward_cpu",
        [](int dtype, int64_t rows, int64_t cols, uintptr_t mu, uintptr_t logvar, uintptr_t eps, uintptr_t z,
           uintptr_t kl_partial, int num_threads) {
          auto a = make_args(dtype, rows, cols, mu, logvar, eps);
          a.z = mptr(z); a.kl_partial = mptr(kl_partial); a.num_threads = num_threads;
          py::gil_scoped_release release;
          vae::forward_cpu(a);
        });
  m.def("vae_backward_cpu",
        [](int dtype, int64_t rows, int64_t cols, uintptr_t mu, uintptr_t logvar, uintptr_t eps, uintptr_t dz,
           uintptr_t dkl, uintptr_t dmu, uintptr_t dlogvar, int num_threads) {
          auto a = make_args(dtype, rows, cols, mu, logvar, eps);
          a.dz = cptr(dz); a.dkl = cptr(dkl); a.dmu = mptr(dmu); a.dlogvar = mptr(dlogvar); a.num_threads = num_threads;
          py::gil_scoped_release release;
          vae::backward_cpu(a);
        });
#ifdef GENFAST_WITH_CUDA
  m.def("vae_forward_cuda",
        [](int dtype, int64_t rows, int64_t cols, uintptr_t mu, uintptr_t logvar, uintptr_t eps, uintptr_t z,
           uintptr_t kl_partial, uintptr_t stream, int device) {
          auto a = make_args(dtype, rows, cols, mu, logvar, eps);
          a.z = mptr(z); a.kl_partial = mptr(kl_partial); a.stream = stream; a.device = device;
          py::gil_scoped_release release;
          vae::forward_cuda(a);
        });
  m.def("vae_backward_cuda",
        [](int dtype, int64_t rows, int64_t cols, uintptr_t mu, uintptr_t logvar, uintptr_t eps, uintptr_t dz,
           uintptr_t dkl, uintptr_t dmu, uintptr_t dlogvar, uintptr_t stream, int device) {
          auto a = make_args(dtype, rows, cols, mu, logvar, eps);
          a.dz = cptr(dz); a.dkl = cptr(dkl); a.dmu = mptr(dmu); a.dlogvar = mptr(dlogvar);
          a.stream = stream; a.device = device;
          py::gil_scoped_release release;
          vae::backward_cuda(a);
        });
#endif
}
