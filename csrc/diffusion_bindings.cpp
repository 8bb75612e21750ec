// pybind11 bindings of the diffusion family (see csrc/bindings.h).
//
// Each entry point takes its tensors as TensorViews (csrc/tensor_view.h), by name, and what a
// call's configuration fixes as one options struct per kernel (named fields, all keyword, all
// required). Sizes, per-sample counts, dtypes and the compute type are read from the views; the
// bindings check every view against the sample (shape, strides, dtype, device) before any
// kernel runs. Enumerations (add_noise targets, sums modes) are taken by name. Each function
// has a _cpu variant (num_threads) and, with CUDA, a _cuda one (stream; the device is the
// sample's).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <sstream>
#include <string>
#include <utility>

#include "bindings.h"
#include "common.h"
#include "diffusion.h"
#include "tensor_view.h"

namespace py = pybind11;
using namespace genfast;
using namespace genfast::diffusion;

static_assert(INT64_CODE == I64, "diffusion.h INT64_CODE must be common.h I64: the views carry I64");

// The options structs live in a named namespace and are bound py::module_local(): the CUDA
// emulation module of the tests (tests/cuda_emulation) binds them too, and a named type lets an
// options object of either module reach the other's entry points.
namespace genfast {
namespace diffusion {

struct SamplerStepOptions {
  double clamp_value = -1.0;    // < 0 and no clamp tensor: no x0 clamp
  bool x0_rescale = false;      // divide the clamped x0 by its bound
  double guidance_scale = 1.0;  // fused classifier-free guidance (with m_uncond)
};

struct AddNoiseOptions {
  int target = TARGET_NONE;
};

struct PerSampleSumsOptions {
  int mode = SUMS_LOSS;
  double scale = 0.0;  // CFG mode: the guidance scale
};

struct CombineOptions {
  double alpha = 1.0, beta = 1.0;  // out = factor[b] * (alpha * a + beta * (b - a))
};

struct TimestepEmbeddingOptions {
  bool flip_sin_to_cos = false;
  double downscale_freq_shift = 1.0, scale = 1.0, max_period = 10000.0;
};

}  // namespace diffusion
}  // namespace genfast

namespace {

const char* const kTargetNames[] = {"none", "epsilon", "v_prediction", "sample", "flow"};
const char* const kSumsModeNames[] = {"loss", "cfg"};

int target_code(const std::optional<std::string>& name) {
  if (!name) return TARGET_NONE;
  for (int code = TARGET_EPSILON; code <= TARGET_FLOW; ++code)
    if (*name == kTargetNames[code]) return code;
  fail_value("AddNoiseOptions",
             "target must be None, 'epsilon', 'v_prediction', 'sample' or 'flow', got '" + *name + "'");
}

int sums_mode(const std::string& name) {
  for (int mode : {SUMS_LOSS, SUMS_CFG})
    if (name == kSumsModeNames[mode]) return mode;
  fail_value("PerSampleSumsOptions", "mode must be 'loss' or 'cfg', got '" + name + "'");
}

std::string real(double v) {
  std::ostringstream s;
  s << v;
  return s.str();
}

// ----------------------------------------------------------------------------- view checks

// Dense: covers its memory without gaps or overlaps, in any dimension order.
bool dense(const TensorView& t) {
  int order[kMaxDims];
  int k = 0;
  for (int d = 0; d < t.ndim; ++d)
    if (t.shape[d] != 1) order[k++] = d;
  for (int i = 1; i < k; ++i)  // insertion sort by stride: at most 8 dimensions
    for (int j = i; j > 0 && t.strides[order[j]] < t.strides[order[j - 1]]; --j) std::swap(order[j], order[j - 1]);
  int64_t expected = 1;
  for (int i = 0; i < k; ++i) {
    if (t.strides[order[i]] != expected) return false;
    expected *= t.shape[order[i]];
  }
  return true;
}

int64_t samples_of(const TensorView& x) { return x.ndim >= 1 ? x.size(0) : 1; }

// The sample `x` of an elementwise kernel: a float tensor on the entry's device kind, dense;
// with per-sample values, batch-outer (sample b owns one contiguous range of memory).
void expect_sample(const char* fn, const char* name, const TensorView& x, bool per_sample, bool cuda) {
  expect_float_dtype(fn, name, x);
  if (cuda)
    expect_cuda(fn, name, x);
  else
    expect_cpu(fn, name, x);
  if (!dense(x)) fail_value(fn, std::string(name) + " must be dense (any dimension order), got " + describe(x));
  if (per_sample && x.ndim >= 1 && x.size(0) > 1 && x.stride(0) * x.size(0) != x.numel())
    fail_value(fn, std::string(name) + " must have its batch dimension outermost in memory (per-sample values), got " +
                       describe(x) + " with stride " + std::to_string(x.stride(0)) + " along it");
}

// A tensor read or written in the sample's layout: same shape, same strides, same device.
void expect_like(const char* fn, const char* name, const TensorView& t, const char* x_name, const TensorView& x) {
  expect_float_dtype(fn, name, t);
  expect_same_shape(fn, name, t, x_name, x);
  expect_same_device(fn, name, t, x);
  for (int d = 0; d < t.ndim; ++d)
    if (t.shape[d] != 1 && t.strides[d] != x.strides[d])
      fail_value(fn, std::string(name) + " must have the memory layout (strides) of " + x_name);
}

void expect_optional_like(const char* fn, const char* name, const TensorView& t, const char* x_name,
                          const TensorView& x) {
  if (t.present) expect_like(fn, name, t, x_name, x);
}

// A small dense per-sample or table tensor.
void expect_vector(const char* fn, const char* name, const TensorView& t, int64_t length, const TensorView& x) {
  expect_float_dtype(fn, name, t);
  expect_shape(fn, name, t, {length});
  expect_contiguous(fn, name, t);
  expect_same_device(fn, name, t, x);
}

Operand operand(const TensorView& t) {
  Operand o;
  if (t.present) {
    o.ptr = t.data;
    o.dtype = t.dtype;
  }
  return o;
}

int checked_threads(const char* fn, int num_threads) {
  if (num_threads < 1) fail_value(fn, "num_threads must be >= 1, got " + std::to_string(num_threads));
  return num_threads;
}

int device_of(const TensorView& x) { return x.device < 0 ? 0 : x.device; }  // the emulation runs on CPU tensors

// ----------------------------------------------------------------------------- argument structs

StepArgs step_args(const char* fn, bool cuda, const TensorView& prev, const TensorView& aux, const TensorView& x,
                   const TensorView& m, const TensorView& m_uncond, const TensorView& history,
                   const TensorView& history2, const TensorView& noise, const TensorView& coefs,
                   const TensorView& clamp, std::optional<uint64_t> seed, const SamplerStepOptions& o) {
  const bool by_sample = (coefs.present && coefs.ndim == 2) || clamp.present;
  expect_sample(fn, "sample", x, by_sample, cuda);
  expect_like(fn, "model_output", m, "sample", x);
  expect_like(fn, "prev", prev, "sample", x);
  expect_optional_like(fn, "aux", aux, "sample", x);
  expect_optional_like(fn, "model_output_uncond", m_uncond, "sample", x);
  expect_optional_like(fn, "history", history, "sample", x);
  expect_optional_like(fn, "history2", history2, "sample", x);
  expect_optional_like(fn, "noise", noise, "sample", x);
  const int64_t samples = samples_of(x);
  expect_present(fn, "coefs", coefs);
  if (coefs.dtype != F32 && coefs.dtype != F64)
    fail_type(fn, "coefs must be float32 or float64, got " + describe(coefs));
  if (coefs.ndim == 1)
    expect_shape(fn, "coefs", coefs, {NUM_COLS});
  else
    expect_shape(fn, "coefs", coefs, {samples, NUM_COLS});
  expect_contiguous(fn, "coefs", coefs);
  expect_same_device(fn, "coefs", coefs, x);
  if (clamp.present) expect_vector(fn, "clamp", clamp, samples, x);
  if (seed && noise.present) fail_value(fn, "noise and seed are exclusive (the seed draws the noise)");
  if (o.x0_rescale && !clamp.present && o.clamp_value < 0)
    fail_value(fn, "options.x0_rescale needs a clamp (a clamp tensor or options.clamp_value >= 0)");
  StepArgs a;
  a.n = x.numel();
  a.per_sample = by_sample && samples > 0 ? std::max<int64_t>(1, a.n / samples) : std::max<int64_t>(1, a.n);
  a.compute_f64 = x.dtype == F64;
  a.prev = prev.data;
  a.prev_dtype = prev.dtype;
  a.aux = aux.present ? aux.data : nullptr;
  a.aux_dtype = aux.present ? aux.dtype : 0;
  a.x = operand(x);
  a.m = operand(m);
  a.m_uncond = operand(m_uncond);
  a.h1 = operand(history);
  a.h2 = operand(history2);
  a.z = operand(noise);
  a.coefs = operand(coefs);
  a.coef_stride = coefs.ndim == 2 ? NUM_COLS : 0;
  a.clamp = operand(clamp);
  a.clamp_value = o.clamp_value;
  a.x0_rescale = o.x0_rescale;
  a.guidance_scale = o.guidance_scale;
  a.has_seed = seed.has_value();
  a.seed = seed.value_or(0);
  return a;
}

NoiseArgs noise_args(const char* fn, bool cuda, const TensorView& noisy, const TensorView& target, const TensorView& x0,
                     const TensorView& noise, const TensorView& timesteps, const TensorView& signal_scale,
                     const TensorView& noise_scale, std::optional<uint64_t> seed, const AddNoiseOptions& o) {
  expect_sample(fn, "x0", x0, true, cuda);
  expect_like(fn, "noisy", noisy, "x0", x0);
  if (o.target != TARGET_NONE) {
    expect_like(fn, "target", target, "x0", x0);
    expect_dtype(fn, "target", target, noisy.dtype);
  } else if (target.present) {
    fail_value(fn, "target must be None when options.target is None, got " + describe(target));
  }
  expect_optional_like(fn, "noise", noise, "x0", x0);
  if (!noise.present && !seed) fail_value(fn, "noise is required without a seed, got None");
  if (seed && noise.present) fail_value(fn, "noise and seed are exclusive (the seed draws the noise)");
  const int64_t samples = samples_of(x0);
  expect_dtype(fn, "timesteps", timesteps, I64);
  expect_shape(fn, "timesteps", timesteps, {samples});
  expect_contiguous(fn, "timesteps", timesteps);
  expect_same_device(fn, "timesteps", timesteps, x0);
  expect_present(fn, "signal_scale", signal_scale);
  if (signal_scale.ndim != 1 || signal_scale.size(0) < 1)
    fail_value(fn, "signal_scale must be a non-empty 1-D table, got " + describe(signal_scale));
  expect_vector(fn, "signal_scale", signal_scale, signal_scale.size(0), x0);
  expect_vector(fn, "noise_scale", noise_scale, signal_scale.size(0), x0);
  NoiseArgs a;
  a.n = x0.numel();
  a.per_sample = samples > 0 ? std::max<int64_t>(1, a.n / samples) : 1;
  a.compute_f64 = x0.dtype == F64;
  a.noisy = noisy.data;
  a.target = target.present ? target.data : nullptr;
  a.out_dtype = noisy.dtype;
  a.x0 = operand(x0);
  a.noise = operand(noise);
  a.timesteps = timesteps.ptr<const int64_t>();
  a.signal = operand(signal_scale);
  a.noise_scale = operand(noise_scale);
  a.table_len = signal_scale.size(0);
  a.target_kind = o.target;
  a.has_seed = seed.has_value();
  a.seed = seed.value_or(0);
  return a;
}

// out: (B, width) on the CPU, (B, chunks, width) partial sums on CUDA.
SumsArgs sums_args(const char* fn, bool cuda, const TensorView& a_view, const TensorView& b_view, const TensorView& out,
                   const PerSampleSumsOptions& o) {
  expect_sample(fn, "a", a_view, true, cuda);
  expect_like(fn, "b", b_view, "a", a_view);
  const int64_t samples = samples_of(a_view);
  SumsArgs a;
  a.n = a_view.numel();
  a.per_sample = samples > 0 ? std::max<int64_t>(1, a.n / samples) : 1;
  a.mode = o.mode;
  a.a = operand(a_view);
  a.b = operand(b_view);
  a.scale = o.scale;
  expect_dtype(fn, "out", out, F64);
  if (cuda) {
    a.chunks = (a.per_sample + CUDA_SUMS_CHUNK - 1) / CUDA_SUMS_CHUNK;
    expect_shape(fn, "out", out, {samples, a.chunks, sums_width(o.mode)});
  } else {
    expect_shape(fn, "out", out, {samples, sums_width(o.mode)});
  }
  expect_contiguous(fn, "out", out);
  expect_same_device(fn, "out", out, a_view);
  a.out = out.ptr<double>();
  return a;
}

CombineArgs combine_args(const char* fn, bool cuda, const TensorView& out, const TensorView& out2,
                         const TensorView& a_view, const TensorView& b_view, const TensorView& factor,
                         const CombineOptions& o) {
  expect_sample(fn, "a", a_view, factor.present, cuda);
  expect_like(fn, "b", b_view, "a", a_view);
  expect_like(fn, "out", out, "a", a_view);
  expect_optional_like(fn, "out2", out2, "a", a_view);
  const int64_t samples = samples_of(a_view);
  if (factor.present) expect_vector(fn, "factor", factor, samples, a_view);
  CombineArgs a;
  a.n = a_view.numel();
  a.per_sample = factor.present && samples > 0 ? std::max<int64_t>(1, a.n / samples) : std::max<int64_t>(1, a.n);
  a.compute_f64 = a_view.dtype == F64 || b_view.dtype == F64;
  a.out = out.data;
  a.out_dtype = out.dtype;
  a.out2 = out2.present ? out2.data : nullptr;
  a.out2_dtype = out2.present ? out2.dtype : 0;
  a.a = operand(a_view);
  a.b = operand(b_view);
  a.factor = operand(factor);
  a.alpha = o.alpha;
  a.beta = o.beta;
  return a;
}

EmbedArgs embed_args(const char* fn, bool cuda, const TensorView& out, const TensorView& timesteps,
                     const TimestepEmbeddingOptions& o) {
  expect_present(fn, "timesteps", timesteps);
  if (cuda)
    expect_cuda(fn, "timesteps", timesteps);
  else
    expect_cpu(fn, "timesteps", timesteps);
  if (timesteps.dtype != I64 && (timesteps.dtype < F32 || timesteps.dtype > F64))
    fail_type(fn, "timesteps must be int64 or a float dtype, got " + describe(timesteps));
  expect_ndim(fn, "timesteps", timesteps, 1);
  expect_contiguous(fn, "timesteps", timesteps);
  expect_dtype(fn, "out", out, F32);
  expect_shape(fn, "out", out, {timesteps.size(0), -1});
  expect_contiguous(fn, "out", out);
  expect_same_device(fn, "out", out, timesteps);
  if (out.size(1) < 1) fail_value(fn, "out must have at least one column (dim >= 1), got " + describe(out));
  EmbedArgs a;
  a.count = timesteps.size(0);
  a.dim = out.size(1);
  a.out = out.data;
  a.out_dtype = out.dtype;
  a.timesteps = operand(timesteps);
  a.flip_sin_to_cos = o.flip_sin_to_cos;
  a.downscale_freq_shift = o.downscale_freq_shift;
  a.scale = o.scale;
  a.max_period = o.max_period;
  return a;
}

}  // namespace

GENFAST_REGISTER_BINDINGS(diffusion) {
  {
    py::dict targets;
    for (int code = TARGET_EPSILON; code <= TARGET_FLOW; ++code) targets[kTargetNames[code]] = code;
    m.attr("DIFFUSION_TARGETS") = targets;  // the names AddNoiseOptions takes
  }
  m.attr("DIFFUSION_CUDA_SUMS_CHUNK") = py::int_(CUDA_SUMS_CHUNK);

  py::class_<SamplerStepOptions>(m, "SamplerStepOptions", py::module_local(),
                                 "Options of diffusion_sampler_step_* (all keyword, all required).")
      .def(py::init([](double clamp_value, bool x0_rescale, double guidance_scale) {
             if (clamp_value != clamp_value) fail_value("SamplerStepOptions", "clamp_value is NaN");
             if (guidance_scale != guidance_scale) fail_value("SamplerStepOptions", "guidance_scale is NaN");
             return SamplerStepOptions{clamp_value, x0_rescale, guidance_scale};
           }),
           py::kw_only(), py::arg("clamp_value"), py::arg("x0_rescale"), py::arg("guidance_scale"))
      .def_readonly("clamp_value", &SamplerStepOptions::clamp_value)
      .def_readonly("x0_rescale", &SamplerStepOptions::x0_rescale)
      .def_readonly("guidance_scale", &SamplerStepOptions::guidance_scale)
      .def("__repr__", [](const SamplerStepOptions& o) {
        return "SamplerStepOptions(clamp_value=" + real(o.clamp_value) +
               ", x0_rescale=" + (o.x0_rescale ? "True" : "False") + ", guidance_scale=" + real(o.guidance_scale) + ")";
      });

  py::class_<AddNoiseOptions>(m, "AddNoiseOptions", py::module_local(),
                              "Options of diffusion_add_noise_* (all keyword, all required).")
      .def(py::init([](std::optional<std::string> target) { return AddNoiseOptions{target_code(target)}; }),
           py::kw_only(), py::arg("target"))
      .def_property_readonly("target",
                             [](const AddNoiseOptions& o) -> py::object {
                               return o.target == TARGET_NONE ? py::object(py::none())
                                                              : py::object(py::str(kTargetNames[o.target]));
                             })
      .def("__repr__", [](const AddNoiseOptions& o) {
        return std::string("AddNoiseOptions(target=") +
               (o.target == TARGET_NONE ? std::string("None") : "'" + std::string(kTargetNames[o.target]) + "'") + ")";
      });

  py::class_<PerSampleSumsOptions>(m, "PerSampleSumsOptions", py::module_local(),
                                   "Options of diffusion_per_sample_sums_* (all keyword, all required).")
      .def(py::init([](const std::string& mode, double scale) {
             if (scale != scale) fail_value("PerSampleSumsOptions", "scale is NaN");
             return PerSampleSumsOptions{sums_mode(mode), scale};
           }),
           py::kw_only(), py::arg("mode"), py::arg("scale"))
      .def_property_readonly("mode", [](const PerSampleSumsOptions& o) { return std::string(kSumsModeNames[o.mode]); })
      .def_property_readonly("width", [](const PerSampleSumsOptions& o) { return sums_width(o.mode); })
      .def_readonly("scale", &PerSampleSumsOptions::scale)
      .def("__repr__", [](const PerSampleSumsOptions& o) {
        return std::string("PerSampleSumsOptions(mode='") + kSumsModeNames[o.mode] + "', scale=" + real(o.scale) + ")";
      });

  py::class_<CombineOptions>(m, "CombineOptions", py::module_local(),
                             "Options of diffusion_combine_* (all keyword, all required).")
      .def(py::init([](double alpha, double beta) { return CombineOptions{alpha, beta}; }), py::kw_only(),
           py::arg("alpha"), py::arg("beta"))
      .def_readonly("alpha", &CombineOptions::alpha)
      .def_readonly("beta", &CombineOptions::beta)
      .def("__repr__", [](const CombineOptions& o) {
        return "CombineOptions(alpha=" + real(o.alpha) + ", beta=" + real(o.beta) + ")";
      });

  py::class_<TimestepEmbeddingOptions>(m, "TimestepEmbeddingOptions", py::module_local(),
                                       "Options of diffusion_timestep_embedding_* (all keyword, all required).")
      .def(py::init([](bool flip_sin_to_cos, double downscale_freq_shift, double scale, double max_period) {
             if (!(max_period > 0)) fail_value("TimestepEmbeddingOptions", "max_period must be > 0");
             return TimestepEmbeddingOptions{flip_sin_to_cos, downscale_freq_shift, scale, max_period};
           }),
           py::kw_only(), py::arg("flip_sin_to_cos"), py::arg("downscale_freq_shift"), py::arg("scale"),
           py::arg("max_period"))
      .def_readonly("flip_sin_to_cos", &TimestepEmbeddingOptions::flip_sin_to_cos)
      .def_readonly("downscale_freq_shift", &TimestepEmbeddingOptions::downscale_freq_shift)
      .def_readonly("scale", &TimestepEmbeddingOptions::scale)
      .def_readonly("max_period", &TimestepEmbeddingOptions::max_period);

  m.def(
      "diffusion_sampler_step_cpu",
      [](const TensorView& prev, const TensorView& aux, const TensorView& sample, const TensorView& model_output,
         const TensorView& model_output_uncond, const TensorView& history, const TensorView& history2,
         const TensorView& noise, const TensorView& coefs, const TensorView& clamp, std::optional<uint64_t> seed,
         const SamplerStepOptions& options, int num_threads) {
        const char* fn = "diffusion_sampler_step_cpu";
        StepArgs a = step_args(fn, false, prev, aux, sample, model_output, model_output_uncond, history, history2,
                               noise, coefs, clamp, seed, options);
        a.num_threads = checked_threads(fn, num_threads);
        py::gil_scoped_release release;
        sampler_step_cpu(a);
      },
      py::arg("prev"), py::arg("aux"), py::arg("sample"), py::arg("model_output"), py::arg("model_output_uncond"),
      py::arg("history"), py::arg("history2"), py::arg("noise"), py::arg("coefs"), py::arg("clamp"), py::arg("seed"),
      py::arg("options"), py::arg("num_threads"));
  m.def(
      "diffusion_add_noise_cpu",
      [](const TensorView& noisy, const TensorView& target, const TensorView& x0, const TensorView& noise,
         const TensorView& timesteps, const TensorView& signal_scale, const TensorView& noise_scale,
         std::optional<uint64_t> seed, const AddNoiseOptions& options, int num_threads) {
        const char* fn = "diffusion_add_noise_cpu";
        NoiseArgs a =
            noise_args(fn, false, noisy, target, x0, noise, timesteps, signal_scale, noise_scale, seed, options);
        a.num_threads = checked_threads(fn, num_threads);
        py::gil_scoped_release release;
        add_noise_cpu(a);
      },
      py::arg("noisy"), py::arg("target"), py::arg("x0"), py::arg("noise"), py::arg("timesteps"),
      py::arg("signal_scale"), py::arg("noise_scale"), py::kw_only(), py::arg("seed"), py::arg("options"),
      py::arg("num_threads"));
  m.def(
      "diffusion_per_sample_sums_cpu",
      [](const TensorView& a_view, const TensorView& b_view, const TensorView& out, const PerSampleSumsOptions& options,
         int num_threads) {
        const char* fn = "diffusion_per_sample_sums_cpu";
        SumsArgs a = sums_args(fn, false, a_view, b_view, out, options);
        a.num_threads = checked_threads(fn, num_threads);
        py::gil_scoped_release release;
        per_sample_sums_cpu(a);
      },
      py::arg("a"), py::arg("b"), py::arg("out"), py::kw_only(), py::arg("options"), py::arg("num_threads"));
  m.def(
      "diffusion_combine_cpu",
      [](const TensorView& out, const TensorView& out2, const TensorView& a_view, const TensorView& b_view,
         const TensorView& factor, const CombineOptions& options, int num_threads) {
        const char* fn = "diffusion_combine_cpu";
        CombineArgs a = combine_args(fn, false, out, out2, a_view, b_view, factor, options);
        a.num_threads = checked_threads(fn, num_threads);
        py::gil_scoped_release release;
        combine_cpu(a);
      },
      py::arg("out"), py::arg("out2"), py::arg("a"), py::arg("b"), py::kw_only(), py::arg("factor"), py::arg("options"),
      py::arg("num_threads"));
  m.def(
      "diffusion_timestep_embedding_cpu",
      [](const TensorView& out, const TensorView& timesteps, const TimestepEmbeddingOptions& options, int num_threads) {
        const char* fn = "diffusion_timestep_embedding_cpu";
        EmbedArgs a = embed_args(fn, false, out, timesteps, options);
        a.num_threads = checked_threads(fn, num_threads);
        py::gil_scoped_release release;
        timestep_embedding_cpu(a);
      },
      py::arg("out"), py::arg("timesteps"), py::kw_only(), py::arg("options"), py::arg("num_threads"));

#ifdef GENFAST_WITH_CUDA
  m.def(
      "diffusion_sampler_step_cuda",
      [](const TensorView& prev, const TensorView& aux, const TensorView& sample, const TensorView& model_output,
         const TensorView& model_output_uncond, const TensorView& history, const TensorView& history2,
         const TensorView& noise, const TensorView& coefs, const TensorView& clamp, std::optional<uint64_t> seed,
         const SamplerStepOptions& options, uintptr_t stream) {
        const char* fn = "diffusion_sampler_step_cuda";
        StepArgs a = step_args(fn, true, prev, aux, sample, model_output, model_output_uncond, history, history2, noise,
                               coefs, clamp, seed, options);
        a.stream = stream;
        a.device = device_of(sample);
        py::gil_scoped_release release;
        sampler_step_cuda(a);
      },
      py::arg("prev"), py::arg("aux"), py::arg("sample"), py::arg("model_output"), py::kw_only(),
      py::arg("model_output_uncond"), py::arg("history"), py::arg("history2"), py::arg("noise"), py::arg("coefs"),
      py::arg("clamp"), py::arg("seed"), py::arg("options"), py::arg("stream"));
  m.def(
      "diffusion_add_noise_cuda",
      [](const TensorView& noisy, const TensorView& target, const TensorView& x0, const TensorView& noise,
         const TensorView& timesteps, const TensorView& signal_scale, const TensorView& noise_scale,
         std::optional<uint64_t> seed, const AddNoiseOptions& options, uintptr_t stream) {
        const char* fn = "diffusion_add_noise_cuda";
        NoiseArgs a =
            noise_args(fn, true, noisy, target, x0, noise, timesteps, signal_scale, noise_scale, seed, options);
        a.stream = stream;
        a.device = device_of(x0);
        py::gil_scoped_release release;
        add_noise_cuda(a);
      },
      py::arg("noisy"), py::arg("target"), py::arg("x0"), py::arg("noise"), py::arg("timesteps"),
      py::arg("signal_scale"), py::arg("noise_scale"), py::kw_only(), py::arg("seed"), py::arg("options"),
      py::arg("stream"));
  m.def(
      "diffusion_per_sample_sums_cuda",
      [](const TensorView& a_view, const TensorView& b_view, const TensorView& partial,
         const PerSampleSumsOptions& options, uintptr_t stream) {
        const char* fn = "diffusion_per_sample_sums_cuda";
        SumsArgs a = sums_args(fn, true, a_view, b_view, partial, options);
        a.stream = stream;
        a.device = device_of(a_view);
        py::gil_scoped_release release;
        per_sample_sums_cuda(a);
      },
      py::arg("a"), py::arg("b"), py::arg("partial"), py::kw_only(), py::arg("options"), py::arg("stream"));
  m.def(
      "diffusion_combine_cuda",
      [](const TensorView& out, const TensorView& out2, const TensorView& a_view, const TensorView& b_view,
         const TensorView& factor, const CombineOptions& options, uintptr_t stream) {
        const char* fn = "diffusion_combine_cuda";
        CombineArgs a = combine_args(fn, true, out, out2, a_view, b_view, factor, options);
        a.stream = stream;
        a.device = device_of(a_view);
        py::gil_scoped_release release;
        combine_cuda(a);
      },
      py::arg("out"), py::arg("out2"), py::arg("a"), py::arg("b"), py::kw_only(), py::arg("factor"), py::arg("options"),
      py::arg("stream"));
  m.def(
      "diffusion_timestep_embedding_cuda",
      [](const TensorView& out, const TensorView& timesteps, const TimestepEmbeddingOptions& options,
         uintptr_t stream) {
        const char* fn = "diffusion_timestep_embedding_cuda";
        EmbedArgs a = embed_args(fn, true, out, timesteps, options);
        a.stream = stream;
        a.device = device_of(timesteps);
        py::gil_scoped_release release;
        timestep_embedding_cuda(a);
      },
      py::arg("out"), py::arg("timesteps"), py::kw_only(), py::arg("options"), py::arg("stream"));
#endif
}
