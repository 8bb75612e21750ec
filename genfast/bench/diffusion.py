"""Benchmark cases of ``genfast.ops.diffusion``: each fused op against the reference torch
composition (``eager``, genfast.reference.diffusion, which every genfast provider is checked
against first) and ``torch.compile`` of it (``compile``).

Variants (the ``act`` column) and the bytes the fused kernel must touch (GB/s counts those
only, the same for every provider; n = elements, s = element size):
  step_ddim       sampler_step, x0 in aux (DDIM/DPM first order): read x, m; write prev, aux  4 n s
  step_dpm2m      sampler_step with one history tensor (DPM-Solver++ 2M): + read h1         5 n s
  step_cfg_noise  sampler_step with fused guidance (cond, uncond) and seeded noise (DDPM):
                  read x, cond, uncond; write prev (no aux)                                   4 n s
                  (the baseline draws torch.randn noise; only aux-free prev shapes are compared,
                  not values, since the noise differs)
  add_noise_v     add_noise with the v-prediction target: read x0, noise; write noisy, v      4 n s
  loss_fwd_bwd    diffusion_loss with weights, forward + backward (grad of model_output):
                  read m, t (forward); read m, t, write dm (backward)                        5 n s
  cfg             cfg_combine: read uncond, cond; write out                                   3 n s
  cfg_rescale     cfg_combine with guidance_rescale 0.7 (two passes): 2 n s + 3 n s           5 n s
  embedding       timestep_embedding, (B,) -> (B, 320) float32 (launch-bound; shape (B, 320)) B 320 4
Shapes: SD latents 1x4x64x64 and 16x4x64x64 (launch-bound: the point is one launch and no
sync), and on GPUs 16x4x1024x1024 (64M elements, bandwidth-bound).
"""
from __future__ import annotations

import math
from typing import Iterator

import torch

from ..ops import diffusion as ops
from ..reference import diffusion as ref
from .providers import BASELINES, GENFAST_BACKENDS, PROVIDERS, CompileFailures, case_device, compile_cleanup
from .providers import compile_factory, provider_unavailable, thunk_factory
from .timing import BASELINE, GENFAST, Case, Provider, input_sets_for, outputs_close

NAME = "diffusion"
VARIANTS = ("step_ddim", "step_dpm2m", "step_cfg_noise", "add_noise_v", "loss_fwd_bwd", "cfg", "cfg_rescale",
            "embedding")
QUICK_VARIANTS = ("step_ddim", "add_noise_v", "loss_fwd_bwd", "cfg_rescale", "embedding")
TENSORS_TOUCHED = {"step_ddim": 4, "step_dpm2m": 5, "step_cfg_noise": 4, "add_noise_v": 4, "loss_fwd_bwd": 5,
                   "cfg": 3, "cfg_rescale": 5}
KERNEL = {"step_ddim": "sampler_step", "step_dpm2m": "sampler_step", "step_cfg_noise": "sampler_step",
          "add_noise_v": "add_noise", "loss_fwd_bwd": "per_sample_sums", "cfg": "per_sample_combine",
          "cfg_rescale": "per_sample_sums", "embedding": "timestep_embedding"}
EMBED_DIM = 320
T = 1000

CPU_SHAPES = ((1, 4, 64, 64), (16, 4, 64, 64))
CPU_QUICK_SHAPES = ((16, 4, 64, 64),)
GPU_SHAPES = ((1, 4, 64, 64), (16, 4, 64, 64), (16, 4, 1024, 1024))
GPU_QUICK_SHAPES = ((16, 4, 64, 64), (16, 4, 1024, 1024))
CPU_DTYPES = (torch.float32,)
GPU_DTYPES = (torch.float16, torch.float32)
GPU_QUICK_DTYPES = (torch.float16,)

# torch.compile failures, per (device type, variant): after the first, later cases do not retry.
_compile_failures = CompileFailures()


def bytes_moved(variant: str, shape: tuple, dtype: torch.dtype) -> int:
    if variant == "embedding":
        return shape[0] * (EMBED_DIM * 4 + 8)
    itemsize = torch.empty((), dtype=dtype).element_size()
    return TENSORS_TOUCHED[variant] * math.prod(shape) * itemsize


def _schedule(device) -> dict:
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, T, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0)
    return {"signal": abar.sqrt().float().to(device), "noise_scale": (1 - abar).sqrt().float().to(device),
            "abar": abar.float().to(device)}


def _ddim_coefs(batch: int, device, per_sample: bool) -> torch.Tensor:
    """A DDIM (eta 0) step from t = 501 to 481, epsilon prediction, x0 in aux."""
    abar = _schedule("cpu")["abar"].double()
    a_t, a_prev = abar[501], abar[481]
    c = torch.zeros(ref.NUM_STEP_COEFS, dtype=torch.float64)
    c[ref.X0_FROM_SAMPLE] = 1 / a_t.sqrt()
    c[ref.X0_FROM_MODEL] = -(1 - a_t).sqrt() / a_t.sqrt()
    c[ref.PREV_X0] = a_prev.sqrt()
    c[ref.PREV_MODEL] = (1 - a_prev).sqrt()
    c[ref.AUX_X0] = 1.0
    c[ref.PREV_HIST1] = -0.1  # used by step_dpm2m only (h1 given)
    c[ref.PREV_NOISE] = 0.05  # used by step_cfg_noise only
    return (c.expand(batch, -1).contiguous() if per_sample else c).to(device)


def make_inputs(variant: str, shape: tuple, dtype: torch.dtype, device, seed: int = 0) -> dict:
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(4321 + seed)

    def randn():
        return torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(dtype)

    batch = shape[0]
    inputs = {"schedule": _schedule(device)}
    if variant == "embedding":
        inputs["t"] = torch.randint(0, T, (batch,), generator=gen, device=device)
        return inputs
    inputs.update(x=randn(), m=randn())
    if variant == "step_dpm2m":
        inputs["h1"] = randn()
    if variant == "step_cfg_noise":
        inputs["uncond"] = randn()
    if variant.startswith("step"):
        inputs["coefs"] = _ddim_coefs(batch, device, per_sample=True)
    if variant in ("add_noise_v", "loss_fwd_bwd"):
        inputs["t"] = torch.randint(0, T, (batch,), generator=gen, device=device)
    if variant == "loss_fwd_bwd":
        inputs["m"].requires_grad_()
        inputs["w"] = ref.min_snr_weights(inputs["t"], inputs["schedule"]["abar"], 5.0)
    return inputs


def _fn(variant: str, provider: str):
    """(inputs) -> outputs for one provider; ``eager``/``compile`` use the reference composition."""
    fast = provider in GENFAST_BACKENDS
    be = provider if fast else None

    if variant in ("step_ddim", "step_dpm2m"):
        def fn(i):
            if fast:
                return ops.sampler_step(i["x"], i["m"], i["coefs"], i.get("h1"), backend=be)
            return ref.sampler_step(i["x"], i["m"], i["coefs"], i.get("h1"))
    elif variant == "step_cfg_noise":
        def fn(i):
            if fast:
                return ops.sampler_step(i["x"], i["m"], i["coefs"], noise_seed=7, model_output_uncond=i["uncond"],
                                        guidance_scale=7.5, return_aux=False, backend=be)[0]
            m = i["uncond"] + 7.5 * (i["m"] - i["uncond"])
            return ref.sampler_step(i["x"], m, i["coefs"], noise=torch.randn_like(i["x"]))[0]
    elif variant == "add_noise_v":
        def fn(i):
            s = i["schedule"]
            if fast:
                return ops.add_noise(i["x"], i["m"], i["t"], s["signal"], s["noise_scale"], "v_prediction", backend=be)
            return ref.add_noise(i["x"], i["m"], i["t"], s["signal"], s["noise_scale"], "v_prediction")
    elif variant == "loss_fwd_bwd":
        def fn(i):
            if fast:
                loss = ops.diffusion_loss(i["m"], i["x"], i["w"], backend=be)
            else:
                loss = ref.diffusion_loss(i["m"], i["x"], i["w"])
            (dm,) = torch.autograd.grad(loss, i["m"])
            return loss.detach(), dm
    elif variant in ("cfg", "cfg_rescale"):
        rescale = 0.7 if variant == "cfg_rescale" else 0.0

        def fn(i):
            if fast:
                return ops.cfg_combine(i["x"], i["m"], 7.5, rescale, backend=be)
            return ref.cfg_combine(i["x"], i["m"], 7.5, rescale)
    elif variant == "embedding":
        def fn(i):
            if fast:
                return ops.timestep_embedding(i["t"], EMBED_DIM, True, 0, backend=be)
            return ref.timestep_embedding(i["t"], EMBED_DIM, True, 0)
    else:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    return fn


def _check(variant: str):
    if variant != "step_cfg_noise":
        return outputs_close

    def shapes_only(out, ref_out, dtype):  # the noise differs by design: compare shape and spread
        ok = out.shape == ref_out.shape and bool(torch.isfinite(out).all())
        return ok, 0.0 if ok else math.inf

    return shapes_only


def build_case(variant: str, shape: tuple, dtype: torch.dtype, device="cpu", use_compile: bool = True) -> Case:
    device = case_device(device)
    dispatch = ops.DISPATCH[KERNEL[variant]]
    kernel_dtype = torch.int64 if variant == "embedding" else dtype
    key = (device.type, variant)
    providers = {}
    for name in PROVIDERS:
        reason = provider_unavailable(name, device, kernel_dtype, dispatch, use_compile, _compile_failures, key)
        factory = None
        if reason is None:  # each provider's function takes the inputs dict (loss_fwd_bwd runs its own backward)
            fn = _fn(variant, name)
            factory = (compile_factory(fn, "fwd", _compile_failures, key, args=None) if name == "compile"
                       else thunk_factory(fn, "fwd", args=None))
        providers[name] = Provider(name, GENFAST if name in GENFAST_BACKENDS else BASELINE, factory, reason)
    per_set = bytes_moved(variant, shape, dtype)
    return Case(op=NAME, mode="fwd+bwd" if variant == "loss_fwd_bwd" else "fwd", shape=tuple(shape), dtype=dtype,
                act=variant, device=device, bytes_moved=bytes_moved(variant, shape, dtype),
                make_inputs=lambda i: make_inputs(variant, shape, dtype, device, seed=i), providers=providers,
                reference="eager", baselines=BASELINES, n_input_sets=input_sets_for(device, per_set),
                check=_check(variant), cleanup=compile_cleanup(providers))


def _plan(device, quick: bool):
    device = torch.device(device)
    if device.type == "cuda":
        shapes = GPU_QUICK_SHAPES if quick else GPU_SHAPES
        dtypes = GPU_QUICK_DTYPES if quick else GPU_DTYPES
    else:
        shapes = CPU_QUICK_SHAPES if quick else CPU_SHAPES
        dtypes = CPU_DTYPES
    variants = QUICK_VARIANTS if quick else VARIANTS
    plan = []
    for variant in variants:
        for shape in shapes:
            if variant == "embedding":  # (B,) timesteps -> (B, EMBED_DIM): depends on the batch only
                if math.prod(shape[1:]) > 4 * 64 * 64:
                    continue
                plan.append((variant, (shape[0], EMBED_DIM), torch.float32))
                continue
            for dtype in dtypes:
                plan.append((variant, shape, dtype))
    return plan


def build_cases(device, quick: bool = False, use_compile: bool = True) -> Iterator[Case]:
    for variant, shape, dtype in _plan(device, quick):
        yield build_case(variant, shape, dtype, device, use_compile)


def count_cases(device, quick: bool = False) -> int:
    return len(_plan(device, quick))
