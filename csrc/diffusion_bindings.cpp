// pybind11 bindings of the diffusion family (see csrc/bindings.h). Tensor arguments arrive as
// (address, dtype code) pairs, address 0 for none; everything was validated in Python
// (genfast/ops/diffusion.py). Each function has a _cpu and, with CUDA, a _cuda variant that
// takes the stream and device as two extra trailing arguments.
#include <stdexcept>

#include "bindings.h"
#include "common.h"
#include "diffusion.h"

namespace py = pybind11;
using namespace genfast;
using namespace genfast::diffusion;

namespace {

Operand operand(uintptr_t ptr, int dtype) {
  Operand o;
  o.ptr = cptr(ptr);
  o.dtype = dtype;
  return o;
}

void check_sizes(const char* op, int64_t n, int64_t per_sample) {
  if (n < 0 || per_sample < 1 || n % per_sample != 0)
    throw std::invalid_argument(std::string(op) + ": bad sizes (n must be a multiple of per_sample >= 1)");
}

StepArgs step_args(int64_t n, int64_t per_sample, bool compute_f64, uintptr_t prev, int prev_dtype, uintptr_t aux,
                   int aux_dtype, uintptr_t x, int x_dtype, uintptr_t m, int m_dtype, uintptr_t mu, int mu_dtype,
                   uintptr_t h1, int h1_dtype, uintptr_t h2, int h2_dtype, uintptr_t z, int z_dtype, uintptr_t coefs,
                   int coefs_dtype, int64_t coef_stride, uintptr_t clamp, int clamp_dtype, double clamp_value,
                   bool x0_rescale, double guidance_scale, bool has_seed, uint64_t seed) {
  check_sizes("sampler_step", n, per_sample);
  StepArgs a;
  a.n = n; a.per_sample = per_sample; a.compute_f64 = compute_f64;
  a.prev = mptr(prev); a.prev_dtype = prev_dtype;
  a.aux = mptr(aux); a.aux_dtype = aux_dtype;
  a.x = operand(x, x_dtype); a.m = operand(m, m_dtype); a.m_uncond = operand(mu, mu_dtype);
  a.h1 = operand(h1, h1_dtype); a.h2 = operand(h2, h2_dtype); a.z = operand(z, z_dtype);
  a.coefs = operand(coefs, coefs_dtype); a.coef_stride = coef_stride;
  a.clamp = operand(clamp, clamp_dtype); a.clamp_value = clamp_value;
  a.x0_rescale = x0_rescale; a.guidance_scale = guidance_scale;
  a.has_seed = has_seed; a.seed = seed;
  if (has_seed && z) throw std::invalid_argument("sampler_step: noise and a noise seed are exclusive");
  return a;
}

NoiseArgs noise_args(int64_t n, int64_t per_sample, bool compute_f64, uintptr_t noisy, uintptr_t target,
                     int out_dtype, uintptr_t x0, int x0_dtype, uintptr_t noise, int noise_dtype, uintptr_t timesteps,
                     uintptr_t signal, int signal_dtype, uintptr_t noise_scale, int noise_scale_dtype,
                     int64_t table_len, int target_kind, bool has_seed, uint64_t seed) {
  check_sizes("add_noise", n, per_sample);
  if (table_len < 1) throw std::invalid_argument("add_noise: empty schedule table");
  NoiseArgs a;
  a.n = n; a.per_sample = per_sample; a.compute_f64 = compute_f64;
  a.noisy = mptr(noisy); a.target = mptr(target); a.out_dtype = out_dtype;
  a.x0 = operand(x0, x0_dtype); a.noise = operand(noise, noise_dtype);
  a.timesteps = static_cast<const int64_t*>(cptr(timesteps));
  a.signal = operand(signal, signal_dtype); a.noise_scale = operand(noise_scale, noise_scale_dtype);
  a.table_len = table_len; a.target_kind = target_kind;
  a.has_seed = has_seed; a.seed = seed;
  return a;
}

SumsArgs sums_args(int64_t n, int64_t per_sample, int mode, uintptr_t a_ptr, int a_dtype, uintptr_t b_ptr, int b_dtype,
                   double scale, uintptr_t out, int64_t chunks) {
  check_sizes("per_sample_sums", n, per_sample);
  SumsArgs a;
  a.n = n; a.per_sample = per_sample; a.mode = mode;
  a.a = operand(a_ptr, a_dtype); a.b = operand(b_ptr, b_dtype);
  a.scale = scale;
  a.out = static_cast<double*>(mptr(out));
  a.chunks = chunks;
  return a;
}

CombineArgs combine_args(int64_t n, int64_t per_sample, bool compute_f64, uintptr_t out, int out_dtype, uintptr_t out2,
                         int out2_dtype, uintptr_t a_ptr, int a_dtype, uintptr_t b_ptr, int b_dtype, uintptr_t factor,
                         int factor_dtype, double alpha, double beta) {
  check_sizes("combine", n, per_sample);
  CombineArgs a;
  a.n = n; a.per_sample = per_sample; a.compute_f64 = compute_f64;
  a.out = mptr(out); a.out_dtype = out_dtype; a.out2 = mptr(out2); a.out2_dtype = out2_dtype;
  a.a = operand(a_ptr, a_dtype); a.b = operand(b_ptr, b_dtype); a.factor = operand(factor, factor_dtype);
  a.alpha = alpha; a.beta = beta;
  return a;
}

EmbedArgs embed_args(int64_t count, int64_t dim, uintptr_t out, int out_dtype, uintptr_t timesteps, int t_dtype,
                     bool flip, double shift, double scale, double max_period) {
  if (count < 0 || dim < 1) throw std::invalid_argument("timestep_embedding: bad sizes");
  EmbedArgs a;
  a.count = count; a.dim = dim; a.out = mptr(out); a.out_dtype = out_dtype;
  a.timesteps = operand(timesteps, t_dtype);
  a.flip_sin_to_cos = flip; a.downscale_freq_shift = shift; a.scale = scale; a.max_period = max_period;
  return a;
}

}  // namespace

// The Python side calls each as f(*args, num_threads) on the CPU and f(*args, stream, device)
// on CUDA; the argument lists are those of the *_args helpers above.
GENFAST_REGISTER_BINDINGS(diffusion) {
  m.def("diffusion_sampler_step_cpu",
        [](int64_t n, int64_t per_sample, bool f64, uintptr_t prev, int prev_dtype, uintptr_t aux, int aux_dtype,
           uintptr_t x, int x_dtype, uintptr_t mo, int m_dtype, uintptr_t mu, int mu_dtype, uintptr_t h1, int h1_dtype,
           uintptr_t h2, int h2_dtype, uintptr_t z, int z_dtype, uintptr_t coefs, int coefs_dtype, int64_t coef_stride,
           uintptr_t clamp, int clamp_dtype, double clamp_value, bool rescale, double g, bool has_seed, uint64_t seed,
           int num_threads) {
          StepArgs a = step_args(n, per_sample, f64, prev, prev_dtype, aux, aux_dtype, x, x_dtype, mo, m_dtype, mu,
                                 mu_dtype, h1, h1_dtype, h2, h2_dtype, z, z_dtype, coefs, coefs_dtype, coef_stride,
                                 clamp, clamp_dtype, clamp_value, rescale, g, has_seed, seed);
          a.num_threads = num_threads;
          py::gil_scoped_release release;
          sampler_step_cpu(a);
        });
  m.def("diffusion_add_noise_cpu",
        [](int64_t n, int64_t per_sample, bool f64, uintptr_t noisy, uintptr_t target, int out_dtype, uintptr_t x0,
           int x0_dtype, uintptr_t noise, int noise_dtype, uintptr_t timesteps, uintptr_t signal, int signal_dtype,
           uintptr_t noise_scale, int noise_scale_dtype, int64_t table_len, int target_kind, bool has_seed,
           uint64_t seed, int num_threads) {
          NoiseArgs a = noise_args(n, per_sample, f64, noisy, target, out_dtype, x0, x0_dtype, noise, noise_dtype,
                                   timesteps, signal, signal_dtype, noise_scale, noise_scale_dtype, table_len,
                                   target_kind, has_seed, seed);
          a.num_threads = num_threads;
          py::gil_scoped_release release;
          add_noise_cpu(a);
        });
  m.def("diffusion_per_sample_sums_cpu",
        [](int64_t n, int64_t per_sample, int mode, uintptr_t a_ptr, int a_dtype, uintptr_t b_ptr, int b_dtype,
           double scale, uintptr_t out, int num_threads) {
          SumsArgs a = sums_args(n, per_sample, mode, a_ptr, a_dtype, b_ptr, b_dtype, scale, out, 1);
          a.num_threads = num_threads;
          py::gil_scoped_release release;
          per_sample_sums_cpu(a);
        });
  m.def("diffusion_combine_cpu",
        [](int64_t n, int64_t per_sample, bool f64, uintptr_t out, int out_dtype, uintptr_t out2, int out2_dtype,
           uintptr_t a_ptr, int a_dtype, uintptr_t b_ptr, int b_dtype, uintptr_t factor, int factor_dtype, double alpha,
           double beta, int num_threads) {
          CombineArgs a = combine_args(n, per_sample, f64, out, out_dtype, out2, out2_dtype, a_ptr, a_dtype, b_ptr,
                                       b_dtype, factor, factor_dtype, alpha, beta);
          a.num_threads = num_threads;
          py::gil_scoped_release release;
          combine_cpu(a);
        });
  m.def("diffusion_timestep_embedding_cpu",
        [](int64_t count, int64_t dim, uintptr_t out, int out_dtype, uintptr_t t, int t_dtype, bool flip, double shift,
           double scale, double max_period, int num_threads) {
          EmbedArgs a = embed_args(count, dim, out, out_dtype, t, t_dtype, flip, shift, scale, max_period);
          a.num_threads = num_threads;
          py::gil_scoped_release release;
          timestep_embedding_cpu(a);
        });

#ifdef GENFAST_WITH_CUDA
  m.def("diffusion_sampler_step_cuda",
        [](int64_t n, int64_t per_sample, bool f64, uintptr_t prev, int prev_dtype, uintptr_t aux, int aux_dtype,
           uintptr_t x, int x_dtype, uintptr_t mo, int m_dtype, uintptr_t mu, int mu_dtype, uintptr_t h1, int h1_dtype,
           uintptr_t h2, int h2_dtype, uintptr_t z, int z_dtype, uintptr_t coefs, int coefs_dtype, int64_t coef_stride,
           uintptr_t clamp, int clamp_dtype, double clamp_value, bool rescale, double g, bool has_seed, uint64_t seed,
           uintptr_t stream, int device) {
          StepArgs a = step_args(n, per_sample, f64, prev, prev_dtype, aux, aux_dtype, x, x_dtype, mo, m_dtype, mu,
                                 mu_dtype, h1, h1_dtype, h2, h2_dtype, z, z_dtype, coefs, coefs_dtype, coef_stride,
                                 clamp, clamp_dtype, clamp_value, rescale, g, has_seed, seed);
          a.stream = stream; a.device = device;
          py::gil_scoped_release release;
          sampler_step_cuda(a);
        });
  m.def("diffusion_add_noise_cuda",
        [](int64_t n, int64_t per_sample, bool f64, uintptr_t noisy, uintptr_t target, int out_dtype, uintptr_t x0,
           int x0_dtype, uintptr_t noise, int noise_dtype, uintptr_t timesteps, uintptr_t signal, int signal_dtype,
           uintptr_t noise_scale, int noise_scale_dtype, int64_t table_len, int target_kind, bool has_seed,
           uint64_t seed, uintptr_t stream, int device) {
          NoiseArgs a = noise_args(n, per_sample, f64, noisy, target, out_dtype, x0, x0_dtype, noise, noise_dtype,
                                   timesteps, signal, signal_dtype, noise_scale, noise_scale_dtype, table_len,
                                   target_kind, has_seed, seed);
          a.stream = stream; a.device = device;
          py::gil_scoped_release release;
          add_noise_cuda(a);
        });
  m.def("diffusion_per_sample_sums_cuda",
        [](int64_t n, int64_t per_sample, int mode, uintptr_t a_ptr, int a_dtype, uintptr_t b_ptr, int b_dtype,
           double scale, uintptr_t out, int64_t chunks, uintptr_t stream, int device) {
          SumsArgs a = sums_args(n, per_sample, mode, a_ptr, a_dtype, b_ptr, b_dtype, scale, out, chunks);
          a.stream = stream; a.device = device;
          py::gil_scoped_release release;
          per_sample_sums_cuda(a);
        });
  m.def("diffusion_combine_cuda",
        [](int64_t n, int64_t per_sample, bool f64, uintptr_t out, int out_dtype, uintptr_t out2, int out2_dtype,
           uintptr_t a_ptr, int a_dtype, uintptr_t b_ptr, int b_dtype, uintptr_t factor, int factor_dtype, double alpha,
           double beta, uintptr_t stream, int device) {
          CombineArgs a = combine_args(n, per_sample, f64, out, out_dtype, out2, out2_dtype, a_ptr, a_dtype, b_ptr,
                                       b_dtype, factor, factor_dtype, alpha, beta);
          a.stream = stream; a.device = device;
          py::gil_scoped_release release;
          combine_cuda(a);
        });
  m.def("diffusion_timestep_embedding_cuda",
        [](int64_t count, int64_t dim, uintptr_t out, int out_dtype, uintptr_t t, int t_dtype, bool flip, double shift,
           double scale, double max_period, uintptr_t stream, int device) {
          EmbedArgs a = embed_args(count, dim, out, out_dtype, t, t_dtype, flip, shift, scale, max_period);
          a.stream = stream; a.device = device;
          py::gil_scoped_release release;
          timestep_embedding_cuda(a);
        });
#endif
}
