// pybind11 bindings of the VAE family (see csrc/bindings.h and kernels/vae.h).
//
// Each entry point takes its tensors as TensorViews (csrc/tensor_view.h), by name; the problem
// has no static options (rows and cols come from mu). The bindings check every view against
// mu (dtype, shape, device, contiguity): a missing, swapped or mis-shaped tensor raises here
// instead of reaching a kernel.
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "bindings.h"
#include "common.h"
#include "tensor_view.h"
#include "vae.h"

namespace py = pybind11;
using namespace genfast;

namespace {

// mu-shaped tensors: contiguous, mu's dtype, shape and device.
void expect_like_mu(const char* fn, const char* name, const TensorView& t, const TensorView& mu) {
  expect_dtype(fn, name, t, mu.dtype);
  expect_same_shape(fn, name, t, "mu", mu);
  expect_contiguous(fn, name, t);
  expect_same_device(fn, name, t, mu);
}

// Per-row values (KL partials, dkl) are in the compute type: float64 for float64, else float32.
void expect_compute(const char* fn, const char* name, const TensorView& t, const TensorView& mu,
                    std::initializer_list<int64_t> shape) {
  expect_dtype(fn, name, t, mu.dtype == F64 ? F64 : F32);
  expect_shape(fn, name, t, shape);
  expect_contiguous(fn, name, t);
  expect_same_device(fn, name, t, mu);
}

vae::Args make_args(const char* fn, const TensorView& mu, const TensorView& logvar, const TensorView& eps) {
  expect_float_dtype(fn, "mu", mu);
  if (mu.ndim < 1) fail_value(fn, "mu must have a batch dimension, got " + describe(mu));
  expect_contiguous(fn, "mu", mu);
  expect_like_mu(fn, "logvar", logvar, mu);
  if (eps.present) expect_like_mu(fn, "eps", eps, mu);
  vae::Args a{};
  a.dtype = mu.dtype;
  a.rows = mu.size(0);
  a.cols = a.rows ? mu.numel() / a.rows : 0;
  a.mu = mu.data;
  a.logvar = logvar.data;
  a.eps = eps.data;
  return a;
}

vae::Args forward_args(const char* fn, const TensorView& mu, const TensorView& logvar, const TensorView& eps,
                       const TensorView& z, const TensorView& kl_partial) {
  auto a = make_args(fn, mu, logvar, eps);
  if (z.present) {
    if (!eps.present) fail_value(fn, "eps is required to write z, got None");
    expect_like_mu(fn, "z", z, mu);
  }
  if (kl_partial.present) expect_compute(fn, "kl_partial", kl_partial, mu, {a.rows, vae::num_chunks(a.cols)});
  a.z = z.data;
  a.kl_partial = kl_partial.data;
  return a;
}

vae::Args backward_args(const char* fn, const TensorView& mu, const TensorView& logvar, const TensorView& eps,
                        const TensorView& dz, const TensorView& dkl, const TensorView& dmu, const TensorView& dlogvar) {
  auto a = make_args(fn, mu, logvar, eps);
  if (dz.present) {
    if (!eps.present) fail_value(fn, "eps is required with dz, got None");
    expect_like_mu(fn, "dz", dz, mu);
  }
  if (dkl.present) expect_compute(fn, "dkl", dkl, mu, {a.rows});
  expect_like_mu(fn, "dmu", dmu, mu);
  expect_like_mu(fn, "dlogvar", dlogvar, mu);
  a.dz = dz.data;
  a.dkl = dkl.data;
  a.dmu = dmu.data;
  a.dlogvar = dlogvar.data;
  return a;
}

int checked_threads(const char* fn, int num_threads) {
  if (num_threads < 1) fail_value(fn, "num_threads must be >= 1, got " + std::to_string(num_threads));
  return num_threads;
}

}  // namespace

GENFAST_REGISTER_BINDINGS(vae) {
  // Columns per KL partial (genfast/ops/vae.py sizes kl_partial with it).
  m.attr("VAE_CHUNK_COLS") = vae::kChunkCols;
  m.def(
      "vae_forward_cpu",
      [](const TensorView& mu, const TensorView& logvar, const TensorView& eps, const TensorView& z,
         const TensorView& kl_partial, int num_threads) {
        const char* fn = "vae_forward_cpu";
        expect_cpu(fn, "mu", mu);
        auto a = forward_args(fn, mu, logvar, eps, z, kl_partial);
        a.num_threads = checked_threads(fn, num_threads);
        if (a.rows == 0 || a.cols == 0) return;
        py::gil_scoped_release release;
        vae::forward_cpu(a);
      },
      py::arg("mu"), py::arg("logvar"), py::kw_only(), py::arg("eps"), py::arg("z"), py::arg("kl_partial"),
      py::arg("num_threads"));
  m.def(
      "vae_backward_cpu",
      [](const TensorView& mu, const TensorView& logvar, const TensorView& eps, const TensorView& dz,
         const TensorView& dkl, const TensorView& dmu, const TensorView& dlogvar, int num_threads) {
        const char* fn = "vae_backward_cpu";
        expect_cpu(fn, "mu", mu);
        auto a = backward_args(fn, mu, logvar, eps, dz, dkl, dmu, dlogvar);
        a.num_threads = checked_threads(fn, num_threads);
        if (a.rows == 0 || a.cols == 0) return;
        py::gil_scoped_release release;
        vae::backward_cpu(a);
      },
      py::arg("mu"), py::arg("logvar"), py::kw_only(), py::arg("eps"), py::arg("dz"), py::arg("dkl"), py::arg("dmu"),
      py::arg("dlogvar"), py::arg("num_threads"));
#ifdef GENFAST_WITH_CUDA
  m.def(
      "vae_forward_cuda",
      [](const TensorView& mu, const TensorView& logvar, const TensorView& eps, const TensorView& z,
         const TensorView& kl_partial, uintptr_t stream) {
        const char* fn = "vae_forward_cuda";
        expect_cuda(fn, "mu", mu);
        if (mu.dtype == F64)
          fail_type(fn, "the CUDA kernels take float32, float16 or bfloat16, got mu " + describe(mu));
        auto a = forward_args(fn, mu, logvar, eps, z, kl_partial);
        a.stream = stream;
        a.device = mu.device < 0 ? 0 : mu.device;  // the CPU-hosted emulation runs on CPU tensors
        if (a.rows == 0 || a.cols == 0) return;
        py::gil_scoped_release release;
        vae::forward_cuda(a);
      },
      py::arg("mu"), py::arg("logvar"), py::kw_only(), py::arg("eps"), py::arg("z"), py::arg("kl_partial"),
      py::arg("stream"));
  m.def(
      "vae_backward_cuda",
      [](const TensorView& mu, const TensorView& logvar, const TensorView& eps, const TensorView& dz,
         const TensorView& dkl, const TensorView& dmu, const TensorView& dlogvar, uintptr_t stream) {
        const char* fn = "vae_backward_cuda";
        expect_cuda(fn, "mu", mu);
        if (mu.dtype == F64)
          fail_type(fn, "the CUDA kernels take float32, float16 or bfloat16, got mu " + describe(mu));
        auto a = backward_args(fn, mu, logvar, eps, dz, dkl, dmu, dlogvar);
        a.stream = stream;
        a.device = mu.device < 0 ? 0 : mu.device;
        if (a.rows == 0 || a.cols == 0) return;
        py::gil_scoped_release release;
        vae::backward_cuda(a);
      },
      py::arg("mu"), py::arg("logvar"), py::kw_only(), py::arg("eps"), py::arg("dz"), py::arg("dkl"), py::arg("dmu"),
      py::arg("dlogvar"), py::arg("stream"));
#endif
}
