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

import contextlib
import math
from typing import Iterator, Optional

import torch

from ..ops.bias_act import DISPATCH
from ..ops.bias_act import bias_act as genfast_bias_act
from ..reference import bias_act as reference
from .timing import BASELINE, GENFAST, Case, Provider, input_sets_for

NAME = "bias_act"
GENFAST_BACKENDS = ("cuda", "triton", "cpu")
BASELINES = ("eager", "compile")
PROVIDERS = GENFAST_BACKENDS + BASELINES
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
        if failed:
            return f"torch.compile failed earlier in this process ({failed})"
        return None
    if name == "triton" and device.type == "cpu":
        return "triton on CPU tensors is the interpreter, not a benchmark"
    if name == "reference":
        return "the reference backend is the eager baseline"
    return DISPATCH.unavailable_reason(name, device, dtype)


def available_providers(device, dtype: torch.dtype, use_compile: bool = True, mode: Optional[str] = None) -> list:
    return [p for p in PROVIDERS if provider_unavailable(p, device, dtype, use_compile, mode) is None]


def _variant_name(clamp: Optional[float]) -> str:
    return "" if clamp is None else f"clamp={clamp:g}"


def bytes_moved(mode: str, shape: tuple, dtype: torch.dtype) -> int:
    itemsize = torch.empty((), dtype=dtype).element_size()
    return (FULL_TENSORS[mode] * math.prod(shape) + BIAS_TENSORS[mode] * shape[1]) * itemsize


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


def _thunk_factory(fn, mode: str, warm_up: bool = False):
    """inputs -> thunk for ``fn(x, b)`` in ``mode``; the thunk returns the outputs."""

    def factory(inputs: dict):
        x, b, dy = inputs["x"], inputs["b"], inputs["dy"]
        if mode == "fwd":
            def thunk():
                return fn(x, b)
        elif mode == "fwd+bwd":
            def thunk():
                y = fn(x, b)
                dx, db = torch.autograd.grad(y, (x, b), dy)
                return y, dx, db
        elif mode == "bwd":
            y = fn(x, b)

            def thunk():
                return torch.autograd.grad(y, (x, b), dy, retain_graph=True)
        else:
            raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
        if warm_up:
            thunk()
        return thunk

    return factory


def _compile_options(mode: str) -> contextlib.ExitStack:
    """Config for compiling (the backward is compiled at the first backward call, so the
    warm-up runs inside it too):
      * compile_threads=1: no pool of compile worker processes, which would keep warming up
        in the background after the first compile and steal the CPU from the timed calls
        (on a 2-core machine that made the first ~40 calls 50x slower);
      * bwd mode: backward is called repeatedly with retain_graph=True, which AOTAutograd's
        donated buffers (a memory optimisation) forbid.
    """
    stack = contextlib.ExitStack()
    try:
        import torch._inductor.config as inductor_config

        stack.enter_context(inductor_config.patch(compile_threads=1))
    except Exception:
        pass
    functorch_config = getattr(torch._functorch, "config", None)
    if mode == "bwd" and functorch_config is not None and hasattr(functorch_config, "donated_buffer"):
        stack.enter_context(functorch_config.patch(donated_buffer=False))
    return stack


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


def _reset_compile() -> None:
    # One compiled function per case; resetting afterwards keeps dynamo's per-code-object
    # cache (recompile limit 8) from filling up and silently running eager, and frees memory.
    torch._dynamo.reset()


def build_case(mode: str, shape: tuple, dtype: torch.dtype, act: str = "lrelu", device="cpu",
               clamp: Optional[float] = None, use_compile: bool = True) -> Case:
    """One bias_act case with all its providers (unavailable ones carry the reason)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    providers = {}
    for name in PROVIDERS:
        kind = GENFAST if name in GENFAST_BACKENDS else BASELINE
        reason = provider_unavailable(name, device, dtype, use_compile, mode)
        factory = None
        if reason is None:
            if kind == GENFAST:
                def fn(x, b, _name=name):
                    return genfast_bias_act(x, b, dim=1, act=act, clamp=clamp, backend=_name)

                factory = _thunk_factory(fn, mode)
            elif name == "eager":
                def fn(x, b):
                    return reference(x, b, 1, act, None, None, clamp)

                factory = _thunk_factory(fn, mode)
            else:
                def ref_fn(x, b):
                    return reference(x, b, 1, act, None, None, clamp)

                factory = _compile_factory(torch.compile(ref_fn, dynamic=False), mode, device)
        providers[name] = Provider(name, kind, factory, reason)
    itemsize = torch.empty((), dtype=dtype).element_size()
    per_set = (3 if mode != "fwd" else 2) * math.prod(shape) * itemsize  # x, y (, dy)
    compiles = providers["compile"].unavailable is None
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
        cleanup=_reset_compile if compiles else None,
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
