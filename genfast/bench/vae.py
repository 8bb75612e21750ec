"""Benchmark cases of the fused VAE reparameterisation + KL (``genfast.ops.reparameterize_kl``).

Providers: genfast backends (cuda, triton, cpu; never triton on CPU tensors) and the
baselines ``eager`` (the unfused PyTorch code of the PyTorch VAE example: exp, mul, add for z;
pow, exp, sub, add, sum for the KL) and ``compile`` (torch.compile of it).
Modes: fwd (z and the per-sample KL), fwd+bwd (both, then gradients of z and the KL w.r.t.
mu and logvar). Bytes (ideal fused op, the same for every provider): fwd = read mu, logvar,
eps + write z; fwd+bwd adds read mu, logvar, eps, dz + write dmu, dlogvar.
"""
from __future__ import annotations

import math
from typing import Iterator

import torch

from ..ops.vae import DISPATCH, reparameterize_kl
from .bias_act import _compile_options, _reset_compile
from .timing import BASELINE, GENFAST, Case, Provider, input_sets_for

NAME = "vae"
GENFAST_BACKENDS = ("cuda", "triton", "cpu")
BASELINES = ("eager", "compile")
PROVIDERS = GENFAST_BACKENDS + BASELINES
MODES = ("fwd", "fwd+bwd")
TENSORS = {"fwd": 4, "fwd+bwd": 10}

CPU_SHAPES = ((64, 4, 64, 64),)  # 1M elements: SD-VAE latents, batch 64
GPU_SHAPES = ((256, 16, 64, 64), (1024, 16, 64, 64))  # 16M, 64M elements
GPU_QUICK_SHAPES = ((256, 16, 64, 64),)
CPU_DTYPES = (torch.float32,)
GPU_DTYPES = (torch.float32, torch.bfloat16)


def unfused(mu, logvar, eps):
    std = torch.exp(0.5 * logvar)
    z = mu + std * eps
    kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).flatten(1).sum(1, dtype=torch.float32)
    return z, kl


def _provider_unavailable(name, device, dtype, use_compile):
    if name == "eager":
        return None
    if name == "compile":
        return None if use_compile else "disabled (--no-compile)"
    if name == "triton" and device.type == "cpu":
        return "triton on CPU tensors is the interpreter, not a benchmark"
    return DISPATCH.unavailable_reason(name, device, dtype)


def _make_inputs(shape, dtype, device, mode, seed):
    gen = torch.Generator(device=device).manual_seed(4321 + seed)
    mu, logvar, eps = (torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(dtype)
                       for _ in range(3))
    inputs = {"mu": mu, "logvar": logvar, "eps": eps}
    if mode == "fwd+bwd":
        mu.requires_grad_()
        logvar.requires_grad_()
        inputs["dz"] = torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(dtype)
        inputs["dkl"] = torch.randn(shape[0], generator=gen, device=device, dtype=torch.float32)
    return inputs


def _factory(fn, mode, warm_up=False):
    def factory(inputs):
        mu, logvar, eps = inputs["mu"], inputs["logvar"], inputs["eps"]
        if mode == "fwd":
            def thunk():
                return fn(mu, logvar, eps)
        else:
            def thunk():
                z, kl = fn(mu, logvar, eps)
                dmu, dlv = torch.autograd.grad((z, kl), (mu, logvar), (inputs["dz"], inputs["dkl"]))
                return z, kl, dmu, dlv
        if warm_up:
            with _compile_options(mode):
                thunk()
        return thunk
    return factory


def build_case(mode, shape, dtype, device, use_compile=True) -> Case:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    providers = {}
    for name in PROVIDERS:
        kind = GENFAST if name in GENFAST_BACKENDS else BASELINE
        reason = _provider_unavailable(name, device, dtype, use_compile)
        factory = None
        if reason is None:
            if kind == GENFAST:
                factory = _factory(lambda m, lv, e, _b=name: reparameterize_kl(m, lv, e, reduction="none", backend=_b),
                                   mode)
            elif name == "eager":
                factory = _factory(unfused, mode)
            else:
                factory = _factory(torch.compile(unfused, dynamic=False), mode, warm_up=True)
        providers[name] = Provider(name, kind, factory, reason)
    itemsize = torch.empty((), dtype=dtype).element_size()
    numel = math.prod(shape)
    return Case(op=NAME, mode=mode, shape=tuple(shape), dtype=dtype, act="reparam+kl", device=device,
                bytes_moved=TENSORS[mode] * numel * itemsize,
                make_inputs=lambda i: _make_inputs(shape, dtype, device, mode, i),
                providers=providers, reference="eager", baselines=BASELINES,
                n_input_sets=input_sets_for(device, (4 if mode == "fwd" else 8) * numel * itemsize),
                cleanup=_reset_compile if providers["compile"].unavailable is None else None)


def _grid(device, quick):
    device = torch.device(device)
    if device.type == "cuda":
        return (GPU_QUICK_SHAPES if quick else GPU_SHAPES), GPU_DTYPES
    return CPU_SHAPES, CPU_DTYPES


def build_cases(device, quick: bool = False, use_compile: bool = True) -> Iterator[Case]:
    shapes, dtypes = _grid(device, quick)
    for shape in shapes:
        for dtype in dtypes:
            for mode in MODES:
                yield build_case(mode, shape, dtype, device, use_compile)


def count_cases(device, quick: bool = False) -> int:
    shapes, dtypes = _grid(device, quick)
    return len(shapes) * len(dtypes) * len(MODES)
