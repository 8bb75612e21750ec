"""Benchmark cases of ``genfast.ops.group_norm`` (GroupNorm + SiLU, the diffusion-UNet hot spot).

Providers: every genfast backend that can run on the device and dtype (``cuda``, ``triton``,
``cpu``; never ``triton`` on CPU tensors, where it would be the interpreter), and the
baselines ``eager`` (``F.group_norm`` then ``F.silu``: what diffusers runs, and what every
genfast provider's output is checked against before it is timed) and ``compile``
(``torch.compile`` of the same, compiled once per case and warmed up).

Inputs: SD-UNet activations ``x`` (N, C, H, W) with 32 groups, in NCHW (contiguous) or
NHWC (channels_last) memory, learnable weight and bias. Modes:
  fwd      y = silu(group_norm(x))
  fwd+bwd  y, then torch.autograd.grad(y, [x, weight, bias], dy)
Bytes moved (for GB/s) are those of the ideal fused op, the same for every provider:
fwd = read x + write y; fwd+bwd = that + read x, dy + write dx (5 x-sized tensors).
"""
from __future__ import annotations

import math
from typing import Iterator, Optional

import torch
import torch.nn.functional as F

from ..ops.group_norm import DISPATCH
from ..ops.group_norm import group_norm as genfast_group_norm
from .providers import BASELINES, GENFAST_BACKENDS, PROVIDERS  # noqa: F401  (the suite's provider table)
from .providers import CompileFailures, case_device, compile_cleanup, itemsize, op_providers
from .timing import Case, input_sets_for

NAME = "group_norm"
MODES = ("fwd", "fwd+bwd")
FULL_TENSORS = {"fwd": 2, "fwd+bwd": 5}
GROUPS = 32
EPS = 1e-5  # diffusers' resnet GroupNorm uses 1e-6 or 1e-5; the cost is the same
LAYOUTS = ("nchw", "nhwc")
ACTIVATIONS = ("silu", None)

# SD-1.5 UNet GroupNorm inputs at 512x512 (latent 64x64), batch 2 (classifier-free guidance).
GPU_SHAPES = ((2, 320, 64, 64), (2, 640, 32, 32), (2, 1280, 16, 16))
GPU_QUICK_SHAPES = ((2, 320, 64, 64),)
GPU_DTYPES = (torch.float16, torch.bfloat16)
CPU_SHAPES = ((2, 320, 64, 64), (2, 640, 32, 32), (2, 1280, 16, 16))
CPU_QUICK_SHAPES = ((2, 320, 32, 32),)
CPU_DTYPES = (torch.float32,)

# torch.compile failures, per (device type, mode): after the first, later cases do not retry.
_compile_failures = CompileFailures()


def bytes_moved(mode: str, shape: tuple, dtype: torch.dtype) -> int:
    return (FULL_TENSORS[mode] * math.prod(shape) + (2 if mode == "fwd" else 4) * shape[1]) * itemsize(dtype)


def make_inputs(shape: tuple, dtype: torch.dtype, device, mode: str, layout: str, seed: int = 0) -> dict:
    """x ~ N(0.3, 1) in the layout, weight ~ 1 + N(0, 0.2), bias ~ N(0, 0.2), dy ~ N(0, 1)."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(4321 + seed)
    x = (0.3 + torch.randn(shape, generator=gen, device=device, dtype=torch.float32)).to(dtype)
    if layout == "nhwc":
        x = x.to(memory_format=torch.channels_last)
    w = (1 + 0.2 * torch.randn(shape[1], generator=gen, device=device)).to(dtype)
    b = (0.2 * torch.randn(shape[1], generator=gen, device=device)).to(dtype)
    dy = None
    if mode != "fwd":
        dy = torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(dtype)
        if layout == "nhwc":
            dy = dy.to(memory_format=torch.channels_last)
        for t in (x, w, b):
            t.requires_grad_()
    return {"x": x, "w": w, "b": b, "dy": dy}


def eager_group_norm(x, w, b, activation):
    y = F.group_norm(x, GROUPS, w, b, EPS)
    return F.silu(y) if activation == "silu" else y


def build_case(mode: str, shape: tuple, dtype: torch.dtype, activation: Optional[str] = "silu", device="cpu",
               layout: str = "nchw", use_compile: bool = True) -> Case:
    """One group_norm case with all its providers (unavailable ones carry the reason)."""
    device = case_device(device)
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")

    def fast(x, w, b, backend):
        return genfast_group_norm(x, GROUPS, w, b, EPS, activation=activation, backend=backend)

    def eager(x, w, b):
        return eager_group_norm(x, w, b, activation)

    providers = op_providers(fast, eager, mode, device, dtype, DISPATCH, use_compile, _compile_failures,
                             (device.type, mode), args=("x", "w", "b"), wrt=("x", "w", "b"))
    per_set = (3 if mode != "fwd" else 2) * math.prod(shape) * itemsize(dtype)
    return Case(
        op=NAME,
        mode=mode,
        shape=tuple(shape),
        dtype=dtype,
        act=activation or "none",
        device=device,
        bytes_moved=bytes_moved(mode, shape, dtype),
        make_inputs=lambda i: make_inputs(shape, dtype, device, mode, layout, seed=i),
        providers=providers,
        reference="eager",
        baselines=BASELINES,
        n_input_sets=input_sets_for(device, per_set),
        variant=layout,
        cleanup=compile_cleanup(providers),
    )


def _suite(device, quick: bool):
    device = torch.device(device)
    if device.type == "cuda":
        shapes, dtypes = (GPU_QUICK_SHAPES if quick else GPU_SHAPES), GPU_DTYPES
    else:
        shapes, dtypes = (CPU_QUICK_SHAPES if quick else CPU_SHAPES), CPU_DTYPES
    activations = ("silu",) if quick else ACTIVATIONS
    return shapes, dtypes, activations


def build_cases(device, quick: bool = False, use_compile: bool = True) -> Iterator[Case]:
    """The suite: SD-UNet shapes; GPU fp16/bf16, CPU fp32; NCHW and NHWC; fwd and fwd+bwd;
    with and without SiLU (quick: one shape, SiLU only). Cases are built lazily."""
    shapes, dtypes, activations = _suite(device, quick)
    for shape in shapes:
        for dtype in dtypes:
            for activation in activations:
                for layout in LAYOUTS:
                    for mode in MODES:
                        yield build_case(mode, shape, dtype, activation, device, layout, use_compile)


def count_cases(device, quick: bool = False) -> int:
    shapes, dtypes, activations = _suite(device, quick)
    return len(shapes) * len(dtypes) * len(activations) * len(LAYOUTS) * len(MODES)
