"""Benchmark cases of ``genfast.ops.upfirdn2d``.

Providers: every genfast backend that can run on the device and dtype (``cuda``, ``triton``,
``cpu``; never ``triton`` on CPU tensors, where it would be the interpreter), and the
baselines ``eager`` (``genfast.reference.upfirdn2d``: zero insertion, pad, grouped conv2d,
slice, the composition StyleGAN ports use; every genfast provider's output is checked against
it before it is timed) and ``compile`` (``torch.compile`` of that reference).

Variants (the ``act`` column), with the padding of NVlabs' upsample2d / downsample2d:
  up2-f4     2x upsample, 4x4 filter ([1, 3, 3, 1] outer product; StyleGAN2)
  down2-f4   2x downsample, 4x4 filter (StyleGAN2)
  up2-f12s   2x upsample, separable 12-tap filter (StyleGAN3)
  down2-f12s 2x downsample, separable 12-tap filter (StyleGAN3)
  ...,nhwc   the same on a channels_last input
Modes: fwd (y = upfirdn2d(x)) and fwd+bwd (plus dx = the adjoint op on dy).
Bytes moved (for GB/s) are those of the ideal op: fwd = read x + write y; fwd+bwd = also
read dy and write dx.
"""
from __future__ import annotations

import math
from typing import Iterator, NamedTuple

import torch

from ..ops.upfirdn2d import DISPATCH, setup_filter
from ..ops.upfirdn2d import upfirdn2d as genfast_upfirdn2d
from ..reference.upfirdn2d import upfirdn2d as reference
from .providers import BASELINES, GENFAST_BACKENDS, PROVIDERS  # noqa: F401  (the suite's provider table)
from .providers import CompileFailures, case_device, compile_cleanup, itemsize, op_providers
from .timing import Case, input_sets_for

NAME = "upfirdn2d"
MODES = ("fwd", "fwd+bwd")


class Variant(NamedTuple):
    name: str
    up: int
    down: int
    taps: int
    separable: bool
    channels_last: bool = False

    @property
    def label(self) -> str:
        return self.name + (",nhwc" if self.channels_last else "")

    def padding(self) -> list:
        """NVlabs upsample2d / downsample2d padding (output = input * up / down)."""
        t = self.taps
        if self.up > 1:
            p0, p1 = (t + self.up - 1) // 2, (t - self.up) // 2
        else:
            p0, p1 = (t - self.down + 1) // 2, (t - self.down) // 2
        return [p0, p1, p0, p1]

    def gain(self) -> float:
        return float(self.up * self.up)

    def filter(self, device) -> torch.Tensor:
        if self.taps == 4:
            taps = [1.0, 3.0, 3.0, 1.0]
        else:  # a smooth low-pass of the given length (a Kaiser-like window is not needed for timing)
            taps = torch.hann_window(self.taps + 2, periodic=False)[1:-1].tolist()
        return setup_filter(taps, device=device, separable=self.separable)

    def output_shape(self, shape: tuple) -> tuple:
        n, c, h, w = shape
        return (n, c, h * self.up // self.down, w * self.up // self.down)


UP4, DOWN4 = Variant("up2-f4", 2, 1, 4, False), Variant("down2-f4", 1, 2, 4, False)
UP12, DOWN12 = Variant("up2-f12s", 2, 1, 12, True), Variant("down2-f12s", 1, 2, 12, True)

# (variant, input shape): StyleGAN2 at 256^2 (up from 128^2, down from 256^2, 256 channels)
# and StyleGAN3 at 1024^2 (its high-resolution layers have few channels).
GPU_CASES = (
    (UP4, (16, 256, 128, 128)), (DOWN4, (16, 256, 256, 256)),
    (UP4._replace(channels_last=True), (16, 256, 128, 128)), (DOWN4._replace(channels_last=True), (16, 256, 256, 256)),
    (UP12, (8, 64, 512, 512)), (DOWN12, (8, 64, 1024, 1024)),
    (UP12, (32, 512, 64, 64)), (DOWN12, (32, 512, 128, 128)),
)
GPU_QUICK_CASES = ((UP4, (16, 256, 128, 128)), (DOWN4, (16, 256, 256, 256)), (UP12, (8, 64, 512, 512)),
                   (DOWN12, (8, 64, 1024, 1024)))
CPU_CASES = ((UP4, (4, 128, 64, 64)), (DOWN4, (4, 128, 128, 128)),
             (UP4._replace(channels_last=True), (4, 128, 64, 64)),
             (UP12, (4, 64, 64, 64)), (DOWN12, (4, 64, 128, 128)))
CPU_QUICK_CASES = ((UP4, (2, 64, 64, 64)), (DOWN12, (2, 32, 128, 128)))
GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
GPU_QUICK_DTYPES = (torch.float16,)
CPU_DTYPES = (torch.float32,)

# torch.compile failures, per (device type, mode): after the first, later cases do not retry.
_compile_failures = CompileFailures()


def bytes_moved(mode: str, variant: Variant, shape: tuple, dtype: torch.dtype) -> int:
    one_way = math.prod(shape) + math.prod(variant.output_shape(shape))
    return (2 if mode == "fwd+bwd" else 1) * one_way * itemsize(dtype)


def make_inputs(variant: Variant, shape: tuple, dtype: torch.dtype, device, mode: str, seed: int = 0) -> dict:
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(4321 + seed)
    fmt = torch.channels_last if variant.channels_last else torch.contiguous_format
    x = torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(dtype).contiguous(memory_format=fmt)
    dy = None
    if mode != "fwd":
        dy = torch.randn(variant.output_shape(shape), generator=gen, device=device, dtype=torch.float32)
        dy = dy.to(dtype).contiguous(memory_format=fmt)
        x.requires_grad_()
    return {"x": x, "f": variant.filter(device), "dy": dy}


def build_case(mode: str, variant: Variant, shape: tuple, dtype: torch.dtype, device="cpu",
               use_compile: bool = True) -> Case:
    device = case_device(device)
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    up, down, pad, gain = variant.up, variant.down, variant.padding(), variant.gain()

    def fast(x, f, backend):
        return genfast_upfirdn2d(x, f, up, down, pad, gain=gain, backend=backend)

    def eager(x, f):
        return reference(x, f, up, down, pad, gain=gain)

    providers = op_providers(fast, eager, mode, device, dtype, DISPATCH, use_compile, _compile_failures,
                             (device.type, mode), args=("x", "f"), wrt=("x",))
    per_set = bytes_moved(mode, variant, shape, dtype)
    return Case(
        op=NAME,
        mode=mode,
        shape=tuple(shape),
        dtype=dtype,
        act=variant.label,
        device=device,
        bytes_moved=per_set,
        make_inputs=lambda i: make_inputs(variant, shape, dtype, device, mode, seed=i),
        providers=providers,
        reference="eager",
        baselines=BASELINES,
        n_input_sets=input_sets_for(device, per_set),
        cleanup=compile_cleanup(providers),
    )


def _plan(device, quick: bool) -> tuple:
    if torch.device(device).type == "cuda":
        return (GPU_QUICK_CASES if quick else GPU_CASES), (GPU_QUICK_DTYPES if quick else GPU_DTYPES)
    return (CPU_QUICK_CASES if quick else CPU_CASES), CPU_DTYPES


def build_cases(device, quick: bool = False, use_compile: bool = True) -> Iterator[Case]:
    """GPU: StyleGAN2 256^2 and StyleGAN3 1024^2 shapes in fp32/fp16/bf16 (quick: fp16, four
    cases); CPU: smaller shapes in fp32 (quick: two). Both modes. Built lazily."""
    cases, dtypes = _plan(device, quick)
    for variant, shape in cases:
        for dtype in dtypes:
            for mode in MODES:
                yield build_case(mode, variant, shape, dtype, device, use_compile)


def count_cases(device, quick: bool = False) -> int:
    cases, dtypes = _plan(device, quick)
    return len(cases) * len(dtypes) * len(MODES)
