// Entry points and shared math of the diffusion kernels (sampler_step, add_noise, per-sample
// sums, per-sample scaled combination, timestep embedding), used by the bindings
// (csrc/diffusion_bindings.cpp), the CPU kernels (csrc/diffusion_cpu.cpp) and the CUDA
// kernels (kernels/diffusion.cu). No libtorch: raw addresses, sizes and dtype codes.
//
// Every elementwise tensor of one call shares one dense layout with the batch dimension
// outermost in memory, so sample b owns the elements [b * N, (b + 1) * N) (N = per_sample).
// Each tensor has its own dtype (Operand), so e.g. an fp32 sample and an fp16 model output
// need no conversion pass; arithmetic is float (double when the compute dtype is float64).
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define GF_DIFF_HD __host__ __device__ __forceinline__
#else
#define GF_DIFF_HD inline
#endif

namespace genfast {
namespace diffusion {

// Column indices of a sampler_step coefficient row: genfast/reference/diffusion.py.
enum Col : int {
  X0_FROM_SAMPLE = 0,
  X0_FROM_MODEL = 1,
  PREV_X0 = 2,
  PREV_SAMPLE = 3,
  PREV_MODEL = 4,
  PREV_HIST1 = 5,
  PREV_HIST2 = 6,
  PREV_NOISE = 7,
  AUX_X0 = 8,
  AUX_SAMPLE = 9,
  AUX_MODEL = 10,
  AUX_HIST1 = 11,
  AUX_HIST2 = 12,
  NUM_COLS = 16
};

// add_noise targets: genfast/ops/diffusion.py TARGET_CODES.
enum Target : int { TARGET_NONE = 0, TARGET_EPSILON = 1, TARGET_V = 2, TARGET_SAMPLE = 3, TARGET_FLOW = 4 };

// per_sample_sums modes: LOSS -> [sum (a - b)^2]; CFG -> [sum b, sum b^2, sum g, sum g^2]
// with g = a + scale * (b - a) (a = unconditional, b = conditional prediction).
enum SumsMode : int { SUMS_LOSS = 0, SUMS_CFG = 1 };
inline int sums_width(int mode) { return mode == SUMS_LOSS ? 1 : 4; }

// A tensor argument: address (0 for none) and genfast::DType code.
struct Operand {
  const void* ptr = nullptr;
  int dtype = 0;
};

struct StepArgs {
  int64_t n = 0, per_sample = 1;  // elements; elements per sample
  int compute_f64 = 0;            // 1: arithmetic in double
  void* prev = nullptr;
  int prev_dtype = 0;
  void* aux = nullptr;  // null: aux not written
  int aux_dtype = 0;
  Operand x, m, m_uncond, h1, h2, z;  // m_uncond: fused classifier-free guidance
  Operand coefs;                      // (16,) or (B, 16), float32 or float64
  int64_t coef_stride = 0;            // 0: one row shared by the batch; 16: one row per sample
  Operand clamp;                      // (B,) per-sample bound; when null, clamp_value
  double clamp_value = -1.0;          // < 0 and no clamp tensor: no clamp
  int x0_rescale = 0;
  double guidance_scale = 1.0;
  int has_seed = 0;  // draw z in the kernel (z.ptr must then be null)
  uint64_t seed = 0;
  int num_threads = 1;
  uintptr_t stream = 0;
  int device = 0;
};

struct NoiseArgs {
  int64_t n = 0, per_sample = 1;
  int compute_f64 = 0;
  void* noisy = nullptr;
  void* target = nullptr;  // null when target == TARGET_NONE
  int out_dtype = 0;
  Operand x0, noise;
  const int64_t* timesteps = nullptr;  // (B,), indexes the tables; clamped to [0, T)
  Operand signal, noise_scale;         // (T,) tables
  int64_t table_len = 0;
  int target_kind = TARGET_NONE;
  int has_seed = 0;
  uint64_t seed = 0;
  int num_threads = 1;
  uintptr_t stream = 0;
  int device = 0;
};

struct SumsArgs {
  int64_t n = 0, per_sample = 1;
  int mode = SUMS_LOSS;
  Operand a, b;
  double scale = 1.0;
  double* out = nullptr;  // CPU: (B, width); CUDA: (B, chunks, width) partial sums
  int64_t chunks = 1;     // CUDA: blocks per sample
  int num_threads = 1;
  uintptr_t stream = 0;
  int device = 0;
};

// out = factor[b] * (alpha * a + beta * (b - a)); out2 = -out when out2 is given.
// (classifier-free guidance: alpha 1, beta g; loss gradient: alpha 0, beta -1 -> a - b)
struct CombineArgs {
  int64_t n = 0, per_sample = 1;
  int compute_f64 = 0;
  void* out = nullptr;
  void* out2 = nullptr;
  int out_dtype = 0;
  int out2_dtype = 0;
  Operand a, b, factor;  // factor: (B,) or null (1)
  double alpha = 1.0, beta = 1.0;
  int num_threads = 1;
  uintptr_t stream = 0;
  int device = 0;
};

// diffusers get_timestep_embedding, one (N, dim) output.
struct EmbedArgs {
  int64_t count = 0, dim = 0;
  void* out = nullptr;
  int out_dtype = 0;
  Operand timesteps;  // any of float32/16/bf16/64 or int64 (dtype code 4), see INT64_CODE
  int flip_sin_to_cos = 0;
  double downscale_freq_shift = 1.0, scale = 1.0, max_period = 10000.0;
  int num_threads = 1;
  uintptr_t stream = 0;
  int device = 0;
};
constexpr int INT64_CODE = 4;  // timesteps only; equal to genfast::I64 (checked in the bindings)
// Elements of one sample summed by one block of the CUDA per-sample sums kernel; the caller
// allocates (B, ceil(per_sample / CUDA_SUMS_CHUNK), width) partial sums (exported to Python as
// _C.DIFFUSION_CUDA_SUMS_CHUNK).
constexpr int64_t CUDA_SUMS_CHUNK = 16384;

void sampler_step_cpu(const StepArgs& a);
void add_noise_cpu(const NoiseArgs& a);
void per_sample_sums_cpu(const SumsArgs& a);
void combine_cpu(const CombineArgs& a);
void timestep_embedding_cpu(const EmbedArgs& a);
#ifdef GENFAST_WITH_CUDA
void sampler_step_cuda(const StepArgs& a);
void add_noise_cuda(const NoiseArgs& a);
void per_sample_sums_cuda(const SumsArgs& a);
void combine_cuda(const CombineArgs& a);
void timestep_embedding_cuda(const EmbedArgs& a);
#endif

// ---------------------------------------------------------------------------------- Philox
// Philox4x32-10 (Salmon et al. 2011), the constants and round order of triton.language.random,
// so the CPU, CUDA and Triton kernels draw the same bits: counter (index lo, index hi, 0, 0),
// key (seed lo, seed hi).
struct Philox4 {
  uint32_t v[4];
};

GF_DIFF_HD uint32_t mulhi32(uint32_t a, uint32_t b) { return uint32_t((uint64_t(a) * uint64_t(b)) >> 32); }

GF_DIFF_HD Philox4 philox4x32_10(uint64_t seed, uint64_t index) {
  uint32_t c0 = uint32_t(index), c1 = uint32_t(index >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint32_t p0 = c0, p2 = c2;
    c0 = mulhi32(0xCD9E8D57u, p2) ^ c1 ^ k0;
    c2 = mulhi32(0xD2511F53u, p0) ^ c3 ^ k1;
    c1 = 0xCD9E8D57u * p2;
    c3 = 0xD2511F53u * p0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// Two uniforms in (0, 1) from the first two Philox words: 24 bits each, centred in their bin
// so that log(u) is finite.
GF_DIFF_HD void philox_uniforms(uint64_t seed, uint64_t index, float& u1, float& u2) {
  const Philox4 r = philox4x32_10(seed, index);
  u1 = (float(r.v[0] >> 8) + 0.5f) * 5.9604644775390625e-8f;  // 2^-24
  u2 = (float(r.v[1] >> 8) + 0.5f) * 5.9604644775390625e-8f;
}

}  // namespace diffusion
}  // namespace genfast
