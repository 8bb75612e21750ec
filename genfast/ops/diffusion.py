"""genfast.ops.diffusion: fused diffusion sampling and training kernels.

Public ops (each validates its arguments before any kernel and never synchronises a GPU with
the host; only the reference backend's seeded noise is drawn on the host, with numpy):

* ``sampler_step``: one sampler step of any scheduler (the coefficient contract of
  ``genfast.reference.diffusion``) in one pass: reads x, m and the history/noise tensors that
  are passed (pass None for those whose coefficients are zero: a tensor given is read),
  writes prev and aux. Extras: ``return_aux=False`` skips writing aux (it returns None);
  ``noise_seed=int`` draws the noise in-kernel; ``model_output_uncond=`` with
  ``guidance_scale=`` fuses classifier-free guidance (m = uncond + g (cond - uncond), no
  rescale in the fused form; use ``cfg_combine`` for guidance_rescale).
* ``add_noise``: q(x_t | x_0) and the training target in one pass; per-sample timesteps index
  the (T,) tables inside the kernel; noise given or drawn from ``noise_seed``.
* ``diffusion_loss``: per-sample weighted MSE; forward one pass (per-sample sums), backward one
  pass (grad of model_output and, if it requires grad, of target). ``min_snr_weights``.
* ``cfg_combine``: classifier-free guidance, with diffusers' guidance_rescale (two passes:
  per-sample sums, then the scaled combination).
* ``timestep_embedding``: diffusers' get_timestep_embedding in one kernel.

Seeded noise (``noise_seed``): standard normal, Box-Muller of Philox4x32-10 uniforms, a pure
function of (seed, element offset in the output's memory), so the same seed, shape and layout
give the same noise on every call. All backends draw the same Philox bits (the spec is
``genfast.reference.diffusion.seeded_normal``); their normals differ by the rounding of
log/cos only (no bit-exactness across devices is promised). Use a new seed per step.

Timesteps of ``add_noise``: checked against the table length on the host when they are CPU
tensors in eager mode (free); CUDA timesteps (and CPU ones under torch.compile) are clamped to
[0, T - 1] in the kernel (a check would need a device-to-host synchronisation).

Layouts: outputs keep the layout of the (first) input when the kernel can run in it: any dense
layout when nothing is per sample (shared coefficients, cfg without rescale), else a dense
layout whose batch dimension is outermost in memory (contiguous, channels_last, ...), where
sample b owns one contiguous range. Other inputs (gaps, or a batch dimension that is not
outermost where per-sample values are needed) are made contiguous first.
Every input keeps its own dtype (e.g. an fp32 sample with an fp16 model output): no
conversion pass. Arithmetic is float32, or float64 when the sample / x0 / prediction is
float64.

Backends (``DISPATCH``, one OpDispatcher per kernel: sampler_step, add_noise, per_sample_sums,
per_sample_combine, timestep_embedding; these are the op names for ``GENFAST_BACKEND=op=name``
and ``genfast.use_backend({op: name})``): cuda and triton (float32/16/bf16), cpu (C++/OpenMP,
also float64), reference (the plain-PyTorch composition; float64 GPU tensors end up there).
The ops are registered with torch.library (light form, with fake kernels), so
torch.compile(fullgraph=True) keeps each as one opaque node. Gradients: diffusion_loss has a
fused backward; the other ops are inference kernels and, when an input requires grad, run the
differentiable reference composition instead.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch

from .. import _ext
from .._ext import bind_positional
from .._dispatch import OpDispatcher, direct_call_allowed, plain_eager_mode
from ..reference import diffusion as ref
from ..reference.diffusion import NUM_STEP_COEFS, PREDICTION_TYPES, TARGETS
from ._define import NativeOp
from ._validate import (ValidatedSignatures, cacheable, check_backend, check_real, check_tensor, cpu_threads,
                        cpu_threads_per_call, dense, is_dense, is_int, tensor_key, type_name)

__all__ = ["sampler_step", "add_noise", "diffusion_loss", "min_snr_weights", "cfg_combine", "timestep_embedding",
           "DISPATCH", "FLOAT_DTYPES", "TARGETS", "PREDICTION_TYPES"]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The ops' int arguments (torch.library schemas, and the Triton kernels' constexprs); the C++
# entry points take the target and sums mode by name (AddNoiseOptions, PerSampleSumsOptions).
TARGET_CODES = {None: 0, "epsilon": 1, "v_prediction": 2, "sample": 3, "flow": 4}
TARGET_NAMES = {code: name for name, code in TARGET_CODES.items()}
SUMS_LOSS, SUMS_CFG = 0, 1
SUMS_MODE_NAMES = {SUMS_LOSS: "loss", SUMS_CFG: "cfg"}
SUMS_WIDTH = {SUMS_LOSS: 1, SUMS_CFG: 4}  # columns of the (B, width) sums; the bindings check out's shape
MAX_SEED = 2 ** 63 - 1

DISPATCH = {name: OpDispatcher(name) for name in
            ("sampler_step", "add_noise", "per_sample_sums", "per_sample_combine", "timestep_embedding")}


# ----------------------------------------------------------------------------- layout


def batch_outer(t: torch.Tensor) -> bool:
    """Dense, with the batch dimension outermost in memory: sample b is one contiguous range."""
    if not is_dense(t):
        return False
    return t.ndim == 0 or t.shape[0] <= 1 or t.stride(0) * t.shape[0] == t.numel()


def _layout(t: torch.Tensor, per_sample: bool = True) -> torch.Tensor:
    """The memory layout a kernel runs in: any dense layout when nothing is per sample, else a
    batch-outer one; a copy (contiguous) only when ``t`` does not qualify."""
    if not per_sample:
        return dense(t)
    return t if batch_outer(t) else t.contiguous()


def _same_layout(t: Optional[torch.Tensor], like: torch.Tensor, like_strides=None) -> Optional[torch.Tensor]:
    """``t`` (its own dtype) with exactly the memory layout of the dense ``like`` (whose
    strides the caller may pass, read once for several tensors)."""
    if t is None or t.stride() == (like.stride() if like_strides is None else like_strides):
        return t
    return torch.empty_like(like, dtype=t.dtype).copy_(t)


def _compute_f64(*tensors) -> bool:
    return any(t is not None and t.dtype == torch.float64 for t in tensors)


def _per_sample_count(x: torch.Tensor, per_sample_inputs: bool) -> int:
    """Elements per sample: numel / B when something is per sample, else the whole tensor."""
    if per_sample_inputs and x.ndim >= 1 and x.shape[0] > 0:
        return max(1, x.numel() // x.shape[0])
    return max(1, x.numel())


# ----------------------------------------------------------------------------- reference helpers


def _reference_step(x, m, coefs, h1, h2, z, mu, clamp, clamp_value, rescale, g, seed, like=None):
    """sampler_step through the reference (differentiable); seeded noise in ``like``'s layout."""
    if mu is not None:
        m = ref.guided_model_output(m, mu, g)
    if seed is not None:
        z = _seeded_noise_like(like if like is not None else x, seed,
                               torch.float64 if x.dtype == torch.float64 else torch.float32)
    bound = clamp if clamp is not None else (clamp_value if clamp_value >= 0 else None)
    return ref.sampler_step(x, m, coefs, h1, h2, z, bound, rescale)


def _seeded_noise_like(like: torch.Tensor, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """The reference's seeded noise laid out in ``like``'s memory order (offset i gets normal i)."""
    flat = ref.seeded_normal(torch.empty(like.numel(), device=like.device), seed, dtype).reshape(-1)
    out = torch.empty_like(like, dtype=dtype)
    if out.numel():
        out.as_strided((out.numel(),), (1,)).copy_(flat)
    return out


# ----------------------------------------------------------------------------- backends: sampler_step
# fn(prev, aux, x, m, mu, h1, h2, z, coefs, coef_stride, clamp, clamp_value, rescale, g, seed, per_sample)


# The extension's options objects, one per static configuration (the C++ entries check them).


@functools.lru_cache(maxsize=256)
def _step_options(clamp_value: float, x0_rescale: bool, guidance_scale: float):
    return _ext._C.SamplerStepOptions(clamp_value=float(clamp_value), x0_rescale=bool(x0_rescale),
                                      guidance_scale=float(guidance_scale))


@functools.lru_cache(maxsize=16)
def _noise_options(target_code: int):
    return _ext._C.AddNoiseOptions(target=TARGET_NAMES[target_code])


@functools.lru_cache(maxsize=256)
def _sums_options(mode: int, scale: float):
    return _ext._C.PerSampleSumsOptions(mode=SUMS_MODE_NAMES[mode], scale=float(scale))


@functools.lru_cache(maxsize=256)
def _combine_options(alpha: float, beta: float):
    return _ext._C.CombineOptions(alpha=float(alpha), beta=float(beta))


@functools.lru_cache(maxsize=256)
def _embed_options(flip: bool, shift: float, scale: float, max_period: float):
    return _ext._C.TimestepEmbeddingOptions(flip_sin_to_cos=bool(flip), downscale_freq_shift=float(shift),
                                            scale=float(scale), max_period=float(max_period))


# The C++ and CUDA entries read sizes, per-sample counts (2-D coefs or a clamp tensor: per
# sample), dtypes and the compute type from the tensors themselves.


@DISPATCH["sampler_step"].register("cpu", FLOAT_DTYPES)
def _step_cpu(prev, aux, x, m, mu, h1, h2, z, coefs, coef_stride, clamp, clamp_value, rescale, g, seed, per_sample):
    _ext._C.diffusion_sampler_step_cpu(
        prev, aux, x, m, model_output_uncond=mu, history=h1, history2=h2, noise=z, coefs=coefs, clamp=clamp, seed=seed,
        options=_step_options(clamp_value, rescale, g), num_threads=cpu_threads(x.numel()))


@DISPATCH["sampler_step"].register("cuda", GPU_DTYPES)
def _step_cuda(prev, aux, x, m, mu, h1, h2, z, coefs, coef_stride, clamp, clamp_value, rescale, g, seed, per_sample):
    _ext._C.diffusion_sampler_step_cuda(
        prev, aux, x, m, model_output_uncond=mu, history=h1, history2=h2, noise=z, coefs=coefs, clamp=clamp, seed=seed,
        options=_step_options(clamp_value, rescale, g), stream=_ext.stream_of(x))


@DISPATCH["sampler_step"].register("triton", GPU_DTYPES)
def _step_triton(prev, aux, x, m, mu, h1, h2, z, coefs, coef_stride, clamp, clamp_value, rescale, g, seed, per_sample):
    from ..triton_kernels import diffusion as kernels

    kernels.sampler_step(prev, aux, x, m, mu, h1, h2, z, coefs, coef_stride, clamp, clamp_value, rescale, g, seed,
                         per_sample)


@DISPATCH["sampler_step"].register("reference", FLOAT_DTYPES)
def _step_reference(prev, aux, x, m, mu, h1, h2, z, coefs, coef_stride, clamp, clamp_value, rescale, g, seed,
                    per_sample):
    p, a = _reference_step(x, m, coefs, h1, h2, z, mu, clamp, clamp_value, rescale, g, seed, like=prev)
    prev.copy_(p)
    if aux is not None:
        aux.copy_(a)


# ----------------------------------------------------------------------------- backends: add_noise
# fn(noisy, target, x0, noise, timesteps, signal, noise_scale, target_code, seed, per_sample)


@DISPATCH["add_noise"].register("cpu", FLOAT_DTYPES)
def _noise_cpu(noisy, target, x0, noise, timesteps, signal, noise_scale, target_code, seed, per_sample):
    _ext._C.diffusion_add_noise_cpu(noisy, target, x0, noise, timesteps, signal, noise_scale, seed=seed,
                                    options=_noise_options(target_code), num_threads=cpu_threads(x0.numel()))


@DISPATCH["add_noise"].register("cuda", GPU_DTYPES)
def _noise_cuda(noisy, target, x0, noise, timesteps, signal, noise_scale, target_code, seed, per_sample):
    _ext._C.diffusion_add_noise_cuda(noisy, target, x0, noise, timesteps, signal, noise_scale, seed=seed,
                                     options=_noise_options(target_code), stream=_ext.stream_of(x0))


@DISPATCH["add_noise"].register("triton", GPU_DTYPES)
def _noise_triton(noisy, target, x0, noise, timesteps, signal, noise_scale, target_code, seed, per_sample):
    from ..triton_kernels import diffusion as kernels

    kernels.add_noise(noisy, target, x0, noise, timesteps, signal, noise_scale, target_code, seed, per_sample)


@DISPATCH["add_noise"].register("reference", FLOAT_DTYPES)
def _noise_reference(noisy, target, x0, noise, timesteps, signal, noise_scale, target_code, seed, per_sample):
    if seed is not None:
        noise = _seeded_noise_like(noisy, seed, torch.float64 if x0.dtype == torch.float64 else torch.float32)
    name = {v: k for k, v in TARGET_CODES.items()}[target_code]
    t = timesteps.clamp(0, signal.numel() - 1)
    if x0.ndim == 0:
        t = t.reshape(())
    out = ref.add_noise(x0, noise, t, signal, noise_scale, name)
    if name is None:
        noisy.copy_(out)
    else:
        noisy.copy_(out[0])
        target.copy_(out[1])


# ----------------------------------------------------------------------------- backends: per-sample sums
# fn(a, b, mode, scale, per_sample, width) -> (B, width) float64


@DISPATCH["per_sample_sums"].register("cpu", FLOAT_DTYPES)
def _sums_cpu(a, b, mode, scale, per_sample, width):
    out = torch.empty(a.numel() // per_sample, width, dtype=torch.float64)
    _ext._C.diffusion_per_sample_sums_cpu(a, b, out, options=_sums_options(mode, scale),
                                          num_threads=cpu_threads(a.numel()))
    return out


@DISPATCH["per_sample_sums"].register("cuda", GPU_DTYPES)
def _sums_cuda(a, b, mode, scale, per_sample, width):
    chunks = max(1, -(-per_sample // _ext._C.DIFFUSION_CUDA_SUMS_CHUNK))  # blocks per sample (partial sums)
    partial = torch.empty(a.numel() // per_sample, chunks, width, dtype=torch.float64, device=a.device)
    _ext._C.diffusion_per_sample_sums_cuda(a, b, partial, options=_sums_options(mode, scale),
                                           stream=_ext.stream_of(a))
    return partial.sum(dim=1)


@DISPATCH["per_sample_sums"].register("triton", GPU_DTYPES)
def _sums_triton(a, b, mode, scale, per_sample, width):
    from ..triton_kernels import diffusion as kernels

    return kernels.per_sample_sums(a, b, mode, scale, per_sample, width)


@DISPATCH["per_sample_sums"].register("reference", FLOAT_DTYPES)
def _sums_reference(a, b, mode, scale, per_sample, width):
    u = a.double().reshape(-1, per_sample)
    v = b.double().reshape(-1, per_sample)
    if mode == SUMS_LOSS:
        return (u - v).square().sum(dim=1, keepdim=True)
    cd = torch.float64 if _compute_f64(a, b) else torch.float32
    g = (a.to(cd) + scale * (b.to(cd) - a.to(cd))).double().reshape(-1, per_sample)
    return torch.stack([v.sum(1), v.square().sum(1), g.sum(1), g.square().sum(1)], dim=1)


# ----------------------------------------------------------------------------- backends: per-sample combine
# fn(out, out2, a, b, factor, alpha, beta, per_sample, compute_f64):
#   out = factor[b] * (alpha * a + beta * (b - a)), out2 = -out


@DISPATCH["per_sample_combine"].register("cpu", FLOAT_DTYPES)
def _combine_cpu(out, out2, a, b, factor, alpha, beta, per_sample, compute_f64):
    _ext._C.diffusion_combine_cpu(out, out2, a, b, factor=factor, options=_combine_options(alpha, beta),
                                  num_threads=cpu_threads(a.numel()))


@DISPATCH["per_sample_combine"].register("cuda", GPU_DTYPES)
def _combine_cuda(out, out2, a, b, factor, alpha, beta, per_sample, compute_f64):
    _ext._C.diffusion_combine_cuda(out, out2, a, b, factor=factor, options=_combine_options(alpha, beta),
                                   stream=_ext.stream_of(a))


@DISPATCH["per_sample_combine"].register("triton", GPU_DTYPES)
def _combine_triton(out, out2, a, b, factor, alpha, beta, per_sample, compute_f64):
    from ..triton_kernels import diffusion as kernels

    kernels.combine(out, out2, a, b, factor, alpha, beta, per_sample, compute_f64)


@DISPATCH["per_sample_combine"].register("reference", FLOAT_DTYPES)
def _combine_reference(out, out2, a, b, factor, alpha, beta, per_sample, compute_f64):
    cd = torch.float64 if compute_f64 else torch.float32
    u, v = a.to(cd), b.to(cd)
    r = alpha * u + beta * (v - u)
    if factor is not None:
        r = factor.to(cd).reshape(-1, *([1] * (a.ndim - 1))) * r if a.ndim else factor.to(cd).reshape(()) * r
    out.copy_(r)
    if out2 is not None:
        out2.copy_(-r)


# ----------------------------------------------------------------------------- backends: timestep embedding
# fn(out, timesteps, dim, flip, shift, scale, max_period)


@DISPATCH["timestep_embedding"].register("cpu", FLOAT_DTYPES + (torch.int64,))
def _embed_cpu(out, timesteps, dim, flip, shift, scale, max_period):
    _ext._C.diffusion_timestep_embedding_cpu(out, timesteps, options=_embed_options(flip, shift, scale, max_period),
                                             num_threads=cpu_threads(timesteps.numel() * dim))


@DISPATCH["timestep_embedding"].register("cuda", FLOAT_DTYPES + (torch.int64,))
def _embed_cuda(out, timesteps, dim, flip, shift, scale, max_period):
    _ext._C.diffusion_timestep_embedding_cuda(out, timesteps, options=_embed_options(flip, shift, scale, max_period),
                                              stream=_ext.stream_of(out))


@DISPATCH["timestep_embedding"].register("triton", (torch.float32, torch.float16, torch.bfloat16, torch.int64))
def _embed_triton(out, timesteps, dim, flip, shift, scale, max_period):
    from ..triton_kernels import diffusion as kernels

    kernels.timestep_embedding(out, timesteps, dim, flip, -math.log(max_period), dim // 2 - shift, scale)


@DISPATCH["timestep_embedding"].register("reference", FLOAT_DTYPES + (torch.int64,))
def _embed_reference(out, timesteps, dim, flip, shift, scale, max_period):
    t = timesteps if timesteps.dtype != torch.float64 else timesteps.float()  # diffusers: float32
    out.copy_(ref.timestep_embedding(t, dim, flip, shift, scale, max_period))


# ----------------------------------------------------------------------------- torch.library

def _backend(name: str) -> Optional[str]:
    return name or None


def _step_per_sample(coefs, clamp) -> bool:
    return coefs.ndim == 2 or clamp is not None


def _step_outputs(x, per_sample, return_aux, out_dtype, aux_dtype):
    x = _layout(x, per_sample)
    prev = torch.empty_like(x, dtype=out_dtype)
    aux = torch.empty_like(x, dtype=aux_dtype) if return_aux else x.new_empty(0, dtype=aux_dtype)
    return prev, aux


def _step_impl(sample, model_output, coefs, history, history2, noise, model_output_uncond, clamp, clamp_value,
               x0_rescale, guidance_scale, seed, return_aux, out_dtype, aux_dtype, backend):
    prev, aux = _step_run(sample, model_output, coefs, history, history2, noise, model_output_uncond, clamp,
                          clamp_value, x0_rescale, guidance_scale, seed, return_aux, out_dtype, aux_dtype, backend)
    return prev, (aux if aux is not None else sample.new_empty(0, dtype=aux_dtype))


def _step_run(sample, model_output, coefs, history, history2, noise, model_output_uncond, clamp, clamp_value,
              x0_rescale, guidance_scale, seed, return_aux, out_dtype, aux_dtype, backend):
    """The body of the op: (prev, aux), aux None unless ``return_aux`` (eager calls skip the
    op's empty placeholder)."""
    by_sample = coefs.ndim == 2 or clamp is not None
    x = _layout(sample, by_sample)
    prev = torch.empty_like(x, dtype=out_dtype)
    aux = torch.empty_like(x, dtype=aux_dtype) if return_aux else None
    if x.numel() == 0:
        return prev, aux
    per_sample = _per_sample_count(x, by_sample)
    strides = x.stride()
    m = _same_layout(model_output, x, strides)
    mu = _same_layout(model_output_uncond, x, strides)
    h1 = _same_layout(history, x, strides)
    h2 = _same_layout(history2, x, strides)
    z = _same_layout(noise, x, strides)
    DISPATCH["sampler_step"].run(backend or None, x.device, x.dtype, prev, aux, x, m, mu, h1, h2, z,
                                 coefs.contiguous(), NUM_STEP_COEFS if coefs.ndim == 2 else 0,
                                 clamp.contiguous() if clamp is not None else None, clamp_value, x0_rescale,
                                 guidance_scale, seed if seed >= 0 else None, per_sample)
    return prev, aux


def _noise_impl(x0, noise, timesteps, signal_scale, noise_scale, target, seed, backend):
    x = _layout(x0)
    noisy = torch.empty_like(x)
    tgt = torch.empty_like(x) if target else x.new_empty(0)
    if x.numel() == 0:
        return noisy, tgt
    per_sample = _per_sample_count(x, timesteps.numel() > 1 or x.ndim >= 1)
    samples = x.numel() // per_sample
    t = timesteps.reshape(-1).to(torch.int64)
    if t.numel() == 1 and samples > 1:
        t = t.expand(samples)
    t = t.contiguous()
    DISPATCH["add_noise"].run(_backend(backend), x.device, x.dtype, noisy, tgt if target else None, x,
                              _same_layout(noise, x), t, signal_scale.contiguous(), noise_scale.contiguous(),
                              target, seed if seed >= 0 else None, per_sample)
    return noisy, tgt


def _sums_impl(a, b, mode, scale, backend):
    x = _layout(a)
    per_sample = _per_sample_count(x, True)
    samples = x.shape[0] if x.ndim >= 1 else 1
    if x.numel() == 0:
        return torch.zeros(samples, SUMS_WIDTH[mode], dtype=torch.float64, device=a.device)
    return DISPATCH["per_sample_sums"].run(_backend(backend), x.device, x.dtype, x, _same_layout(b, x), mode, scale,
                                           per_sample, SUMS_WIDTH[mode])


def _combine_impl(a, b, factor, alpha, beta, second, out_dtype, out2_dtype, backend):
    out, out2 = _combine_run(a, b, factor, alpha, beta, second, out_dtype, out2_dtype, backend)
    return out, (out2 if out2 is not None else a.new_empty(0, dtype=out2_dtype))


def _combine_run(a, b, factor, alpha, beta, second, out_dtype, out2_dtype, backend):
    """The body of the op: (out, out2), out2 None unless ``second``."""
    x = _layout(a, factor is not None)
    out = torch.empty_like(x, dtype=out_dtype)
    out2 = torch.empty_like(x, dtype=out2_dtype) if second else None
    if x.numel() == 0:
        return out, out2
    per_sample = _per_sample_count(x, factor is not None)
    DISPATCH["per_sample_combine"].run(backend or None, x.device, x.dtype, out, out2, x,
                                       _same_layout(b, x), factor.contiguous() if factor is not None else None,
                                       alpha, beta, per_sample, _compute_f64(a, b))
    return out, out2


def _embed_impl(timesteps, dim, flip_sin_to_cos, shift, scale, max_period, backend):
    out = torch.empty(timesteps.shape[0], dim, dtype=torch.float32, device=timesteps.device)
    if out.numel() == 0:
        return out
    t = timesteps.contiguous()
    DISPATCH["timestep_embedding"].run(_backend(backend), t.device, t.dtype, out, t, dim, flip_sin_to_cos, shift,
                                       scale, max_period)
    return out


def _step_fake(sample, model_output, coefs, history, history2, noise, model_output_uncond, clamp, clamp_value,
               x0_rescale, guidance_scale, seed, return_aux, out_dtype, aux_dtype, backend):
    return _step_outputs(sample, _step_per_sample(coefs, clamp), return_aux, out_dtype, aux_dtype)


def _noise_fake(x0, noise, timesteps, signal_scale, noise_scale, target, seed, backend):
    x = _layout(x0)
    return torch.empty_like(x), (torch.empty_like(x) if target else x.new_empty(0))


def _sums_fake(a, b, mode, scale, backend):
    return a.new_empty(a.shape[0] if a.ndim >= 1 else 1, SUMS_WIDTH[mode], dtype=torch.float64)


def _combine_fake(a, b, factor, alpha, beta, second, out_dtype, out2_dtype, backend):
    x = _layout(a, factor is not None)
    return (torch.empty_like(x, dtype=out_dtype),
            torch.empty_like(x, dtype=out2_dtype) if second else x.new_empty(0, dtype=out2_dtype))


def _embed_fake(timesteps, dim, flip_sin_to_cos, shift, scale, max_period, backend):
    return timesteps.new_empty(timesteps.shape[0], dim, dtype=torch.float32)


# The torch.library ops (opaque nodes for torch.compile); calling one runs its impl directly in
# plain eager mode (see genfast.ops._define.NativeOp).
SAMPLER_STEP = NativeOp(
    "diffusion_sampler_step(Tensor sample, Tensor model_output, Tensor coefs, Tensor? history, Tensor? history2, "
    "Tensor? noise, Tensor? model_output_uncond, Tensor? clamp, float clamp_value, bool x0_rescale, "
    "float guidance_scale, int seed, bool return_aux, ScalarType out_dtype, ScalarType aux_dtype, str backend) "
    "-> (Tensor, Tensor)", _step_impl, _step_fake)
ADD_NOISE = NativeOp(
    "diffusion_add_noise(Tensor x0, Tensor? noise, Tensor timesteps, Tensor signal_scale, Tensor noise_scale, "
    "int target, int seed, str backend) -> (Tensor, Tensor)", _noise_impl, _noise_fake)
PER_SAMPLE_SUMS = NativeOp(
    "diffusion_per_sample_sums(Tensor a, Tensor b, int mode, float scale, str backend) -> Tensor", _sums_impl,
    _sums_fake)
PER_SAMPLE_COMBINE = NativeOp(
    "diffusion_per_sample_combine(Tensor a, Tensor b, Tensor? factor, float alpha, float beta, bool second, "
    "ScalarType out_dtype, ScalarType out2_dtype, str backend) -> (Tensor, Tensor)", _combine_impl, _combine_fake)
TIMESTEP_EMBEDDING = NativeOp(
    "diffusion_timestep_embedding(Tensor timesteps, SymInt dim, bool flip_sin_to_cos, float shift, float scale, "
    "float max_period, str backend) -> Tensor", _embed_impl, _embed_fake)


# ----------------------------------------------------------------------------- validation helpers


_type_name = type_name


def _check_float_tensor(op: str, name: str, t, like: Optional[torch.Tensor] = None, optional: bool = False):
    if t is None and optional:
        return
    check_tensor(op, name, t, dtypes=FLOAT_DTYPES, optional=optional)
    if like is not None:
        if t.device != like.device:
            raise ValueError(f"{op}: {name} is on {t.device} but the sample is on {like.device}; "
                             "they must be on the same device")
        if t.shape != like.shape:
            raise ValueError(f"{op}: {name} has shape {tuple(t.shape)} but the sample has shape {tuple(like.shape)}; "
                             "they must match")


def _check_number(op: str, name: str, value, minimum: Optional[float] = None) -> float:
    return check_real(op, name, value, minimum=minimum)


def _check_seed(op: str, noise, noise_seed) -> int:
    if noise_seed is None:
        return -1
    if not is_int(noise_seed):
        raise TypeError(f"{op}: noise_seed must be an int or None, got {_type_name(noise_seed)}")
    if not 0 <= int(noise_seed) <= MAX_SEED:
        raise ValueError(f"{op}: noise_seed must be in [0, 2**63 - 1], got {noise_seed}")
    if noise is not None:
        raise ValueError(f"{op}: pass either noise or noise_seed, not both")
    return int(noise_seed)


def _check_backend(op: str, backend, dispatcher: OpDispatcher) -> str:
    return check_backend(op, backend, dispatcher.backends)


def _check_out_dtype(op: str, name: str, dtype, default: torch.dtype) -> torch.dtype:
    if dtype is None:
        return default
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be None or one of float32, float16, bfloat16, float64, got {dtype}")
    return dtype


def _needs_grad(*tensors) -> bool:
    if not torch.is_grad_enabled():
        return False
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.requires_grad:
            return True
    return False


# Signatures of eager calls whose arguments passed validation, with what validation computed
# (see ValidatedSignatures): a sampling loop calls each op with one signature over and over.
_VALIDATED = ValidatedSignatures()


# ----------------------------------------------------------------------------- sampler_step


def sampler_step(sample, model_output, coefs, history=None, history2=None, noise=None, x0_clamp=None,
                 x0_rescale=False, out_dtype=None, aux_dtype=None, *, return_aux: bool = True,
                 noise_seed: Optional[int] = None, model_output_uncond=None, guidance_scale=None,
                 backend: Optional[str] = None):
    """One fused sampler step (genfast.reference.diffusion.sampler_step semantics):

        x0   = c[0] x + c[1] m, clamped to +-x0_clamp (and divided by it with x0_rescale)
        prev = c[2] x0 + c[3] x + c[4] m + c[5] h1 + c[6] h2 + c[7] z
        aux  = c[8] x0 + c[9] x + c[10] m + c[11] h1 + c[12] h2

    Args:
        sample, model_output: same shape and device; any float dtype each.
        coefs: (16,) shared by the batch or (B, 16) per sample; float32 or float64, on the
            sample's device (read in the kernel: no host synchronisation).
        history, history2, noise: optional tensors like the sample. A tensor passed is read;
            pass None where the coefficient is zero.
        x0_clamp: None, a float >= 0, or a (B,) tensor of per-sample bounds (thresholding).
        out_dtype, aux_dtype: dtypes of prev and aux (default: the sample's).
        return_aux: False skips writing aux (returns ``(prev, None)``): one output fewer.
        noise_seed: draw z in the kernel (standard normal from Philox, a pure function of
            (seed, element offset)); exclusive with ``noise``.
        model_output_uncond, guidance_scale: fused classifier-free guidance, m = uncond +
            g (model_output - uncond) (no guidance_rescale here; see cfg_combine).
        backend: 'cuda', 'triton', 'cpu', 'reference' or None (automatic).

    Returns ``(prev, aux)``. Differentiable only through the reference path (used when an
    input requires grad).
    """
    op = "sampler_step"
    clamp_is_tensor = isinstance(x0_clamp, torch.Tensor)
    direct = direct_call_allowed(sample, model_output, coefs, history, history2, noise, model_output_uncond,
                                 x0_clamp if clamp_is_tensor else None)
    signature = checked = None
    if direct and cacheable(x0_rescale, out_dtype, aux_dtype, guidance_scale, backend,
                            None if clamp_is_tensor else x0_clamp):
        signature = (op, tensor_key(sample), tensor_key(model_output), tensor_key(coefs), tensor_key(history),
                     tensor_key(history2), tensor_key(noise), tensor_key(model_output_uncond),
                     tensor_key(x0_clamp) if clamp_is_tensor else x0_clamp, x0_rescale, out_dtype, aux_dtype,
                     noise_seed is None, guidance_scale, backend)
        checked = _VALIDATED.get(signature)
    if checked is None:
        checked = _check_sampler_step(op, sample, model_output, coefs, history, history2, noise, x0_clamp,
                                      x0_rescale, out_dtype, aux_dtype, noise_seed, model_output_uncond,
                                      guidance_scale, backend)
        if signature is not None:
            _VALIDATED.add(signature, checked)
        seed = checked[-1]
    else:
        seed = _check_seed(op, noise, noise_seed)  # its value changes from call to call
    clamp_value, out_dtype, aux_dtype, g, backend, _ = checked
    clamp_tensor = None
    if clamp_is_tensor:
        clamp_tensor = x0_clamp.reshape(1).expand(sample.shape[0]) if x0_clamp.ndim == 0 else x0_clamp
    if _needs_grad(sample, model_output, coefs, history, history2, noise, model_output_uncond, clamp_tensor):
        prev, aux = _reference_step(sample, model_output, coefs, history, history2, noise, model_output_uncond,
                                    clamp_tensor, clamp_value, x0_rescale, g, seed if seed >= 0 else None,
                                    like=_layout(sample, _step_per_sample(coefs, clamp_tensor)))
        return prev.to(out_dtype), (aux.to(aux_dtype) if return_aux else None)
    if direct:  # eager, plain tensors: no torch.library round trip (see direct_call_allowed)
        if signature is not None:
            result = _eager_step(signature, sample, model_output, coefs, history, history2, noise,
                                 model_output_uncond, clamp_tensor, seed, bool(return_aux), x0_rescale, checked)
            if result is not None:
                return result
        return _step_run(sample, model_output, coefs, history, history2, noise, model_output_uncond, clamp_tensor,
                         clamp_value, x0_rescale, g, seed, bool(return_aux), out_dtype, aux_dtype, backend)
    prev, aux = SAMPLER_STEP.op(
        sample, model_output, coefs, history, history2, noise, model_output_uncond, clamp_tensor, clamp_value,
        x0_rescale, g, seed, bool(return_aux), out_dtype, aux_dtype, backend)
    return prev, (aux if return_aux else None)


def sampler_step_in_loop(x, m, coefs, history=None, history2=None, noise=None, out_dtype=None, aux_dtype=None):
    """The eager fast path of ``sampler_step(x, m, coefs, history, history2, noise,
    out_dtype=..., aux_dtype=...)`` (no clamp, no guidance, aux returned) for a sampling loop,
    which calls it with one signature every step (genfast's schedulers): the full checks run at
    the first call of a signature, then only what the prepared call needs (plain contiguous
    tensors, eager mode, no autograd). Returns (prev, aux), or None where the fast path does
    not apply: the caller then calls ``sampler_step``."""
    # direct_call_allowed, _needs_grad and the layouts in one pass, written out for the three
    # tensors every step has (this runs at every step of a sampling loop); the optional ones
    # only when given.
    if type(x) is not torch.Tensor or type(m) is not torch.Tensor or type(coefs) is not torch.Tensor \
            or not (x.is_contiguous() and m.is_contiguous() and coefs.is_contiguous()):
        return None
    grad = torch.is_grad_enabled()
    if grad and (x.requires_grad or m.requires_grad or coefs.requires_grad):
        return None
    optional = None
    if history is not None or history2 is not None or noise is not None:
        for t in (history, history2, noise):
            if t is not None and (type(t) is not torch.Tensor or not t.is_contiguous() or (grad and t.requires_grad)):
                return None
        optional = (tensor_key(history), tensor_key(history2), tensor_key(noise))
    if not plain_eager_mode():
        return None
    signature = ("sampler_step in a loop", x.shape, x.dtype, x.device, m.shape, m.dtype, m.device, coefs.shape,
                 coefs.dtype, coefs.device, optional, out_dtype, aux_dtype)
    return DISPATCH["sampler_step"].call_prepared(
        signature, lambda: _prepare_loop_step(x, m, coefs, history, history2, noise, out_dtype, aux_dtype),
        x, m, None, history, history2, noise, coefs, None, -1, True)


def _prepare_loop_step(x, m, coefs, history, history2, noise, out_dtype, aux_dtype):
    """sampler_step_in_loop's prepared call: sampler_step's checks once (they raise its errors),
    then _prepare_step."""
    checked = _check_sampler_step("sampler_step", x, m, coefs, history, history2, noise, None, False, out_dtype,
                                  aux_dtype, None, None, None, None)
    return _prepare_step(x, coefs, None, False, checked)


def _prepare_step(x, coefs, clamp, x0_rescale, checked):
    """The sampler step of one validated signature, for contiguous tensors: a function
    (x, m, mu, h1, h2, z, coefs, clamp, seed, return_aux) -> (prev, aux) (_step_run without the
    layout work and the dispatch), or None for empty tensors."""
    clamp_value, out_dtype, aux_dtype, g, backend, _ = checked
    table = DISPATCH["sampler_step"]
    name = table.select(backend or None, x.device, x.dtype)
    if x.numel() == 0:
        return None
    if name == "cpu":
        native = bind_positional(_ext._C.diffusion_sampler_step_cpu,
                                 ("prev", "aux", "sample", "model_output", "model_output_uncond", "history", "history2",
                                  "noise", "coefs", "clamp", "seed", "num_threads"),
                                 options=_step_options(clamp_value, x0_rescale, g))
        threads = cpu_threads_per_call(x.numel())

        def call_cpu(x, m, mu, h1, h2, z, coefs, clamp, seed, return_aux):  # the extension directly
            prev = torch.empty_like(x, dtype=out_dtype)
            aux = torch.empty_like(x, dtype=aux_dtype) if return_aux else None
            native(prev, aux, x, m, mu, h1, h2, z, coefs, clamp, seed if seed >= 0 else None, threads())
            return prev, aux

        return call_cpu
    fn = table.backends[name].fn
    per_sample = _per_sample_count(x, coefs.ndim == 2 or clamp is not None)
    coef_stride = NUM_STEP_COEFS if coefs.ndim == 2 else 0

    def call(x, m, mu, h1, h2, z, coefs, clamp, seed, return_aux):
        prev = torch.empty_like(x, dtype=out_dtype)
        aux = torch.empty_like(x, dtype=aux_dtype) if return_aux else None
        fn(prev, aux, x, m, mu, h1, h2, z, coefs, coef_stride, clamp, clamp_value, x0_rescale, g,
           seed if seed >= 0 else None, per_sample)
        return prev, aux

    return call


def _eager_step(signature, x, m, coefs, h1, h2, z, mu, clamp, seed, return_aux, x0_rescale, checked):
    """(prev, aux) through the call prepared for ``signature`` (see OpDispatcher.call_prepared), or
    None where it does not apply: a tensor that is not contiguous takes the general path, which
    matches layouts."""
    for t in (x, m, coefs, h1, h2, z, mu, clamp):
        if t is not None and not t.is_contiguous():
            return None
    prepare = lambda: _prepare_step(x, coefs, clamp, x0_rescale, checked)  # noqa: E731
    return DISPATCH["sampler_step"].call_prepared(signature, prepare, x, m, mu, h1, h2, z, coefs, clamp, seed,
                                                  return_aux)


def _check_sampler_step(op, sample, model_output, coefs, history, history2, noise, x0_clamp, x0_rescale, out_dtype,
                        aux_dtype, noise_seed, model_output_uncond, guidance_scale, backend) -> tuple:
    """Every check of sampler_step; returns (clamp_value, out_dtype, aux_dtype, g, backend, seed)."""
    _check_float_tensor(op, "sample", sample)
    _check_float_tensor(op, "model_output", model_output, sample)
    for name, t in (("history", history), ("history2", history2), ("noise", noise),
                    ("model_output_uncond", model_output_uncond)):
        _check_float_tensor(op, name, t, sample, optional=True)
    if not isinstance(coefs, torch.Tensor):
        raise TypeError(f"{op}: coefs must be a torch.Tensor, got {_type_name(coefs)}")
    if coefs.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{op}: coefs must be float32 or float64, got {coefs.dtype}")
    if coefs.device != sample.device:
        raise ValueError(f"{op}: coefs is on {coefs.device} but the sample is on {sample.device}; keep the "
                         "coefficient table on the sample's device")
    batch = sample.shape[0] if sample.ndim >= 1 else None
    if not (coefs.shape == (NUM_STEP_COEFS,) or (batch is not None and coefs.shape == (batch, NUM_STEP_COEFS))):
        raise ValueError(f"{op}: coefs must have shape ({NUM_STEP_COEFS},) or (B, {NUM_STEP_COEFS}) with B = "
                         f"sample.shape[0] = {batch}, got {tuple(coefs.shape)}")
    clamp_value = -1.0
    if isinstance(x0_clamp, torch.Tensor):
        if x0_clamp.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{op}: x0_clamp must be a float tensor, got {x0_clamp.dtype}")
        if x0_clamp.device != sample.device:
            raise ValueError(f"{op}: x0_clamp is on {x0_clamp.device} but the sample is on {sample.device}")
        if batch is None or x0_clamp.shape not in ((batch,), ()):
            raise ValueError(f"{op}: a tensor x0_clamp must have shape (B,) with B = sample.shape[0] = {batch}, "
                             f"got {tuple(x0_clamp.shape)}")
    elif x0_clamp is not None:
        clamp_value = _check_number(op, "x0_clamp", x0_clamp, minimum=0.0)
    if not isinstance(x0_rescale, bool):
        raise TypeError(f"{op}: x0_rescale must be a bool, got {_type_name(x0_rescale)}")
    if x0_rescale and x0_clamp is None:
        raise ValueError(f"{op}: x0_rescale needs x0_clamp (the bound x0 is divided by)")
    out_dtype = _check_out_dtype(op, "out_dtype", out_dtype, sample.dtype)
    aux_dtype = _check_out_dtype(op, "aux_dtype", aux_dtype, sample.dtype)
    seed = _check_seed(op, noise, noise_seed)
    if (model_output_uncond is None) != (guidance_scale is None):
        raise ValueError(f"{op}: fused guidance needs both model_output_uncond and guidance_scale")
    g = 1.0 if guidance_scale is None else _check_number(op, "guidance_scale", guidance_scale)
    backend = _check_backend(op, backend, DISPATCH[op])
    return clamp_value, out_dtype, aux_dtype, g, backend, seed


# ----------------------------------------------------------------------------- add_noise


def add_noise(x0, noise, timesteps, signal_scale, noise_scale, target=None, *, noise_seed: Optional[int] = None,
              backend: Optional[str] = None):
    """Fused forward noising (genfast.reference.diffusion.add_noise semantics) in one pass:
    noisy = signal_scale[t_b] x0 + noise_scale[t_b] noise, plus the training target
    ("epsilon", "v_prediction", "sample", "flow") when ``target`` is given.

    ``timesteps``: (B,) integer tensor on x0's device (or one timestep, shape () or (1,)); CPU timesteps outside
    [0, T) raise ValueError, CUDA ones are clamped in the kernel (checking would synchronise).
    ``noise=None`` with ``noise_seed=int`` draws the noise in the kernel (then the target
    "epsilon" is that noise). Returns noisy, or (noisy, target), in x0's dtype.
    """
    op = "add_noise"
    direct = direct_call_allowed(x0, noise, timesteps, signal_scale, noise_scale)
    signature = None
    if direct and cacheable(target, backend):
        signature = (op, tensor_key(x0), tensor_key(noise), tensor_key(timesteps), tensor_key(signal_scale),
                     tensor_key(noise_scale), target, noise_seed is None, backend)
    if signature is None or signature not in _VALIDATED:
        _check_add_noise(op, x0, noise, timesteps, signal_scale, noise_scale, target, noise_seed)
        if signature is not None:
            _VALIDATED.add(signature)
    seed = _check_seed(op, noise, noise_seed)  # the values checked on every call
    _check_timestep_range(op, timesteps, signal_scale.numel(), "(the table length)")
    backend = _check_backend(op, backend, DISPATCH[op])
    if _needs_grad(x0, noise, signal_scale, noise_scale):
        z = noise if seed < 0 else _seeded_noise_like(_layout(x0), seed, x0.dtype)
        return ref.add_noise(x0, z, timesteps.long(), signal_scale, noise_scale, target)
    code = TARGET_CODES[target]
    if (signature is not None and x0.is_contiguous() and (noise is None or noise.is_contiguous())
            and timesteps.dtype == torch.int64 and timesteps.shape == x0.shape[:1] and timesteps.is_contiguous()
            and signal_scale.is_contiguous() and noise_scale.is_contiguous()):
        # The call prepared for this signature (OpDispatcher.call_prepared).
        result = DISPATCH[op].call_prepared(signature, lambda: _prepare_noise(x0, code, backend), x0, noise,
                                            timesteps, signal_scale, noise_scale, seed)
        if result is not None:
            return result[0] if target is None else result
    run = _noise_impl if direct else ADD_NOISE.op
    noisy, tgt = run(x0, noise, timesteps, signal_scale, noise_scale, code, seed, backend)
    return noisy if target is None else (noisy, tgt)


def _prepare_noise(x0, target_code: int, backend):
    """add_noise of one validated signature for contiguous tensors and int64 (B,) timesteps: a
    function (x0, noise, timesteps, signal_scale, noise_scale, seed) -> (noisy, target or None)
    (_noise_impl without the layout work and the dispatch), or None for an empty x0."""
    table = DISPATCH["add_noise"]
    fn = table.backends[table.select(backend or None, x0.device, x0.dtype)].fn
    if x0.numel() == 0:
        return None
    per_sample = _per_sample_count(x0, True)

    def call(x0, noise, timesteps, signal_scale, noise_scale, seed):
        noisy = torch.empty_like(x0)
        target = torch.empty_like(x0) if target_code else None
        fn(noisy, target, x0, noise, timesteps, signal_scale, noise_scale, target_code, seed if seed >= 0 else None,
           per_sample)
        return noisy, target

    return call


def _check_timestep_range(op: str, timesteps, length: int, what: str = "") -> None:
    """CPU timesteps within [0, length): free on the host (on a GPU it would synchronise, and
    under torch.compile it is data-dependent)."""
    n = timesteps.numel()
    if timesteps.device.type != "cpu" or not n or torch.compiler.is_compiling():
        return
    if n <= 64:  # a batch's timesteps: read as numbers, cheaper than two reductions
        values = timesteps.reshape(-1).tolist()
        lo, hi = min(values), max(values)
    else:
        lo, hi = int(timesteps.min()), int(timesteps.max())
    if lo < 0 or hi >= length:
        raise ValueError(f"{op}: timesteps must lie in [0, {length - 1}]{' ' + what if what else ''}, "
                         f"got {'values in ' if what else ''}[{lo}, {hi}]")


def _check_add_noise(op, x0, noise, timesteps, signal_scale, noise_scale, target, noise_seed) -> None:
    """The checks of add_noise that depend on the call signature only (not on values)."""
    _check_float_tensor(op, "x0", x0)
    if x0.ndim < 1:
        raise ValueError(f"{op}: x0 needs a batch dimension, got a 0-d tensor")
    _check_float_tensor(op, "noise", noise, x0, optional=noise_seed is not None)
    _check_seed(op, noise, noise_seed)
    if not isinstance(timesteps, torch.Tensor):
        raise TypeError(f"{op}: timesteps must be an integer torch.Tensor, got {_type_name(timesteps)}")
    if timesteps.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"{op}: timesteps must be an integer tensor (indices into the tables), got {timesteps.dtype}")
    if timesteps.device != x0.device:
        raise ValueError(f"{op}: timesteps is on {timesteps.device} but x0 is on {x0.device}")
    if timesteps.shape not in ((x0.shape[0],), (), (1,)):
        raise ValueError(f"{op}: timesteps must have shape (B,) with B = x0.shape[0] = {x0.shape[0]} (or one "
                         f"timestep for the batch), got {tuple(timesteps.shape)}")
    for name, table in (("signal_scale", signal_scale), ("noise_scale", noise_scale)):
        if not isinstance(table, torch.Tensor) or table.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{op}: {name} must be a float torch.Tensor, got {_type_name(table)}")
        if table.ndim != 1 or table.numel() == 0:
            raise ValueError(f"{op}: {name} must be a non-empty 1-D table, got shape {tuple(table.shape)}")
        if table.device != x0.device:
            raise ValueError(f"{op}: {name} is on {table.device} but x0 is on {x0.device}")
    if signal_scale.shape != noise_scale.shape:
        raise ValueError(f"{op}: signal_scale and noise_scale must have the same length, got "
                         f"{signal_scale.shape[0]} and {noise_scale.shape[0]}")
    if target not in TARGET_CODES:
        raise ValueError(f"{op}: target must be None or one of {TARGETS}, got {target!r}")


# ----------------------------------------------------------------------------- diffusion_loss


class _PerSampleMSE(torch.autograd.Function):
    """(B,) mean over non-batch dims of (m - t)^2; forward one reduction pass, backward one
    elementwise pass writing d/dm and (if needed) d/dt = -d/dm."""

    @staticmethod
    def forward(ctx, m, t, backend):
        ctx.save_for_backward(m, t)
        ctx.backend = backend
        sums = PER_SAMPLE_SUMS(m, t, SUMS_LOSS, 0.0, backend)
        per_sample = max(1, m.numel() // max(1, m.shape[0]))
        cd = torch.float64 if m.dtype == torch.float64 else torch.float32
        return (sums[:, 0] / per_sample).to(cd)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        m, t = ctx.saved_tensors
        per_sample = max(1, m.numel() // max(1, m.shape[0]))
        factor = grad * (2.0 / per_sample)
        dm, dt = PER_SAMPLE_COMBINE(m, t, factor, 0.0, -1.0, bool(ctx.needs_input_grad[1]), m.dtype, t.dtype,
                                    ctx.backend)
        return (dm if ctx.needs_input_grad[0] else None), (dt if ctx.needs_input_grad[1] else None), None


def diffusion_loss(model_output, target, weights=None, reduction: str = "mean", *, backend: Optional[str] = None):
    """Per-sample weighted MSE: l_b = weights[b] * mean over non-batch dims of (model_output -
    target)^2, then the mean over the batch ("mean"), the sum ("sum") or the (B,) vector ("none").

    Forward: one fused pass (per-sample sums); backward: one fused pass giving the gradient of
    model_output and, when it requires grad, of target (weights get theirs through autograd).
    The loss is float32 (float64 for float64 model_output).
    """
    op = "diffusion_loss"
    direct = direct_call_allowed(model_output, target, weights)
    signature = None
    if direct and cacheable(reduction, backend):
        signature = (op, tensor_key(model_output), tensor_key(target), tensor_key(weights), reduction, backend)
    if signature is None or signature not in _VALIDATED:
        _check_diffusion_loss(op, model_output, target, weights, reduction)
        if signature is not None:
            _VALIDATED.add(signature)
    backend = _check_backend(op, backend, DISPATCH["per_sample_sums"])
    if _needs_grad(model_output, target):
        per_sample = _PerSampleMSE.apply(model_output, target, backend)
    else:
        sums = None
        if signature is not None and model_output.is_contiguous() and target.is_contiguous():
            # The call prepared for this signature (OpDispatcher.call_prepared): the kernel only.
            sums = DISPATCH["per_sample_sums"].call_prepared(
                signature, lambda: _prepare_loss_sums(model_output, backend), model_output, target)
        if sums is None:
            sums = (_sums_impl if direct else PER_SAMPLE_SUMS.op)(model_output, target, SUMS_LOSS, 0.0, backend)
        count = max(1, model_output.numel() // max(1, model_output.shape[0]))
        cd = torch.float64 if model_output.dtype == torch.float64 else torch.float32
        if weights is None and reduction != "none" and sums.device.type == "cpu" and sums.shape[0] > 0 and direct:
            # The per-sample sums are in host memory: the reduction costs less in Python than as
            # three torch ops (small calls are launch-bound). Exact float64 sum, one rounding.
            total = math.fsum(row[0] for row in sums.tolist()) / count
            return torch.full((), total / sums.shape[0] if reduction == "mean" else total, dtype=cd)
        per_sample = (sums[:, 0] / count).to(cd)
    if weights is not None:
        per_sample = per_sample * weights.to(per_sample.dtype)
    if reduction == "none":
        return per_sample
    return per_sample.sum() if reduction == "sum" else per_sample.mean()


def _prepare_loss_sums(x, backend):
    """The per-sample sums of diffusion_loss for one validated signature of contiguous tensors:
    a function (model_output, target) -> float64 (B, 2) sums, or None for an empty input."""
    table = DISPATCH["per_sample_sums"]
    fn = table.backends[table.select(backend or None, x.device, x.dtype)].fn
    if x.numel() == 0:
        return None
    per_sample = _per_sample_count(x, True)
    return lambda m, t: fn(m, t, SUMS_LOSS, 0.0, per_sample, SUMS_WIDTH[SUMS_LOSS])


def _check_diffusion_loss(op, model_output, target, weights, reduction) -> None:
    _check_float_tensor(op, "model_output", model_output)
    if model_output.ndim < 1:
        raise ValueError(f"{op}: model_output needs a batch dimension, got a 0-d tensor")
    _check_float_tensor(op, "target", target, model_output)
    if weights is not None:
        _check_float_tensor(op, "weights", weights)
        if weights.device != model_output.device:
            raise ValueError(f"{op}: weights is on {weights.device} but model_output is on {model_output.device}")
        if weights.shape != (model_output.shape[0],):
            raise ValueError(f"{op}: weights must have shape (B,) = ({model_output.shape[0]},), "
                             f"got {tuple(weights.shape)}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"{op}: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def min_snr_weights(timesteps, alphas_cumprod, gamma, prediction_type: str = "epsilon"):
    """Min-SNR-gamma weights (Hang et al. 2023) for (B,) integer timesteps, on the device (a few
    (B,)-sized torch ops, no synchronisation): SNR = abar / (1 - abar); min(SNR, gamma) for
    "sample", min(SNR, gamma) / SNR for "epsilon", min(SNR, gamma) / (SNR + 1) for
    "v_prediction". Use as ``diffusion_loss(..., weights=min_snr_weights(...))``."""
    op = "min_snr_weights"
    if not isinstance(timesteps, torch.Tensor) or timesteps.dtype.is_floating_point or timesteps.dtype.is_complex:
        raise TypeError(f"{op}: timesteps must be an integer torch.Tensor, got {_type_name(timesteps)}")
    if (not isinstance(alphas_cumprod, torch.Tensor) or alphas_cumprod.dtype not in FLOAT_DTYPES
            or alphas_cumprod.ndim != 1):
        raise TypeError(f"{op}: alphas_cumprod must be a 1-D float torch.Tensor, got {_type_name(alphas_cumprod)}")
    if alphas_cumprod.device != timesteps.device:
        raise ValueError(f"{op}: alphas_cumprod is on {alphas_cumprod.device} but timesteps is on {timesteps.device}")
    gamma = _check_number(op, "gamma", gamma, minimum=0.0)
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"{op}: prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    _check_timestep_range(op, timesteps, alphas_cumprod.numel())
    return ref.min_snr_weights(timesteps, alphas_cumprod, gamma, prediction_type)


# ----------------------------------------------------------------------------- cfg_combine


def cfg_combine(uncond, cond, guidance_scale, guidance_rescale: float = 0.0, *, backend: Optional[str] = None):
    """Classifier-free guidance ``uncond + g (cond - uncond)``; with ``guidance_rescale > 0``
    diffusers' rescale_noise_cfg (std over the non-batch dims of ``cond``, the text prediction).
    One pass without rescale; two with it (per-sample sums, then the scaled combination; the
    (B,) factor is computed on the device in between). Returns cond's dtype and layout."""
    op = "cfg_combine"
    direct = direct_call_allowed(uncond, cond)
    signature = checked = None
    if direct and cacheable(guidance_scale, guidance_rescale, backend):
        signature = (op, tensor_key(uncond), tensor_key(cond), guidance_scale, guidance_rescale, backend)
        checked = _VALIDATED.get(signature)
    if checked is None:
        checked = _check_cfg_combine(op, uncond, cond, guidance_scale, guidance_rescale, backend)
        if signature is not None:
            _VALIDATED.add(signature, checked)
    g, rescale, backend = checked
    if _needs_grad(uncond, cond):
        return ref.cfg_combine(uncond, cond, g, rescale)
    factor = None
    if rescale > 0:
        sums = (_sums_impl if direct else PER_SAMPLE_SUMS.op)(uncond, cond, SUMS_CFG, g, backend)
        n = max(1, cond.numel() // max(1, cond.shape[0]))
        var_cond = (sums[:, 1] - sums[:, 0] * sums[:, 0] / n) / max(1, n - 1)
        var_cfg = (sums[:, 3] - sums[:, 2] * sums[:, 2] / n) / max(1, n - 1)
        factor = rescale * torch.sqrt(var_cond / var_cfg) + (1.0 - rescale)
    if direct:
        return _combine_run(uncond, cond, factor, 1.0, g, False, cond.dtype, cond.dtype, backend)[0]
    out, _ = PER_SAMPLE_COMBINE.op(uncond, cond, factor, 1.0, g, False, cond.dtype, cond.dtype, backend)
    return out


def _check_cfg_combine(op, uncond, cond, guidance_scale, guidance_rescale, backend) -> tuple:
    """Every check of cfg_combine; returns (guidance_scale, guidance_rescale, backend)."""
    _check_float_tensor(op, "cond", cond)
    _check_float_tensor(op, "uncond", uncond, cond)
    g = _check_number(op, "guidance_scale", guidance_scale)
    rescale = _check_number(op, "guidance_rescale", guidance_rescale, minimum=0.0)
    if rescale > 0 and cond.ndim < 1:
        raise ValueError(f"{op}: guidance_rescale needs a batch dimension")
    return g, rescale, _check_backend(op, backend, DISPATCH["per_sample_combine"])


# ----------------------------------------------------------------------------- timestep_embedding


def timestep_embedding(timesteps, dim: int, flip_sin_to_cos: bool = False, downscale_freq_shift: float = 1,
                       scale: float = 1, max_period: int = 10000, *, backend: Optional[str] = None):
    """diffusers ``get_timestep_embedding`` in one kernel: (N,) timesteps (int or float) ->
    (N, dim) float32 embedding [sin | cos] (flip: [cos | sin]), zero-padded for odd dim."""
    op = "timestep_embedding"
    direct = direct_call_allowed(timesteps)
    signature = checked = None
    if direct and cacheable(dim, flip_sin_to_cos, downscale_freq_shift, scale, max_period, backend):
        signature = (op, tensor_key(timesteps), dim, flip_sin_to_cos, downscale_freq_shift, scale, max_period, backend)
        checked = _VALIDATED.get(signature)
    if checked is None:
        checked = _check_timestep_embedding(op, timesteps, dim, flip_sin_to_cos, downscale_freq_shift, scale,
                                            max_period, backend)
        if signature is not None:
            _VALIDATED.add(signature, checked)
    shift, scale, max_period, backend = checked
    if timesteps.dtype not in FLOAT_DTYPES:
        timesteps = timesteps.to(torch.int64)
    embed = _embed_impl if direct else TIMESTEP_EMBEDDING.op
    return embed(timesteps, int(dim), flip_sin_to_cos, shift, scale, max_period, backend)


def _check_timestep_embedding(op, timesteps, dim, flip_sin_to_cos, downscale_freq_shift, scale, max_period,
                              backend) -> tuple:
    """Every check of timestep_embedding; returns (shift, scale, max_period, backend)."""
    if not isinstance(timesteps, torch.Tensor):
        raise TypeError(f"{op}: timesteps must be a torch.Tensor, got {_type_name(timesteps)}")
    if timesteps.ndim != 1:
        raise ValueError(f"{op}: timesteps must be 1-D (N,), got shape {tuple(timesteps.shape)}")
    if timesteps.dtype.is_complex or timesteps.dtype == torch.bool:
        raise TypeError(f"{op}: timesteps must be an integer or float tensor, got {timesteps.dtype}")
    if not is_int(dim) or dim < 1:
        raise ValueError(f"{op}: dim must be an int >= 1, got {dim!r}")
    if not isinstance(flip_sin_to_cos, bool):
        raise TypeError(f"{op}: flip_sin_to_cos must be a bool, got {_type_name(flip_sin_to_cos)}")
    shift = _check_number(op, "downscale_freq_shift", downscale_freq_shift)
    scale = _check_number(op, "scale", scale)
    max_period = _check_number(op, "max_period", max_period)
    if max_period <= 0:
        raise ValueError(f"{op}: max_period must be > 0, got {max_period}")
    if dim // 2 > 0 and dim // 2 - shift == 0:
        raise ValueError(f"{op}: dim // 2 - downscale_freq_shift is 0 (dim={dim}, shift={shift}): the frequencies "
                         "would divide by zero")
    return shift, scale, max_period, _check_backend(op, backend, DISPATCH[op])


def selected_backend(op: str, device, dtype: torch.dtype, backend: Optional[str] = None) -> str:
    """The backend kernel ``op`` (a DISPATCH key) would run on (diagnostics and benchmarks)."""
    return DISPATCH[op].select(backend, torch.device(device), dtype)
