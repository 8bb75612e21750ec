"""genfast.ops.attention: fused attention with the APIs of torch's SDPA and of flash-attn 2.

Layers of this module (the pattern every op family follows):
  1. Public functions: ``scaled_dot_product_attention`` (torch.nn.functional semantics, plus
     ``return_lse``), ``flash_attn_func``, ``flash_attn_varlen_func``, ``flash_attn_with_kvcache``
     (flash-attn 2 semantics). They validate every argument (clear ValueError/TypeError before any
     kernel) and translate it into ONE canonical problem (ATTENTION_CONTRACT: q (B, H, Sq, D),
     k/v (B, Hk, Sk, D) views, window, alignment, softcap, ALiBi, additive bias, dropout, varlen).
  2. ``_AttentionFunction`` (autograd) around the torch.library ops
     ``genfast::attention_forward``/``attention_backward``/``attention_decode``/
     ``attention_kvcache_append`` (light form: define + impl + fake), so torch.compile(fullgraph=True)
     sees opaque nodes. The decode path never synchronises with the device (CUDA-graph safe).
  3. ``FORWARD``, ``BACKWARD``, ``DECODE``: the backends' tables. ``register_backend(name, dtypes,
     module)`` registers one backend's forward/backward/decode in all three; the choice is made at
     run time inside the op impls (``backend=`` argument, GENFAST_BACKEND, or automatic).
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import math
from typing import Optional

import torch

from .. import _ext
from .._ext import bind_positional
from .._dispatch import OpDispatcher, Unsupported, direct_call_allowed, plain_eager_mode
from ._define import NativeOp
from ._validate import ValidatedSignatures
from ._validate import (check_backend, check_real, check_tensor, compiling, cpu_threads, cpu_threads_per_call, is_int,
                        type_name)
from ..reference import attention as reference

__all__ = [
    "scaled_dot_product_attention",
    "flash_attn_func",
    "flash_attn_varlen_func",
    "flash_attn_with_kvcache",
    "register_backend",
    "available_backends",
    "FORWARD",
    "BACKWARD",
    "DECODE",
    "FLOAT_DTYPES",
]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256

# One table per contract function; every table uses the op name "attention", so
# GENFAST_BACKEND=attention=cpu selects all three.
FORWARD = OpDispatcher("attention")
BACKWARD = OpDispatcher("attention")
DECODE = OpDispatcher("attention")


def _kwargs_adapter(fn):
    """Backends implement the contract's keyword signature; the dispatcher passes positionals."""

    def call(args, kwargs):
        return fn(*args, **kwargs)

    return call


def _lazy(module: str, name: str):
    def call(*args, **kwargs):
        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    call.__name__ = f"{module}.{name}"
    return call


def register_backend(name: str, dtypes, module=None, *, forward=None, backward=None, decode=None) -> None:
    """Registers a backend of the attention contract in FORWARD, BACKWARD and DECODE.

    ``module``: a module object or an absolute module name (imported lazily, at the first call)
    with functions ``forward``, ``backward`` and ``decode``; or pass the three functions."""
    if module is not None:
        if isinstance(module, str):
            forward, backward, decode = (_lazy(module, n) for n in ("forward", "backward", "decode"))
        else:
            forward, backward, decode = module.forward, module.backward, module.decode
    for table, fn in ((FORWARD, forward), (BACKWARD, backward), (DECODE, decode)):
        if fn is not None:
            table.register(name, dtypes, _kwargs_adapter(fn))


def available_backends(device, dtype: torch.dtype, table: OpDispatcher = FORWARD) -> list:
    """Backends of ``table`` that can run on ``device`` with ``dtype`` (tests iterate over these)."""
    device = torch.device(device)
    return [b for b in table.backends if table.unavailable_reason(b, device, dtype) is None]


# ----------------------------------------------------------------------------- cpu backend


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The LSE is fp32 (the contract), fp64 for fp64 inputs (cpu and reference only), so fp64
    gradients recomputed from it keep fp64 accuracy."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# Below this many multiply-adds (B * H * Sq * Sk * D) a problem runs on one thread: waking the
# OpenMP team costs more than it saves on a small problem (and small calls are launch-bound).
SINGLE_THREAD_WORK = 1 << 18


def _options(scale: float, softcap: float, window_left: int, window_right: int, align_bottom_right: bool,
             dropout_p: float, seq_first: bool = False):
    """The extension's AttentionOptions of one problem (made once per call signature in practice).
    ``seq_first``: the tensors come in flash-attn's (B, S, H, D) layout (the contract's is (B, H, S, D))."""
    return _options_of(_ext._C.AttentionOptions, scale, softcap, window_left, window_right, align_bottom_right,
                       dropout_p, seq_first)


@functools.lru_cache(maxsize=256)  # keyed by the class too: the tests' CUDA emulation module has its own
def _options_of(cls, scale, softcap, window_left, window_right, align_bottom_right, dropout_p, seq_first):
    return cls(scale=float(scale), softcap=float(softcap), window_left=int(window_left),
               window_right=int(window_right), align_bottom_right=bool(align_bottom_right), dropout_p=float(dropout_p),
               seq_first=bool(seq_first))


def _cpu_work(q, k, keys: Optional[int] = None) -> int:
    """Multiply-adds of q·kᵀ; ``keys``: the keys a row may read when k is not (B, Hk, Sk, D) (a paged cache)."""
    B, H, Sq, D = q.shape
    return B * H * Sq * (k.shape[2] if keys is None else keys) * D


def _cpu_threads(q, k, keys: Optional[int] = None) -> int:
    return cpu_threads(_cpu_work(q, k, keys), SINGLE_THREAD_WORK)


def _cpu_ready(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The C++ kernels read rows with unit stride in the last dimension; ALiBi and cu_seqlens densely."""
    if t is None:
        return None
    return t if t.stride(-1) == 1 else t.contiguous()


def _dense(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.contiguous()


def _cache_keys(k_cache, block_table) -> int:
    """Positions a row of a decode cache (contract layout) holds."""
    return k_cache.shape[2] if block_table is None else block_table.shape[1] * k_cache.shape[2]


def _cache_index(cache_leftpad, cache_batch_idx, block_table) -> dict:
    """The decode's optional cache-index tensors as the extension's keyword arguments (only those
    given, so calls without them look as before)."""
    given = dict(cache_leftpad=_dense(cache_leftpad), cache_batch_idx=_dense(cache_batch_idx),
                 block_table=None if block_table is None else _cpu_ready(block_table))
    return {name: t for name, t in given.items() if t is not None}


def _cpu_forward(q, k, v, *, scale, window_left, window_right, align_bottom_right, softcap, alibi_slopes, bias,
                 dropout_p, seed, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
                 return_dropout_mask=False):
    q, k, v = _cpu_ready(q), _cpu_ready(k), _cpu_ready(v)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:3], dtype=lse_dtype(q.dtype), device=q.device)
    keep = None
    if return_dropout_mask:
        keep = torch.zeros(q.shape[0], q.shape[1], q.shape[2], k.shape[2], dtype=torch.bool, device=q.device)
        if dropout_p == 0:
            keep.fill_(True)
    if q.numel() > 0:
        _ext._C.attention_forward_cpu(
            q, k, v, out, lse, bias=bias, alibi_slopes=_dense(alibi_slopes), cu_seqlens_q=cu_seqlens_q,
            cu_seqlens_k=cu_seqlens_k, seqused_k=None, keep_mask=keep if dropout_p > 0 else None,
            seed=int(seed) & ((1 << 64) - 1),
            options=_options(scale, softcap, window_left, window_right, align_bottom_right, dropout_p),
            num_threads=_cpu_threads(q, k))
    return (out, lse, keep) if return_dropout_mask else (out, lse)


def _cpu_backward(dout, q, k, v, out, lse, *, scale, window_left, window_right, align_bottom_right, softcap,
                  alibi_slopes, bias, dropout_p, seed, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None,
                  max_seqlen_k=None, deterministic=False):
    q, k, v, dout = _cpu_ready(q), _cpu_ready(k), _cpu_ready(v), _cpu_ready(dout)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.zeros(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.zeros(v.shape, dtype=v.dtype, device=v.device)
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk, dv
    _ext._C.attention_backward_cpu(
        dout, q, k, v, out.contiguous(), lse.contiguous(), dq, dk, dv, bias=bias, alibi_slopes=_dense(alibi_slopes),
        cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, seed=int(seed) & ((1 << 64) - 1),
        options=_options(scale, softcap, window_left, window_right, align_bottom_right, dropout_p),
        num_threads=_cpu_threads(q, k))
    return dq, dk, dv


def _cpu_decode(q, k_cache, v_cache, cache_seqlens, *, scale, window_left, window_right, softcap, alibi_slopes,
                num_splits=0, cache_leftpad=None, cache_batch_idx=None, block_table=None):
    # The forward kernel with a per-row key count; queries are the last Sq positions. Split-KV
    # is not needed on the CPU: (batch, head) pairs already give every core work.
    q, k_cache, v_cache = _cpu_ready(q), _cpu_ready(k_cache), _cpu_ready(v_cache)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:3], dtype=lse_dtype(q.dtype), device=q.device)
    if q.numel() > 0:
        seqused = cache_seqlens if cache_seqlens.dtype == torch.int32 else cache_seqlens.to(torch.int32)
        _ext._C.attention_forward_cpu(
            q, k_cache, v_cache, out, lse, bias=None, alibi_slopes=_dense(alibi_slopes), cu_seqlens_q=None,
            cu_seqlens_k=None, seqused_k=seqused.contiguous(), keep_mask=None, seed=0,
            options=_options(scale, softcap, window_left, window_right, True, 0.0),
            num_threads=_cpu_threads(q, k_cache, _cache_keys(k_cache, block_table)),
            **_cache_index(cache_leftpad, cache_batch_idx, block_table))
    return out, lse


register_backend("cpu", FLOAT_DTYPES, forward=_cpu_forward, backward=_cpu_backward, decode=_cpu_decode)


# ----------------------------------------------------------------------------- cuda backend
# kernels/attention.cu: forward, split-KV decode and backward on tensor cores (fp16/bf16,
# sm_80+). Calls with an additive bias or dropout, and backwards with head dims above 128, raise
# Unsupported and go on to the next backend (triton): one contract, one LSE convention, so a
# forward on one backend and a backward on another agree.

CUDA_DTYPES = (torch.float16, torch.bfloat16)
# kernels/attention.h kBackwardMaxHeadDim, read from the extension (128 stands in without it).
CUDA_BACKWARD_MAX_HEAD_DIM = getattr(_ext._C, "ATTENTION_CUDA_BACKWARD_MAX_HEAD_DIM", 128)
CUDA_DECODE_MIN_KEYS_PER_SPLIT = 256  # below this a split's fixed cost outweighs its bandwidth
CUDA_MAX_SPLITS = 128


@functools.lru_cache(maxsize=None)
def _cuda_device_info(index: int) -> tuple:
    props = torch.cuda.get_device_properties(index)
    return (props.major, props.minor), props.multi_processor_count


def _device_index(t: torch.Tensor) -> int:
    return t.device.index if t.device.index is not None else torch.cuda.current_device()


def _cuda_check_call(q, bias, dropout_p, return_dropout_mask):
    if bias is not None:
        raise Unsupported("an additive bias / attn_mask is not implemented in the CUDA kernels")
    if dropout_p > 0 or return_dropout_mask:
        raise Unsupported("dropout is not implemented in the CUDA kernels")
    capability, _ = _cuda_device_info(_device_index(q))
    if capability < (8, 0):
        raise Unsupported(f"the CUDA attention kernels need compute capability 8.0+, this GPU has {capability}")


def _cuda_ready(t: torch.Tensor) -> torch.Tensor:
    """16-byte vector loads: unit stride in the head dim, other strides multiples of 8 elements
    and a 16-byte aligned start; anything else is copied once."""
    if t.stride(-1) == 1 and all(s % 8 == 0 for s in t.stride()[:-1]) and t.data_ptr() % 16 == 0:
        return t
    return t.clone(memory_format=torch.contiguous_format)  # a fresh (aligned) allocation even when contiguous


def _cuda_launch(max_seqlen_q=0, max_seqlen_k=0, pack_gqa=False, num_splits=1):
    return _ext._C.AttentionCudaLaunch(max_seqlen_q=int(max_seqlen_q or 0), max_seqlen_k=int(max_seqlen_k or 0),
                                       pack_gqa=bool(pack_gqa), num_splits=int(num_splits))


def _cuda_forward(q, k, v, *, scale, window_left, window_right, align_bottom_right, softcap, alibi_slopes, bias,
                  dropout_p, seed, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
                  return_dropout_mask=False):
    _cuda_check_call(q, bias, dropout_p, return_dropout_mask)
    q, k, v = _cuda_ready(q), _cuda_ready(k), _cuda_ready(v)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    if q.numel() > 0:
        _ext._C.attention_forward_cuda(
            q, k, v, out, lse, alibi_slopes=_dense(alibi_slopes), cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
            seqused_k=None, out_partial=None, lse_partial=None,
            options=_options(scale, softcap, window_left, window_right, align_bottom_right, 0.0),
            launch=_cuda_launch(max_seqlen_q, max_seqlen_k), stream=_ext.stream_of(q))
    return out, lse


def _cuda_backward(dout, q, k, v, out, lse, *, scale, window_left, window_right, align_bottom_right, softcap,
                   alibi_slopes, bias, dropout_p, seed, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None,
                   max_seqlen_k=None, deterministic=False):
    # Always deterministic: no atomics (dQ and dK/dV come from separate kernels).
    _cuda_check_call(q, bias, dropout_p, False)
    if q.shape[-1] > CUDA_BACKWARD_MAX_HEAD_DIM:
        raise Unsupported(f"the CUDA backward supports head dims up to {CUDA_BACKWARD_MAX_HEAD_DIM}, got {q.shape[-1]}")
    q, k, v, dout = (_cuda_ready(t) for t in (q, k, v, dout))
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = (dout.float() * out.float()).sum(-1)  # (B, H, Sq) fp32: the softmax backward's row term
    _ext._C.attention_backward_cuda(
        dout, q, k, v, lse.contiguous(), delta, dq, dk, dv, alibi_slopes=_dense(alibi_slopes),
        cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
        options=_options(scale, softcap, window_left, window_right, align_bottom_right, 0.0),
        launch=_cuda_launch(max_seqlen_q, max_seqlen_k), stream=_ext.stream_of(q))
    return dq, dk, dv


def cuda_decode_splits(batch: int, kv_heads: int, group_rows: int, cache_len: int, num_sms: int,
                       num_splits: int = 0) -> int:
    """Chunks per row of the KV cache (flash-decoding). ``num_splits`` > 0 is the caller's
    choice (clamped to 128); 0 picks enough chunks to give every SM two blocks, keeping at
    least CUDA_DECODE_MIN_KEYS_PER_SPLIT keys per chunk. From shapes only: no host sync."""
    if num_splits > 0:
        return min(num_splits, CUDA_MAX_SPLITS)
    blocks = batch * kv_heads * -(-group_rows // 64)
    wanted = -(-2 * num_sms // max(blocks, 1))
    return max(1, min(wanted, cache_len // CUDA_DECODE_MIN_KEYS_PER_SPLIT, CUDA_MAX_SPLITS))


def _cuda_decode(q, k_cache, v_cache, cache_seqlens, *, scale, window_left, window_right, softcap, alibi_slopes,
                 num_splits=0, cache_leftpad=None, cache_batch_idx=None, block_table=None):
    _cuda_check_call(q, None, 0.0, False)
    q, k_cache, v_cache = _cuda_ready(q), _cuda_ready(k_cache), _cuda_ready(v_cache)
    B, H, Sq, D = q.shape
    Hk = k_cache.shape[1]
    S_max = k_cache.shape[2] if block_table is None else block_table.shape[1] * k_cache.shape[2]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    if q.numel() == 0:
        return out, lse
    _, num_sms = _cuda_device_info(_device_index(q))
    # The G query heads of one key head share a block, so the cache is read once per group.
    splits = cuda_decode_splits(B, Hk, (H // Hk) * Sq, S_max, num_sms, num_splits)
    out_partial = lse_partial = None
    if splits > 1:
        out_partial = torch.empty((splits,) + tuple(q.shape), dtype=torch.float32, device=q.device)
        lse_partial = torch.empty((splits,) + tuple(q.shape[:3]), dtype=torch.float32, device=q.device)
    _ext._C.attention_forward_cuda(
        q, k_cache, v_cache, out, lse, alibi_slopes=_dense(alibi_slopes), cu_seqlens_q=None, cu_seqlens_k=None,
        seqused_k=cache_seqlens.to(torch.int32).contiguous(), out_partial=out_partial, lse_partial=lse_partial,
        options=_options(scale, softcap, window_left, window_right, True, 0.0),
        launch=_cuda_launch(pack_gqa=H > Hk, num_splits=splits), stream=_ext.stream_of(q),
        **_cache_index(cache_leftpad, cache_batch_idx, block_table))
    return out, lse


register_backend("cuda", CUDA_DTYPES, forward=_cuda_forward, backward=_cuda_backward, decode=_cuda_decode)


def prefer_triton_on_hopper(device: torch.device):
    """Automatic order of the attention forward and backward on sm_90+: Triton first. There
    Triton's dots lower to wgmma, while the CUDA kernels are mma.sync (FlashAttention-2 class,
    about 350 TFLOP/s at best on an H100; Triton's tutorial reaches 407-487), so Triton is the
    better bet until measured rows on an H100 say otherwise. sm_80 keeps CUDA first; calls
    Triton cannot run still fall through to CUDA, and decode (split-KV) stays on CUDA."""
    if device.type != "cuda" or _ext.cuda_unavailable_reason() is not None:
        return None
    capability, _ = _cuda_device_info(device.index if device.index is not None else torch.cuda.current_device())
    return ("triton", "cuda") if capability >= (9, 0) else None


FORWARD.prefer = BACKWARD.prefer = prefer_triton_on_hopper
register_backend("reference", FLOAT_DTYPES, reference)
# The Triton kernels (genfast/triton_kernels/attention.py) register themselves here when the
# module is present; they are imported at their first call.
if importlib.util.find_spec("genfast.triton_kernels.attention") is not None:
    register_backend("triton", GPU_DTYPES, "genfast.triton_kernels.attention")


# ----------------------------------------------------------------------------- torch.library

_PROBLEM = ("Tensor? bias, Tensor? alibi_slopes, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, Tensor? seed, "
            "float scale, SymInt window_left, SymInt window_right, bool align_bottom_right, float softcap, "
            "float dropout_p, SymInt max_seqlen_q, SymInt max_seqlen_k")
# Returns (out, lse, keep_mask); keep_mask is empty unless return_dropout_mask.
_FORWARD_SCHEMA = (f"attention_forward(Tensor q, Tensor k, Tensor v, {_PROBLEM}, bool return_dropout_mask, "
                   "str backend) -> (Tensor, Tensor, Tensor)")
_BACKWARD_SCHEMA = ("attention_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
                    f"{_PROBLEM}, bool deterministic, str backend) -> (Tensor, Tensor, Tensor)")
_DECODE_SCHEMA = ("attention_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_seqlens, "
                  "Tensor? alibi_slopes, float scale, SymInt window_left, SymInt window_right, float softcap, "
                  "SymInt num_splits, str backend, Tensor? cache_leftpad=None, Tensor? cache_batch_idx=None, "
                  "Tensor? block_table=None) -> (Tensor, Tensor)")
_APPEND_SCHEMA = ("attention_kvcache_append(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k, Tensor v, "
                  "Tensor cache_seqlens, Tensor? cache_batch_idx=None, Tensor? block_table=None) -> ()")
# Returns rotary(q); appends rotary(k) and v (flash-attn layout) like attention_kvcache_append.
_ROTARY_APPEND_SCHEMA = ("attention_rotary_append(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k, "
                         "Tensor v, Tensor cache_seqlens, Tensor rotary_cos, Tensor rotary_sin, bool interleaved, "
                         "bool q_same_position, Tensor? cache_batch_idx=None, Tensor? block_table=None) -> Tensor")


# The ops' ``scale`` NaN stands for the default 1 / sqrt(head dim), resolved inside the ops: a
# float computed from a (symbolic) size and passed to a custom op would make torch.compile
# specialise on the head dim. Validation rejects NaN as a user scale.
SCALE_FROM_HEAD_DIM = math.nan


def _resolve_scale(scale: float, head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim) if math.isnan(scale) else scale


def _contract_kwargs(q, bias, alibi_slopes, cu_seqlens_q, cu_seqlens_k, seed, scale, window_left, window_right,
                     align_bottom_right, softcap, dropout_p, max_seqlen_q, max_seqlen_k) -> dict:
    return dict(scale=_resolve_scale(scale, q.shape[-1]), window_left=window_left, window_right=window_right,
                align_bottom_right=align_bottom_right, softcap=softcap, alibi_slopes=alibi_slopes, bias=bias,
                dropout_p=dropout_p, seed=int(seed.item()) if seed is not None else 0, cu_seqlens_q=cu_seqlens_q,
                cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q if cu_seqlens_q is not None else None,
                max_seqlen_k=max_seqlen_k if cu_seqlens_q is not None else None)


def _forward_impl(q, k, v, bias, alibi_slopes, cu_seqlens_q, cu_seqlens_k, seed, scale, window_left, window_right,
                  align_bottom_right, softcap, dropout_p, max_seqlen_q, max_seqlen_k, return_dropout_mask, backend):
    kw = _contract_kwargs(q, bias, alibi_slopes, cu_seqlens_q, cu_seqlens_k, seed, scale, window_left, window_right,
                          align_bottom_right, softcap, dropout_p, max_seqlen_q, max_seqlen_k)
    if return_dropout_mask:
        kw["return_dropout_mask"] = True
    result = FORWARD.run(backend or None, q.device, q.dtype, (q, k, v), kw)
    out, lse = result[0], result[1]
    keep = result[2] if return_dropout_mask else q.new_empty(0, dtype=torch.bool)
    return out, lse, keep


def _backward_impl(dout, q, k, v, out, lse, bias, alibi_slopes, cu_seqlens_q, cu_seqlens_k, seed, scale, window_left,
                   window_right, align_bottom_right, softcap, dropout_p, max_seqlen_q, max_seqlen_k, deterministic,
                   backend):
    kw = _contract_kwargs(q, bias, alibi_slopes, cu_seqlens_q, cu_seqlens_k, seed, scale, window_left, window_right,
                          align_bottom_right, softcap, dropout_p, max_seqlen_q, max_seqlen_k)
    kw["deterministic"] = deterministic
    dq, dk, dv = BACKWARD.run(backend or None, q.device, q.dtype, (dout, q, k, v, out, lse), kw)
    # Contiguous, as the fake kernel promises (the reference backend returns q's own strides,
    # which broke torch.compile of a model using it).
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


def _decode_impl(q, k_cache, v_cache, cache_seqlens, alibi_slopes, scale, window_left, window_right, softcap,
                 num_splits, backend, cache_leftpad=None, cache_batch_idx=None, block_table=None):
    kw = dict(scale=_resolve_scale(scale, q.shape[-1]), window_left=window_left, window_right=window_right,
              softcap=softcap, alibi_slopes=alibi_slopes, num_splits=num_splits)
    for name, t in (("cache_leftpad", cache_leftpad), ("cache_batch_idx", cache_batch_idx),
                    ("block_table", block_table)):
        if t is not None:
            kw[name] = t
    out, lse = DECODE.run(backend or None, q.device, q.dtype, (q, k_cache, v_cache, cache_seqlens), kw)
    return out, lse


def _append_impl(k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx=None, block_table=None):
    # k (B, S_new, Hk, D) goes to positions cache_seqlens[b] + t of batch row b: rows of
    # k_cache (B_cache, S_max, Hk, D) (cache row cache_batch_idx[b], or b), or, with block_table,
    # of the pages (num_blocks, page_size, Hk, D). On the CPU, one C++ call (row copies, every
    # position checked first) instead of six torch ops: decode is host-bound. (getattr: the
    # tests' CUDA emulation module stands in for the extension.)
    native = getattr(_ext._C, "attention_kvcache_append_cpu", None) if k_cache.device.type == "cpu" else None
    if native is not None and k.dtype == k_cache.dtype and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1:
        kk, vv = (t if t.stride(-1) == 1 else t.contiguous() for t in (k, v))
        indexed = {} if cache_batch_idx is None and block_table is None else dict(
            cache_batch_idx=_dense(cache_batch_idx), block_table=_cpu_ready(block_table))
        native(k_cache, v_cache, k=kk, v=vv, cache_seqlens=cache_seqlens.contiguous(), **indexed)
        return
    # Indexing with device tensors: no host synchronisation (CUDA-graph capturable).
    B, S_new = k.shape[0], k.shape[1]
    positions = cache_seqlens.to(torch.int64)[:, None] + torch.arange(S_new, device=k.device)[None, :]
    if block_table is not None:
        page = k_cache.shape[1]
        index = (torch.gather(block_table.to(torch.int64), 1, positions // page), positions % page)
    else:
        rows = torch.arange(B, device=k.device) if cache_batch_idx is None else cache_batch_idx.to(torch.int64)
        index = (rows[:, None].expand(B, S_new), positions)
    k_cache.index_put_(index, k.to(k_cache.dtype))
    v_cache.index_put_(index, v.to(v_cache.dtype))


def _rotary_append_impl(q, k_cache, v_cache, k, v, cache_seqlens, rotary_cos, rotary_sin, interleaved,
                        q_same_position, cache_batch_idx=None, block_table=None):
    # flash_attn_with_kvcache's rotary step, fused where a kernel exists: one C++ pass on the CPU,
    # one Triton kernel on GPUs; else the reference rotation and the append op.
    same_dtype = k.dtype == q.dtype == k_cache.dtype == v.dtype
    unit = all(t.stride(-1) == 1 for t in (k_cache, v_cache))
    if q.device.type == "cpu" and same_dtype and unit:
        native = getattr(_ext._C, "attention_rotary_append_cpu", None)
        if native is not None:
            qq, kk, vv = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
            out = torch.empty(qq.shape, dtype=q.dtype, device=q.device)
            native(qq, out, k_cache, v_cache, k=kk, v=vv, cache_seqlens=cache_seqlens.contiguous(),
                   rotary_cos=rotary_cos.contiguous(), rotary_sin=rotary_sin.contiguous(), interleaved=interleaved,
                   q_same_position=q_same_position, cache_batch_idx=_dense(cache_batch_idx),
                   block_table=_cpu_ready(block_table))
            return out
    if q.device.type == "cuda" and same_dtype and unit and q.dtype in GPU_DTYPES:
        kernel = _triton_rotary_append()
        if kernel is not None:
            return kernel(q, k_cache, v_cache, k, v, cache_seqlens, rotary_cos, rotary_sin, interleaved=interleaved,
                          q_same_position=q_same_position, cache_batch_idx=cache_batch_idx, block_table=block_table)
    S_new = k.shape[1]
    k_rot = reference.rotary_embedding(k, rotary_cos, rotary_sin, _rotary_positions(cache_seqlens, S_new, False),
                                       interleaved)
    q_rot = reference.rotary_embedding(q, rotary_cos, rotary_sin,
                                       _rotary_positions(cache_seqlens, q.shape[1], q_same_position), interleaved)
    if S_new > 0:
        _append_impl(k_cache, v_cache, k_rot, v, cache_seqlens, cache_batch_idx, block_table)
    return q_rot.contiguous()


@functools.lru_cache(maxsize=1)
def _triton_rotary_append():
    """genfast.triton_kernels.attention.rotary_append, or None without Triton."""
    try:
        from ..triton_kernels import attention as triton_attention
    except Exception:  # no triton, or it cannot load here
        return None
    return getattr(triton_attention, "rotary_append", None)


def _rotary_positions(seqlens: torch.Tensor, count: int, same: bool) -> torch.Tensor:
    """(B, count) int64 positions seqlens[b] + t, or seqlens[b] for every t when ``same``."""
    start = seqlens.to(torch.int64)[:, None]
    if same:
        return start.expand(-1, count)
    return start + torch.arange(count, device=seqlens.device)[None, :]


def _forward_fake(q, k, v, bias, alibi_slopes, cu_seqlens_q, cu_seqlens_k, seed, scale, window_left, window_right,
                  align_bottom_right, softcap, dropout_p, max_seqlen_q, max_seqlen_k, return_dropout_mask, backend):
    keep_shape = (q.shape[0], q.shape[1], q.shape[2], k.shape[2]) if return_dropout_mask else (0,)
    return (q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=lse_dtype(q.dtype)),
            q.new_empty(keep_shape, dtype=torch.bool))


def _backward_fake(dout, q, k, v, out, lse, bias, alibi_slopes, cu_seqlens_q, cu_seqlens_k, seed, scale, window_left,
                   window_right, align_bottom_right, softcap, dropout_p, max_seqlen_q, max_seqlen_k, deterministic,
                   backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _decode_fake(q, k_cache, v_cache, cache_seqlens, alibi_slopes, scale, window_left, window_right, softcap,
                 num_splits, backend, cache_leftpad=None, cache_batch_idx=None, block_table=None):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=lse_dtype(q.dtype))


def _append_fake(k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx=None, block_table=None):
    return None


def _rotary_append_fake(q, k_cache, v_cache, k, v, cache_seqlens, rotary_cos, rotary_sin, interleaved,
                        q_same_position, cache_batch_idx=None, block_table=None):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


attention_forward = NativeOp(_FORWARD_SCHEMA, _forward_impl, _forward_fake)
attention_backward = NativeOp(_BACKWARD_SCHEMA, _backward_impl, _backward_fake)
attention_decode = NativeOp(_DECODE_SCHEMA, _decode_impl, _decode_fake)
attention_kvcache_append = NativeOp(_APPEND_SCHEMA, _append_impl, _append_fake)
attention_rotary_append = NativeOp(_ROTARY_APPEND_SCHEMA, _rotary_append_impl, _rotary_append_fake)


# ----------------------------------------------------------------------------- autograd


class _AttentionFunction(torch.autograd.Function):
    """out, lse[, keep] = attention(q, k, v); gradients for q, k, v (not for the bias or ALiBi)."""

    @staticmethod
    def forward(ctx, q, k, v, bias, alibi_slopes, cu_seqlens_q, cu_seqlens_k, seed, problem, return_dropout_mask,
                deterministic, backend):
        out, lse, keep = attention_forward(q, k, v, bias, alibi_slopes, cu_seqlens_q, cu_seqlens_k, seed, *problem,
                                 return_dropout_mask, backend)
        ctx.save_for_backward(q, k, v, out, lse, bias, alibi_slopes, cu_seqlens_q, cu_seqlens_k, seed)
        ctx.problem, ctx.deterministic, ctx.backend = problem, deterministic, backend
        ctx.mark_non_differentiable(lse, keep)
        return out, lse, keep

    @staticmethod
    def backward(ctx, dout, _dlse, _dkeep):
        q, k, v, out, lse, bias, alibi_slopes, cu_seqlens_q, cu_seqlens_k, seed = ctx.saved_tensors
        dq, dk, dv = attention_backward(dout, q, k, v, out, lse, bias, alibi_slopes, cu_seqlens_q, cu_seqlens_k, seed,
                              *ctx.problem, ctx.deterministic, ctx.backend)
        needs = ctx.needs_input_grad
        return (dq if needs[0] else None, dk if needs[1] else None, dv if needs[2] else None) + (None,) * 9


def _attention(q, k, v, *, bias=None, alibi_slopes=None, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0,
               max_seqlen_k=0, scale, window_left=-1, window_right=-1, align_bottom_right=False, softcap=0.0,
               dropout_p=0.0, return_dropout_mask=False, deterministic=False, backend=None):
    """Canonical problem (contract layout) -> (out (B, H, Sq, D), lse, keep mask or empty)."""
    # A fresh seed per call from torch's generator (reproducible under torch.manual_seed); a
    # tensor, so torch.compile traces it instead of specialising on its value.
    seed = torch.randint(0, 2 ** 62, (), dtype=torch.int64) if dropout_p > 0 else None
    problem = (float(scale), int(window_left), int(window_right), bool(align_bottom_right), float(softcap),
               float(dropout_p), 0 if max_seqlen_q is None else int(max_seqlen_q),
               0 if max_seqlen_k is None else int(max_seqlen_k))
    backend = backend or ""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if needs_grad:
        return _AttentionFunction.apply(q, k, v, bias, alibi_slopes, cu_seqlens_q, cu_seqlens_k, seed, problem,
                                        return_dropout_mask, deterministic, backend)
    return attention_forward(q, k, v, bias, alibi_slopes, cu_seqlens_q, cu_seqlens_k, seed, *problem,
                             return_dropout_mask, backend)


# ----------------------------------------------------------------------------- prepared eager calls
# A call whose signature passed validation before, that needs no autograd and has no mask,
# ALiBi, dropout or varlen, runs a call prepared once per signature (OpDispatcher.call_prepared):
# the backend choice, the resolved options, the extension's options struct and whether the
# problem gets more than one thread are worked out at the first call; later calls allocate the
# outputs and run the kernel (with torch's thread count at that call).


def _cpu_lse_like(q: torch.Tensor, seq_first: bool) -> torch.Tensor:
    """A (B, H, Sq) view in the lse dtype without storage: ``torch.empty_like`` of it allocates
    the CPU kernels' contiguous lse."""
    B, H, Sq = (q.shape[0], q.shape[2], q.shape[1]) if seq_first else q.shape[:3]
    return torch.empty((), dtype=lse_dtype(q.dtype), device=q.device).expand(B, H, Sq)


def _cpu_outputs(q: torch.Tensor, seq_first: bool):
    """Allocators of the CPU kernels' contiguous out (q's shape) and lse (B, H, Sq)."""
    lse_like, contiguous = _cpu_lse_like(q, seq_first), torch.contiguous_format
    return lambda q: (torch.empty_like(q, memory_format=contiguous), torch.empty_like(lse_like))


def _heads_first(fn, seq_first: bool):
    """``fn`` (taking the contract's (B, H, S, D) views first, returning (out, lse, ...)) for
    tensors in the caller's layout: flash-attn's (B, S, H, D) when ``seq_first``."""
    if not seq_first:
        return lambda *tensors: fn(*tensors)[:2]

    def call(q, k, v, *rest):
        out, lse = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), *rest)[:2]
        return out.transpose(1, 2).contiguous(), lse

    return call


def _prepare_forward(q, k, problem, backend, seq_first):
    """The forward of a dense, unmasked problem with ``problem`` = (scale, window_left,
    window_right, align_bottom_right, softcap), q, k, v in (B, H, S, D) or, when ``seq_first``,
    (B, S, H, D): a function (q, k, v) -> (out in q's layout, lse (B, H, Sq)), or None."""
    name = FORWARD.select(backend or None, q.device, q.dtype)
    scale, left, right, bottom_right, softcap = problem
    kw = _contract_kwargs(q, None, None, None, None, None, scale, left, right, bottom_right, softcap, 0.0, 0, 0)
    if name != "cpu":
        fn = FORWARD.backends[name].fn
        return _heads_first(lambda q, k, v: fn((q, k, v), kw), seq_first)
    if q.numel() == 0:
        return None
    lse_like, contiguous = _cpu_lse_like(q, seq_first), torch.contiguous_format
    native = bind_positional(_ext._C.attention_forward_cpu, ("q", "k", "v", "out", "lse", "num_threads"), bias=None,
                             alibi_slopes=None, cu_seqlens_q=None, cu_seqlens_k=None, seqused_k=None, keep_mask=None,
                             seed=0, options=_options(kw["scale"], softcap, left, right, bottom_right, 0.0, seq_first),
                             cache_leftpad=None, cache_batch_idx=None, block_table=None, k_new=None, v_new=None)
    threads = cpu_threads_per_call(_cpu_work(*((q.transpose(1, 2), k.transpose(1, 2)) if seq_first else (q, k))),
                                   SINGLE_THREAD_WORK)

    def call(q, k, v):  # _cpu_outputs' allocations inline: the most frequent prepared call
        out, lse = torch.empty_like(q, memory_format=contiguous), torch.empty_like(lse_like)
        native(q, k, v, out, lse, threads())
        return out, lse

    return call


def _eager_forward(signature, q, k, v, problem, backend, seq_first=False):
    """(out in q's layout, lse) of a dense unmasked forward without autograd (q, k, v with unit
    last stride, in (B, H, S, D) or, when ``seq_first``, (B, S, H, D))."""
    result = FORWARD.call_prepared(signature, lambda: _prepare_forward(q, k, problem, backend, seq_first), q, k, v)
    if result is None:
        general = lambda q, k, v: attention_forward(q, k, v, None, None, None, None, None, *problem, 0.0, 0, 0,
                                                    False, backend or "")
        return _heads_first(general, seq_first)(q, k, v)
    return result


def _prepare_backward(q, k, problem, backend, deterministic):
    """The backward of a dense, unmasked problem (see _prepare_forward), tensors in the
    contract's (B, H, S, D) layout: a function (dout, q, k, v, out, lse) -> (dq, dk, dv), or None."""
    name = BACKWARD.select(backend or None, q.device, q.dtype)
    scale, left, right, bottom_right, softcap = problem
    kw = _contract_kwargs(q, None, None, None, None, None, scale, left, right, bottom_right, softcap, 0.0, 0, 0)
    kw["deterministic"] = deterministic
    if name != "cpu":
        fn = BACKWARD.backends[name].fn
        return lambda *tensors: tuple(g.contiguous() for g in fn(tensors, kw))
    if q.numel() == 0 or k.numel() == 0:
        return None
    native = bind_positional(_ext._C.attention_backward_cpu,
                             ("dout", "q", "k", "v", "out", "lse", "dq", "dk", "dv", "num_threads"), bias=None,
                             alibi_slopes=None, cu_seqlens_q=None, cu_seqlens_k=None, seed=0,
                             options=_options(kw["scale"], softcap, left, right, bottom_right, 0.0))
    threads = cpu_threads_per_call(_cpu_work(q, k), SINGLE_THREAD_WORK)

    def call(dout, q, k, v, out, lse):
        dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        dk = torch.zeros(k.shape, dtype=k.dtype, device=k.device)
        dv = torch.zeros(v.shape, dtype=v.dtype, device=v.device)
        native(_cpu_ready(dout), q, k, v, out, lse, dq, dk, dv, threads())
        return dq, dk, dv

    return call


def _eager_backward(signature, dout, q, k, v, out, lse, problem, backend, deterministic):
    """(dq, dk, dv) of a dense unmasked problem through the call prepared for its forward's
    ``signature`` (contract layout; out and lse as the forward made them)."""
    prepare = lambda: _prepare_backward(q, k, problem, backend, deterministic)  # noqa: E731
    result = BACKWARD.call_prepared(signature, prepare, dout, q, k, v, out, lse)
    if result is None:
        result = attention_backward(dout, q, k, v, out, lse, None, None, None, None, None, *problem, 0.0, 0, 0,
                                    deterministic, backend or "")
    return result


class _PreparedAttention(torch.autograd.Function):
    """A dense unmasked attention whose signature validated before, with gradients: forward and
    backward through prepared calls (no dispatch tables, no ``torch.library`` round trip), the
    general ops where a prepared call has none. q, k, v in (B, H, S, D) or, when ``seq_first``,
    flash-attn's (B, S, H, D) (the backward runs on (B, H, S, D) views of them)."""

    @staticmethod
    def forward(ctx, q, k, v, signature, problem, backend, seq_first, deterministic):
        out, lse = _eager_forward(signature, q, k, v, problem, backend, seq_first)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.options = (signature, problem, backend, seq_first, deterministic)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        signature, problem, backend, seq_first, deterministic = ctx.options
        if seq_first:
            dout, q, k, v, out = (t.transpose(1, 2) for t in (dout, q, k, v, out))
            out = out.contiguous()  # the kernels write out (B, H, S, D) densely; read it so too
        grads = _eager_backward(signature, dout, q, k, v, out, lse, problem, backend, deterministic)
        if seq_first:
            grads = tuple(g.transpose(1, 2) for g in grads)
        needs = ctx.needs_input_grad
        return tuple(g if need else None for g, need in zip(grads, needs)) + (None,) * 5


def _prepare_decode(q, k_cache, problem, num_splits, backend, capacity, append=False):
    """The decode of ``problem`` = (scale, window_left, window_right, softcap) in flash-attn's
    layout: a function (q, k_cache, v_cache, seqlens, k, v, cache_leftpad, cache_batch_idx,
    block_table) -> (out (B, Sq, H, D), lse), or None. ``capacity``: positions a row holds.
    k, v: None, or (``append``, CPU backend only) new tokens the same C++ call writes into the
    cache at seqlens[b] + t before it attends to seqlens + S_new keys; with ``append`` the other
    backends have no prepared call (None: the caller appends first)."""
    name = DECODE.select(backend or None, q.device, q.dtype)
    scale, left, right, softcap = problem
    kw = dict(scale=_resolve_scale(scale, q.shape[-1]), window_left=left, window_right=right, softcap=softcap,
              alibi_slopes=None, num_splits=num_splits)
    if append and name != "cpu":
        return None
    if name != "cpu":
        fn = DECODE.backends[name].fn

        def run(q, kc, vc, seqlens, k, v, *index):  # k, v: None; index: () or the three index tensors
            return fn((q, kc, vc, seqlens), dict(kw, **_cache_index(*index)) if index else kw)

        return _heads_first(run, True)
    if q.numel() == 0:
        return None
    outputs = _cpu_outputs(q, True)
    native = bind_positional(_ext._C.attention_forward_cpu,
                             ("q", "k", "v", "out", "lse", "seqused_k", "num_threads", "cache_leftpad",
                              "cache_batch_idx", "block_table", "k_new", "v_new"),
                             bias=None, alibi_slopes=None, cu_seqlens_q=None, cu_seqlens_k=None, keep_mask=None, seed=0,
                             options=_options(kw["scale"], softcap, left, right, True, 0.0, True))
    threads = cpu_threads_per_call(_cpu_work(q.transpose(1, 2), k_cache.transpose(1, 2), capacity), SINGLE_THREAD_WORK)

    def call(q, kc, vc, seqlens, k, v, cache_leftpad=None, cache_batch_idx=None, block_table=None):
        out, lse = outputs(q)
        native(q, kc, vc, out, lse, seqlens.contiguous(), threads(), _dense(cache_leftpad), _dense(cache_batch_idx),
               _cpu_ready(block_table), k, v)
        return out, lse

    return call


@functools.lru_cache(maxsize=64)
def _constant_seqlens(batch: int, value: int, device: torch.device) -> torch.Tensor:
    """An int cache_seqlens as the int32 (B,) tensor the kernels read (read-only, shared)."""
    return torch.full((batch,), value, dtype=torch.int32, device=device)


def _eager_decode(signature, q, k_cache, v_cache, seqlens, problem, num_splits, backend, index=(), capacity=None):
    """(out, lse) of a decode without ALiBi, tensors in flash-attn's (B, S, H, D) layout with unit
    last stride; ``index``: () or (cache_leftpad, cache_batch_idx, block_table)."""
    prepare = lambda: _prepare_decode(q, k_cache, problem, num_splits, backend,  # noqa: E731
                                      k_cache.shape[1] if capacity is None else capacity)
    result = DECODE.call_prepared(signature, prepare, q, k_cache, v_cache, seqlens, None, None, *index)
    if result is None:
        general = lambda q, kc, vc, seqlens: attention_decode(q, kc, vc, seqlens, None, *problem, num_splits,
                                                              backend or "", *index)
        return _heads_first(general, True)(q, k_cache, v_cache, seqlens)
    return result


def _eager_decode_append(signature, q, k_cache, v_cache, k, v, cache_seqlens, problem, num_splits, backend, index,
                         capacity):
    """(out, lse) of a decode that appends k, v (flash-attn's layout, unit last strides) through
    one prepared call, or None where the backend has none (the caller appends, then decodes)."""
    prepare = lambda: _prepare_decode(q, k_cache, problem, num_splits, backend, capacity, append=True)  # noqa: E731
    return DECODE.call_prepared(("append", signature), prepare, q, k_cache, v_cache, cache_seqlens, k, v, *index)


def _eager_allowed(*tensors) -> bool:
    """No autograd needed (the prepared calls have none)."""
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


# ----------------------------------------------------------------------------- validation


_type_name = type_name
_compiling = compiling


def _check_tensor(fn: str, name: str, t, ndim: Optional[int] = None):
    check_tensor(fn, name, t, ndim=ndim)


def _check_qkv(fn: str, q, k, v, head_dim_axis: int = -1):
    """dtype, device and head-dim checks shared by every API (after shapes are known)."""
    if q.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{fn}: query must be float16, bfloat16, float32 or float64, got {q.dtype}")
    for name, t in (("key", k), ("value", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{fn}: {name} has dtype {t.dtype} but query has {q.dtype}; q, k and v must have one dtype")
        if t.device != q.device:
            raise ValueError(f"{fn}: {name} is on {t.device} but query is on {q.device}; they must be on one device")
    D = q.shape[head_dim_axis]
    if k.shape[head_dim_axis] != D:
        raise ValueError(f"{fn}: key head dim {k.shape[head_dim_axis]} != query head dim {D}; they must match")
    if v.shape[head_dim_axis] != D:
        raise ValueError(f"{fn}: value head dim {v.shape[head_dim_axis]} != query head dim {D}; genfast requires "
                         "the value head dim to equal the query/key head dim")
    if not (MIN_HEAD_DIM <= D <= MAX_HEAD_DIM and D % 8 == 0):
        raise ValueError(f"{fn}: unsupported head dim {D}; expected a multiple of 8 in "
                         f"[{MIN_HEAD_DIM}, {MAX_HEAD_DIM}]")
    if q.dtype == torch.float64 and q.device.type == "cuda":
        raise TypeError(f"{fn}: float64 attention runs on the CPU only (cpu and reference backends)")


def _check_heads(fn: str, H: int, Hk: int, Hv: int):
    if Hv != Hk:
        raise ValueError(f"{fn}: key has {Hk} heads but value has {Hv}; they must match")
    if Hk == 0 or H % Hk != 0:
        raise ValueError(f"{fn}: the number of query heads ({H}) must be a multiple of the number of key/value "
                         f"heads ({Hk})")


def _check_scalar(fn: str, name: str, value, minimum=None, maximum=None, max_inclusive=True) -> float:
    return check_real(fn, name, value, minimum=minimum, maximum=maximum, max_inclusive=max_inclusive)


def _check_dropout(fn: str, dropout_p) -> float:
    return _check_scalar(fn, "dropout_p", dropout_p, 0.0, 1.0, max_inclusive=False)


def _check_scale(fn: str, scale, D: int) -> float:
    if scale is None:
        return SCALE_FROM_HEAD_DIM  # the ops compute 1 / sqrt(D)
    return _check_scalar(fn, "softmax_scale" if fn.startswith("flash") else "scale", scale)


def _check_window(fn: str, window_size) -> tuple:
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise ValueError(f"{fn}: window_size must be a pair (left, right), got {window_size!r}")
    left, right = window_size
    for side, w in (("left", left), ("right", right)):
        if not is_int(w):
            raise TypeError(f"{fn}: window_size {side} must be an int (-1 for unbounded), got {_type_name(w)}")
        if w < -1:
            raise ValueError(f"{fn}: window_size {side} must be >= -1 (-1 = unbounded), got {w}")
    return int(left), int(right)


def _flash_window(fn: str, causal: bool, window_size) -> tuple:
    left, right = _check_window(fn, window_size)
    if causal:  # flash-attn: causal is window (left, 0)
        right = 0
    return left, right


def _check_softcap(fn: str, softcap) -> float:
    return _check_scalar(fn, "softcap", softcap, 0.0)


def _check_alibi(fn: str, alibi_slopes, B: int, H: int, device, varlen: bool = False):
    if alibi_slopes is None:
        return None
    _check_tensor(fn, "alibi_slopes", alibi_slopes)
    if alibi_slopes.dtype != torch.float32:
        raise TypeError(f"{fn}: alibi_slopes must be float32, got {alibi_slopes.dtype}")
    if alibi_slopes.device != device:
        raise ValueError(f"{fn}: alibi_slopes is on {alibi_slopes.device} but query is on {device}")
    rows = "number of sequences" if varlen else "batch size"
    if tuple(alibi_slopes.shape) not in ((H,), (B, H)):
        raise ValueError(f"{fn}: alibi_slopes must have shape ({H},) or ({B}, {H}) (heads, or {rows} x heads), "
                         f"got {tuple(alibi_slopes.shape)}")
    if alibi_slopes.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{fn}: gradients with respect to alibi_slopes are not supported; pass alibi_slopes.detach()")
    return alibi_slopes.contiguous()


def _check_backend(fn: str, backend):
    check_backend(fn, backend, FORWARD.backends)
    return backend


def _check_cu_seqlens(fn: str, name: str, cu, total: int, max_seqlen, max_name: str, device, check_values: bool):
    _check_tensor(fn, name, cu, ndim=1)
    if cu.dtype != torch.int32:
        raise TypeError(f"{fn}: {name} must be int32, got {cu.dtype}")
    if cu.device != device:
        raise ValueError(f"{fn}: {name} is on {cu.device} but the inputs are on {device}")
    if cu.numel() < 1:
        raise ValueError(f"{fn}: {name} must have at least one element (0)")
    if not is_int(max_seqlen) or max_seqlen < 0:
        raise ValueError(f"{fn}: {max_name} must be a non-negative int, got {max_seqlen!r}")
    if not check_values:
        return
    values = cu.tolist()
    if values[0] != 0:
        raise ValueError(f"{fn}: {name}[0] must be 0, got {values[0]}")
    lengths = [b - a for a, b in zip(values, values[1:])]
    if any(n < 0 for n in lengths):
        raise ValueError(f"{fn}: {name} must be non-decreasing (sequence lengths >= 0), got {values}")
    if values[-1] != total:
        raise ValueError(f"{fn}: {name}[-1] = {values[-1]} but the tensor holds {total} tokens; they must match")
    if lengths and max(lengths) > max_seqlen:
        raise ValueError(f"{fn}: {max_name} = {max_seqlen} is smaller than the longest sequence ({max(lengths)})")


# ----------------------------------------------------------------------------- SDPA API


def _sdpa_mask_to_bias(fn: str, attn_mask, q: torch.Tensor, target: tuple):
    """attn_mask (bool: True = attend; or additive in query's dtype) -> additive 4-D view of ``target``."""
    if attn_mask is None:
        return None
    _check_tensor(fn, "attn_mask", attn_mask)
    if attn_mask.device != q.device:
        raise ValueError(f"{fn}: attn_mask is on {attn_mask.device} but query is on {q.device}")
    if attn_mask.dtype == torch.bool:
        # zeros_like: a DTensor mask stays a DTensor (with its placements)
        bias = torch.zeros_like(attn_mask, dtype=q.dtype).masked_fill_(~attn_mask, -math.inf)
    elif attn_mask.dtype in (q.dtype, torch.float32):  # torch accepts float32 masks with any query dtype
        if attn_mask.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{fn}: gradients with respect to attn_mask are not supported; pass attn_mask.detach()")
        bias = attn_mask.to(q.dtype)
    else:
        raise TypeError(f"{fn}: attn_mask must be bool, float32 or the query's dtype ({q.dtype}), "
                        f"got {attn_mask.dtype}")
    try:
        return torch.broadcast_to(bias, target)
    except RuntimeError:
        raise ValueError(f"{fn}: attn_mask of shape {tuple(attn_mask.shape)} is not broadcastable to "
                         f"{target} (batch, heads, L, S)") from None


# Signatures of eager calls whose arguments passed validation (see ValidatedSignatures).
_VALIDATED = ValidatedSignatures()


def _sdpa_signature(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, backend):
    """Everything ``_check_sdpa`` looks at, as a hashable key; None where a call is not cached
    (a mask, non-Python scalars, tensor subclasses, tracing)."""
    if attn_mask is not None or type(is_causal) is not bool or type(enable_gqa) is not bool:
        return None
    if type(dropout_p) not in (float, int) or (scale is not None and type(scale) not in (float, int)):
        return None
    if type(query) is not torch.Tensor or type(key) is not torch.Tensor or type(value) is not torch.Tensor \
            or not plain_eager_mode():  # direct_call_allowed(query, key, value), inline
        return None
    return ("sdpa", query.shape, key.shape, value.shape, query.dtype, key.dtype, value.dtype, query.device,
            key.device, value.device, dropout_p, is_causal, scale, enable_gqa, backend)


def _check_sdpa(fn, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, backend) -> tuple:
    """Every check of ``scaled_dot_product_attention`` but the mask's; returns (dropout_p, scale)."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        _check_tensor(fn, name, t)
        if t.ndim < 3:
            raise ValueError(f"{fn}: {name} must have at least 3 dimensions (N, ..., L, E), got shape {tuple(t.shape)}")
    if not (query.ndim == key.ndim == value.ndim):
        raise ValueError(f"{fn}: query, key and value must have the same number of dimensions, got "
                         f"{query.ndim}, {key.ndim}, {value.ndim}")
    _check_qkv(fn, query, key, value)
    _check_backend(fn, backend)
    dropout_p = _check_dropout(fn, dropout_p)
    if key.shape[-2] != value.shape[-2]:
        raise ValueError(f"{fn}: key has {key.shape[-2]} positions but value has {value.shape[-2]}")
    lead = query.shape[:-3] if query.ndim > 3 else query.shape[:-2]
    if key.shape[:len(lead)] != lead or value.shape[:len(lead)] != lead:
        raise ValueError(f"{fn}: batch dimensions differ: query {tuple(query.shape)}, key {tuple(key.shape)}, "
                         f"value {tuple(value.shape)}")
    scale = _check_scale(fn, scale, query.shape[-1])
    if is_causal and attn_mask is not None:
        raise ValueError(f"{fn}: pass either attn_mask or is_causal=True, not both")
    H, Hk, Hv = ((t.shape[-3] if t.ndim > 3 else 1) for t in (query, key, value))
    if Hk != H and not enable_gqa:
        raise ValueError(f"{fn}: query has {H} heads but key has {Hk}; pass enable_gqa=True for grouped-query "
                         "attention")
    _check_heads(fn, H, Hk, Hv)
    return dropout_p, scale


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False, *, return_lse=False, backend=None):
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention``.

    query (N, ..., Hq, L, E), key/value (N, ..., H, S, E) (or 3-D (N, L, E)); ``attn_mask``
    bool (True = take part) or additive in query's dtype, broadcastable to (N, ..., Hq, L, S);
    ``is_causal``: top-left aligned lower triangle (not combined with attn_mask); ``scale``
    defaults to 1/sqrt(E); ``enable_gqa``: Hq a multiple of H. A query row with no allowed key
    gives 0, as torch does. genfast extras: ``return_lse=True`` returns (out, lse) with lse
    (N, ..., Hq, L) fp32 (-inf for such rows); ``backend`` picks the implementation.
    Differentiable with respect to query, key and value (not the mask).
    """
    fn = "scaled_dot_product_attention"
    signature = _sdpa_signature(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, backend)
    # (signature first: under torch.compile it is None and _VALIDATED, a dict, is not touched;
    # Dynamo would guard on its length and recompile when it grows.)
    if signature is not None and signature in _VALIDATED and not dropout_p and query.ndim == 4 \
            and query.stride(-1) == key.stride(-1) == value.stride(-1) == 1 \
            and not (torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)):
        # The usual repeated call (a model's layers, a decode loop): no conversions, no autograd.
        problem = (SCALE_FROM_HEAD_DIM if scale is None else float(scale), -1, 0 if is_causal else -1, False, 0.0)
        result = FORWARD.call_prepared(signature, lambda: _prepare_forward(query, key, problem, backend, False),
                                       query, key, value)
        if result is not None:
            return result if return_lse else result[0]
    if signature is not None and signature in _VALIDATED:  # checked before: only the conversions
        dropout_p = float(dropout_p)
        scale = SCALE_FROM_HEAD_DIM if scale is None else float(scale)
    else:
        dropout_p, scale = _check_sdpa(fn, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                                       backend)
        if signature is not None:
            _VALIDATED.add(signature)
    # (N, ..., H, L, E) -> (B, H, L, E) views (3-D inputs get one head).
    if query.ndim == 4:
        q4, k4, v4 = query, key, value
    elif query.ndim == 3:
        q4, k4, v4 = query.unsqueeze(-3), key.unsqueeze(-3), value.unsqueeze(-3)
    else:
        q4, k4, v4 = (t.reshape(-1, *t.shape[-3:]) for t in (query, key, value))
    q4, k4, v4 = (t if t.stride(-1) == 1 else t.contiguous() for t in (q4, k4, v4))
    if signature is not None and dropout_p == 0:
        problem = (scale, -1, 0 if is_causal else -1, False, 0.0)
        if _eager_allowed(q4, k4, v4):
            out, lse = _eager_forward(signature, q4, k4, v4, problem, backend)
        else:
            out, lse = _PreparedAttention.apply(q4, k4, v4, signature, problem, backend, False, False)
        if query.ndim != 4:
            out, lse = out.reshape(query.shape), lse.reshape(query.shape[:-1])
        return (out, lse) if return_lse else out
    bias = None
    if attn_mask is not None:
        full = tuple(query.shape[:-1]) + (k4.shape[2],)
        bias = _sdpa_mask_to_bias(fn, attn_mask, query, full)
        bias = bias.unsqueeze(-3) if query.ndim == 3 else bias.reshape(-1, *bias.shape[-3:])
    out, lse, _ = _attention(q4, k4, v4, bias=bias, scale=scale, window_left=-1, window_right=0 if is_causal else -1,
                             align_bottom_right=False, dropout_p=dropout_p, backend=backend)
    if query.ndim != 4:  # 4-D: already query's shape
        out, lse = out.reshape(query.shape), lse.reshape(query.shape[:-1])
    return (out, lse) if return_lse else out


# ----------------------------------------------------------------------------- flash-attn API


def _flash_qkv(fn: str, q, k, v, ndim: int):
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(fn, name, t, ndim=ndim)
    _check_qkv(fn, q, k, v)


def _flash_result(out, lse, keep, return_attn_probs: bool, dropout_p: float):
    if not return_attn_probs:
        return out
    return out, lse, (keep if dropout_p > 0 else None)


def _plain_flash_options(softmax_scale, causal, window_size, softcap) -> bool:
    """The flash-attn options are exact Python scalars and a pair of ints, fit for a signature."""
    if type(causal) is not bool or type(window_size) is not tuple or len(window_size) != 2:
        return False
    if type(window_size[0]) is not int or type(window_size[1]) is not int or type(softcap) not in (float, int):
        return False
    return softmax_scale is None or type(softmax_scale) in (float, int)


def _flash_signature(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                     return_attn_probs, backend):
    """Everything ``_check_flash`` looks at, as a hashable key (see _sdpa_signature); None
    where a call is not cached (ALiBi, non-Python scalars, tracing)."""
    if alibi_slopes is not None or not _plain_flash_options(softmax_scale, causal, window_size, softcap):
        return None
    if type(dropout_p) not in (float, int):
        return None
    if not direct_call_allowed(q, k, v):
        return None
    return ("flash", q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, q.device, k.device, v.device, dropout_p,
            softmax_scale, causal, window_size, softcap, bool(deterministic), bool(return_attn_probs), backend)


def _check_flash(fn, q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, backend) -> tuple:
    """Every check of ``flash_attn_func``; returns (dropout_p, scale, left, right, softcap, alibi)."""
    _flash_qkv(fn, q, k, v, 4)
    _check_backend(fn, backend)
    B, Sq, H, D = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"{fn}: batch sizes differ: q {B}, k {k.shape[0]}, v {v.shape[0]}")
    if v.shape[1] != k.shape[1]:
        raise ValueError(f"{fn}: k has {k.shape[1]} positions but v has {v.shape[1]}")
    _check_heads(fn, H, k.shape[2], v.shape[2])
    dropout_p = _check_dropout(fn, dropout_p)
    scale = _check_scale(fn, softmax_scale, D)
    left, right = _flash_window(fn, causal, window_size)
    softcap = _check_softcap(fn, softcap)
    alibi = _check_alibi(fn, alibi_slopes, B, H, q.device)
    return dropout_p, scale, left, right, softcap, alibi


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False, backend=None):
    """Drop-in for flash-attn 2's ``flash_attn_func``.

    q (B, Sq, H, D), k/v (B, Sk, Hk, D) with H a multiple of Hk (GQA/MQA). ``causal`` is aligned
    to the bottom-right corner (query i sees keys j <= i + Sk - Sq); ``window_size=(left, right)``
    (-1 = unbounded); ``softcap``: scores become softcap * tanh(scores / softcap); ``alibi_slopes``
    fp32 (H,) or (B, H): scores -= slope * |i + Sk - Sq - j|. Returns out (B, Sq, H, D); with
    ``return_attn_probs=True``, (out, softmax_lse (B, H, Sq) fp32, keep mask (B, H, Sq, Sk) bool
    when dropout_p > 0 else None). ``deterministic=True``: bitwise reproducible backward.
    """
    fn = "flash_attn_func"
    signature = _flash_signature(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                                 deterministic, return_attn_probs, backend)
    if signature is not None and signature in _VALIDATED:  # checked before: only the conversions
        dropout_p, softcap = float(dropout_p), float(softcap)
        scale = SCALE_FROM_HEAD_DIM if softmax_scale is None else float(softmax_scale)
        left, right = window_size[0], 0 if causal else window_size[1]
        alibi = None
    else:
        dropout_p, scale, left, right, softcap, alibi = _check_flash(fn, q, k, v, dropout_p, softmax_scale, causal,
                                                                     window_size, softcap, alibi_slopes, backend)
        if signature is not None:
            _VALIDATED.add(signature)
    qt, kt, vt = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if signature is not None and dropout_p == 0:
        problem = (scale, left, right, True, softcap)
        if _eager_allowed(qt, kt, vt):
            out, lse = _eager_forward(signature, qt, kt, vt, problem, backend, seq_first=True)
        else:
            out, lse = _PreparedAttention.apply(qt, kt, vt, signature, problem, backend, True, bool(deterministic))
        return _flash_result(out, lse, None, return_attn_probs, dropout_p)
    out, lse, keep = _attention(qt.transpose(1, 2), kt.transpose(1, 2), vt.transpose(1, 2), alibi_slopes=alibi,
                                scale=scale, window_left=left, window_right=right, align_bottom_right=True,
                                softcap=softcap, dropout_p=dropout_p,
                                return_dropout_mask=return_attn_probs and dropout_p > 0,
                                deterministic=bool(deterministic), backend=backend)
    return _flash_result(out.transpose(1, 2).contiguous(), lse, keep, return_attn_probs, dropout_p)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, backend=None):
    """Drop-in for flash-attn 2's ``flash_attn_varlen_func``: q (total_q, H, D), k/v
    (total_k, Hk, D), sequences delimited by int32 ``cu_seqlens_q``/``cu_seqlens_k``
    (nseq + 1, starting at 0, non-decreasing; empty sequences allowed); ``max_seqlen_*`` at least
    the longest sequence. Masking as ``flash_attn_func`` per sequence (causal bottom-right).
    Returns out (total_q, H, D); with ``return_attn_probs``, (out, lse (H, total_q), keep mask or None).
    The cu_seqlens values are checked on the host (one device sync on GPUs) unless compiling or
    capturing a CUDA graph.
    """
    fn = "flash_attn_varlen_func"
    _flash_qkv(fn, q, k, v, 3)
    _check_backend(fn, backend)
    total_q, H, D = q.shape
    if v.shape[0] != k.shape[0]:
        raise ValueError(f"{fn}: k has {k.shape[0]} tokens but v has {v.shape[0]}")
    _check_heads(fn, H, k.shape[1], v.shape[1])
    check_values = not _compiling()
    _check_cu_seqlens(fn, "cu_seqlens_q", cu_seqlens_q, total_q, max_seqlen_q, "max_seqlen_q", q.device, check_values)
    _check_cu_seqlens(fn, "cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k, "max_seqlen_k", q.device,
                      check_values)
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"{fn}: cu_seqlens_q has {cu_seqlens_q.numel()} entries but cu_seqlens_k has "
                         f"{cu_seqlens_k.numel()}; both are (number of sequences + 1)")
    dropout_p = _check_dropout(fn, dropout_p)
    scale = _check_scale(fn, softmax_scale, D)
    left, right = _flash_window(fn, causal, window_size)
    softcap = _check_softcap(fn, softcap)
    alibi = _check_alibi(fn, alibi_slopes, cu_seqlens_q.numel() - 1, H, q.device, varlen=True)
    qt, kt, vt = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    q4, k4, v4 = (t.unsqueeze(0).transpose(1, 2) for t in (qt, kt, vt))
    out, lse, keep = _attention(q4, k4, v4, alibi_slopes=alibi, cu_seqlens_q=cu_seqlens_q.contiguous(),
                                cu_seqlens_k=cu_seqlens_k.contiguous(), max_seqlen_q=max_seqlen_q,
                                max_seqlen_k=max_seqlen_k, scale=scale, window_left=left, window_right=right,
                                align_bottom_right=True, softcap=softcap, dropout_p=dropout_p,
                                return_dropout_mask=return_attn_probs and dropout_p > 0,
                                deterministic=bool(deterministic), backend=backend)
    out = out[0].transpose(0, 1).contiguous()
    return _flash_result(out, lse[0], keep, return_attn_probs, dropout_p)


def _kvcache_signature(q, k_cache, v_cache, k, v, cache_seqlens, softmax_scale, causal, window_size, softcap,
                       num_splits, alibi_slopes, backend, extras=()):
    """Everything ``_check_kvcache`` looks at, as a hashable key (see _sdpa_signature); None
    where a call is not cached. Tensors (cache_seqlens, and the rotary / cache-index tensors in
    ``extras``) enter by their metadata: their values are checked on every call."""
    if alibi_slopes is not None or not _plain_flash_options(softmax_scale, causal, window_size, softcap):
        return None
    if type(num_splits) is not int:
        return None
    seqlens = cache_seqlens
    if isinstance(cache_seqlens, torch.Tensor):
        seqlens = (cache_seqlens.shape, cache_seqlens.dtype, cache_seqlens.device)
    elif cache_seqlens is not None and type(cache_seqlens) is not int:
        return None
    extra_tensors = [t for t in extras if isinstance(t, torch.Tensor)] if extras else ()
    if not direct_call_allowed(q, k_cache, v_cache, k, v, cache_seqlens if isinstance(cache_seqlens, torch.Tensor)
                               else None, *extra_tensors):
        return None
    new = None if k is None or v is None else (k.shape, v.shape, k.dtype, v.dtype, k.device, v.device)
    described = tuple((t.shape, t.dtype, t.device) if isinstance(t, torch.Tensor) else t for t in extras) \
        if extras else ()
    return ("kvcache", q.shape, k_cache.shape, v_cache.shape, q.dtype, k_cache.dtype, v_cache.dtype, q.device,
            k_cache.device, v_cache.device, new, k is None, v is None, seqlens, softmax_scale, causal, window_size,
            softcap, num_splits, backend, described)


# Page sizes of a paged cache: multiples of this (FlashInfer and vLLM use 16; flash-attn 2 needs 256).
PAGE_SIZE_MULTIPLE = 16


def _check_index_tensor(fn: str, name: str, t, shape: tuple, device):
    _check_tensor(fn, name, t, ndim=len(shape))
    if t.dtype != torch.int32:
        raise TypeError(f"{fn}: {name} must be int32, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{fn}: {name} is on {t.device} but q is on {device}")
    if any(want is not None and got != want for got, want in zip(t.shape, shape)):
        wanted = ", ".join("n" if want is None else str(want) for want in shape)
        raise ValueError(f"{fn}: {name} must have shape ({wanted}), got {tuple(t.shape)}")


def _check_cache_layout(fn, q, k_cache, cache_batch_idx, cache_leftpad, block_table) -> int:
    """The cache's layout checks (flash-attn 2.6 semantics); returns the positions a row holds."""
    B = q.shape[0]
    if block_table is not None:
        if cache_batch_idx is not None:
            raise ValueError(f"{fn}: a paged cache (block_table) takes no cache_batch_idx: the table already maps "
                             "each batch row to its blocks")
        _check_index_tensor(fn, "block_table", block_table, (B, None), q.device)
        page = k_cache.shape[1]
        if page == 0 or page % PAGE_SIZE_MULTIPLE != 0:
            raise ValueError(f"{fn}: with a block_table, k_cache is (num_blocks, page_size, Hk, D) with page_size a "
                             f"multiple of {PAGE_SIZE_MULTIPLE}, got k_cache {tuple(k_cache.shape)}")
        return block_table.shape[1] * page
    if cache_batch_idx is not None:
        _check_index_tensor(fn, "cache_batch_idx", cache_batch_idx, (B,), q.device)
        if k_cache.shape[0] < 1:
            raise ValueError(f"{fn}: cache_batch_idx needs a cache with at least one row, got k_cache "
                             f"{tuple(k_cache.shape)}")
    elif k_cache.shape[0] != B:
        raise ValueError(f"{fn}: k_cache has batch {k_cache.shape[0]} but q has {B} (pass cache_batch_idx to "
                         "read other rows)")
    if cache_leftpad is not None:
        _check_index_tensor(fn, "cache_leftpad", cache_leftpad, (B,), q.device)
    return k_cache.shape[1]


def _check_rotary(fn, q, k, rotary_cos, rotary_sin, capacity: int):
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError(f"{fn}: pass both rotary_cos and rotary_sin, or neither")
    if rotary_cos is None:
        return
    if k is None:
        raise ValueError(f"{fn}: rotary_cos/rotary_sin rotate q and the new k: they need k and v")
    for name, t in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
        _check_tensor(fn, name, t, ndim=2)
        if not t.is_floating_point() or t.device != q.device:
            raise TypeError(f"{fn}: {name} must be a floating tensor on {q.device}, got {t.dtype} on {t.device}")
    if rotary_sin.shape != rotary_cos.shape:
        raise ValueError(f"{fn}: rotary_cos {tuple(rotary_cos.shape)} and rotary_sin {tuple(rotary_sin.shape)} "
                         "must have one shape")
    seqlen_ro, half = rotary_cos.shape
    if not 0 < 2 * half <= q.shape[-1]:
        raise ValueError(f"{fn}: rotary_cos is (seqlen_ro, rotary_dim / 2) with 0 < rotary_dim <= head dim "
                         f"{q.shape[-1]}, got {tuple(rotary_cos.shape)}")
    if seqlen_ro < capacity:
        raise ValueError(f"{fn}: rotary_cos/rotary_sin have {seqlen_ro} positions but the cache holds {capacity}")


def _check_kvcache(fn, q, k_cache, v_cache, k, v, cache_seqlens, softmax_scale, causal, window_size, softcap,
                   num_splits, alibi_slopes, backend, rotary_cos=None, rotary_sin=None, cache_batch_idx=None,
                   cache_leftpad=None, block_table=None) -> tuple:
    """Every check of ``flash_attn_with_kvcache`` but the values of its index tensors; returns
    (scale, left, right, softcap, alibi, capacity)."""
    _flash_qkv(fn, q, k_cache, v_cache, 4)
    _check_backend(fn, backend)
    B, Sq, H, D = q.shape
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"{fn}: k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} must have one shape")
    S_max = _check_cache_layout(fn, q, k_cache, cache_batch_idx, cache_leftpad, block_table)
    Hk = k_cache.shape[2]
    _check_heads(fn, H, Hk, v_cache.shape[2])
    if (k is None) != (v is None):
        raise ValueError(f"{fn}: pass both k and v to append to the cache, or neither")
    if k is not None:
        for name, t in (("k", k), ("v", v)):
            _check_tensor(fn, name, t, ndim=4)
            if t.dtype != q.dtype or t.device != q.device:
                raise TypeError(f"{fn}: {name} must have q's dtype and device ({q.dtype}, {q.device}), got "
                                f"{t.dtype} on {t.device}")
            if tuple(t.shape[:1]) + tuple(t.shape[2:]) != (B, Hk, D):
                raise ValueError(f"{fn}: {name} must have shape ({B}, S_new, {Hk}, {D}), got {tuple(t.shape)}")
        if v.shape[1] != k.shape[1]:
            raise ValueError(f"{fn}: k has {k.shape[1]} new tokens but v has {v.shape[1]}")
    if cache_seqlens is None:
        if k is not None:
            raise ValueError(f"{fn}: cache_seqlens is required when appending k/v (where do they go?)")
    elif is_int(cache_seqlens):
        if not 0 <= cache_seqlens <= S_max:
            raise ValueError(f"{fn}: cache_seqlens = {cache_seqlens} must be in [0, {S_max}]")
    else:
        _check_tensor(fn, "cache_seqlens", cache_seqlens, ndim=1)
        if cache_seqlens.dtype != torch.int32:
            raise TypeError(f"{fn}: cache_seqlens must be int32, got {cache_seqlens.dtype}")
        if cache_seqlens.device != q.device:
            raise ValueError(f"{fn}: cache_seqlens is on {cache_seqlens.device} but q is on {q.device}")
        if cache_seqlens.shape[0] != B:
            raise ValueError(f"{fn}: cache_seqlens must have {B} entries (one per batch row), "
                             f"got {cache_seqlens.shape[0]}")
    _check_rotary(fn, q, k, rotary_cos, rotary_sin, S_max)
    scale = _check_scale(fn, softmax_scale, D)
    left, right = _flash_window(fn, causal, window_size)
    softcap = _check_softcap(fn, softcap)
    if not is_int(num_splits) or num_splits < 0:
        raise ValueError(f"{fn}: num_splits must be an int >= 0 (0 = heuristic), got {num_splits!r}")
    alibi = _check_alibi(fn, alibi_slopes, B, H, q.device)
    return scale, left, right, softcap, alibi, S_max


def _check_cache_values(fn, lengths, S_new: int, capacity: int, k_cache, cache_batch_idx, cache_leftpad,
                        block_table):
    """The index tensors' values (eager calls only; torch.compile and CUDA graphs skip this, as
    flash-attn checks nothing): every position a row writes or reads exists. CPU tensors: one C++
    call; others: one host read, the messages worked out only when something is wrong."""
    # DTensor index tensors (tensor-parallel serving): their full values (k_cache gives shapes only).
    cache_batch_idx, cache_leftpad, block_table = (t.full_tensor() if hasattr(t, "full_tensor") else t
                                                   for t in (cache_batch_idx, cache_leftpad, block_table))
    native = getattr(_ext._C, "attention_check_cache_index_cpu", None)
    if native is not None and lengths.device.type == "cpu" and type(k_cache) is torch.Tensor:
        native(k_cache, cache_seqlens=_dense(lengths), new_tokens=S_new, cache_leftpad=_dense(cache_leftpad),
               cache_batch_idx=_dense(cache_batch_idx), block_table=_cpu_ready(block_table))
        return
    lengths = lengths.to(torch.int64)
    flags = [(lengths < 0).any(), (lengths + S_new > capacity).any()]
    if cache_leftpad is not None:
        flags.append(((cache_leftpad < 0) | (cache_leftpad > lengths)).any())
    if cache_batch_idx is not None:
        flags.append(((cache_batch_idx < 0) | (cache_batch_idx >= k_cache.shape[0])).any())
    if block_table is not None and block_table.numel() > 0:
        flags.append(_bad_blocks(lengths, S_new, k_cache, cache_leftpad, block_table).any())
    if not any(torch.stack(flags).tolist()):  # the one host read
        return
    _raise_cache_value_error(fn, lengths.cpu(), S_new, capacity, k_cache, cache_batch_idx, cache_leftpad, block_table)


def _bad_blocks(lengths, S_new, k_cache, cache_leftpad, block_table):
    """(B, max_blocks) bool: the table entries a row uses (pages of [cache_leftpad, lengths + S_new))
    that are not blocks of the pool."""
    page = k_cache.shape[1]
    first = torch.zeros_like(lengths) if cache_leftpad is None else cache_leftpad.to(torch.int64) // page
    used = (lengths + S_new + page - 1) // page
    col = torch.arange(block_table.shape[1], device=block_table.device)[None, :]
    return (col >= first[:, None]) & (col < used[:, None]) & ((block_table < 0) | (block_table >= k_cache.shape[0]))


def _raise_cache_value_error(fn, lengths, S_new, capacity, k_cache, cache_batch_idx, cache_leftpad, block_table):
    values = lengths.tolist()
    for b, n in enumerate(values):
        if n < 0:
            raise ValueError(f"{fn}: cache_seqlens[{b}] = {n} must be >= 0")
        if n + S_new > capacity:
            where = "the block_table's pages hold" if block_table is not None else "the cache holds"
            raise ValueError(f"{fn}: {where} {capacity} positions per row but cache_seqlens[{b}] = {n} + {S_new} new "
                             f"tokens needs {n + S_new}; the cache is too small")
    if cache_leftpad is not None:
        for b, start in enumerate(cache_leftpad.tolist()):
            if not 0 <= start <= values[b]:
                raise ValueError(f"{fn}: cache_leftpad[{b}] = {start} must be in [0, cache_seqlens[{b}] = {values[b]}]")
    if cache_batch_idx is not None:
        for b, row in enumerate(cache_batch_idx.tolist()):
            if not 0 <= row < k_cache.shape[0]:
                raise ValueError(f"{fn}: cache_batch_idx[{b}] = {row} is not a row of the {k_cache.shape[0]}-row cache")
    bad = _bad_blocks(lengths.to(block_table.device), S_new, k_cache, cache_leftpad, block_table).nonzero()[0].tolist()
    b, i = bad
    raise ValueError(f"{fn}: block_table[{b}, {i}] = {int(block_table[b, i])} is not a block of the "
                     f"{k_cache.shape[0]}-block cache")


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None, cache_seqlens=None,
                            cache_batch_idx=None, cache_leftpad=None, block_table=None, softmax_scale=None,
                            causal=False, window_size=(-1, -1), softcap=0.0, rotary_interleaved=True,
                            alibi_slopes=None, num_splits=0, return_softmax_lse=False, *, backend=None):
    """Drop-in for flash-attn 2.6's ``flash_attn_with_kvcache`` (inference; no gradients; same
    argument order, ``backend`` keyword-only).

    q (B, Sq, H, D); k_cache/v_cache (B_cache, S_max, Hk, D), or with ``block_table`` a paged
    cache (num_blocks, page_size, Hk, D), page_size a multiple of 16, where position p of batch
    row b lives in block block_table[b, p // page_size] (int32 (B, max_blocks)) at row
    p % page_size. Optional new k/v (B, S_new, Hk, D) are written into the caches IN PLACE at
    positions cache_seqlens[b] .. + S_new; then row b attends to its keys at positions
    [cache_leftpad[b] (or 0), cache_seqlens[b] + S_new), queries being the last Sq positions
    (causal/window are bottom-right aligned; positions are absolute, a left pad moves nothing).
    ``cache_seqlens``: int or int32 (B,) tensor (None: the whole cache). ``cache_batch_idx``
    (int32 (B,)): row b uses cache row cache_batch_idx[b]. ``rotary_cos``/``rotary_sin``
    (seqlen_ro, rotary_dim / 2), seqlen_ro >= the cache's positions: rotary embedding of the new
    k at positions cache_seqlens[b] + t and of q at cache_seqlens[b] + i when causal or local,
    else at cache_seqlens[b] (``rotary_interleaved``: GPT-J pairs (2d, 2d+1); False: GPT-NeoX
    halves). ``num_splits``: 0 = heuristic, n > 1 = split each row's keys into n chunks
    (flash-decoding). Returns out (B, Sq, H, D), and softmax_lse (B, H, Sq) if
    ``return_softmax_lse``.
    Eager calls check every index value first (one host read); compiled calls and CUDA-graph
    captures check shapes only and launch no host synchronisation.
    """
    fn = "flash_attn_with_kvcache"
    extended = not (rotary_cos is None and rotary_sin is None and cache_batch_idx is None and cache_leftpad is None
                    and block_table is None)
    extras = (rotary_cos, rotary_sin, rotary_interleaved, cache_batch_idx, cache_leftpad, block_table) if extended \
        else ()
    if extended and type(rotary_interleaved) is not bool:
        extras = None
    signature = None if extras is None else _kvcache_signature(
        q, k_cache, v_cache, k, v, cache_seqlens, softmax_scale, causal, window_size, softcap, num_splits,
        alibi_slopes, backend, extras)
    if signature is not None and signature in _VALIDATED:  # checked before: only the conversions
        softcap = float(softcap)
        scale = SCALE_FROM_HEAD_DIM if softmax_scale is None else float(softmax_scale)
        left, right = window_size[0], 0 if causal else window_size[1]
        alibi = None
        S_max = k_cache.shape[1] if block_table is None else block_table.shape[1] * k_cache.shape[1]
    else:
        scale, left, right, softcap, alibi, S_max = _check_kvcache(
            fn, q, k_cache, v_cache, k, v, cache_seqlens, softmax_scale, causal, window_size, softcap, num_splits,
            alibi_slopes, backend, rotary_cos, rotary_sin, cache_batch_idx, cache_leftpad, block_table)
        if signature is not None:
            _VALIDATED.add(signature)
    B = q.shape[0]
    S_new = 0 if k is None else k.shape[1]
    index = (cache_leftpad, cache_batch_idx, block_table) if extended else ()
    if signature is not None and S_new > 0 and rotary_cos is None and q.device.type == "cpu" \
            and q.stride(-1) == k_cache.stride(-1) == v_cache.stride(-1) == k.stride(-1) == v.stride(-1) == 1:
        # A CPU decode step: the checks of the index values, the append and the attention in one call.
        lengths = cache_seqlens if isinstance(cache_seqlens, torch.Tensor) else \
            _constant_seqlens(B, int(cache_seqlens), q.device)
        result = _eager_decode_append(signature, q, k_cache, v_cache, k, v, lengths, (scale, left, right, softcap),
                                      int(num_splits), backend, index, S_max)
        if result is not None:
            return result if return_softmax_lse else result[0]
    # An int cache_seqlens was checked above; a tensor's values (and the index tensors') are read here.
    read_values = extended or isinstance(cache_seqlens, torch.Tensor)
    if cache_seqlens is None:
        cache_seqlens = torch.full((B,), S_max, dtype=torch.int32, device=q.device)
    elif is_int(cache_seqlens):  # its value was checked in Python
        if signature is not None and S_new == 0:
            cache_seqlens = _constant_seqlens(B, int(cache_seqlens), q.device)
        else:
            cache_seqlens = torch.full((B,), int(cache_seqlens), dtype=torch.int32, device=q.device)
    if read_values and not _compiling():  # the values decide where the new k/v go and how far rows read
        lengths = cache_seqlens.full_tensor() if hasattr(cache_seqlens, "full_tensor") else cache_seqlens  # DTensor
        _check_cache_values(fn, lengths, S_new, S_max, k_cache, cache_batch_idx, cache_leftpad, block_table)
    if rotary_cos is not None:  # rotates q and the new k, appends k and v
        local = causal or tuple(window_size) != (-1, -1)
        q = attention_rotary_append(q, k_cache, v_cache, k, v, cache_seqlens, rotary_cos, rotary_sin,
                                    bool(rotary_interleaved), not local, cache_batch_idx, block_table)
        seqlens = cache_seqlens + S_new
    elif k is not None and S_new > 0:
        if extended:
            attention_kvcache_append(k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, block_table)
        else:
            attention_kvcache_append(k_cache, v_cache, k, v, cache_seqlens)
        seqlens = cache_seqlens + S_new
    else:
        seqlens = cache_seqlens
    qt = q if q.stride(-1) == 1 else q.contiguous()
    kc = k_cache if k_cache.stride(-1) == 1 else k_cache.contiguous()
    vc = v_cache if v_cache.stride(-1) == 1 else v_cache.contiguous()
    if signature is not None:
        out, lse = _eager_decode(signature, qt, kc, vc, seqlens, (scale, left, right, softcap), int(num_splits),
                                 backend, index, S_max)
        return (out, lse) if return_softmax_lse else out
    index = ()
    if cache_leftpad is not None or cache_batch_idx is not None or block_table is not None:
        index = (cache_leftpad, cache_batch_idx, block_table)
    out, lse = attention_decode(qt.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2), seqlens, alibi, scale,
                                left, right, softcap, int(num_splits), backend or "", *index)
    out = out.transpose(1, 2).contiguous()
    return (out, lse) if return_softmax_lse else out


def selected_backend(q: torch.Tensor, backend: Optional[str] = None) -> str:
    """The backend the attention ops would run on for ``q`` (diagnostics, benchmarks)."""
    return FORWARD.select(backend, q.device, q.dtype)


from . import attention_dtensor  # noqa: E402,F401  DTensor sharding strategies (registered when DTensor is imported)
