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
from typing import Iterator, NamedTuple, Optional

import torch

from ..ops.upfirdn2d import DISPATCH, setup_filter
from ..ops.upfirdn2d import upfirdn2d as genfast_upfirdn2d
from ..reference.upfirdn2d import upfirdn2d as reference
from .bias_act import _compile_options, _reset_compile
from .timing import BASELINE, GENFAST, Case, Provider, input_sets_for

NAME = "upfirdn2d"
GENFAST_BACKENDS = ("cuda", "triton", "cpu")
BASELINES = ("eager", "compile")
PROVIDERS = GENFAST_BACKENDS + BASELINES
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

_compile_failed: dict = {}


def provider_unavailable(name: str, device: torch.device, dtype: torch.dtype, use_compile: bool = True,
                         mode: Optional[str] = None) -> Optional[str]:
    """Why provider ``name`` cannot be benchmarked here (None: it can)."""
    device = torch.device(device)
    if name == "eager":
        return None
    if name == "compile":
        if not use_compile:
            return "disabled (--no-compile)"
        failed = _compile_failed.get((device.type, mode))
        return f"torch.compile failed earlier in this process ({failed})" if failed else None
    if name == "triton" and device.type == "cpu":
        return "triton on CPU tensors is the interpreter, not a benchmark"
    return DISPATCH.unavailable_reason(name, device, dtype)


def bytes_moved(mode: str, variant: Variant, shape: tuple, dtype: torch.dtype) -> int:
    itemsize = torch.empty((), dtype=dtype).element_size()
    one_way = math.prod(shape) + math.prod(variant.output_shape(shape))
    return (2 if mode == "fwd+bwd" else 1) * one_way * itemsize


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


def _thunk_factory(fn, mode: str, warm_up: bool = False):
    def factory(inputs: dict):
        x, f, dy = inputs["x"], inputs["f"], inputs["dy"]
        if mode == "fwd":
            def thunk():
                return fn(x, f)
        else:
            def thunk():
                y = fn(x, f)
                (dx,) = torch.autograd.grad(y, x, dy)
                return y, dx
        if warm_up:
            thunk()
        return thunk

    return factory


def _compile_factory(fn, mode: str, device: torch.device):
    """Factory for the torch.compile baseline: compiles on the first input set (warm-up) and
    remembers a failure so later cases of the mode skip it."""
    inner = _thunk_factory(fn, mode, warm_up=True)

    def factory(inputs: dict):
        try:
            with _compile_options(mode):
                return inner(inputs)
        except Exception as exc:
            text = f"{type(exc).__name__}: {exc}".strip().splitlines()
            _compile_failed[(device.type, mode)] = (text[0] if text else type(exc).__name__)[:200]
            raise

    return factory


def build_case(mode: str, variant: Variant, shape: tuple, dtype: torch.dtype, device="cpu",
               use_compile: bool = True) -> Case:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    up, down, pad, gain = variant.up, variant.down, variant.padding(), variant.gain()
    providers = {}
    for name in PROVIDERS:
        kind = GENFAST if name in GENFAST_BACKENDS else BASELINE
        reason = provider_unavailable(name, device, dtype, use_compile, mode)
        factory = None
        if reason is None:
            if kind == GENFAST:
                def fn(x, f, _name=name):
                    return genfast_upfirdn2d(x, f, up, down, pad, gain=gain, backend=_name)

                factory = _thunk_factory(fn, mode)
            elif name == "eager":
                def fn(x, f):
                    return reference(x, f, up, down, pad, gain=gain)

                factory = _thunk_factory(fn, mode)
            else:
                def ref_fn(x, f):
                    return reference(x, f, up, down, pad, gain=gain)

                factory = _compile_factory(torch.compile(ref_fn, dynamic=False), mode, device)
        providers[name] = Provider(name, kind, factory, reason)
    per_set = bytes_moved(mode, variant, shape, dtype)
    compiles = providers["compile"].unavailable is None
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
        cleanup=_reset_compile if compiles else None,
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
