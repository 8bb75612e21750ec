// VAE reparameterisation + KL kernels (shared by csrc/vae_cpu.cpp, kernels/vae.cu and the
// bindings). Tensors mu, logvar, eps (and dz, dmu, dlogvar, z) are contiguous [rows, cols]
// (rows = batch, cols = the product of the other dimensions), all in one storage dtype.
//
//   forward:  z = mu + exp(logvar / 2) * eps
//             kl_partial[r, k] = -1/2 * sum over chunk k of row r of (1 + logvar - mu^2 - exp(logvar))
//   backward: dmu     = dz + dkl[r] * mu
//             dlogvar = dz * eps * exp(logvar / 2) / 2 + dkl[r] * (exp(logvar) - 1) / 2
// Chunks are kChunkCols columns of one row, so the per-row KL is a deterministic sum of the
// partials (done by the caller); partials are float32 (float64 for float64 inputs).
#pragma once
#include <cstdint>

#ifdef __CUDACC__
#define GF_VAE_HD __host__ __device__
#else
#define GF_VAE_HD
#endif

namespace genfast {
namespace vae {

constexpr int64_t kChunkCols = 4096;  // must match genfast/ops/vae.py CHUNK_COLS

struct Args {
  int dtype;  // genfast::DType
  int64_t rows, cols;
  const void* mu;
  const void* logvar;
  const void* eps;
  // forward
  void* z;           // may be null (KL only)
  void* kl_partial;  // [rows, ceil(cols / kChunkCols)] in the compute dtype; may be null (z only)
  // backward
  const void* dz;   // may be null (no gradient through z)
  const void* dkl;  // [rows] in the compute dtype; may be null (no gradient through the KL)
  void* dmu;
  void* dlogvar;
  int num_threads;   // CPU only
  uintptr_t stream;  // CUDA only
  int device;        // CUDA only
};

GF_VAE_HD inline int64_t num_chunks(int64_t cols) { return (cols + kChunkCols - 1) / kChunkCols; }

void forward_cpu(const Args& a);
void backward_cpu(const Args& a);
#ifdef GENFAST_WITH_CUDA
void forward_cuda(const Args& a);
void backward_cuda(const Args& a);
#endif

}  // namespace vae
}  // namespace genfast
