"""Benchmark cases of ``genfast.ops.bias_act``.

Providers: every genfast backend that can run on the device and dtype (``cuda``, ``triton``,
``cpu``; never ``triton`` on CPU tensors, where it would be the interpreter), and the
baselines ``eager`` (``genfast.reference.bias_act``, which every genfast provider's output is
checked against before it is timed) and ``compile`` (``torch.compile`` of the reference,
compiled once per case and warmed up; recorded as unavailable, with the reason, if it fails).

Inputs: ``x`` of shape (N, C, H, W), ``b`` of length C along ``dim=1``. Modes:
  fwd      y = bias_act(x, b)
  bwd      only the backward: y is built once through autograd, then
           ``torch.autograd.grad(y, [x, b], dy, retain_graph=True)`` is timed
  fwd+bwd  both
Bytes moved (for GB/s) are those of the ideal fused op, the same for every provider:
fwd = read x + write y; bwd = read dy + read x + write dx; fwd+bwd = the 5 tensors of both
(plus the bias and its gradient, negligible).
"""
from __future__ import annotations

import math
from typing import Iterator, Optional

import torch

from ..ops.bias_act import DISPATCH
from ..ops.bias_act import bias_act as genfast_bias_act
from ..reference import bias_act as reference
from .providers import BASELINES, GENFAST_BACKENDS, PROVIDERS  # noqa: F401  (the suite's provider table)
from .providers import CompileFailures, case_device, compile_cleanup, itemsize, op_providers
from .timing import Case, input_sets_for

NAME = "bias_act"
MODES = ("fwd", "bwd", "fwd+bwd")
QUICK_MODES = MODES
FULL_TENSORS = {"fwd": 2, "bwd": 3, "fwd+bwd": 5}  # x-sized tensors read or written
BIAS_TENSORS = {"fwd": 1, "bwd": 2, "fwd+bwd": 3}  # b read, db written

# (act, clamp): lrelu is the StyleGAN default; all with their default alpha and gain.
VARIANTS = (("lrelu", None), ("swish", None), ("tanh", None), ("lrelu", 256.0))
QUICK_VARIANTS = (("lrelu", None),)

CPU_SHAPES = ((16, 256, 64, 64),)  # 16M elements
GPU_SHAPES = ((64, 256, 64, 64), (256, 256, 64, 64))  # 64M, 256M elements
GPU_QUICK_SHAPES = ((64, 256, 64, 64),)
CPU_DTYPES = (torch.float32,)
GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# torch.compile failures, per (device type, mode): after the first, later cases do not retry.
_compile_failures = CompileFailures()


def _variant_name(clamp: Optional[float]) -> str:
    return "" if clamp is None else f"clamp={clamp:g}"


def bytes_moved(mode: str, shape: tuple, dtype: torch.dtype) -> int:
    return (FULL_TENSORS[mode] * math.prod(shape) + BIAS_TENSORS[mode] * shape[1]) * itemsize(dtype)


def make_inputs(shape: tuple, dtype: torch.dtype, device, mode: str, seed: int = 0) -> dict:
    """x ~ N(0, 1), b ~ N(0, 1) along dim 1, and dy ~ N(0, 1) for the backward modes."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(1234 + seed)
    x = torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(dtype)
    b = torch.randn(shape[1], generator=gen, device=device, dtype=torch.float32).to(dtype)
    dy = None
    if mode != "fwd":
        dy = torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(dtype)
        x.requires_grad_()
        b.requires_grad_()
    return {"x": x, "b": b, "dy": dy}


def build_case(mode: str, shape: tuple, dtype: torch.dtype, act: str = "lrelu", device="cpu",
               clamp: Optional[float] = None, use_compile: bool = True) -> Case:
    """One bias_act case with all its providers (unavailable ones carry the reason)."""
    device = case_device(device)
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")

    def fast(x, b, backend):
        return genfast_bias_act(x, b, dim=1, act=act, clamp=clamp, backend=backend)

    def eager(x, b):
        return reference(x, b, 1, act, None, None, clamp)

    providers = op_providers(fast, eager, mode, device, dtype, DISPATCH, use_compile, _compile_failures,
                             (device.type, mode), args=("x", "b"), wrt=("x", "b"))
    per_set = (3 if mode != "fwd" else 2) * math.prod(shape) * itemsize(dtype)  # x, y (, dy)
    return Case(
        op=NAME,
        mode=mode,
        shape=tuple(shape),
        dtype=dtype,
        act=act,
        device=device,
        bytes_moved=bytes_moved(mode, shape, dtype),
        make_inputs=lambda i: make_inputs(shape, dtype, device, mode, seed=i),
        providers=providers,
        reference="eager",
        baselines=BASELINES,
        n_input_sets=input_sets_for(device, per_set),
        variant=_variant_name(clamp),
        cleanup=compile_cleanup(providers),
    )


def build_cases(device, quick: bool = False, use_compile: bool = True) -> Iterator[Case]:
    """The suite: CPU 16M fp32; GPU 64M and 256M elements in fp32/fp16/bf16 (quick: 64M).
    Quick: lrelu only; full: lrelu, swish, tanh and lrelu with clamp=256. Cases are built
    lazily (inputs are allocated only when a case runs)."""
    device = torch.device(device)
    if device.type == "cuda":
        shapes = GPU_QUICK_SHAPES if quick else GPU_SHAPES
        dtypes = GPU_DTYPES
    else:
        shapes, dtypes = CPU_SHAPES, CPU_DTYPES
    variants = QUICK_VARIANTS if quick else VARIANTS
    modes = QUICK_MODES if quick else MODES
    for shape in shapes:
        for dtype in dtypes:
            for act, clamp in variants:
                for mode in modes:
                    yield build_case(mode, shape, dtype, act, device, clamp, use_compile)


def count_cases(device, quick: bool = False) -> int:
    device = torch.device(device)
    if device.type == "cuda":
        n = len(GPU_QUICK_SHAPES if quick else GPU_SHAPES) * len(GPU_DTYPES)
    else:
        n = len(CPU_SHAPES) * len(CPU_DTYPES)
    return n * len(QUICK_VARIANTS if quick else VARIANTS) * len(QUICK_MODES if quick else MODES)
