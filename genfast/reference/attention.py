"""Plain-PyTorch reference of genfast's fused attention: the specification of the internal
kernel contract (forward / backward / decode) that every backend implements.

Layout: q (B, H, Sq, D); k, v (B, Hk, Sk, D), H % Hk == 0 (query head h uses key head
h // (H // Hk)). Varlen: B == 1, sequences delimited by int32 cu_seqlens_q / cu_seqlens_k.

Scores, for one sequence with Sq queries and Sk keys, off = Sk - Sq if align_bottom_right else 0:
    s = scale * q.k                          (fp32 math; fp64 for fp64 inputs)
    s = softcap * tanh(s / softcap)          if softcap > 0
    s += -slope[b, h] * |i + off - j|        if alibi_slopes is given ((H,) or (B, H) fp32)
    s += bias[b, h, i, j]                    if bias is given (additive, may hold -inf)
    s = -inf where the window forbids (i, j): allowed iff
        (window_left < 0 or j >= i + off - window_left) and (window_right < 0 or j <= i + off + window_right)
    lse = logsumexp_j s  (-inf for a row with no allowed key),  p = exp(s - lse)  (0 for such rows)
    out = (p * keep / (1 - dropout_p)) @ v
The dropout keep mask is a pure function of (seed, b, h, i, j): ``dropout_keep_mask`` (a 32-bit
integer hash; the cpu backend computes the same bits). Varlen sequences use b = the sequence
index and i, j = positions inside the sequence.

This module materialises the score matrix: it is the spec and the test oracle, not fast.
"""
from __future__ import annotations

import math

import torch

__all__ = ["forward", "backward", "decode", "cache_rows", "rotary_embedding", "dropout_keep_mask", "dropout_threshold",
           "attention_dense"]

_MASK32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 (Chris Wellons' integer hash) on int64 tensors holding uint32 values.
    Products can pass 2^63; int64 multiplication wraps modulo 2^64, so the low 32 bits are exact."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def _mix32_int(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def dropout_threshold(dropout_p: float) -> int:
    """Keep iff (hash >> 8) >= threshold: keep probability 1 - p at 24-bit resolution."""
    return int(math.ceil(dropout_p * (1 << 24)))


def dropout_keep_mask(seed: int, b: int, num_heads: int, Sq: int, Sk: int, dropout_p: float,
                      device=None, head_offset: int = 0) -> torch.Tensor:
    """bool (num_heads, Sq, Sk) keep mask of batch row (or varlen sequence) ``b``.

    hash = mix(mix(mix(mix(mix(seed_lo ^ 0x9E3779B9) ^ seed_hi) ^ (b * H + h)) ^ i) ^ j);
    keep iff (hash >> 8) >= ceil(p * 2^24). ``num_heads`` is the number of query heads H."""
    seed &= (1 << 64) - 1
    state = _mix32_int(_mix32_int((seed & _MASK32) ^ 0x9E3779B9) ^ (seed >> 32))
    h = torch.arange(num_heads, device=device, dtype=torch.int64) + head_offset
    x = _mix32((h + b * num_heads) & _MASK32 ^ state)  # (H,)
    i = torch.arange(Sq, device=device, dtype=torch.int64)
    x = _mix32(x[:, None] ^ i[None, :])  # (H, Sq)
    j = torch.arange(Sk, device=device, dtype=torch.int64)
    x = _mix32(x[:, :, None] ^ j[None, None, :])  # (H, Sq, Sk)
    return (x >> 8) >= dropout_threshold(dropout_p)


def _allowed(Sq: int, Sk: int, window_left: int, window_right: int, align_bottom_right: bool, device) -> torch.Tensor:
    off = Sk - Sq if align_bottom_right else 0
    i = torch.arange(Sq, device=device)[:, None] + off
    j = torch.arange(Sk, device=device)[None, :]
    ok = torch.ones(Sq, Sk, dtype=torch.bool, device=device)
    if window_left >= 0:
        ok &= j >= i - window_left
    if window_right >= 0:
        ok &= j <= i + window_right
    return ok


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 (the contract); fp64 for fp64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def attention_dense(q, k, v, *, scale, window_left=-1, window_right=-1, align_bottom_right=False, softcap=0.0,
                    alibi_slopes=None, bias=None, dropout_p=0.0, seed=0, keep_mask=None, batch_offset=0):
    """Differentiable dense attention in the compute dtype: returns (out, lse, keep_mask or None).

    q (B, H, Sq, D), k/v (B, Hk, Sk, D) already in the compute dtype. ``alibi_slopes`` (B, H)
    or (H,); ``bias`` broadcastable to (B, H, Sq, Sk). ``keep_mask`` overrides the hash-based
    dropout mask (tests use the mask a backend returned); ``batch_offset`` is the b of row 0
    in the dropout hash."""
    B, H, Sq, D = q.shape
    Hk, Sk = k.shape[1], k.shape[2]
    if Hk != H:
        k = k.repeat_interleave(H // Hk, dim=1)
        v = v.repeat_interleave(H // Hk, dim=1)
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    off = Sk - Sq if align_bottom_right else 0
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(s.dtype)
        slopes = slopes.reshape(1, H, 1, 1) if slopes.ndim == 1 else slopes.reshape(B, H, 1, 1)
        dist = (torch.arange(Sq, device=q.device)[:, None] + off - torch.arange(Sk, device=q.device)[None, :]).abs()
        s = s - slopes * dist.to(s.dtype)
    if bias is not None:
        s = s + bias.to(s.dtype)
    s = s.masked_fill(~_allowed(Sq, Sk, window_left, window_right, align_bottom_right, q.device), -math.inf)
    # Rows with no allowed key: logsumexp of all -inf has a NaN gradient, so those rows take
    # the logsumexp of zeros and are then set to -inf (their p is 0).
    finite = torch.isfinite(s).any(dim=-1)
    lse = torch.logsumexp(torch.where(finite[..., None], s, torch.zeros_like(s)), dim=-1)
    lse = torch.where(finite, lse, torch.full_like(lse, -math.inf))
    p = torch.exp(s - torch.where(finite, lse, torch.zeros_like(lse))[..., None])
    p = torch.where(finite[..., None], p, torch.zeros_like(p))
    if dropout_p > 0:
        if keep_mask is None:
            keep_mask = torch.stack([dropout_keep_mask(seed, batch_offset + b, H, Sq, Sk, dropout_p, q.device)
                                     for b in range(B)])
        p = p * keep_mask.to(p.dtype) / (1.0 - dropout_p)
    out = torch.matmul(p, v)
    return out, lse, keep_mask if dropout_p > 0 else None


def _sequences(q, k, cu_seqlens_q, cu_seqlens_k):
    """(b, q slice, k slice) per sequence; the whole batch as one item when not varlen."""
    if cu_seqlens_q is None:
        return None
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    return [(s, slice(cq[s], cq[s + 1]), slice(ck[s], ck[s + 1])) for s in range(len(cq) - 1)]


def _run(q, k, v, *, scale, window_left, window_right, align_bottom_right, softcap, alibi_slopes, bias, dropout_p,
         seed, cu_seqlens_q, cu_seqlens_k, keep_mask=None):
    """Forward in the compute dtype on differentiable inputs: (out, lse, keep) with out/lse
    of the full (varlen: concatenated) problem."""
    common = dict(scale=scale, window_left=window_left, window_right=window_right,
                  align_bottom_right=align_bottom_right, softcap=softcap, dropout_p=dropout_p, seed=seed)
    seqs = _sequences(q, k, cu_seqlens_q, cu_seqlens_k)
    if seqs is None:
        return attention_dense(q, k, v, alibi_slopes=alibi_slopes, bias=bias, keep_mask=keep_mask, **common)
    H, total_q, total_k = q.shape[1], q.shape[2], k.shape[2]
    outs, lses = [], []
    keep_full = None
    if dropout_p > 0:
        keep_full = torch.zeros(1, H, total_q, total_k, dtype=torch.bool, device=q.device)
    for s, qs, ks in seqs:
        slopes = None
        if alibi_slopes is not None:
            slopes = alibi_slopes if alibi_slopes.ndim == 1 else alibi_slopes[s:s + 1]
        given = keep_mask[:, :, qs, ks] if keep_mask is not None else None
        out, lse, keep = attention_dense(q[:, :, qs], k[:, :, ks], v[:, :, ks], alibi_slopes=slopes, bias=None,
                                         keep_mask=given, batch_offset=s, **common)
        outs.append(out)
        lses.append(lse)
        if keep is not None:
            keep_full[:, :, qs, ks] = keep
    out = torch.cat(outs, dim=2) if outs else q.new_zeros(q.shape)
    lse = torch.cat(lses, dim=2) if lses else q.new_zeros(q.shape[:3])
    return out, lse, keep_full


def forward(q, k, v, *, scale, window_left=-1, window_right=-1, align_bottom_right=False, softcap=0.0,
            alibi_slopes=None, bias=None, dropout_p=0.0, seed=0, cu_seqlens_q=None, cu_seqlens_k=None,
            max_seqlen_q=None, max_seqlen_k=None, return_dropout_mask=False, keep_mask=None):
    """Contract forward: (out in q's dtype, contiguous; lse fp32 (B, H, Sq)[, bool keep mask]).
    ``keep_mask`` (reference only) replaces the hash-based dropout mask."""
    cd = _compute_dtype(q.dtype)
    with torch.no_grad():
        out, lse, keep = _run(q.to(cd), k.to(cd), v.to(cd), scale=scale, window_left=window_left,
                              window_right=window_right, align_bottom_right=align_bottom_right, softcap=softcap,
                              alibi_slopes=alibi_slopes, bias=bias, dropout_p=dropout_p, seed=seed,
                              cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, keep_mask=keep_mask)
    result = (out.to(q.dtype).contiguous(), lse.to(_lse_dtype(q.dtype)).contiguous())
    if return_dropout_mask:
        if keep is None:
            keep = torch.ones(q.shape[0], q.shape[1], q.shape[2], k.shape[2], dtype=torch.bool, device=q.device)
        result = result + (keep,)
    return result


def backward(dout, q, k, v, out, lse, *, scale, window_left=-1, window_right=-1, align_bottom_right=False,
             softcap=0.0, alibi_slopes=None, bias=None, dropout_p=0.0, seed=0, cu_seqlens_q=None,
             cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None, deterministic=False, keep_mask=None,
             return_dropout_mask=False):
    """Contract backward: (dq, dk, dv) in the dtypes of q, k, v (autograd through the forward
    recomputed in the compute dtype; deterministic by construction)."""
    cd = _compute_dtype(q.dtype)
    with torch.enable_grad():
        qc, kc, vc = (t.detach().to(cd).requires_grad_() for t in (q, k, v))
        o, _, _ = _run(qc, kc, vc, scale=scale, window_left=window_left, window_right=window_right,
                       align_bottom_right=align_bottom_right, softcap=softcap, alibi_slopes=alibi_slopes,
                       bias=bias, dropout_p=dropout_p, seed=seed, cu_seqlens_q=cu_seqlens_q,
                       cu_seqlens_k=cu_seqlens_k, keep_mask=keep_mask)
        dq, dk, dv = torch.autograd.grad(o, (qc, kc, vc), dout.to(cd), allow_unused=True)
    dq = torch.zeros_like(qc) if dq is None else dq
    dk = torch.zeros_like(kc) if dk is None else dk
    dv = torch.zeros_like(vc) if dv is None else dv
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def rotary_embedding(x, cos, sin, positions, interleaved: bool):
    """flash-attn's rotary embedding of x (B, S, H, D) at integer positions (B, S): cos / sin
    (seqlen_ro, rotary_dim / 2) rows ``positions`` rotate the first rotary_dim dims, pairs
    (d, d + rotary_dim / 2) (GPT-NeoX, ``interleaved=False``) or (2d, 2d + 1) (GPT-J,
    ``interleaved=True``); the other dims pass through. Computed in fp32 (fp64 for fp64 x),
    returned in x's dtype."""
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32
    half = cos.shape[-1]
    c = cos.to(cd)[positions][:, :, None, :]  # (B, S, 1, rotary_dim / 2)
    s = sin.to(cd)[positions][:, :, None, :]
    xr = x[..., :2 * half].to(cd)
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        rotated = torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2)
    else:
        x1, x2 = xr[..., :half], xr[..., half:]
        rotated = torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1)
    return torch.cat([rotated.to(x.dtype), x[..., 2 * half:]], dim=-1)


def cache_rows(cache, b: int, end: int, cache_batch_idx=None, block_table=None):
    """(1, Hk, end, D): the first ``end`` key positions of batch row b in a decode cache of the
    contract layout: (B_cache, Hk, S_max, D), row cache_batch_idx[b] (or b); or paged,
    (num_blocks, Hk, page_size, D) with key j in block block_table[b, j // page_size]."""
    if block_table is not None:
        page = cache.shape[2]
        blocks = block_table[b, :-(-end // page)].long()
        return cache[blocks].transpose(0, 1).reshape(1, cache.shape[1], -1, cache.shape[3])[:, :, :end]
    row = b if cache_batch_idx is None else int(cache_batch_idx[b])
    return cache[row:row + 1, :, :end]


def decode(q, k_cache, v_cache, cache_seqlens, *, scale, window_left=-1, window_right=-1, softcap=0.0,
           alibi_slopes=None, num_splits=0, cache_leftpad=None, cache_batch_idx=None, block_table=None):
    """Contract decode: batch row b attends the keys at positions [cache_leftpad[b] (or 0),
    cache_seqlens[b]) of its cache row (``cache_rows``), its Sq queries being the last Sq
    positions before cache_seqlens[b] (bottom-right alignment; positions are absolute, so a
    left pad moves no diagonal). (out (B, H, Sq, D), lse fp32)."""
    cd = _compute_dtype(q.dtype)
    B, H, Sq, D = q.shape
    lengths = cache_seqlens.tolist()
    starts = [0] * B if cache_leftpad is None else cache_leftpad.tolist()
    outs, lses = [], []
    with torch.no_grad():
        for b in range(B):
            n, start = lengths[b], starts[b]
            slopes = None
            if alibi_slopes is not None:
                slopes = alibi_slopes if alibi_slopes.ndim == 1 else alibi_slopes[b:b + 1]
            k = cache_rows(k_cache, b, n, cache_batch_idx, block_table)[:, :, start:]
            v = cache_rows(v_cache, b, n, cache_batch_idx, block_table)[:, :, start:]
            out, lse, _ = attention_dense(q[b:b + 1].to(cd), k.to(cd), v.to(cd), scale=scale,
                                          window_left=window_left, window_right=window_right,
                                          align_bottom_right=True, softcap=softcap, alibi_slopes=slopes)
            outs.append(out)
            lses.append(lse)
    return torch.cat(outs).to(q.dtype).contiguous(), torch.cat(lses).to(_lse_dtype(q.dtype)).contiguous()
