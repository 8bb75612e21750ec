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
from .providers import BASELINES, GENFAST_BACKENDS, PROVIDERS  # noqa: F401  (the suite's provider table)
from .providers import CompileFailures, case_device, compile_cleanup, itemsize, op_providers
from .timing import Case, input_sets_for

NAME = "vae"
MODES = ("fwd", "fwd+bwd")
TENSORS = {"fwd": 4, "fwd+bwd": 10}

CPU_SHAPES = ((64, 4, 64, 64),)  # 1M elements: SD-VAE latents, batch 64
GPU_SHAPES = ((256, 16, 64, 64), (1024, 16, 64, 64))  # 16M, 64M elements
GPU_QUICK_SHAPES = ((256, 16, 64, 64),)
CPU_DTYPES = (torch.float32,)
GPU_DTYPES = (torch.float32, torch.bfloat16)

# torch.compile failures, per (device type, mode): after the first, later cases do not retry.
_compile_failures = CompileFailures()


def unfused(mu, logvar, eps):
    std = torch.exp(0.5 * logvar)
    z = mu + std * eps
    kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).flatten(1).sum(1, dtype=torch.float32)
    return z, kl


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


def build_case(mode, shape, dtype, device, use_compile=True) -> Case:
    device = case_device(device)

    def fast(mu, logvar, eps, backend):
        return reparameterize_kl(mu, logvar, eps, reduction="none", backend=backend)

    providers = op_providers(fast, unfused, mode, device, dtype, DISPATCH, use_compile, _compile_failures,
                             (device.type, mode), args=("mu", "logvar", "eps"), wrt=("mu", "logvar"),
                             grad_outputs=("dz", "dkl"))
    numel = math.prod(shape)
    return Case(op=NAME, mode=mode, shape=tuple(shape), dtype=dtype, act="reparam+kl", device=device,
                bytes_moved=TENSORS[mode] * numel * itemsize(dtype),
                make_inputs=lambda i: _make_inputs(shape, dtype, device, mode, i),
                providers=providers, reference="eager", baselines=BASELINES,
                n_input_sets=input_sets_for(device, (4 if mode == "fwd" else 8) * numel * itemsize(dtype)),
                cleanup=compile_cleanup(providers))


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
