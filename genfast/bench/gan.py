"""Benchmark cases of the GAN layer set (``genfast.ops.gan`` / ``genfast.nn.gan``).

* ``pixel_norm`` (bandwidth-bound): every genfast backend that runs here (never triton on
  CPU tensors) vs ``eager`` (the reference composition, which every genfast output is checked
  against) and ``compile`` (torch.compile of it). GB/s of the ideal fused op: fwd = read x +
  write y; bwd = read x, dy + write dx; fwd+bwd = 5 tensors. ``% copy`` is meaningful here.
* ``mlp_gan`` (FusedLinearAct): the MNIST MLP-GAN generator 100->256->512->1024->784 (lrelu 0.2
  x3, tanh) and discriminator 784->1024->512->256->1 (lrelu 0.2 x3, sigmoid) at batch 64, 256
  and 1024: a stack of ``FusedLinearAct`` vs the same ``nn.Linear`` + activation modules, eager
  and compiled. Matmul-bound: the ``act`` column names the net and the variant column its
  GFLOP per call (TFLOP/s = GFLOP / ms); bytes are weights + activations read and written once.
* ``modulated_conv2d`` (compute-bound): StyleGAN2 256^2 synthesis-layer shapes (paper256
  config: 128 -> 64 channels, 3x3, up 2 from 128^2, and 64 -> 64 at 256^2), fused and
  non-fused, genfast (conv2d + genfast upfirdn2d) vs the reference (reference upfirdn2d).
  The variant column carries the GFLOP per call.
"""
from __future__ import annotations

import math
from typing import Iterator

import torch
from torch import nn

from ..nn.gan import FusedLinearAct
from ..ops.gan import DISPATCH, modulated_conv2d, pixel_norm
from ..ops.upfirdn2d import setup_filter
from ..reference import gan as reference
from .providers import BASELINES, GENFAST_BACKENDS  # noqa: F401  (the suite's provider table)
from .providers import CompileFailures, baseline_unavailable, compile_cleanup, compile_factory, itemsize, op_providers
from .providers import thunk_factory
from .timing import BASELINE, GENFAST, Case, Provider, input_sets_for

NAME = "gan"
MODES = ("fwd", "fwd+bwd")

PIXEL_NORM_CPU_SHAPES = ((16, 512, 32, 32),)  # 8M elements
PIXEL_NORM_GPU_SHAPES = ((64, 512, 32, 32), (256, 512, 16, 16))
PIXEL_NORM_QUICK_CPU = ((8, 512, 16, 16),)  # 1M elements

MLP_NETS = {
    "mlp-G": ((100, 256, "lrelu"), (256, 512, "lrelu"), (512, 1024, "lrelu"), (1024, 784, "tanh")),
    "mlp-D": ((784, 1024, "lrelu"), (1024, 512, "lrelu"), (512, 256, "lrelu"), (256, 1, "sigmoid")),
}
MLP_BATCHES = (64, 256, 1024)
MLP_QUICK_BATCHES = (64,)

# (N, in, out, resolution_in, up): StyleGAN2-ADA paper256 synthesis layers at 256^2.
MODCONV_GPU = ((8, 128, 64, 128, 2), (8, 64, 64, 256, 1))
MODCONV_CPU = ((2, 64, 64, 64, 1),)
MODCONV_QUICK_CPU = ((2, 32, 32, 16, 2),)

# torch.compile failures, per (case kind, device type, mode): after the first, later cases do not retry.
_compile_failures = CompileFailures()
# Thunks of the MLP and modulated-conv cases: fwd+bwd differentiates w.r.t. x and the
# parameters listed under "params"; fwd runs without autograd.
MODEL_THUNK = dict(wrt=("x", "params"), no_grad_forward=True)

# ----------------------------------------------------------------------------- pixel_norm


def pixel_norm_case(mode: str, shape: tuple, dtype: torch.dtype, device, use_compile: bool = True) -> Case:
    device = torch.device(device)
    numel = math.prod(shape)
    tensors = {"fwd": 2, "fwd+bwd": 5}[mode]

    def make_inputs(i):
        gen = torch.Generator(device=device).manual_seed(4321 + i)
        x = torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(dtype)
        dy = torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(dtype) if mode != "fwd" else None
        if mode != "fwd":
            x.requires_grad_()
        return {"x": x, "dy": dy}

    def fast(x, backend):
        return pixel_norm(x, 1, backend=backend)

    def eager(x):
        return reference.pixel_norm(x, 1)

    providers = op_providers(fast, eager, mode, device, dtype, DISPATCH, use_compile, _compile_failures,
                             ("pixel_norm", device.type, mode), no_grad_forward=True)
    return Case(op="pixel_norm", mode=mode, shape=tuple(shape), dtype=dtype, act="dim=1", device=device,
                bytes_moved=tensors * numel * itemsize(dtype), make_inputs=make_inputs, providers=providers,
                baselines=BASELINES,
                n_input_sets=input_sets_for(device, (3 if mode != "fwd" else 2) * numel * itemsize(dtype)),
                cleanup=compile_cleanup(providers))


# ----------------------------------------------------------------------------- MLP-GAN


def _torch_act(act: str) -> nn.Module:
    return {"lrelu": nn.LeakyReLU(0.2), "relu": nn.ReLU(), "tanh": nn.Tanh(), "sigmoid": nn.Sigmoid()}[act]


def mlp_case(mode: str, net: str, batch: int, dtype: torch.dtype, device, use_compile: bool = True) -> Case:
    device = torch.device(device)
    layers = MLP_NETS[net]
    torch.manual_seed(0)
    fused = nn.Sequential(*[FusedLinearAct(i, o, activation=a, negative_slope=0.2) for i, o, a in layers])
    eager = nn.Sequential(*[m for i, o, a in layers for m in (nn.Linear(i, o), _torch_act(a))])
    eager.load_state_dict({k.replace(f"{j}.", f"{2 * j}.", 1): v for j in range(len(layers))
                           for k, v in fused.state_dict().items() if k.startswith(f"{j}.")})
    fused, eager = fused.to(device=device, dtype=dtype), eager.to(device=device, dtype=dtype)
    flops = 2 * batch * sum(i * o for i, o, _ in layers) * (3 if mode != "fwd" else 1)
    weights = sum(i * o + o for i, o, _ in layers)
    acts = batch * (layers[0][0] + sum(o for _, o, _ in layers))
    bytes_moved = (weights + acts) * itemsize(dtype) * (3 if mode != "fwd" else 1)

    def make_inputs(i):
        gen = torch.Generator(device=device).manual_seed(99 + i)
        x = torch.randn(batch, layers[0][0], generator=gen, device=device, dtype=torch.float32).to(dtype)
        out = layers[-1][1]
        dy = (torch.randn(batch, out, generator=gen, device=device, dtype=torch.float32).to(dtype)
              if mode != "fwd" else None)
        if mode != "fwd":
            x.requires_grad_()
        return {"x": x, "dy": dy}

    genfast_name = "cuda" if device.type == "cuda" else "cpu"
    key = ("mlp", device.type, mode)
    providers = {}
    for name in (genfast_name,) + BASELINES:
        kind = GENFAST if name == genfast_name else BASELINE
        reason = None if kind == GENFAST else baseline_unavailable(name, use_compile, _compile_failures, key)
        factory = None
        if reason is None:
            model = fused if kind == GENFAST else eager
            params = list(model.parameters())
            if kind == GENFAST or name == "eager":
                inner = thunk_factory(lambda x, _m=model: _m(x), mode, **MODEL_THUNK)
            else:
                inner = compile_factory(lambda x, _m=model: _m(x), mode, _compile_failures, key, **MODEL_THUNK)

            def factory(inputs, _inner=inner, _params=params):
                return _inner(dict(inputs, params=_params))
        providers[name] = Provider(name, kind, factory, reason)
    return Case(op="mlp_gan", mode=mode, shape=(batch, layers[0][0], layers[-1][1]), dtype=dtype, act=net,
                device=device, bytes_moved=bytes_moved, make_inputs=make_inputs, providers=providers,
                baselines=BASELINES, variant=f"{flops / 1e9:.3g} GFLOP", cleanup=compile_cleanup(providers))


# ----------------------------------------------------------------------------- modulated_conv2d


def modconv_case(mode: str, shape: tuple, dtype: torch.dtype, device, fused: bool) -> Case:
    device = torch.device(device)
    n, cin, cout, res, up = shape
    res_out = res * up
    flops = 2 * n * cout * cin * 9 * res_out * res_out * (3 if mode != "fwd" else 1)
    f = setup_filter([1, 3, 3, 1], device=device)
    item = itemsize(dtype)
    bytes_moved = (n * cin * res * res + n * cout * res_out * res_out) * item * (3 if mode != "fwd" else 1)

    def make_inputs(i):
        gen = torch.Generator(device=device).manual_seed(7 + i)
        x = torch.randn(n, cin, res, res, generator=gen, device=device).to(dtype)
        weight = torch.randn(cout, cin, 3, 3, generator=gen, device=device)
        styles = torch.randn(n, cin, generator=gen, device=device) + 1
        noise = torch.randn(n, 1, res_out, res_out, generator=gen, device=device).to(dtype)
        dy = torch.randn(n, cout, res_out, res_out, generator=gen, device=device).to(dtype) if mode != "fwd" else None
        if mode != "fwd":
            x.requires_grad_()
            weight.requires_grad_()
            styles.requires_grad_()
        return {"x": x, "weight": weight, "styles": styles, "noise": noise, "dy": dy, "params": [weight, styles]}

    kwargs = dict(up=up, padding=1, resample_filter=f, flip_weight=up == 1, fused_modconv=fused)
    genfast_name = "cuda" if device.type == "cuda" else "cpu"

    def run_genfast(inp):
        return modulated_conv2d(inp["x"], inp["weight"], inp["styles"], inp["noise"], **kwargs)

    def run_reference(inp):
        return reference.modulated_conv2d(inp["x"], inp["weight"], inp["styles"], inp["noise"], **kwargs)

    providers = {
        genfast_name: Provider(genfast_name, GENFAST, thunk_factory(run_genfast, mode, args=None, **MODEL_THUNK)),
        "eager": Provider("eager", BASELINE, thunk_factory(run_reference, mode, args=None, **MODEL_THUNK)),
    }
    return Case(op="modulated_conv2d", mode=mode, shape=shape, dtype=dtype, act="fused" if fused else "nonfused",
                device=device, bytes_moved=bytes_moved, make_inputs=make_inputs, providers=providers,
                baselines=("eager",), variant=f"{flops / 1e9:.3g} GFLOP")


# ----------------------------------------------------------------------------- suite


def _plan(device, quick: bool, use_compile: bool = True) -> list:
    device = torch.device(device)
    gpu = device.type == "cuda"
    plan = []
    pn_shapes = (PIXEL_NORM_GPU_SHAPES[:1] if quick else PIXEL_NORM_GPU_SHAPES) if gpu else (
        PIXEL_NORM_QUICK_CPU if quick else PIXEL_NORM_CPU_SHAPES)
    pn_dtypes = (torch.float32, torch.float16, torch.bfloat16) if gpu else (torch.float32,)
    for shape in pn_shapes:
        for dtype in pn_dtypes:
            for mode in MODES:
                plan.append(lambda s=shape, d=dtype, m=mode: pixel_norm_case(m, s, d, device, use_compile))
    mlp_dtypes = (torch.float32, torch.float16) if gpu else (torch.float32,)
    for net in MLP_NETS:
        for batch in (MLP_QUICK_BATCHES if quick else MLP_BATCHES):
            for dtype in mlp_dtypes:
                for mode in (("fwd",) if quick else MODES):
                    plan.append(lambda n=net, b=batch, d=dtype, m=mode: mlp_case(m, n, b, d, device, use_compile))
    mc_shapes = MODCONV_GPU if gpu else (MODCONV_QUICK_CPU if quick else MODCONV_CPU)
    mc_dtypes = (torch.float32, torch.float16) if gpu else (torch.float32,)
    for shape in mc_shapes:
        for dtype in mc_dtypes:
            for fused in (True, False):
                for mode in (("fwd",) if quick else MODES):
                    plan.append(lambda s=shape, d=dtype, fu=fused, m=mode: modconv_case(m, s, d, device, fu))
    return plan


def build_cases(device, quick: bool = False, use_compile: bool = True) -> Iterator[Case]:
    """pixel_norm, the MLP-GAN stacks and StyleGAN2 modulated conv; built lazily."""
    for make in _plan(device, quick, use_compile):
        yield make()


def count_cases(device, quick: bool = False) -> int:
    return len(_plan(device, quick))
