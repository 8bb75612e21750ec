"""Benchmark cases of ``genfast.ops.filtered_lrelu`` on StyleGAN3's common layer shape.

The layer: x (N, C, 36, 36), bias (C,), up 2 with a 12-tap separable lowpass, leaky ReLU
(gain sqrt(2), slope 0.2, clamp 256), 12-tap lowpass and down 2 back to 36 x 36 (padding 11).

Providers: every genfast backend that can run on the device and dtype (``cuda``, ``triton``,
``cpu``; never ``triton`` on CPU tensors, where it would be the interpreter), and the
baselines ``eager`` (the reference chain ``genfast.reference.filtered_lrelu``: bias_act +
upfirdn2d in plain torch, which every genfast provider's output is checked against before it
is timed) and ``compile`` (``torch.compile`` of that chain).

Modes: fwd (y = filtered_lrelu(x, ...)); fwd+bwd (y, then dx and db from dy).
Bytes moved (for GB/s) are those of the ideal fused op, the same for every provider:
fwd = read x + write y; fwd+bwd = also read dy and write dx (the 1-byte-per-pixel sign record
and the bias are not counted).
"""
from __future__ import annotations

import math
from typing import Iterator

import torch

from ..ops.filtered_lrelu import DISPATCH
from ..ops.filtered_lrelu import filtered_lrelu as genfast_filtered_lrelu
from ..reference.filtered_lrelu import filtered_lrelu as reference
from .providers import BASELINES, GENFAST_BACKENDS, PROVIDERS  # noqa: F401  (the suite's provider table)
from .providers import CompileFailures, case_device, compile_cleanup, itemsize, op_providers
from .timing import Case, input_sets_for

NAME = "filtered_lrelu"
MODES = ("fwd", "fwd+bwd")
FULL_TENSORS = {"fwd": 2, "fwd+bwd": 4}  # x-sized tensors read or written (x, y; dy, dx)

UP, DOWN, TAPS, PADDING, CLAMP = 2, 2, 12, 11, 256.0
CPU_SHAPES = ((4, 64, 36, 36),)
CPU_QUICK_SHAPES = ((2, 32, 36, 36),)
GPU_SHAPES = ((8, 256, 36, 36), (4, 512, 36, 36))
GPU_QUICK_SHAPES = ((8, 256, 36, 36),)
CPU_DTYPES = (torch.float32,)
GPU_DTYPES = (torch.float32, torch.float16)

# torch.compile failures, per (device type, mode): after the first, later cases do not retry.
_compile_failures = CompileFailures()


def lowpass(taps: int, cutoff: float = 0.5) -> torch.Tensor:
    """A Kaiser-windowed sinc lowpass (cutoff in units of the sample rate's Nyquist), unit DC
    gain, float32: the kind of filter StyleGAN3 designs for its layers."""
    n = torch.arange(taps, dtype=torch.float64) - (taps - 1) / 2
    h = torch.sinc(cutoff * n) * torch.kaiser_window(taps, periodic=False, beta=6.0, dtype=torch.float64)
    return (h / h.sum()).float()


def output_shape(shape: tuple) -> tuple:
    n, c, h, w = shape
    taps = 2 * (TAPS - 1)
    return (n, c, (h * UP + 2 * PADDING - taps + DOWN - 1) // DOWN, (w * UP + 2 * PADDING - taps + DOWN - 1) // DOWN)


def bytes_moved(mode: str, shape: tuple, dtype: torch.dtype) -> int:
    x_elems, y_elems = math.prod(shape), math.prod(output_shape(shape))
    return (x_elems + y_elems) * itemsize(dtype) * (2 if mode == "fwd+bwd" else 1)


def make_inputs(shape: tuple, dtype: torch.dtype, device, mode: str, seed: int = 0) -> dict:
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(4321 + seed)
    x = torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(dtype)
    b = (0.1 * torch.randn(shape[1], generator=gen, device=device, dtype=torch.float32)).to(dtype)
    dy = None
    if mode != "fwd":
        dy = torch.randn(output_shape(shape), generator=gen, device=device, dtype=torch.float32).to(dtype)
        x.requires_grad_()
        b.requires_grad_()
    return {"x": x, "b": b, "dy": dy}


def build_case(mode: str, shape: tuple, dtype: torch.dtype, device="cpu", use_compile: bool = True) -> Case:
    device = case_device(device)
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    f = lowpass(TAPS).to(device)

    def fast(x, b, backend):
        return genfast_filtered_lrelu(x, f, f, b, UP, DOWN, PADDING, clamp=CLAMP, backend=backend)

    def eager(x, b):
        return reference(x, f, f, b, UP, DOWN, PADDING, clamp=CLAMP)

    providers = op_providers(fast, eager, mode, device, dtype, DISPATCH, use_compile, _compile_failures,
                             (device.type, mode), args=("x", "b"), wrt=("x", "b"))
    per_set = (math.prod(shape) + math.prod(output_shape(shape)) * (2 if mode != "fwd" else 1)) * itemsize(dtype)
    return Case(
        op=NAME,
        mode=mode,
        shape=tuple(shape),
        dtype=dtype,
        act="lrelu",
        device=device,
        bytes_moved=bytes_moved(mode, shape, dtype),
        make_inputs=lambda i: make_inputs(shape, dtype, device, mode, seed=i),
        providers=providers,
        reference="eager",
        baselines=BASELINES,
        n_input_sets=input_sets_for(device, per_set),
        variant=f"up{UP},down{DOWN},{TAPS}tap,clamp={CLAMP:g}",
        cleanup=compile_cleanup(providers),
    )


def _plan(device, quick: bool) -> tuple:
    if torch.device(device).type == "cuda":
        return (GPU_QUICK_SHAPES if quick else GPU_SHAPES), GPU_DTYPES
    return (CPU_QUICK_SHAPES if quick else CPU_SHAPES), CPU_DTYPES


def build_cases(device, quick: bool = False, use_compile: bool = True) -> Iterator[Case]:
    """CPU: (2|4, 32|64, 36, 36) float32; GPU: (8, 256) and (4, 512) x 36 x 36 in float32 and
    float16 (quick: the first shape). Both modes."""
    shapes, dtypes = _plan(device, quick)
    for shape in shapes:
        for dtype in dtypes:
            for mode in MODES:
                yield build_case(mode, shape, dtype, device, use_compile)


def count_cases(device, quick: bool = False) -> int:
    shapes, dtypes = _plan(device, quick)
    return len(shapes) * len(dtypes) * len(MODES)
