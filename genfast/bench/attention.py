"""Benchmark cases of genfast's fused attention (``python -m genfast bench attention``).

Training-style cases: q, k, v (B, H, S, D), non-causal and causal, modes fwd / bwd / fwd+bwd.
TFLOP/s uses the FlashAttention convention: forward 4*B*H*Sq*Sk*D (halved when causal),
backward 2.5x forward, fwd+bwd 3.5x. Providers:
  genfast backends  every backend of genfast.ops.attention that runs here (never Triton on CPU
                    tensors: that is the interpreter), through genfast.scaled_dot_product_attention
  sdpa              torch.nn.functional.scaled_dot_product_attention, torch's own choice (the
                    reference every genfast output is checked against before timing)
  sdpa-flash, sdpa-efficient, sdpa-cudnn, sdpa-math   one SDPA backend each (sdpa_kernel)
  flex              torch.compile'd FlexAttention (GPU)
  flash-attn        Dao-AILab flash_attn_func, if installed (GPU)
Decode cases (GB/s of the K/V cache read, vs the device's copy bandwidth): one new query per
row against a cache of S keys, genfast.flash_attn_with_kvcache vs SDPA (and flash-attn's
flash_attn_with_kvcache if installed). Paged decode cases (act "kv<Hk>-page<P>"): the same
cache held in pages of P rows, shuffled in a pool, read through a block table; SDPA runs on the
same rows gathered into a contiguous cache (what a server without paging would keep).
Ring rows (act "ring<W>-<layout>[-causal]", from genfast.bench.ring): ring_attention on W CPU
processes vs flash_attn_func on the whole sequence in one process with as many threads.

Sizes: GPU S in 512..16k, head dims 64/128/256, bf16 and fp16; CPU fp32 S 1k..4k (quick: 1k).
"""
from __future__ import annotations

import functools
import math
from typing import Iterator, Optional

import torch
import torch.nn.functional as F

from ..ops import attention as ops
from . import ring
from .providers import GENFAST_BACKENDS, TRITON_ON_CPU, case_device, itemsize, thunk_factory
from .timing import BASELINE, GENFAST, Case, Provider, input_sets_for

NAME = "attention"
SDPA_BACKENDS = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-efficient": "EFFICIENT_ATTENTION",
                 "sdpa-cudnn": "CUDNN_ATTENTION", "sdpa-math": "MATH"}
BASELINES = ("sdpa",) + tuple(SDPA_BACKENDS) + ("flex", "flash-attn")
PROVIDERS = GENFAST_BACKENDS + BASELINES
MODES = ("fwd", "bwd", "fwd+bwd")
FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}

GPU_TOKENS = 16384  # B * S kept constant, as in the FlashAttention charts
GPU_SEQS = (512, 1024, 2048, 4096, 8192, 16384)
GPU_QUICK_SEQS = (4096,)
GPU_HEAD_DIMS = (64, 128, 256)
GPU_QUICK_HEAD_DIMS = (128,)
GPU_DTYPES = (torch.bfloat16, torch.float16)
GPU_QUICK_DTYPES = (torch.bfloat16,)
CPU_SEQS = (1024, 2048, 4096)
CPU_QUICK_SEQS = (1024,)
CPU_HEAD_DIMS = (64, 128)
CPU_QUICK_HEAD_DIMS = (64,)
CPU_HEADS = 8
DECODE_GPU = dict(B=16, H=32, Hk=8, D=128, S=(2048, 8192, 32768), pages=(16, 256))
DECODE_CPU = dict(B=4, H=16, Hk=4, D=64, S=(4096,), pages=(16, 256))


def _flash_attn():
    try:
        import flash_attn  # noqa: F401
        from flash_attn import flash_attn_func, flash_attn_with_kvcache

        return flash_attn_func, flash_attn_with_kvcache
    except Exception:
        return None


def provider_unavailable(name: str, device: torch.device, dtype: torch.dtype, mode: str = "fwd",
                         decode: bool = False) -> Optional[str]:
    device = torch.device(device)
    if name in GENFAST_BACKENDS:
        if name == "triton" and device.type == "cpu":
            return TRITON_ON_CPU
        table = ops.DECODE if decode else (ops.FORWARD if mode == "fwd" else ops.BACKWARD)
        return table.unavailable_reason(name, device, dtype)
    if name == "sdpa":
        return None
    if decode and name not in ("sdpa", "flash-attn"):
        return "not a decode baseline"
    if name in SDPA_BACKENDS:
        if device.type == "cpu" and name != "sdpa-math":
            return "CPU SDPA has one fused kernel: the 'sdpa' row" if name == "sdpa-flash" else f"{name} is GPU-only"
        return None
    if name == "flex":
        if device.type != "cuda":
            return "FlexAttention is benchmarked on GPUs only (it needs torch.compile)"
        try:
            from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
        except Exception as exc:
            return f"torch has no FlexAttention ({type(exc).__name__})"
        return None
    if name == "flash-attn":
        if device.type != "cuda":
            return "flash-attn is GPU-only"
        if _flash_attn() is None:
            return "flash-attn is not installed"
        if dtype not in (torch.float16, torch.bfloat16):
            return "flash-attn supports fp16/bf16 only"
        return None
    return f"unknown provider {name}"


def attention_flops(B: int, H: int, Sq: int, Sk: int, D: int, causal: bool, mode: str) -> float:
    fwd = 4.0 * B * H * Sq * Sk * D
    if causal:
        fwd /= 2
    return fwd * FLOP_FACTOR[mode]


def make_inputs(shape: tuple, dtype: torch.dtype, device, mode: str, seed: int = 0) -> dict:
    B, H, S, D = shape
    gen = torch.Generator(device=device).manual_seed(4321 + seed)
    q, k, v = (torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(dtype) for _ in range(3))
    dout = None
    if mode != "fwd":
        dout = torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(dtype)
        for t in (q, k, v):
            t.requires_grad_()
    return {"q": q, "k": k, "v": v, "dout": dout}


def _sdpa_with(backend_name: Optional[str]):
    def fn(q, k, v, causal):
        if backend_name is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(getattr(SDPBackend, backend_name)):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return fn


def _flex_fn(shape, device):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)
    masks = {}

    def fn(q, k, v, causal):
        mask = None
        if causal:
            if "causal" not in masks:
                masks["causal"] = create_block_mask(lambda b, h, qi, kj: qi >= kj, None, None, shape[2], shape[2],
                                                    device=device)
            mask = masks["causal"]
        return compiled(q, k, v, block_mask=mask)

    return fn


def _flash_attn_fn():
    flash_attn_func = _flash_attn()[0]

    def fn(q, k, v, causal):
        return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal).transpose(1, 2)

    return fn


def _thunk_factory(fn, mode: str, causal: bool, warm_up: bool = False):
    """inputs -> thunk for ``fn(q, k, v, causal)`` in ``mode``; fwd runs without autograd."""
    return thunk_factory(functools.partial(fn, causal=causal), mode, args=("q", "k", "v"), wrt=("q", "k", "v"),
                         grad_outputs=("dout",), no_grad_forward=True, warm_up=warm_up)


def build_case(mode: str, shape: tuple, dtype: torch.dtype, causal: bool, device="cpu") -> Case:
    device = case_device(device)
    B, H, S, D = shape
    providers = {}
    for name in PROVIDERS:
        kind = GENFAST if name in GENFAST_BACKENDS else BASELINE
        reason = provider_unavailable(name, device, dtype, mode)
        factory = None
        if reason is None:
            if kind == GENFAST:
                def fn(q, k, v, causal, _name=name):
                    from .. import scaled_dot_product_attention

                    return scaled_dot_product_attention(q, k, v, is_causal=causal, backend=_name)

                factory = _thunk_factory(fn, mode, causal)
            elif name == "sdpa" or name in SDPA_BACKENDS:
                factory = _thunk_factory(_sdpa_with(SDPA_BACKENDS.get(name)), mode, causal)
            elif name == "flex":
                factory = _thunk_factory(_flex_fn(shape, device), mode, causal, warm_up=True)
            else:
                factory = _thunk_factory(_flash_attn_fn(), mode, causal)
        providers[name] = Provider(name, kind, factory, reason)
    # ideal tensor traffic
    io = (4 if mode == "fwd" else 8 if mode == "bwd" else 9) * math.prod(shape) * itemsize(dtype)
    return Case(op=NAME, mode=mode, shape=tuple(shape), dtype=dtype, act="causal" if causal else "full",
                device=device, bytes_moved=io,
                make_inputs=lambda i: make_inputs(shape, dtype, device, mode, seed=i), providers=providers,
                reference="sdpa", baselines=("sdpa",), n_input_sets=input_sets_for(device, io),
                cleanup=torch._dynamo.reset if providers["flex"].unavailable is None else None,
                extra={"flops": attention_flops(B, H, S, S, D, causal, mode)})


# ----------------------------------------------------------------------------- decode


def make_decode_inputs(B: int, H: int, Hk: int, S: int, D: int, dtype: torch.dtype, device, seed: int = 0,
                       page_size: Optional[int] = None) -> dict:
    """q (B, 1, H, D), a full K/V cache (B, S, Hk, D) and, with ``page_size``, the same rows in a
    shuffled pool of pages (``k_pool``/``v_pool``, (B * S / page_size, page_size, Hk, D)) with
    its ``block_table``."""
    gen = torch.Generator(device=device).manual_seed(99 + seed)
    r = lambda *s: torch.randn(*s, generator=gen, device=device, dtype=torch.float32).to(dtype)  # noqa: E731
    inp = {"q": r(B, 1, H, D), "k_cache": r(B, S, Hk, D), "v_cache": r(B, S, Hk, D),
           "seqlens": torch.full((B,), S, dtype=torch.int32, device=device)}
    if page_size is not None:
        per_row = S // page_size
        order = torch.randperm(B * per_row, generator=gen, device=device)
        table = order.reshape(B, per_row).to(torch.int32)
        for name in ("k", "v"):
            pool = torch.empty(B * per_row, page_size, Hk, D, dtype=dtype, device=device)
            pool[order] = inp[f"{name}_cache"].reshape(B * per_row, page_size, Hk, D)
            inp[f"{name}_pool"] = pool
        inp["block_table"] = table
    return inp


def build_decode_case(B: int, H: int, Hk: int, S: int, D: int, dtype: torch.dtype, device,
                      page_size: Optional[int] = None) -> Case:
    device = case_device(device)
    paged = page_size is not None
    if paged and S % page_size:
        raise ValueError(f"bench attention: a paged case needs S ({S}) to be a multiple of the page size {page_size}")

    providers = {}
    for name in PROVIDERS:
        kind = GENFAST if name in GENFAST_BACKENDS else BASELINE
        reason = provider_unavailable(name, device, dtype, decode=True)
        if reason is None and name == "flash-attn" and paged and page_size % 256:
            reason = "flash-attn 2 pages are multiples of 256 rows"
        factory = None
        if reason is None:
            if kind == GENFAST:
                def factory(inp, _name=name):
                    from .. import flash_attn_with_kvcache

                    if paged:
                        return lambda: flash_attn_with_kvcache(inp["q"], inp["k_pool"], inp["v_pool"],
                                                               cache_seqlens=inp["seqlens"],
                                                               block_table=inp["block_table"], backend=_name)
                    return lambda: flash_attn_with_kvcache(inp["q"], inp["k_cache"], inp["v_cache"],
                                                           cache_seqlens=inp["seqlens"], backend=_name)
            elif name == "sdpa":
                def factory(inp):
                    q = inp["q"].transpose(1, 2)
                    k, v = inp["k_cache"].transpose(1, 2), inp["v_cache"].transpose(1, 2)
                    return lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=H != Hk).transpose(1, 2)
            else:
                def factory(inp):
                    fn = _flash_attn()[1]
                    if paged:
                        return lambda: fn(inp["q"], inp["k_pool"], inp["v_pool"], cache_seqlens=inp["seqlens"],
                                          block_table=inp["block_table"])
                    return lambda: fn(inp["q"], inp["k_cache"], inp["v_cache"], cache_seqlens=inp["seqlens"])
        providers[name] = Provider(name, kind, factory, reason)
    cache_bytes = 2 * B * S * Hk * D * itemsize(dtype)
    make = functools.partial(_decode_inputs_of, (B, H, Hk, S, D, dtype, device, page_size))
    act = f"kv{Hk}" + (f"-page{page_size}" if paged else "")
    return Case(op=NAME, mode="decode", shape=(B, H, S, D), dtype=dtype, act=act, device=device,
                bytes_moved=cache_bytes + 2 * B * H * D * itemsize(dtype), make_inputs=make, providers=providers,
                reference="sdpa", baselines=("sdpa",), n_input_sets=input_sets_for(device, cache_bytes),
                extra={"flops": 4.0 * B * H * S * D})


def _decode_inputs_of(problem: tuple, i: int) -> dict:
    B, H, Hk, S, D, dtype, device, page_size = problem
    return make_decode_inputs(B, H, Hk, S, D, dtype, device, seed=i, page_size=page_size)


# ----------------------------------------------------------------------------- suite


def _plan(device, quick: bool):
    device = torch.device(device)
    if device.type == "cuda":
        seqs = GPU_QUICK_SEQS if quick else GPU_SEQS
        dims = GPU_QUICK_HEAD_DIMS if quick else GPU_HEAD_DIMS
        dtypes = GPU_QUICK_DTYPES if quick else GPU_DTYPES
        shapes = [(max(1, GPU_TOKENS // s), 2048 // d, s, d) for s in seqs for d in dims]
        decode = DECODE_GPU if not quick else dict(DECODE_GPU, S=(8192,))
    else:
        seqs = CPU_QUICK_SEQS if quick else CPU_SEQS
        dims = CPU_QUICK_HEAD_DIMS if quick else CPU_HEAD_DIMS
        dtypes = (torch.float32,)
        shapes = [(1, CPU_HEADS, s, d) for s in seqs for d in dims]
        decode = DECODE_CPU
    causals = (False,) if quick and device.type == "cpu" else (False, True)
    return shapes, dtypes, causals, decode


def build_cases(device, quick: bool = False, use_compile: bool = True) -> Iterator[Case]:
    shapes, dtypes, causals, decode = _plan(device, quick)
    for dtype in dtypes:
        for shape in shapes:
            for causal in causals:
                for mode in MODES:
                    yield build_case(mode, shape, dtype, causal, device)
        for S in decode["S"]:
            for page_size in (None,) + tuple(decode["pages"]):
                yield build_decode_case(decode["B"], decode["H"], decode["Hk"], S, decode["D"], dtype, device,
                                        page_size=page_size)
    yield from ring.build_cases(device, quick)  # ring attention over processes vs one process


def count_cases(device, quick: bool = False) -> int:
    shapes, dtypes, causals, decode = _plan(device, quick)
    decodes = len(decode["S"]) * (1 + len(decode["pages"]))
    return len(dtypes) * (len(shapes) * len(causals) * len(MODES) + decodes) + ring.count_cases(device, quick)
