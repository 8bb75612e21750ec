"""Fused attention in Triton: FlashAttention-2-style forward / backward and flash-decoding.

Implements the internal kernel contract (forward, backward, decode; see the attention
front end, genfast/ops/attention.py, and the reference genfast/reference/attention.py).

Design (after the Triton fused-attention tutorial, FlashAttention-2 and flash-decoding):
- Scores are kept in the log2 domain: log2(e) is folded into the scale so the online softmax
  uses exp2; accumulation is fp32; lse is stored in natural log (fp32).
- One program per (query block, batch x head); GQA maps query head h to key head h // group,
  k/v are never repeated. Any strides (stride(-1) == 1); head dims 16..256 (multiples of 8)
  are padded to a power-of-two BLOCK_D with masked loads.
- The key loop of a query block is split into three ranges: masked blocks before, unmasked
  full blocks, masked blocks after (boundary, diagonal, window edges). Blocks that are
  entirely outside a causal/local window are never visited.
- Offsets are 64-bit, the bias's too (a (1, 1, Sq, Sk) mask with Sq = Sk >= 46,341 has
  Sq x stride >= 2^31). Every launch grid is one axis x (limit 2^31 - 1): y and z stop at
  65,535, below batch x heads of large batches.
- Dropout is the counter-based hash of the reference (``dropout_keep_mask``: lowbias32 of
  (seed, b, h, i, j)), so every backend drops the same elements; the backward regenerates it.
- Backward: delta = rowsum(out * dout); a key-block-parallel kernel computes dk/dv, looping
  over the query heads of a GQA group inside the program (no atomics for dk/dv). dq either
  with fp32 atomics from that kernel (deterministic=False) or in its own query-block-parallel
  kernel (deterministic=True; bitwise reproducible).
- Hopper (sm_90+, half precision, 16-byte aligned tensors): extra forward configs read Q, K, V
  and write the output through tensor descriptors made in the kernel per (sequence, head)
  (TMA; rows past a sequence's end read as zeros, stores are clipped), some with the key loop
  warp-specialized (Triton 3.9 specializes only a 4-warp kernel with one loop and no early
  return, so those run one masked loop); the autotuner measures them beside the pointer-load
  configs. The backward reads its loop tiles (q, dO; k, v) through descriptors there. Older
  Triton (no tl.make_tensor_descriptor / warp_specialize), sm_80 and fp32 keep pointer loads.
- Decode: the key range is split over programs (partial out + lse in fp32 workspaces, then a
  combine kernel); the query heads of a kv head share one program; cache_seqlens is read on
  the device, the grid depends only on shapes (CUDA-graph capturable). Paged caches
  (block_table) are addressed per key column through the table, so a key tile may span pages of
  any size; cache_batch_idx picks a cache row, cache_leftpad raises a row's first key (constexpr
  flags: the plain cache compiles as without them).
"""
from __future__ import annotations

import inspect
import math
import os

import torch
import triton
import triton.language as tl

from .._dispatch import environment

_LOG2E = 1.4426950408889634
_MASK32 = 0xFFFFFFFF
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


# ---------------------------------------------------------------------------------------------
# Shared device helpers
# ---------------------------------------------------------------------------------------------
@triton.jit
def _tanh(z):
    """Cephes tanhf (no libdevice in the interpreter): odd polynomial near 0, exp form elsewhere."""
    a = tl.abs(z)
    z2 = z * z
    small = ((((-5.70498872745e-3 * z2 + 2.06390887954e-2) * z2 - 5.37397155531e-2) * z2
              + 1.33314422036e-1) * z2 - 3.33332819422e-1) * z2 * z + z
    large = 1.0 - 2.0 / (tl.exp(2.0 * a) + 1.0)
    return tl.where(a < 0.625, small, tl.where(z < 0, -large, large))


@triton.jit
def _mix32(x):
    """lowbias32 integer hash on uint32 (wrapping multiplies), as the reference's _mix32."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def _dropout_row_state(state, b, h, num_heads, rows):
    """Hash state after mixing (b, h) and the query positions ``rows`` (any shape)."""
    bh = ((b * num_heads + h) & 0xFFFFFFFF).to(tl.uint32)
    x = _mix32(bh ^ state.to(tl.uint32))
    return _mix32(x ^ rows.to(tl.uint32))


@triton.jit
def _dropout_keep(row_state, cols, threshold):
    """Keep iff (mix(row_state ^ j) >> 8) >= threshold (row_state and cols broadcast)."""
    x = _mix32(row_state ^ cols.to(tl.uint32))
    return (x >> 8).to(tl.int32) >= threshold


@triton.jit
def _scores_log2(qk, diag, slope2, bias, qk_scale2, softcap_scale, softcap2,
                 HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Scores in the log2 domain from the raw dot products ``qk``; ``diag`` = i + off - j.
    Returns (s2, t) where t = tanh(scale * qk / softcap) (for the backward; qk when unused)."""
    if HAS_SOFTCAP:
        t = _tanh(qk * softcap_scale)
        s2 = t * softcap2
    else:
        t = qk
        s2 = qk * qk_scale2
    if HAS_ALIBI:
        s2 = s2 - slope2 * tl.abs(diag).to(tl.float32)
    if HAS_BIAS:
        s2 = s2 + bias * 1.4426950408889634
    return s2, t


@triton.jit
def _allowed(i, j, diag, q_len, k_len, window_left, window_right, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr):
    """Contract mask for positions (i, j) (broadcast tensors), bounds included."""
    ok = (i < q_len) & (j < k_len)
    if HAS_WL:
        ok = ok & (diag <= window_left)  # j >= i + off - window_left
    if HAS_WR:
        ok = ok & (diag >= -window_right)  # j <= i + off + window_right
    return ok


@triton.jit
def _key_ranges(m_start, q_len, k_len, off, window_left, window_right,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr):
    """For query rows [m_start, m_start + BLOCK_M): key block ranges (lo, full_lo, full_hi, hi).
    [lo, full_lo) and [full_hi, hi) need the mask; [full_lo, full_hi) is fully allowed for
    every valid row. Keys outside [lo, hi) are masked for every row and never visited."""
    m_last = tl.minimum(m_start + BLOCK_M, q_len) - 1
    lo = m_start * 0
    hi = k_len
    full_lo = lo
    full_hi = k_len
    if HAS_WL:
        lo = tl.maximum(m_start + off - window_left, 0)
        lo = (lo // BLOCK_N) * BLOCK_N
        first_full = tl.maximum(m_last + off - window_left, 0)
        full_lo = ((first_full + BLOCK_N - 1) // BLOCK_N) * BLOCK_N
    if HAS_WR:
        hi = tl.minimum(tl.maximum(m_last + off + window_right + 1, 0), k_len)
        full_hi = tl.minimum(tl.maximum(m_start + off + window_right + 1, 0), k_len)
    full_hi = (full_hi // BLOCK_N) * BLOCK_N
    hi = tl.maximum(hi, lo)
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.maximum(tl.minimum(full_hi, hi), full_lo)
    return lo, full_lo, full_hi, hi


@triton.jit
def _query_ranges(n_start, q_len, k_len, off, window_left, window_right,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr):
    """For key columns [n_start, n_start + BLOCK_N): query block ranges (lo, full_lo, full_hi, hi)
    (the transpose of _key_ranges; full blocks also need every row and column in bounds)."""
    n_last = tl.minimum(n_start + BLOCK_N, k_len) - 1
    lo = n_start * 0
    hi = q_len
    full_lo = lo
    full_hi = q_len
    if HAS_WR:  # i >= j - off - window_right
        lo = tl.maximum(n_start - off - window_right, 0)
        lo = (lo // BLOCK_M) * BLOCK_M
        first_full = tl.maximum(n_last - off - window_right, 0)
        full_lo = ((first_full + BLOCK_M - 1) // BLOCK_M) * BLOCK_M
    if HAS_WL:  # i <= j - off + window_left
        hi = tl.minimum(tl.maximum(n_last - off + window_left + 1, 0), q_len)
        full_hi = tl.minimum(tl.maximum(n_start - off + window_left + 1, 0), q_len)
    full_hi = (full_hi // BLOCK_M) * BLOCK_M
    if n_start + BLOCK_N > k_len:  # a partial key block: every query block needs the column mask
        full_hi = lo
    hi = tl.maximum(hi, lo)
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.maximum(tl.minimum(full_hi, hi), full_lo)
    return lo, full_lo, full_hi, hi


@triton.jit
def _sequence(Cu, idx, total, IS_VARLEN: tl.constexpr):
    """(start, length) of batch row / varlen sequence ``idx``."""
    if IS_VARLEN:
        first = tl.load(Cu + idx)
        length = tl.load(Cu + idx + 1) - first
        start = first.to(tl.int64)
    else:
        start = idx * 0
        length = (idx * 0).to(tl.int32) + total
    return start, length


@triton.jit
def _bias_offsets(rows, cols, sbm, sbn, BIAS_I64: tl.constexpr):
    """rows * sbm + cols * sbn of a bias tile: in int64 when the host found an offset that can
    reach 2^31 (a (1, 1, Sq, Sk) mask with Sq = Sk >= 46,341), else in int32: 64-bit offsets of
    a whole score tile cost registers (spills of 12 B to 4.4 KB in bias configs on sm_90)."""
    if BIAS_I64:
        return rows.to(tl.int64) * sbm + cols.to(tl.int64) * sbn
    else:
        return rows * sbm + cols * sbn


@triton.jit
def _tile_scores(qk, rows, cols, col_ok, off, q_len, k_len, Bias, sbm, sbn, slope2, qk_scale2, softcap_scale,
                 softcap2, window_left, window_right, MASKED: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                 HAS_ALIBI: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr,
                 BIAS_I64: tl.constexpr):
    """log2-domain scores (rows x cols) of q . k^T = qk with the bias, ALiBi, softcap and (MASKED)
    the causal / window / length mask applied (-inf), and the softcap's tanh (for its gradient)."""
    diag = rows[:, None] + off - cols[None, :]
    bias = qk
    if HAS_BIAS:
        bias = tl.load(Bias + _bias_offsets(rows[:, None], cols[None, :], sbm, sbn, BIAS_I64),
                       mask=(rows[:, None] < q_len) & col_ok[None, :], other=0.0).to(tl.float32)
    s2, t = _scores_log2(qk, diag, slope2, bias, qk_scale2, softcap_scale, softcap2, HAS_SOFTCAP, HAS_ALIBI, HAS_BIAS)
    if MASKED:
        ok = _allowed(rows[:, None], cols[None, :], diag, q_len, k_len, window_left, window_right, HAS_WL, HAS_WR)
        s2 = tl.where(ok, s2, float("-inf"))
    return s2, t


@triton.jit
def _split_program(length, BLOCK: tl.constexpr):
    """(block index along the sequence, batch x head index) of a 1-D launch grid: both live on
    axis x, whose limit is 2^31 - 1 (y and z stop at 65,535, less than e.g. batch 2048 x 32
    heads). The blocks of one head are consecutive programs, so they share K/V in L2."""
    return _split_tile(tl.program_id(0), length, BLOCK, False)


@triton.jit
def _split_tile(tile, length, BLOCK: tl.constexpr, LAST_BLOCK_FIRST: tl.constexpr):
    """(block index, batch x head index) of tile number `tile` (see _split_program);
    LAST_BLOCK_FIRST numbers a head's blocks from its last one, which under a causal mask has
    the most keys: a persistent program taking tiles in order starts with the longest ones."""
    blocks = tl.cdiv(length, BLOCK)
    block = tile % blocks
    if LAST_BLOCK_FIRST:
        block = blocks - 1 - block
    return block, (tile // blocks).to(tl.int64)


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------
@triton.jit
def _fwd_tile(acc, l_i, m_i, q, K, V, Bias, DescK, DescV, skn, svn, sbm, sbn, n0,
              rows, off, q_len, k_len, k_start, slope2, qk_scale2, softcap_scale, softcap2,
              window_left, window_right, row_state, drop_threshold, drop_scale,
              MASKED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
              HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_BIAS: tl.constexpr,
              HAS_WL: tl.constexpr, HAS_WR: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr,
              BIAS_I64: tl.constexpr, USE_TMA: tl.constexpr):
    """One key block of the online softmax. USE_TMA: K and V tiles come through tensor
    descriptors (TMA on Hopper; rows past the sequence read as zeros), else masked loads."""
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    cols = n0 + tl.arange(0, BLOCK_N)
    if MASKED:
        col_ok = cols < k_len
    else:
        col_ok = cols >= 0
    if USE_TMA:
        kt = tl.trans(DescK.load([n0, 0]))
    else:
        kt = tl.load(K + (k_start + cols)[None, :] * skn + d[:, None], mask=d_ok[:, None] & col_ok[None, :],
                     other=0.0)
    qk = tl.dot(q, kt, input_precision=DOT_PREC)
    s2, _t = _tile_scores(qk, rows, cols, col_ok, off, q_len, k_len, Bias, sbm, sbn, slope2, qk_scale2, softcap_scale,
                          softcap2, window_left, window_right, MASKED, HAS_SOFTCAP, HAS_ALIBI, HAS_BIAS, HAS_WL, HAS_WR,
                          BIAS_I64)
    m_new = tl.maximum(m_i, tl.max(s2, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing allowed yet: no NaN
    p = tl.math.exp2(s2 - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    if HAS_DROPOUT:
        keep = _dropout_keep(row_state[:, None], cols[None, :], drop_threshold)
        p = tl.where(keep, p * drop_scale, 0.0)
    if USE_TMA:
        v = DescV.load([n0, 0])
    else:
        v = tl.load(V + (k_start + cols)[:, None] * svn + d[None, :], mask=col_ok[:, None] & d_ok[None, :],
                    other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return acc, l_i, m_new


@triton.jit
def _fwd_block_range(acc, l_i, m_i, q, K, V, Bias, DescK, DescV, skn, svn, sbm, sbn, start, end,
                     rows, off, q_len, k_len, k_start, slope2, qk_scale2, softcap_scale, softcap2,
                     window_left, window_right, row_state, drop_threshold, drop_scale,
                     MASKED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
                     HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_BIAS: tl.constexpr,
                     HAS_WL: tl.constexpr, HAS_WR: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr,
                     BIAS_I64: tl.constexpr, USE_TMA: tl.constexpr):
    for n0 in range(start, end, BLOCK_N):
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, K, V, Bias, DescK, DescV, skn, svn, sbm, sbn, n0,
                                  rows, off, q_len, k_len, k_start, slope2, qk_scale2, softcap_scale, softcap2,
                                  window_left, window_right, row_state, drop_threshold, drop_scale,
                                  MASKED, BLOCK_N, BLOCK_D, HEAD_DIM, HAS_SOFTCAP, HAS_ALIBI, HAS_BIAS,
                                  HAS_WL, HAS_WR, HAS_DROPOUT, DOT_PREC, BIAS_I64, USE_TMA)
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(Q, K, V, Out, Lse, Bias, Alibi, CuQ, CuK,
                sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som, slb, slh,
                sbb, sbh, sbm, sbn, sab, sah,
                num_heads, group, Sq_total, Sk_total, max_q,
                qk_scale2, softcap_scale, softcap2, window_left, window_right,
                drop_state, drop_threshold, drop_scale, num_bh,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                IS_VARLEN: tl.constexpr, ALIGN_BR: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
                HAS_BIAS: tl.constexpr, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                DOT_PREC: tl.constexpr, BIAS_I64: tl.constexpr, TMA_ALIGNED: tl.constexpr,
                USE_TMA: tl.constexpr, WARP_SPECIALIZE: tl.constexpr, PERSISTENT: tl.constexpr):
    """One program per (query block, batch x head) tile, or PERSISTENT (Hopper configs): one
    program per SM taking tiles in turn, each head's longest (last) query block first, so a
    causal launch does not end on a wave of a few long tiles. USE_TMA / WARP_SPECIALIZE (Hopper configs; see
    _prune_fwd_configs): Q, K, V and the output go through tensor descriptors made per
    (sequence, head), so tiles past a sequence's end read as zeros and are not stored; the key
    loop is warp-specialized (producer warps issue the TMA loads). TMA_ALIGNED only keys the
    autotuner: the launcher's check that every base and row stride is 16-byte aligned, which
    descriptors need. num_bh: sequences x heads."""
    # Two calls rather than one loop: around the single-tile form a loop would break its early
    # return and the warp-specialized loop (Triton's pass takes no nested loop).
    if PERSISTENT:
        tiles = tl.cdiv(max_q, BLOCK_M) * num_bh
        for tile in range(tl.program_id(0), tiles, tl.num_programs(0)):
            _fwd_program(tile, Q, K, V, Out, Lse, Bias, Alibi, CuQ, CuK,
                         sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som, slb, slh,
                         sbb, sbh, sbm, sbn, sab, sah, num_heads, group, Sq_total, Sk_total, max_q,
                         qk_scale2, softcap_scale, softcap2, window_left, window_right,
                         drop_state, drop_threshold, drop_scale,
                         HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, IS_VARLEN, ALIGN_BR, HAS_SOFTCAP, HAS_ALIBI,
                         HAS_BIAS, HAS_WL, HAS_WR, HAS_DROPOUT, DOT_PREC, BIAS_I64, USE_TMA, WARP_SPECIALIZE, True)
    else:
        _fwd_program(tl.program_id(0), Q, K, V, Out, Lse, Bias, Alibi, CuQ, CuK,
                     sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som, slb, slh,
                     sbb, sbh, sbm, sbn, sab, sah, num_heads, group, Sq_total, Sk_total, max_q,
                     qk_scale2, softcap_scale, softcap2, window_left, window_right,
                     drop_state, drop_threshold, drop_scale,
                     HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, IS_VARLEN, ALIGN_BR, HAS_SOFTCAP, HAS_ALIBI,
                     HAS_BIAS, HAS_WL, HAS_WR, HAS_DROPOUT, DOT_PREC, BIAS_I64, USE_TMA, WARP_SPECIALIZE, False)


@triton.jit
def _fwd_program(tile, Q, K, V, Out, Lse, Bias, Alibi, CuQ, CuK,
                 sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som, slb, slh,
                 sbb, sbh, sbm, sbn, sab, sah,
                 num_heads, group, Sq_total, Sk_total, max_q,
                 qk_scale2, softcap_scale, softcap2, window_left, window_right,
                 drop_state, drop_threshold, drop_scale,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 IS_VARLEN: tl.constexpr, ALIGN_BR: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                 HAS_ALIBI: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr,
                 HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr, BIAS_I64: tl.constexpr,
                 USE_TMA: tl.constexpr, WARP_SPECIALIZE: tl.constexpr, LAST_BLOCK_FIRST: tl.constexpr):
    """The forward of one (query block, batch x head) tile (see _fwd_kernel)."""
    pid_m, pid_bh = _split_tile(tile, max_q, BLOCK_M, LAST_BLOCK_FIRST)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    hk = h // group
    q_start, q_len = _sequence(CuQ, b, Sq_total, IS_VARLEN)
    k_start, k_len = _sequence(CuK, b, Sk_total, IS_VARLEN)
    m_start = pid_m * BLOCK_M
    if not WARP_SPECIALIZE:  # (see below)
        if m_start >= q_len:
            return
    if IS_VARLEN:
        batch = b * 0  # tensors hold one batch row; b is the sequence index
    else:
        batch = b
    if ALIGN_BR:
        off = k_len - q_len
    else:
        off = k_len * 0

    rows = m_start + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    row_ok = rows < q_len
    Kh = K + batch * skb + hk * skh
    Vh = V + batch * svb + hk * svh
    if USE_TMA:
        desc_q = tl.make_tensor_descriptor(Q + batch * sqb + h * sqh + q_start * sqm, shape=[q_len, HEAD_DIM],
                                           strides=[sqm, 1], block_shape=[BLOCK_M, BLOCK_D])
        desc_k = tl.make_tensor_descriptor(Kh + k_start * skn, shape=[k_len, HEAD_DIM], strides=[skn, 1],
                                           block_shape=[BLOCK_N, BLOCK_D])
        desc_v = tl.make_tensor_descriptor(Vh + k_start * svn, shape=[k_len, HEAD_DIM], strides=[svn, 1],
                                           block_shape=[BLOCK_N, BLOCK_D])
        q = desc_q.load([m_start, 0])
    else:
        desc_k = Kh  # unused placeholders
        desc_v = Vh
        q = tl.load(Q + batch * sqb + h * sqh + (q_start + rows)[:, None] * sqm + d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    Bh = Bias + b * sbb + h * sbh
    slope2 = 0.0
    if HAS_ALIBI:
        slope2 = tl.load(Alibi + b * sab + h * sah).to(tl.float32) * 1.4426950408889634
    row_state = rows.to(tl.uint32)
    if HAS_DROPOUT:
        row_state = _dropout_row_state(drop_state, b, h, num_heads, rows)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    lo, full_lo, full_hi, hi = _key_ranges(m_start, q_len, k_len, off, window_left, window_right,
                                           BLOCK_M, BLOCK_N, HAS_WL, HAS_WR)
    if WARP_SPECIALIZE:
        # Triton's Hopper warp specialization takes one loop and no early return: a single
        # masked loop over [lo, hi), empty for a block past its sequence (its stores are clipped).
        hi = lo + (hi - lo) * (m_start < q_len)
        for n0 in tl.range(lo, hi, BLOCK_N, warp_specialize=True):
            acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, Kh, Vh, Bh, desc_k, desc_v, skn, svn, sbm, sbn, n0,
                                      rows, off, q_len, k_len, k_start, slope2, qk_scale2, softcap_scale, softcap2,
                                      window_left, window_right, row_state, drop_threshold, drop_scale,
                                      True, BLOCK_N, BLOCK_D, HEAD_DIM, HAS_SOFTCAP, HAS_ALIBI, HAS_BIAS,
                                      HAS_WL, HAS_WR, HAS_DROPOUT, DOT_PREC, BIAS_I64, USE_TMA)
    else:
        acc, l_i, m_i = _fwd_block_range(acc, l_i, m_i, q, Kh, Vh, Bh, desc_k, desc_v, skn, svn, sbm, sbn, lo, full_lo,
                                         rows, off, q_len, k_len, k_start, slope2, qk_scale2, softcap_scale, softcap2,
                                         window_left, window_right, row_state, drop_threshold, drop_scale,
                                         True, BLOCK_N, BLOCK_D, HEAD_DIM, HAS_SOFTCAP, HAS_ALIBI, HAS_BIAS,
                                         HAS_WL, HAS_WR, HAS_DROPOUT, DOT_PREC, BIAS_I64, USE_TMA)
        acc, l_i, m_i = _fwd_block_range(acc, l_i, m_i, q, Kh, Vh, Bh, desc_k, desc_v, skn, svn, sbm, sbn,
                                         full_lo, full_hi, rows, off, q_len, k_len, k_start, slope2, qk_scale2,
                                         softcap_scale, softcap2,
                                         window_left, window_right, row_state, drop_threshold, drop_scale,
                                         False, BLOCK_N, BLOCK_D, HEAD_DIM, HAS_SOFTCAP, HAS_ALIBI, HAS_BIAS,
                                         HAS_WL, HAS_WR, HAS_DROPOUT, DOT_PREC, BIAS_I64, USE_TMA)
        acc, l_i, m_i = _fwd_block_range(acc, l_i, m_i, q, Kh, Vh, Bh, desc_k, desc_v, skn, svn, sbm, sbn, full_hi, hi,
                                         rows, off, q_len, k_len, k_start, slope2, qk_scale2, softcap_scale, softcap2,
                                         window_left, window_right, row_state, drop_threshold, drop_scale,
                                         True, BLOCK_N, BLOCK_D, HEAD_DIM, HAS_SOFTCAP, HAS_ALIBI, HAS_BIAS,
                                         HAS_WL, HAS_WR, HAS_DROPOUT, DOT_PREC, BIAS_I64, USE_TMA)
    empty = l_i == 0.0  # no allowed key (or all -inf): out 0, lse -inf
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    if USE_TMA:
        desc_o = tl.make_tensor_descriptor(Out + batch * sob + h * soh + q_start * som, shape=[q_len, HEAD_DIM],
                                           strides=[som, 1], block_shape=[BLOCK_M, BLOCK_D])
        desc_o.store([m_start, 0], out.to(Out.dtype.element_ty))
    else:
        tl.store(Out + batch * sob + h * soh + (q_start + rows)[:, None] * som + d[None, :],
                 out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(Lse + batch * slb + h * slh + q_start + rows, lse, mask=row_ok)


@triton.jit
def _dropout_mask_kernel(Mask, CuQ, CuK, smb, smh, smm, num_heads, Sq_total, Sk_total, max_q, drop_state,
                         drop_threshold, IS_VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Writes the keep mask of one (row block, b/sequence x head) over all its keys."""
    pid_m, pid_bh = _split_program(max_q, BLOCK_M)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    q_start, q_len = _sequence(CuQ, b, Sq_total, IS_VARLEN)
    k_start, k_len = _sequence(CuK, b, Sk_total, IS_VARLEN)
    if IS_VARLEN:
        batch = b * 0
    else:
        batch = b
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_state = _dropout_row_state(drop_state, b, h, num_heads, rows)
    for n0 in range(0, k_len, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        keep = _dropout_keep(row_state[:, None], cols[None, :], drop_threshold)
        tl.store(Mask + batch * smb + h * smh + (q_start + rows)[:, None] * smm + (k_start + cols)[None, :],
                 keep.to(tl.int8), mask=(rows[:, None] < q_len) & (cols[None, :] < k_len))


# Exact fp32 products (DOT_PREC="ieee") are FMA code, not tensor cores: every operand tile lives
# in registers, so only small tiles avoid spills (and compile in seconds, not minutes).
# Measured with compile-check (sm_90, D128): 32 x 32 on 8 warps 202 registers, no spill; on 4
# warps 1.6 KB of spills, 64 x 32 on 8 warps 1.8 KB. The full compile-check then found 32 x 32
# spilling 4-432 B past head dim 64 (head dim 80, varlen, ALiBi+softcap, dropout; sm_80 and
# sm_90): 16-row tiles past head dim 64. At head dim 256 16 x 32 still spilled 4-16 B at 255
# registers on sm_80: 16 x 16 there.
_IEEE_FWD_TILES = ((32, 32, 8, 1), (16, 32, 8, 1), (16, 16, 8, 1))  # (BLOCK_M, BLOCK_N, warps, stages)


def _ieee_fwd_tile(block_d):
    """The exact-fp32 forward tile (BLOCK_M, BLOCK_N) for a head-dim block."""
    return (32, 32) if block_d <= 64 else ((16, 32) if block_d <= 128 else (16, 16))


# Hopper features of the installed Triton: device-side tensor descriptors (TMA) and automatic
# warp specialization of a loop. Without them (older Triton) no config asks for them.
HAS_TMA = hasattr(tl, "make_tensor_descriptor")
HAS_WARP_SPECIALIZE = HAS_TMA and "warp_specialize" in inspect.signature(tl.range).parameters


def _fwd_config(bm, bn, warps, stages, tma=False, ws=False, maxnreg=None, persistent=False):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "USE_TMA": tma, "WARP_SPECIALIZE": ws,
                          "PERSISTENT": persistent}, num_warps=warps, num_stages=stages, maxnreg=maxnreg)


def _fwd_configs(interpret=_INTERPRET):
    if interpret:
        return [_fwd_config(16, 16, 4, 1)]
    tensor_core = [_fwd_config(bm, bn, w, s)
                   for bm in (64, 128) for bn in (32, 64, 128) for s in (2, 3, 4) for w in (4, 8)]
    # ptxas held three exact-fp32 configs on sm_80 to 64 registers and spilled 4-8 B: an explicit
    # budget lets it take what the tile needs (32 x 32 at D128 took 202 on sm_90).
    ieee = [_fwd_config(bm, bn, w, s, maxnreg=255) for bm, bn, w, s in _IEEE_FWD_TILES]
    # Hopper (sm_90+, half precision, aligned tensors): TMA tiles on 8 warps (two warpgroups),
    # and warp-specialized ones on 4 (Triton specializes a loop of a 4-warp kernel only: with
    # 8 it leaves the loop as it is); the autotuner measures them beside the others.
    tma = [_fwd_config(128, bn, 8, s, tma=True) for bn in (32, 64, 128) for s in (2, 3)] if HAS_TMA else []
    specialized = [_fwd_config(bm, bn, 4, s, tma=True, ws=True) for bm in (64, 128) for bn in (64, 128)
                   for s in (2, 3)] if HAS_WARP_SPECIALIZE else []
    # Persistent (sm_90+, half precision): one program per SM over the tiles, with TMA tiles
    # and with the 128 x 64 pointer tile. Not warp-specialized: the pass takes a single loop.
    persistent = [_fwd_config(128, bn, 8, s, tma=True, persistent=True) for bn in (32, 64, 128)
                  for s in (2, 3)] if HAS_TMA else []
    persistent.append(_fwd_config(128, 64, 8, 3, persistent=True))
    return tensor_core + ieee + tma + specialized + persistent


def target_arch():
    """The compute capability Triton compiles for (e.g. 80, 90), or None without a driver."""
    try:
        return triton.runtime.driver.active.get_current_target().arch
    except Exception:
        return None


def shared_memory_limit() -> int:
    """Bytes of shared memory a block may opt into on the target Triton compiles for (A100
    163 KB, H100 227 KB, consumer parts 99 KB; without a driver the smallest common budget)."""
    return {80: 163, 87: 163, 90: 227, 100: 227, 103: 227}.get(target_arch(), 99) * 1024


def _spills_before_hopper(block_d, bm, bn, warps, stages) -> bool:
    """Half-precision forward tiles that spill on sm_80-89, where mma.sync holds the tiles in
    registers that Hopper's wgmma does not need. Measured with the full compile-check (bf16,
    sm_80, every launched problem): at head dim 64, 64 x 128 tiles on 4 warps spill 24 B with
    dropout; at head dim 128 every tile spills for some problem (4-116 B; 64 x 64 on 4 warps in
    19 of 20) but 128 x 32 on 8 warps with 3 stages (0 of 13)."""
    if block_d <= 64:
        return bn == 128 and warps == 4
    if block_d < 256:
        return (bm, bn, warps, stages) != (128, 32, 8, 3)
    return False


def fwd_shared_bytes(block_m, block_n, block_d, stages, elem, bias_elem=0):
    """Shared memory of the forward's pipeline: `stages` buffers of a K and a V tile (and of a
    bias tile) plus the Q tile, in the inputs' element size (fp32 doubles every tile)."""
    return elem * (stages * 2 * block_n * block_d + block_m * block_d) + stages * bias_elem * block_m * block_n


def _prune_fwd_configs(configs, named_args, **kwargs):
    """Drop tiles that cannot fit shared memory / registers for large head dims, and pair
    8 warps with 128-row tiles, 4 warps with 64-row tiles (halves the first-call tuning time).
    Exact fp32 ("ieee") gets only its small FMA tiles."""
    block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D", 64))
    ieee = kwargs.get("DOT_PREC", named_args.get("DOT_PREC")) == "ieee"
    q = named_args.get("Q")
    elem = q.element_size() if hasattr(q, "element_size") else 2
    bias = named_args.get("Bias")
    has_bias = kwargs.get("HAS_BIAS", named_args.get("HAS_BIAS", False))
    has_dropout = kwargs.get("HAS_DROPOUT", named_args.get("HAS_DROPOUT", False))
    bias_elem = bias.element_size() if has_bias and hasattr(bias, "element_size") else 0
    limit = shared_memory_limit() - 8 * 1024  # headroom for the compiler's own scratch (reductions)
    arch = target_arch()
    before_hopper = arch is not None and arch < 90
    ieee_tiles = {(bm, bn, w, st) for bm, bn, w, st in _IEEE_FWD_TILES}
    tma_ok = (HAS_TMA and arch is not None and arch >= 90 and elem != 4
              and kwargs.get("TMA_ALIGNED", named_args.get("TMA_ALIGNED", False)))
    kept = []
    for c in configs:
        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        # With a bias, no descriptor configs: the bias tile stays a pointer load, which Triton's
        # warp specialization cannot place ("unsupported load type for producer commit"), and
        # TMA's 128 x 64 tile spilled 272 B at D64 (compile-check, bf16, sm_90).
        if c.kwargs["USE_TMA"] and (not tma_ok or has_bias):
            continue
        if c.kwargs["PERSISTENT"] and (arch is None or arch < 90 or elem == 4):
            continue
        # The persistent loop holds a few more registers: the pointer tile spilled 20-76 B at head
        # dims 80-128 (compile-check, bf16, sm_90); the TMA tiles did not.
        if c.kwargs["PERSISTENT"] and not c.kwargs["USE_TMA"] and block_d > 64:
            continue
        if ((bm, bn, c.num_warps, c.num_stages) in ieee_tiles and not c.kwargs["USE_TMA"]) != ieee:
            continue
        if fwd_shared_bytes(bm, bn, block_d, c.num_stages, elem, bias_elem) > limit:
            continue
        if ieee:
            if (bm, bn) == _ieee_fwd_tile(block_d):
                kept.append(c)
            continue
        if elem == 4 and c.num_warps != 8:  # fp32 on TF32 tensor cores: 4 warps spill (64 x 64 at D128)
            continue
        if (elem != 4 and c.num_warps != (8 if bm == 128 else 4) and block_d < 256
                and not c.kwargs["WARP_SPECIALIZE"]):
            continue
        # Head dim 256 (half precision): only 64-row tiles on 8 warps fit (4 warps or 128 rows
        # spill 24-456 B with dropout, ALiBi or a bias; with a bias 64 x 32 alone fits).
        if block_d >= 256 and (bn > 64 or c.num_stages > 2 or (elem != 4 and (bm != 64 or c.num_warps != 8))
                               or (elem == 4 and bm == 128 and c.num_warps == 4)):
            continue
        # Register budgets measured with compile-check (bf16, sm_90): a 128-key tile spills
        # (36-60 B) past head dim 64; a bias tile (64-bit addresses per element) makes 128-key
        # tiles spill 3.5-4.4 KB at D64 and 64-key tiles 1.3-1.7 KB at D128.
        if block_d >= 128 and bn > 64:
            continue
        if has_bias and bn > (64 if block_d <= 64 else 32):
            continue
        if elem != 4 and block_d > 64 and c.num_stages > 3:
            continue
        if elem != 4 and block_d <= 64 and (bn < 64 or c.num_stages < 3):  # small tiles: too little work
            continue
        if elem != 4 and before_hopper and _spills_before_hopper(block_d, bm, bn, c.num_warps, c.num_stages):
            continue
        # Full compile-check, bf16, sm_90: at head dim 256, 64 x 64 spilled 56 B (varlen, causal);
        # at head dims 72-128 with dropout, 64 x 64 on 4 warps in 2 stages spilled 24 B.
        if elem != 4 and block_d >= 256 and bn > 32:
            continue
        if elem != 4 and has_dropout and 64 < block_d < 256 and (bm, bn, c.num_warps, c.num_stages) == (64, 64, 4, 2):
            continue
        kept.append(c)
    if not kept:  # the smallest tile of this precision's kind
        same_kind = [c for c in configs if not c.kwargs["USE_TMA"] and not c.kwargs["PERSISTENT"]
                     and ((c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in ieee_tiles) == ieee]
        kept = [min(same_kind or configs, key=lambda c: fwd_shared_bytes(
            c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], block_d, c.num_stages, elem, bias_elem))]
    if environment().quick_autotune:
        kept = one_config_per_kind(kept)
    return kept


def one_config_per_kind(configs):
    """GENFAST_AUTOTUNE=quick: the first config of each kind (pointer loads, TMA,
    warp-specialized, persistent), so a first call compiles and times a handful instead of up
    to 30 per key (seconds each on a GPU host): for short jobs and for bench/gpu_check.sh."""
    seen, kept = set(), []
    for c in configs:
        kind = (c.kwargs["USE_TMA"], c.kwargs["WARP_SPECIALIZE"], c.kwargs["PERSISTENT"])
        if kind not in seen:
            seen.add(kind)
            kept.append(c)
    return kept


_fwd = triton.autotune(
    configs=_fwd_configs(),
    key=["HEAD_DIM", "IS_VARLEN", "ALIGN_BR", "HAS_SOFTCAP", "HAS_ALIBI", "HAS_BIAS", "HAS_WL", "HAS_WR",
         "HAS_DROPOUT", "DOT_PREC", "BIAS_I64", "TMA_ALIGNED"],
    prune_configs_by=None if _INTERPRET else {"early_config_prune": _prune_fwd_configs},
)(_fwd_kernel)


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------
@triton.jit
def _bwd_preprocess_kernel(Out, dOut, Delta, sob, soh, som, sdb, sdh, sdm, num_heads, S,
                           HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta[b, h, i] = sum_d out * dout (fp32)."""
    pid_m, pid_bh = _split_program(S, BLOCK_M)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < S) & (d[None, :] < HEAD_DIM)
    o = tl.load(Out + b * sob + h * soh + rows[:, None].to(tl.int64) * som + d[None, :], mask=mask, other=0.0)
    do = tl.load(dOut + b * sdb + h * sdh + rows[:, None].to(tl.int64) * sdm + d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + pid_bh * S + rows, delta, mask=rows < S)


@triton.jit
def _bwd_dkdv_block_range(dk, dv, k, v, Q, dO, DescQ, DescDO, h, DQ, Lse, Delta, Bias, sqm, sdm, sqm_dq, sbm, sbn,
                          start, end,
                          cols, off, q_len, k_len, q_start, slope2, qk_scale2, softcap_scale, softcap2, scale,
                          window_left, window_right, drop_state, drop_b, drop_h, num_heads, drop_threshold, drop_scale,
                          MASKED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
                          HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_BIAS: tl.constexpr,
                          HAS_WL: tl.constexpr, HAS_WR: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                          ATOMIC_DQ: tl.constexpr, DOT_PREC: tl.constexpr, BIAS_I64: tl.constexpr,
                          USE_TMA: tl.constexpr):
    """Accumulates dk, dv (BLOCK_N, BLOCK_D) over query blocks [start, end) of query head h;
    the score tile is kept transposed (keys x queries). USE_TMA: q and dO tiles come through
    the (heads, rows, head dim) descriptors DescQ / DescDO (rows past q_len read as zeros)."""
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        if MASKED:
            row_ok = rows < q_len
        else:
            row_ok = rows >= 0
        if USE_TMA:
            q = tl.reshape(DescQ.load([h.to(tl.int32), m0, 0]), [BLOCK_M, BLOCK_D])
            do = tl.reshape(DescDO.load([h.to(tl.int32), m0, 0]), [BLOCK_M, BLOCK_D])
        else:
            ld_mask = row_ok[:, None] & d_ok[None, :]
            q = tl.load(Q + (q_start + rows)[:, None] * sqm + d[None, :], mask=ld_mask, other=0.0)
            do = tl.load(dO + (q_start + rows)[:, None] * sdm + d[None, :], mask=ld_mask, other=0.0)
        lse = tl.load(Lse + q_start + rows, mask=row_ok, other=0.0)
        delta = tl.load(Delta + q_start + rows, mask=row_ok, other=0.0)
        lse2 = tl.where(lse == float("-inf"), 0.0, lse * 1.4426950408889634)
        qkT = tl.dot(k, tl.trans(q), input_precision=DOT_PREC)  # (BLOCK_N, BLOCK_M)
        diagT = rows[None, :] + off - cols[:, None]
        bias = qkT
        if HAS_BIAS:
            bias = tl.load(Bias + _bias_offsets(rows[None, :], cols[:, None], sbm, sbn, BIAS_I64),
                           mask=row_ok[None, :] & (cols[:, None] < k_len), other=0.0).to(tl.float32)
        s2, t = _scores_log2(qkT, diagT, slope2, bias, qk_scale2, softcap_scale, softcap2,
                             HAS_SOFTCAP, HAS_ALIBI, HAS_BIAS)
        if MASKED:
            ok = _allowed(rows[None, :], cols[:, None], diagT, q_len, k_len, window_left, window_right, HAS_WL, HAS_WR)
            s2 = tl.where(ok, s2, float("-inf"))
        pT = tl.math.exp2(s2 - lse2[None, :])
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)  # dO . v_j
        if HAS_DROPOUT:
            row_state = _dropout_row_state(drop_state, drop_b, drop_h, num_heads, rows)
            keep = _dropout_keep(row_state[None, :], cols[:, None], drop_threshold)
            p_drop = tl.where(keep, pT * drop_scale, 0.0)
            dpT = tl.where(keep, dpT * drop_scale, 0.0)
        else:
            p_drop = pT
        dv += tl.dot(p_drop.to(do.dtype), do, input_precision=DOT_PREC)
        dsT = pT * (dpT - delta[None, :])
        if HAS_SOFTCAP:
            dsT = dsT * (1.0 - t * t)
        dk += tl.dot(dsT.to(q.dtype), q, input_precision=DOT_PREC)
        if ATOMIC_DQ:
            dq_part = tl.dot(tl.trans(dsT.to(k.dtype)), k, input_precision=DOT_PREC) * scale
            tl.atomic_add(DQ + (q_start + rows)[:, None] * sqm_dq + d[None, :], dq_part,
                          mask=(rows[:, None] < q_len) & d_ok[None, :])
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, dO, DQ, DK, DV, Lse, Delta, Bias, Alibi, CuQ, CuK,
                     sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdb, sdh, sdm,
                     sqb_dq, sqh_dq, sqm_dq, skb_dk, skh_dk, skn_dk, slb, slh,
                     sbb, sbh, sbm, sbn, sab, sah,
                     num_heads, num_kv_heads, group, Sq_total, Sk_total, max_k,
                     qk_scale2, softcap_scale, softcap2, scale, window_left, window_right,
                     drop_state, drop_threshold, drop_scale,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     IS_VARLEN: tl.constexpr, ALIGN_BR: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                     HAS_ALIBI: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr,
                     HAS_DROPOUT: tl.constexpr, ATOMIC_DQ: tl.constexpr, DOT_PREC: tl.constexpr,
                     BIAS_I64: tl.constexpr, USE_TMA: tl.constexpr):
    pid_n, pid_bh = _split_program(max_k, BLOCK_N)
    b = pid_bh // num_kv_heads
    hk = pid_bh % num_kv_heads
    q_start, q_len = _sequence(CuQ, b, Sq_total, IS_VARLEN)
    k_start, k_len = _sequence(CuK, b, Sk_total, IS_VARLEN)
    n_start = pid_n * BLOCK_N
    if n_start >= k_len:
        return
    if IS_VARLEN:
        batch = b * 0
    else:
        batch = b
    if ALIGN_BR:
        off = k_len - q_len
    else:
        off = k_len * 0
    cols = n_start + tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    kv_mask = (cols[:, None] < k_len) & d_ok[None, :]
    k = tl.load(K + batch * skb + hk * skh + (k_start + cols)[:, None] * skn + d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + batch * svb + hk * svh + (k_start + cols)[:, None] * svn + d[None, :], mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    if USE_TMA:  # one descriptor each over all heads of this sequence: made once, outside the loops
        desc_q = tl.make_tensor_descriptor(Q + batch * sqb + q_start * sqm, shape=[num_heads, q_len, HEAD_DIM],
                                           strides=[sqh, sqm, 1], block_shape=[1, BLOCK_M, BLOCK_D])
        desc_do = tl.make_tensor_descriptor(dO + batch * sdb + q_start * sdm, shape=[num_heads, q_len, HEAD_DIM],
                                            strides=[sdh, sdm, 1], block_shape=[1, BLOCK_M, BLOCK_D])
    else:
        desc_q = Q  # unused placeholders
        desc_do = dO
    lo, full_lo, full_hi, hi = _query_ranges(n_start, q_len, k_len, off, window_left, window_right,
                                             BLOCK_M, BLOCK_N, HAS_WL, HAS_WR)
    for g in range(0, group):  # the query heads of this kv head: dk/dv stay in registers
        h = hk * group + g
        Qh = Q + batch * sqb + h * sqh
        dOh = dO + batch * sdb + h * sdh
        DQh = DQ + batch * sqb_dq + h * sqh_dq
        Lh = Lse + batch * slb + h * slh
        Dh = Delta + batch * slb + h * slh
        Bh = Bias + b * sbb + h * sbh
        slope2 = 0.0
        if HAS_ALIBI:
            slope2 = tl.load(Alibi + b * sab + h * sah).to(tl.float32) * 1.4426950408889634
        dk, dv = _bwd_dkdv_block_range(dk, dv, k, v, Qh, dOh, desc_q, desc_do, h, DQh, Lh, Dh, Bh, sqm, sdm,
                                       sqm_dq, sbm, sbn, lo, full_lo,
                                       cols, off, q_len, k_len, q_start, slope2, qk_scale2, softcap_scale, softcap2,
                                       scale, window_left, window_right, drop_state, b, h, num_heads, drop_threshold,
                                       drop_scale, True, BLOCK_M, BLOCK_D, HEAD_DIM, HAS_SOFTCAP, HAS_ALIBI, HAS_BIAS,
                                       HAS_WL, HAS_WR, HAS_DROPOUT, ATOMIC_DQ, DOT_PREC, BIAS_I64, USE_TMA)
        dk, dv = _bwd_dkdv_block_range(dk, dv, k, v, Qh, dOh, desc_q, desc_do, h, DQh, Lh, Dh, Bh, sqm, sdm,
                                       sqm_dq, sbm, sbn, full_lo,
                                       full_hi, cols, off, q_len, k_len, q_start, slope2, qk_scale2, softcap_scale,
                                       softcap2, scale, window_left, window_right, drop_state, b, h, num_heads,
                                       drop_threshold, drop_scale, False, BLOCK_M, BLOCK_D, HEAD_DIM, HAS_SOFTCAP,
                                       HAS_ALIBI, HAS_BIAS, HAS_WL, HAS_WR, HAS_DROPOUT, ATOMIC_DQ, DOT_PREC, BIAS_I64,
                                       USE_TMA)
        dk, dv = _bwd_dkdv_block_range(dk, dv, k, v, Qh, dOh, desc_q, desc_do, h, DQh, Lh, Dh, Bh, sqm, sdm,
                                       sqm_dq, sbm, sbn, full_hi, hi,
                                       cols, off, q_len, k_len, q_start, slope2, qk_scale2, softcap_scale, softcap2,
                                       scale, window_left, window_right, drop_state, b, h, num_heads, drop_threshold,
                                       drop_scale, True, BLOCK_M, BLOCK_D, HEAD_DIM, HAS_SOFTCAP, HAS_ALIBI, HAS_BIAS,
                                       HAS_WL, HAS_WR, HAS_DROPOUT, ATOMIC_DQ, DOT_PREC, BIAS_I64, USE_TMA)
    out_mask = (cols[:, None] < k_len) & d_ok[None, :]
    tl.store(DK + batch * skb_dk + hk * skh_dk + (k_start + cols)[:, None] * skn_dk + d[None, :],
             (dk * scale).to(DK.dtype.element_ty), mask=out_mask)
    tl.store(DV + batch * skb_dk + hk * skh_dk + (k_start + cols)[:, None] * skn_dk + d[None, :],
             dv.to(DV.dtype.element_ty), mask=out_mask)


@triton.jit
def _bwd_dq_block_range(dq, q, do, lse2, delta, K, V, DescK, DescV, Bias, skn, svn, sbm, sbn, start, end,
                        rows, off, q_len, k_len, k_start, slope2, qk_scale2, softcap_scale, softcap2,
                        window_left, window_right, row_state, drop_threshold, drop_scale,
                        MASKED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
                        HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_BIAS: tl.constexpr,
                        HAS_WL: tl.constexpr, HAS_WR: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr,
                        BIAS_I64: tl.constexpr, USE_TMA: tl.constexpr):
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    for n0 in range(start, end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        if MASKED:
            col_ok = cols < k_len
        else:
            col_ok = cols >= 0
        if USE_TMA:
            k = DescK.load([n0, 0])
            v = DescV.load([n0, 0])
        else:
            kv_mask = col_ok[:, None] & d_ok[None, :]
            k = tl.load(K + (k_start + cols)[:, None] * skn + d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(V + (k_start + cols)[:, None] * svn + d[None, :], mask=kv_mask, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        s2, t = _tile_scores(qk, rows, cols, col_ok, off, q_len, k_len, Bias, sbm, sbn, slope2, qk_scale2,
                             softcap_scale, softcap2, window_left, window_right, MASKED, HAS_SOFTCAP, HAS_ALIBI,
                             HAS_BIAS, HAS_WL, HAS_WR, BIAS_I64)
        p = tl.math.exp2(s2 - lse2[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        if HAS_DROPOUT:
            keep = _dropout_keep(row_state[:, None], cols[None, :], drop_threshold)
            dp = tl.where(keep, dp * drop_scale, 0.0)
        ds = p * (dp - delta[:, None])
        if HAS_SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
    return dq


@triton.jit
def _bwd_dq_kernel(Q, K, V, dO, DQ, Lse, Delta, Bias, Alibi, CuQ, CuK,
                   sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdb, sdh, sdm, sqb_dq, sqh_dq, sqm_dq, slb, slh,
                   sbb, sbh, sbm, sbn, sab, sah,
                   num_heads, group, Sq_total, Sk_total, max_q,
                   qk_scale2, softcap_scale, softcap2, scale, window_left, window_right,
                   drop_state, drop_threshold, drop_scale,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   IS_VARLEN: tl.constexpr, ALIGN_BR: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                   HAS_ALIBI: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr,
                   HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr, BIAS_I64: tl.constexpr,
                   USE_TMA: tl.constexpr):
    pid_m, pid_bh = _split_program(max_q, BLOCK_M)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    hk = h // group
    q_start, q_len = _sequence(CuQ, b, Sq_total, IS_VARLEN)
    k_start, k_len = _sequence(CuK, b, Sk_total, IS_VARLEN)
    m_start = pid_m * BLOCK_M
    if m_start >= q_len:
        return
    if IS_VARLEN:
        batch = b * 0
    else:
        batch = b
    if ALIGN_BR:
        off = k_len - q_len
    else:
        off = k_len * 0
    rows = m_start + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    row_ok = rows < q_len
    ld_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + batch * sqb + h * sqh + (q_start + rows)[:, None] * sqm + d[None, :], mask=ld_mask, other=0.0)
    do = tl.load(dO + batch * sdb + h * sdh + (q_start + rows)[:, None] * sdm + d[None, :], mask=ld_mask, other=0.0)
    lse = tl.load(Lse + batch * slb + h * slh + q_start + rows, mask=row_ok, other=0.0)
    delta = tl.load(Delta + batch * slb + h * slh + q_start + rows, mask=row_ok, other=0.0)
    lse2 = tl.where(lse == float("-inf"), 0.0, lse * 1.4426950408889634)
    Kh = K + batch * skb + hk * skh
    Vh = V + batch * svb + hk * svh
    if USE_TMA:
        desc_k = tl.make_tensor_descriptor(Kh + k_start * skn, shape=[k_len, HEAD_DIM], strides=[skn, 1],
                                           block_shape=[BLOCK_N, BLOCK_D])
        desc_v = tl.make_tensor_descriptor(Vh + k_start * svn, shape=[k_len, HEAD_DIM], strides=[svn, 1],
                                           block_shape=[BLOCK_N, BLOCK_D])
    else:
        desc_k = Kh  # unused placeholders
        desc_v = Vh
    Bh = Bias + b * sbb + h * sbh
    slope2 = 0.0
    if HAS_ALIBI:
        slope2 = tl.load(Alibi + b * sab + h * sah).to(tl.float32) * 1.4426950408889634
    row_state = rows.to(tl.uint32)
    if HAS_DROPOUT:
        row_state = _dropout_row_state(drop_state, b, h, num_heads, rows)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, full_lo, full_hi, hi = _key_ranges(m_start, q_len, k_len, off, window_left, window_right,
                                           BLOCK_M, BLOCK_N, HAS_WL, HAS_WR)
    dq = _bwd_dq_block_range(dq, q, do, lse2, delta, Kh, Vh, desc_k, desc_v, Bh,
                             skn, svn, sbm, sbn, lo, full_lo, rows, off, q_len,
                             k_len, k_start, slope2, qk_scale2, softcap_scale, softcap2, window_left, window_right,
                             row_state, drop_threshold, drop_scale, True, BLOCK_N, BLOCK_D, HEAD_DIM, HAS_SOFTCAP,
                             HAS_ALIBI, HAS_BIAS, HAS_WL, HAS_WR, HAS_DROPOUT, DOT_PREC, BIAS_I64, USE_TMA)
    dq = _bwd_dq_block_range(dq, q, do, lse2, delta, Kh, Vh, desc_k, desc_v, Bh,
                             skn, svn, sbm, sbn, full_lo, full_hi, rows, off,
                             q_len, k_len, k_start, slope2, qk_scale2, softcap_scale, softcap2, window_left,
                             window_right, row_state, drop_threshold, drop_scale, False, BLOCK_N, BLOCK_D, HEAD_DIM,
                             HAS_SOFTCAP, HAS_ALIBI, HAS_BIAS, HAS_WL, HAS_WR, HAS_DROPOUT, DOT_PREC, BIAS_I64,
                             USE_TMA)
    dq = _bwd_dq_block_range(dq, q, do, lse2, delta, Kh, Vh, desc_k, desc_v, Bh,
                             skn, svn, sbm, sbn, full_hi, hi, rows, off, q_len,
                             k_len, k_start, slope2, qk_scale2, softcap_scale, softcap2, window_left, window_right,
                             row_state, drop_threshold, drop_scale, True, BLOCK_N, BLOCK_D, HEAD_DIM, HAS_SOFTCAP,
                             HAS_ALIBI, HAS_BIAS, HAS_WL, HAS_WR, HAS_DROPOUT, DOT_PREC, BIAS_I64, USE_TMA)
    tl.store(DQ + batch * sqb_dq + h * sqh_dq + (q_start + rows)[:, None] * sqm_dq + d[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=ld_mask)


# ---------------------------------------------------------------------------------------------
# Decode (flash-decoding)
# ---------------------------------------------------------------------------------------------
@triton.jit
def _decode_split_kernel(Q, K, V, SeqLens, Alibi, WsOut, WsLse, LeftPad, BatchIdx, BlockTable,
                         sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sab, sah, sbt, page_size,
                         num_heads, num_kv_heads, group, Sq, split_size, num_splits, row_blocks, batch_size,
                         qk_scale2, softcap_scale, softcap2, window_left, window_right,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_WL: tl.constexpr,
                         HAS_WR: tl.constexpr, DOT_PREC: tl.constexpr, HAS_LEFTPAD: tl.constexpr,
                         HAS_BATCH_IDX: tl.constexpr, PAGED: tl.constexpr):
    """One key chunk of one kv head for BLOCK_M (query head, position) rows of its GQA group.
    Writes the normalised partial output and its lse (-inf for an empty chunk) to fp32
    workspaces (split, b, h, i, d) / (split, b, h, i).
    Cache rows: K/V (B_cache, Hk, S, D), batch row b reading row BatchIdx[b] (HAS_BATCH_IDX) or
    b; PAGED: K/V (num_blocks, Hk, page_size, D), key j of row b at row j % page_size of block
    BlockTable[b * sbt + j // page_size] (looked up per key column: a tile may span pages).
    HAS_LEFTPAD: row b's keys start at LeftPad[b] (absolute positions: only the lower key bound
    moves)."""
    pid = tl.program_id(0)  # one grid axis (x: up to 2^31 - 1 programs), split fastest
    pid_s = pid % num_splits
    pid_r = (pid // num_splits) % row_blocks
    pid_bh = (pid // (num_splits * row_blocks)).to(tl.int64)
    b = pid_bh // num_kv_heads
    hk = pid_bh % num_kv_heads
    k_len = tl.load(SeqLens + b).to(tl.int64)
    off = k_len - Sq
    r = pid_r * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = r < group * Sq
    g = r // Sq
    i = r % Sq
    h = (hk * group + g).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    q = tl.load(Q + b * sqb + h[:, None] * sqh + i[:, None] * sqm + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    slope2 = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_ALIBI:
        slope2 = tl.load(Alibi + b * sab + h * sah, mask=row_ok, other=0.0).to(tl.float32) * 1.4426950408889634
    n_lo = pid_s * split_size
    n_hi = tl.minimum(n_lo + split_size, k_len)
    if HAS_WL:  # first key any row of this chunk may see: row 0
        n_lo = tl.maximum(n_lo, ((tl.maximum(off - window_left, 0)) // BLOCK_N) * BLOCK_N)
    if HAS_WR:
        n_hi = tl.minimum(n_hi, tl.maximum(Sq - 1 + off + window_right + 1, 0))
    k_first = k_len * 0
    if HAS_LEFTPAD:  # keys [k_first, k_len); tiles stay aligned, the columns below are masked
        k_first = tl.load(LeftPad + b).to(tl.int64)
        n_lo = tl.maximum(n_lo, (k_first // BLOCK_N) * BLOCK_N)
    if PAGED:
        Kh = K + hk * skh
        Vh = V + hk * svh
        Table = BlockTable + b * sbt
    elif HAS_BATCH_IDX:
        cache_row = tl.load(BatchIdx + b).to(tl.int64)
        Kh = K + cache_row * skb + hk * skh
        Vh = V + cache_row * svb + hk * svh
    else:
        Kh = K + b * skb + hk * skh
        Vh = V + b * svb + hk * svh
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < n_hi
        if HAS_LEFTPAD:
            col_ok = col_ok & (cols >= k_first)
        if PAGED:
            # 32-bit position arithmetic (positions < 2^31), 64-bit block offsets
            cols32 = cols.to(tl.int32)
            page = cols32 // page_size
            block = tl.load(Table + page, mask=col_ok, other=0).to(tl.int64)
            in_page = cols32 - page * page_size
            k_off = block * skb + in_page * skn
            v_off = block * svb + in_page * svn
        else:
            k_off = cols * skn
            v_off = cols * svn
        kt = tl.load(Kh + k_off[None, :] + d[:, None], mask=d_ok[:, None] & col_ok[None, :], other=0.0)
        qk = tl.dot(q, kt, input_precision=DOT_PREC)
        diag = i[:, None] + off - cols[None, :]
        s2, _t = _scores_log2(qk, diag, slope2[:, None], qk, qk_scale2, softcap_scale, softcap2,
                              HAS_SOFTCAP, HAS_ALIBI, False)
        ok = _allowed(i[:, None], cols[None, :], diag, Sq, n_hi, window_left, window_right, HAS_WL, HAS_WR)
        if HAS_LEFTPAD:
            ok = ok & col_ok[None, :]
        s2 = tl.where(ok, s2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s2, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s2 - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(Vh + v_off[:, None] + d[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    # workspace index ((split * B + b) * H + h) * Sq + i
    row_index = ((pid_s * batch_size + b) * num_heads + h) * Sq + i
    tl.store(WsOut + row_index[:, None] * HEAD_DIM + d[None, :], out, mask=row_ok[:, None] & d_ok[None, :])
    tl.store(WsLse + row_index, lse, mask=row_ok)


@triton.jit
def _decode_combine_kernel(WsOut, WsLse, Out, Lse, sob, soh, som, num_heads, Sq, rows_total, num_splits,
                           HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    """out = sum_s exp(lse_s - lse) out_s, lse = logsumexp_s lse_s, for one (b, h, i) row."""
    row = tl.program_id(0).to(tl.int64)  # (b * H + h) * Sq + i
    b = row // (num_heads * Sq)
    h = (row // Sq) % num_heads
    i = row % Sq
    s = tl.arange(0, BLOCK_S)
    s_ok = s < num_splits
    lse_s = tl.load(WsLse + s * rows_total + row, mask=s_ok, other=float("-inf"))
    m = tl.max(lse_s, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse_s - m_safe)
    total = tl.sum(w, 0)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    parts = tl.load(WsOut + (s[:, None] * rows_total + row) * HEAD_DIM + d[None, :],
                    mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    out = tl.sum(parts * w[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    lse = tl.where(total == 0.0, float("-inf"), m_safe + tl.log(tl.where(total == 0.0, 1.0, total)))
    tl.store(Out + b * sob + h * soh + i * som + d, out.to(Out.dtype.element_ty), mask=d_ok)
    tl.store(Lse + row, lse)


# ---------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_qkv(q, k, v, pooled=False):
    """pooled: k / v are a decode cache pool (cache_batch_idx rows or paged blocks), any batch."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"attention (triton): {name} must be a 4-D tensor, got "
                             f"{getattr(t, 'shape', type(t).__name__)}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"attention (triton): {name} must be fp16, bf16 or fp32, got {t.dtype}")
        if t.numel() > 0 and t.stride(-1) != 1:
            raise ValueError(f"attention (triton): {name} must have stride(-1) == 1, got strides {t.stride()}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"attention (triton): q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    D = q.shape[-1]
    if k.shape[-1] != D or v.shape[-1] != D:
        raise ValueError("attention (triton): q, k, v need one head dim, "
                         f"got {q.shape[-1]}, {k.shape[-1]}, {v.shape[-1]}")
    if D < 16 or D > 256 or D % 8:
        raise ValueError(f"attention (triton): head dim must be a multiple of 8 in [16, 256], got {D}")
    if k.shape != v.shape[:3] + (D,) or (k.shape[0] != q.shape[0] and not pooled):
        raise ValueError(f"attention (triton): k {tuple(k.shape)} and v {tuple(v.shape)} must match, batch as q "
                         f"{tuple(q.shape)}" + (" (without cache_batch_idx or block_table)" if k.shape == v.shape
                                                 else ""))
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"attention (triton): query heads {q.shape[1]} must be a multiple of kv heads {k.shape[1]}")


def _dot_precision(dtype):
    """fp16/bf16: tensor cores (the value is ignored). fp32: TF32 tensor cores when torch allows
    TF32 for fp32 matmuls (torch.get_float32_matmul_precision() "high"/"medium", which
    torch.backends.cuda.matmul.allow_tf32 = True sets), as torch's SDPA does; by default
    ("highest") exact fp32 products, so fp32 results meet the fp32 error bound."""
    if dtype != torch.float32:
        return "tf32"
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def _dropout_params(dropout_p, seed):
    """(hash state, 24-bit threshold, keep scale) of the reference's dropout_keep_mask."""
    if not (0.0 <= dropout_p < 1.0):
        raise ValueError(f"attention (triton): dropout_p must be in [0, 1), got {dropout_p}")
    seed = int(seed) & ((1 << 64) - 1)

    def mix(x):
        x ^= x >> 16
        x = (x * 0x7FEB352D) & _MASK32
        x ^= x >> 15
        x = (x * 0x846CA68B) & _MASK32
        return x ^ (x >> 16)

    state = mix(mix((seed & _MASK32) ^ 0x9E3779B9) ^ (seed >> 32))
    threshold = int(math.ceil(dropout_p * (1 << 24)))
    return state, threshold, 1.0 / (1.0 - dropout_p)


def _score_params(scale, softcap):
    scale = float(scale)
    softcap = float(softcap or 0.0)
    if softcap > 0:
        return scale * _LOG2E, scale / softcap, softcap * _LOG2E
    return scale * _LOG2E, 1.0, 1.0


def _alibi_args(alibi_slopes, B, H, dummy):
    if alibi_slopes is None:
        return dummy, 0, 0
    a = alibi_slopes
    if a.dim() == 1:
        if a.shape[0] != H:
            raise ValueError(f"attention (triton): alibi_slopes must be (H,) or (B, H) with H={H}, "
                             f"got {tuple(a.shape)}")
        return a, 0, a.stride(0)
    if a.dim() != 2 or a.shape[1] != H or a.shape[0] not in (1, B):
        raise ValueError(f"attention (triton): alibi_slopes must be (H,) or (B, H) = ({B}, {H}), got {tuple(a.shape)}")
    return a, (a.stride(0) if a.shape[0] > 1 else 0), a.stride(1)


def _bias_args(bias, B, H, Sq, Sk, dummy):
    if bias is None:
        return dummy, (0, 0, 0, 0)
    if bias.dim() != 4:
        raise ValueError(f"attention (triton): bias must be a 4-D view broadcastable to {(B, H, Sq, Sk)}, "
                         f"got {tuple(bias.shape)}")
    b = bias.expand(B, H, Sq, Sk)  # broadcast dims get stride 0
    return b, tuple(b.stride())


def _varlen_args(q, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, bias):
    """(is_varlen, number of batch rows / sequences, max Sq, CuQ, CuK)."""
    if (cu_seqlens_q is None) != (cu_seqlens_k is None):
        raise ValueError("attention (triton): cu_seqlens_q and cu_seqlens_k must be given together")
    if cu_seqlens_q is None:
        return False, q.shape[0], q.shape[2], None, None
    if q.shape[0] != 1:
        raise ValueError(f"attention (triton): varlen needs batch 1 (packed sequences), got batch {q.shape[0]}")
    if bias is not None:
        raise ValueError("attention (triton): an additive bias cannot be combined with varlen")
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if cu.dtype != torch.int32 or cu.dim() != 1 or cu.device != q.device:
            raise ValueError(f"attention (triton): {name} must be a 1-D int32 tensor on {q.device}, "
                             f"got {cu.dtype} {tuple(cu.shape)} on {cu.device}")
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(f"attention (triton): cu_seqlens_q {tuple(cu_seqlens_q.shape)} and cu_seqlens_k "
                         f"{tuple(cu_seqlens_k.shape)} must have the same length")
    nseq = cu_seqlens_q.shape[0] - 1
    if max_seqlen_q is None:  # a host sync; the front end passes it
        max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max().item()) if nseq > 0 else 0
    return True, nseq, int(max_seqlen_q), cu_seqlens_q, cu_seqlens_k


def _flags(window_left, window_right, align_bottom_right, softcap, alibi_slopes, bias, dropout_p, is_varlen):
    return dict(IS_VARLEN=is_varlen, ALIGN_BR=bool(align_bottom_right), HAS_SOFTCAP=bool(softcap and softcap > 0),
                HAS_ALIBI=alibi_slopes is not None, HAS_BIAS=bias is not None,
                HAS_WL=window_left is not None and window_left >= 0,
                HAS_WR=window_right is not None and window_right >= 0, HAS_DROPOUT=dropout_p > 0)


def bias_needs_int64(sbm, sbn, Sq, Sk):
    """Whether a bias tile's offsets rows * sbm + cols * sbn can reach 2^31 (rows and columns
    run up to a block past Sq and Sk, <= 256 rows/columns of padding)."""
    return (Sq + 256) * abs(sbm) + (Sk + 256) * abs(sbn) >= 2**31


def _window(w):
    return -1 if w is None else int(w)


def forward(q, k, v, *, scale, window_left=-1, window_right=-1, align_bottom_right=True, softcap=0.0,
            alibi_slopes=None, bias=None, dropout_p=0.0, seed=0, cu_seqlens_q=None, cu_seqlens_k=None,
            max_seqlen_q=None, max_seqlen_k=None, return_dropout_mask=False):
    """Contract forward: (out (B, H, Sq, D) contiguous in q's dtype, lse fp32 (B, H, Sq)[, bool keep mask])."""
    _check_qkv(q, k, v)
    B, H, Sq, D = q.shape
    Hk, Sk = k.shape[1], k.shape[2]
    window_left, window_right = _window(window_left), _window(window_right)
    is_varlen, nseq, max_q, cu_q, cu_k = _varlen_args(q, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, bias)
    drop_state, drop_threshold, drop_scale = _dropout_params(dropout_p, seed)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Sq), dtype=torch.float32, device=q.device)
    keep = None
    if return_dropout_mask:
        keep = torch.zeros((B, H, Sq, Sk), dtype=torch.int8, device=q.device)
    if q.numel() == 0 or nseq == 0:
        lse.fill_(float("-inf"))
        out.zero_()
        return (out, lse, keep.bool()) if return_dropout_mask else (out, lse)
    dummy = lse
    alibi, sab, sah = _alibi_args(alibi_slopes, nseq, H, dummy)
    bias_t, (sbb, sbh, sbm, sbn) = _bias_args(bias, B, H, Sq, Sk, dummy)
    flags = _flags(window_left, window_right, align_bottom_right, softcap, alibi_slopes, bias, dropout_p, is_varlen)
    flags["BIAS_I64"] = bias_needs_int64(sbm, sbn, Sq, Sk) if bias is not None else False
    qk_scale2, softcap_scale, softcap2 = _score_params(scale, softcap)
    block_d = max(16, triton.next_power_of_2(D))

    def grid(meta):
        if meta["PERSISTENT"]:  # one program per SM (each holds one 8-warp 128-row tile's smem)
            return (min(grid_1d(max_q, meta["BLOCK_M"], nseq * H)[0], _num_sms(q.device)),)
        return grid_1d(max_q, meta["BLOCK_M"], nseq * H)

    tma_aligned = descriptors_usable(q, k, v, out)
    with torch.cuda.device(q.device) if q.is_cuda else _nullcontext():
        _fwd[grid](q, k, v, out, lse, bias_t, alibi, cu_q if is_varlen else dummy, cu_k if is_varlen else dummy,
                   q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                   v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
                   lse.stride(0), lse.stride(1), sbb, sbh, sbm, sbn, sab, sah,
                   H, H // Hk, Sq, Sk, max_q, qk_scale2, softcap_scale, softcap2, window_left, window_right,
                   drop_state, drop_threshold, drop_scale, nseq * H,
                   HEAD_DIM=D, BLOCK_D=block_d, DOT_PREC=_dot_precision(q.dtype), TMA_ALIGNED=tma_aligned, **flags)
        if return_dropout_mask and dropout_p > 0:
            _dropout_mask_kernel[grid_1d(max_q, 16, nseq * H)](
                keep, cu_q if is_varlen else dummy, cu_k if is_varlen else dummy,
                keep.stride(0), keep.stride(1), keep.stride(2), H, Sq, Sk, max_q, drop_state, drop_threshold,
                IS_VARLEN=is_varlen, BLOCK_M=16, BLOCK_N=32 if _INTERPRET else 128)
    if return_dropout_mask:
        if dropout_p == 0:
            keep.fill_(1)
        return out, lse, keep.bool()
    return out, lse


def tma_aligned_all(*tensors) -> bool:
    """Whether tensor descriptors can address these tensors: 16-byte aligned data and every
    stride but the last (which must be 1) a multiple of 16 bytes (TMA's rules)."""
    for t in tensors:
        elem = t.element_size()
        if t.stride(-1) != 1 or t.data_ptr() % 16 or any(st * elem % 16 for st in t.stride()[:-1]):
            return False
    return True


def descriptors_usable(*tensors) -> bool:
    """Whether a launch may address these tensors through descriptors made in the kernel: they
    are aligned for TMA and, on a GPU, Triton has an allocator for the descriptors' scratch."""
    return tma_aligned_all(*tensors) and (not tensors[0].is_cuda or descriptor_allocator_ready())


def descriptor_allocator_ready() -> bool:
    """Descriptors made inside a kernel need a small global scratch buffer per launch, which
    Triton takes from the allocator set with triton.set_allocator: set torch's caching allocator
    unless the application chose one (the setting is per thread / context). False where this
    Triton keeps its allocator elsewhere: the launch then uses no descriptor."""
    try:
        from triton.runtime import _allocation

        current = _allocation._allocator.get()
        if isinstance(current, _allocation.NullAllocator):
            triton.set_allocator(_torch_scratch)
        return True
    except Exception:
        return False


def _torch_scratch(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


MAX_GRID_X = 2**31 - 1  # CUDA's limit on grid axis x (y and z: 65,535)


def grid_1d(length, block, heads):
    """The launch grid of a (sequence block, batch x head) kernel: one axis, blocks fastest
    (see _split_program)."""
    programs = triton.cdiv(length, block) * heads
    if programs > MAX_GRID_X:
        raise ValueError(f"attention (triton): {programs} programs exceed CUDA's grid limit {MAX_GRID_X}")
    return (programs,)


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _bwd_blocks(D, dtype, prec="tf32", has_bias=False):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the backward kernels (no autotune: the
    atomic dq path cannot be re-run by a benchmark). Half-precision tiles measured with
    compile-check (bf16, sm_90, dK/dV kernel with the atomic dq, causal / bias / dropout /
    ALiBi+softcap+window): 64 x 64 spilled 196-528 B at D64 on 4 or 8 warps, 32 x 32 on 4 warps
    fits (229-248 registers); at D128 32 x 32 on 8 warps fits (240-254), except with a bias
    (28 B), which fits in one stage; at D256 16 x 32 on 8 warps in one stage (244-255)."""
    if _INTERPRET:
        return 16, 16, 4, 1
    if dtype == torch.float32 and prec == "ieee":
        # FMA code: only small tiles fit registers. 16 x 32 spilled 8-56 B at D64-D128 and
        # 1.3-2.4 KB at D256 with the atomic dq on sm_80 (ptxas held most at 128 registers).
        return 16, 16, 8, 1
    if D <= 64:
        return (64, 64, 4, 3) if dtype == torch.float32 else (32, 32, 4, 2)
    arch = target_arch()
    before_hopper = arch is not None and arch < 90
    if D <= 128:
        if dtype == torch.float32:
            return 32, 64, 8, 2
        # sm_80 (full compile-check, bf16): two stages spilled 8-32 B with ALiBi+softcap+window.
        return (32, 32, 8, 1) if has_bias or before_hopper else (32, 32, 8, 2)
    if dtype == torch.float32:  # fp32 tiles at head dim 256 overflow an A100's 164 KB of shared memory
        return 16, 32, 8, 1
    # 16 x 64 spilled 764-988 B; two stages 44-116 B. On sm_80, 16 x 32 spilled 8-48 B (4 of 12
    # dK/dV problems; already at 255 registers): 16 x 16 there, with a register budget (below).
    # On sm_90 16 x 32 with a bias spilled 8-12 B at 255 registers: 16 x 16 there too.
    return (16, 16, 8, 1) if before_hopper or has_bias else (16, 32, 8, 1)


# Tests set this to run the backward's descriptor loads in the interpreter (no arch there).
TMA_UNDER_INTERPRETER = False


def _bwd_tma(*tensors) -> bool:
    """Whether the backward kernels read their loop tiles (q, dO in dK/dV; k, v in dQ) through
    tensor descriptors: TMA on sm_90+ for half-precision, aligned tensors (fp32 and sm_80 keep
    masked loads). The tiles are those of _bwd_blocks either way."""
    if _INTERPRET:
        return TMA_UNDER_INTERPRETER and descriptors_usable(*tensors)
    arch = target_arch()
    if not HAS_TMA or arch is None or arch < 90 or tensors[0].dtype == torch.float32:
        return False
    return descriptors_usable(*tensors)


def _bwd_register_budgets(block_d, dtype, prec, atomic_dq, use_tma=False):
    """maxnreg of the (dK/dV, dQ) kernels; None: ptxas's choice. Exact fp32 (FMA code, 8 warps):
    left to itself, ptxas trimmed configs that need 90-174 registers to 64 or 80 (more blocks per
    SM) and spilled 4-32 B on sm_80. With a budget it keeps to what fits: 128 (2 blocks per SM)
    where every config fits it, 255 for the dK/dV kernel with the atomic dq past D64 and at
    D256, which need 166-255. Half precision at head dim 256 on sm_80-89 (16 x 16 tiles): ptxas
    kept to 128 registers and spilled 28-80 B; with 255 it takes 143-248 and spills nothing. The
    half-precision dQ kernel gets 255 everywhere (see below), the dK/dV kernel too where it
    loads through descriptors (sm_90: ptxas held the D64 dK/dV at 168 registers and spilled 12 B)."""
    if _INTERPRET:
        return None, None
    if dtype != torch.float32 or prec != "ieee":
        # The dQ kernel: left to itself ptxas kept some configs to 128 registers and spilled 4-40 B
        # (sm_90: D64 with a bias, D128 with ALiBi+softcap+window or varlen).
        arch = target_arch()
        return (255 if use_tma or (block_d > 128 and arch is not None and arch < 90) else None), 255
    return (255 if block_d > 128 or (atomic_dq and block_d > 64) else 128), 128


def backward(dout, q, k, v, out, lse, *, scale, window_left=-1, window_right=-1, align_bottom_right=True,
             softcap=0.0, alibi_slopes=None, bias=None, dropout_p=0.0, seed=0, cu_seqlens_q=None, cu_seqlens_k=None,
             max_seqlen_q=None, max_seqlen_k=None, deterministic=False, return_dropout_mask=False):
    """Contract backward: (dq, dk, dv) with the shapes and dtypes of q, k, v."""
    _check_qkv(q, k, v)
    B, H, Sq, D = q.shape
    Hk, Sk = k.shape[1], k.shape[2]
    if dout.shape != q.shape or out.shape != q.shape or lse.shape != (B, H, Sq):
        raise ValueError(f"attention (triton) backward: dout {tuple(dout.shape)} and out {tuple(out.shape)} must be "
                         f"{tuple(q.shape)}, lse {tuple(lse.shape)} must be {(B, H, Sq)}")
    if dout.stride(-1) != 1 or out.stride(-1) != 1:
        dout, out = dout.contiguous(), out.contiguous()
    window_left, window_right = _window(window_left), _window(window_right)
    is_varlen, nseq, max_q, cu_q, cu_k = _varlen_args(q, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, bias)
    if is_varlen and max_seqlen_k is None:
        max_seqlen_k = int((cu_seqlens_k[1:] - cu_seqlens_k[:-1]).max().item()) if nseq > 0 else 0
    max_k = int(max_seqlen_k) if is_varlen else Sk
    drop_state, drop_threshold, drop_scale = _dropout_params(dropout_p, seed)
    dk = torch.zeros(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.zeros(v.shape, dtype=v.dtype, device=v.device)
    if q.numel() == 0 or k.numel() == 0 or nseq == 0:
        return torch.zeros(q.shape, dtype=q.dtype, device=q.device), dk, dv
    lse = lse.float().contiguous()
    delta = torch.empty((B, H, Sq), dtype=torch.float32, device=q.device)
    dummy = delta
    alibi, sab, sah = _alibi_args(alibi_slopes, nseq, H, dummy)
    bias_t, (sbb, sbh, sbm, sbn) = _bias_args(bias, B, H, Sq, Sk, dummy)
    flags = _flags(window_left, window_right, align_bottom_right, softcap, alibi_slopes, bias, dropout_p, is_varlen)
    flags["BIAS_I64"] = bias_needs_int64(sbm, sbn, Sq, Sk) if bias is not None else False
    qk_scale2, softcap_scale, softcap2 = _score_params(scale, softcap)
    block_d = max(16, triton.next_power_of_2(D))
    prec = _dot_precision(q.dtype)
    block_m, block_n, warps, stages = _bwd_blocks(D, q.dtype, prec, bias is not None)
    atomic_dq = not deterministic
    use_tma = _bwd_tma(q, k, v, dout)
    dkdv_maxnreg, dq_maxnreg = _bwd_register_budgets(block_d, q.dtype, prec, atomic_dq, use_tma)
    if atomic_dq:
        dq_buf = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    else:
        dq_buf = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    cu_q_arg = cu_q if is_varlen else dummy
    cu_k_arg = cu_k if is_varlen else dummy
    with torch.cuda.device(q.device) if q.is_cuda else _nullcontext():
        # fp32 64- and 32-row tiles spilled 4 B (D64, D128, sm_90)
        # (16-row fp32 tiles spilled 4 B at head dim 256 on sm_90: 8 rows there)
        pre_block = 16 if _INTERPRET else (64 if q.dtype != torch.float32 else (8 if block_d > 128 else 16))
        _bwd_preprocess_kernel[grid_1d(Sq, pre_block, B * H)](
            out, dout, delta, out.stride(0), out.stride(1), out.stride(2), dout.stride(0), dout.stride(1),
            dout.stride(2), H, Sq, HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=pre_block)
        common_strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                          v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2))
        _bwd_dkdv_kernel[grid_1d(max_k, block_n, nseq * Hk)](
            q, k, v, dout, dq_buf, dk, dv, lse, delta, bias_t, alibi, cu_q_arg, cu_k_arg,
            *common_strides, dq_buf.stride(0), dq_buf.stride(1), dq_buf.stride(2),
            dk.stride(0), dk.stride(1), dk.stride(2), lse.stride(0), lse.stride(1),
            sbb, sbh, sbm, sbn, sab, sah, H, Hk, H // Hk, Sq, Sk, max_k,
            qk_scale2, softcap_scale, softcap2, float(scale), window_left, window_right,
            drop_state, drop_threshold, drop_scale,
            HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, ATOMIC_DQ=atomic_dq, DOT_PREC=prec,
            USE_TMA=use_tma, num_warps=warps, num_stages=stages, maxnreg=dkdv_maxnreg, **flags)
        if not atomic_dq:
            dq_block_m, dq_block_n = (block_n, block_m) if not _INTERPRET else (16, 16)
            _bwd_dq_kernel[grid_1d(max_q, dq_block_m, nseq * H)](
                q, k, v, dout, dq_buf, lse, delta, bias_t, alibi, cu_q_arg, cu_k_arg,
                *common_strides, dq_buf.stride(0), dq_buf.stride(1), dq_buf.stride(2), lse.stride(0), lse.stride(1),
                sbb, sbh, sbm, sbn, sab, sah, H, H // Hk, Sq, Sk, max_q,
                qk_scale2, softcap_scale, softcap2, float(scale), window_left, window_right,
                drop_state, drop_threshold, drop_scale,
                HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=dq_block_m, BLOCK_N=dq_block_n, DOT_PREC=prec,
                USE_TMA=use_tma, num_warps=warps, num_stages=stages, maxnreg=dq_maxnreg, **flags)
    dq = dq_buf.to(q.dtype) if atomic_dq else dq_buf
    return dq, dk, dv


def _num_sms(device):
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def decode_num_splits(batch, num_kv_heads, row_blocks, max_keys, device, block_n=64):
    """Heuristic: enough programs to fill the GPU twice over, each split >= 4 key blocks, at most 64."""
    programs = max(1, batch * num_kv_heads * row_blocks)
    sms = _num_sms(device)
    if programs >= sms:
        return 1
    by_length = max(1, triton.cdiv(max_keys, 4 * block_n))
    return max(1, min(triton.cdiv(2 * sms, programs), by_length, 64))


def _check_cache_index(name, t, B, device):
    """cache_leftpad / cache_batch_idx: int32 (B,) on q's device (a unit stride is ensured)."""
    if t is None:
        return None
    if not isinstance(t, torch.Tensor) or t.dtype != torch.int32 or t.shape != (B,) or t.device != device:
        raise ValueError(f"attention (triton) decode: {name} must be int32 ({B},) on {device}, got "
                         + (f"{t.dtype} {tuple(t.shape)} on {t.device}" if isinstance(t, torch.Tensor)
                            else type(t).__name__))
    return t if t.stride(0) == 1 else t.contiguous()


def decode(q, k_cache, v_cache, cache_seqlens, *, scale, window_left=-1, window_right=-1, softcap=0.0,
           alibi_slopes=None, num_splits=0, cache_leftpad=None, cache_batch_idx=None, block_table=None):
    """Contract decode (flash-decoding): (out (B, H, Sq, D) in q's dtype, lse fp32 (B, H, Sq)).

    k_cache / v_cache: (B_cache, Hk, S_max, D), batch row b reading cache row cache_batch_idx[b]
    (int32 (B,); None: row b); or a paged cache (num_blocks, Hk, page_size, D) with block_table
    (int32 (B, max_blocks)): key j of row b is row j % page_size of block block_table[b, j //
    page_size], the capacity max_blocks * page_size. cache_leftpad (int32 (B,)): row b's keys are
    positions [cache_leftpad[b], cache_seqlens[b]) (positions stay absolute). The index values
    are not checked (no host synchronisation): the caller keeps them in range."""
    _check_qkv(q, k_cache, v_cache, pooled=cache_batch_idx is not None or block_table is not None)
    B, H, Sq, D = q.shape
    Hk = k_cache.shape[1]
    if cache_seqlens.dtype != torch.int32 or cache_seqlens.shape != (B,) or cache_seqlens.device != q.device:
        raise ValueError(f"attention (triton) decode: cache_seqlens must be int32 ({B},) on {q.device}, got "
                         f"{cache_seqlens.dtype} {tuple(cache_seqlens.shape)} on {cache_seqlens.device}")
    if num_splits < 0:
        raise ValueError(f"attention (triton) decode: num_splits must be >= 0, got {num_splits}")
    cache_leftpad = _check_cache_index("cache_leftpad", cache_leftpad, B, q.device)
    cache_batch_idx = _check_cache_index("cache_batch_idx", cache_batch_idx, B, q.device)
    paged = block_table is not None
    if paged:
        if cache_batch_idx is not None:
            raise ValueError("attention (triton) decode: a paged cache (block_table) takes no cache_batch_idx: the "
                             "table already maps rows to blocks")
        if (not isinstance(block_table, torch.Tensor) or block_table.dtype != torch.int32 or block_table.dim() != 2
                or block_table.shape[0] != B or block_table.device != q.device):
            raise ValueError(f"attention (triton) decode: block_table must be int32 ({B}, max_blocks) on {q.device}, "
                             "got " + (f"{block_table.dtype} {tuple(block_table.shape)} on {block_table.device}"
                                       if isinstance(block_table, torch.Tensor) else type(block_table).__name__))
        if k_cache.shape[2] < 1:
            raise ValueError(f"attention (triton) decode: a paged cache needs pages of at least one row, got "
                             f"k_cache {tuple(k_cache.shape)}")
        if block_table.numel() > 0 and block_table.stride(1) != 1:
            block_table = block_table.contiguous()
        page_size = k_cache.shape[2]
        S_max = block_table.shape[1] * page_size
    else:
        page_size = 0
        S_max = k_cache.shape[2]
    window_left, window_right = _window(window_left), _window(window_right)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Sq), dtype=torch.float32, device=q.device)
    if q.numel() == 0:
        return out, lse.fill_(float("-inf"))
    if S_max == 0 or k_cache.numel() == 0:  # no key anywhere
        return out.zero_(), lse.fill_(float("-inf"))
    group = H // Hk
    rows = group * Sq
    block_m = max(16, min(triton.next_power_of_2(rows), 64))
    prec = _dot_precision(q.dtype)
    block_n = 16 if _INTERPRET else (64 if D <= 128 and prec != "ieee" else 32)
    row_blocks = triton.cdiv(rows, block_m)
    if num_splits == 0:
        num_splits = decode_num_splits(B, Hk, row_blocks, S_max, q.device, block_n)
    num_splits = max(1, min(num_splits, max(1, triton.cdiv(S_max, block_n))))
    split_size = triton.cdiv(triton.cdiv(max(S_max, 1), num_splits), block_n) * block_n
    ws_out = torch.empty((num_splits, B, H, Sq, D), dtype=torch.float32, device=q.device)
    ws_lse = torch.empty((num_splits, B, H, Sq), dtype=torch.float32, device=q.device)
    alibi, sab, sah = _alibi_args(alibi_slopes, B, H, ws_lse)
    qk_scale2, softcap_scale, softcap2 = _score_params(scale, softcap)
    block_d = max(16, triton.next_power_of_2(D))
    dummy = cache_seqlens  # int32 stand-in for absent index tensors (never read)
    with torch.cuda.device(q.device) if q.is_cuda else _nullcontext():
        _decode_split_kernel[(num_splits * row_blocks * B * Hk,)](
            q, k_cache, v_cache, cache_seqlens, alibi, ws_out, ws_lse,
            cache_leftpad if cache_leftpad is not None else dummy,
            cache_batch_idx if cache_batch_idx is not None else dummy,
            block_table if paged else dummy,
            q.stride(0), q.stride(1), q.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), sab, sah,
            block_table.stride(0) if paged else 0, page_size,
            H, Hk, group, Sq, split_size, num_splits, row_blocks, B, qk_scale2, softcap_scale, softcap2,
            window_left, window_right,
            HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n,
            HAS_SOFTCAP=bool(softcap and softcap > 0), HAS_ALIBI=alibi_slopes is not None,
            HAS_WL=window_left >= 0, HAS_WR=window_right >= 0, DOT_PREC=prec,
            HAS_LEFTPAD=cache_leftpad is not None, HAS_BATCH_IDX=cache_batch_idx is not None, PAGED=paged,
            num_warps=8 if prec == "ieee" and not _INTERPRET else 4, num_stages=1 if _INTERPRET else 2,
            # exact fp32 up to D128: ptxas trimmed it to 64 registers and spilled 4-8 B on sm_80
            # (4 warps spilled 488 B on sm_90); with 128 allowed it takes 78-104
            maxnreg=128 if prec == "ieee" and block_d <= 128 and not _INTERPRET else None)
        _decode_combine_kernel[(B * H * Sq,)](
            ws_out, ws_lse, out, lse, out.stride(0), out.stride(1), out.stride(2), H, Sq, B * H * Sq, num_splits,
            HEAD_DIM=D, BLOCK_D=block_d, BLOCK_S=max(2, triton.next_power_of_2(num_splits)))
    return out, lse


# ---------------------------------------------------------------------------------------------
# Rotary embedding of q / new k fused with the KV-cache append (flash_attn_with_kvcache)
# ---------------------------------------------------------------------------------------------
@triton.jit
def _rotary_rows(Src, src_row, Dst, dst_row, Cos, Sin, cos_row, sin_row, h_ok,
                 HEAD_DIM: tl.constexpr, ROT_HALF: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
                 INTERLEAVED: tl.constexpr):
    """Dst[dst_row + d] = rotary(Src[src_row + d]) for the BLOCK_H head rows src_row / dst_row
    (int64 element offsets, unit stride along d; rows with h_ok false are skipped). cos / sin
    rows at Cos + cos_row / Sin + sin_row (unit stride). fp32 math, rounded to Dst's dtype; dims
    [2 * ROT_HALF, HEAD_DIM) are copied unchanged (BLOCK_P: their power-of-two block, 0: none).
    INTERLEAVED pairs (2r, 2r + 1), otherwise (r, r + ROT_HALF)."""
    r = tl.arange(0, BLOCK_R)
    r_ok = r < ROT_HALF
    c = tl.load(Cos + cos_row + r, mask=r_ok, other=0.0).to(tl.float32)[None, :]
    s = tl.load(Sin + sin_row + r, mask=r_ok, other=0.0).to(tl.float32)[None, :]
    if INTERLEAVED:
        # one contiguous load of the 2 * ROT_HALF rotated dims, split into (even, odd)
        e = tl.arange(0, 2 * BLOCK_R)
        m = h_ok[:, None] & (e < 2 * ROT_HALF)[None, :]
        x = tl.load(Src + src_row[:, None] + e[None, :], mask=m, other=0.0).to(tl.float32)
        x1, x2 = tl.split(tl.reshape(x, [x.shape[0], BLOCK_R, 2]))
        o1 = x1 * c - x2 * s
        o2 = x1 * s + x2 * c
        o = tl.reshape(tl.join(o1, o2), [x.shape[0], 2 * BLOCK_R])
        tl.store(Dst + dst_row[:, None] + e[None, :], o.to(Dst.dtype.element_ty), mask=m)
    else:
        m = h_ok[:, None] & r_ok[None, :]
        x1 = tl.load(Src + src_row[:, None] + r[None, :], mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(Src + src_row[:, None] + (r + ROT_HALF)[None, :], mask=m, other=0.0).to(tl.float32)
        tl.store(Dst + dst_row[:, None] + r[None, :], (x1 * c - x2 * s).to(Dst.dtype.element_ty), mask=m)
        tl.store(Dst + dst_row[:, None] + (r + ROT_HALF)[None, :], (x1 * s + x2 * c).to(Dst.dtype.element_ty),
                 mask=m)
    if BLOCK_P > 0:
        p = 2 * ROT_HALF + tl.arange(0, BLOCK_P)
        pm = h_ok[:, None] & (p < HEAD_DIM)[None, :]
        xp = tl.load(Src + src_row[:, None] + p[None, :], mask=pm)
        tl.store(Dst + dst_row[:, None] + p[None, :], xp, mask=pm)


@triton.jit
def _rotary_append_kernel(Q, QOut, K, V, KCache, VCache, SeqLens, Cos, Sin, BatchIdx, BlockTable,
                          sqb, sqs, sqh, sob, sos, soh, skb, sks, skh, svb, svs, svh,
                          skcb, skcs, skch, svcb, svcs, svch, scos, ssin, sbt, page_size,
                          Sq, num_heads, q_head_blocks, S_new, num_kv_heads, kv_head_blocks, q_programs,
                          HEAD_DIM: tl.constexpr, ROT_HALF: tl.constexpr, BLOCK_R: tl.constexpr,
                          BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_HQ: tl.constexpr,
                          BLOCK_HK: tl.constexpr, INTERLEAVED: tl.constexpr, Q_SAME_POSITION: tl.constexpr,
                          HAS_BATCH_IDX: tl.constexpr, PAGED: tl.constexpr):
    """One grid axis: programs [0, q_programs) rotate q, one per (b, i, block of BLOCK_HQ heads)
    (head block fastest) into QOut; the others append the new k (rotated) / v, one per (b, t,
    block of BLOCK_HK kv heads), at position SeqLens[b] + t of row b's cache: row BatchIdx[b]
    (HAS_BATCH_IDX) or b of (B_cache, S_max, Hk, D); PAGED: row (p % page_size) of block
    BlockTable[b * sbt + p // page_size] of (num_blocks, page_size, Hk, D). Cache offsets 64-bit."""
    pid = tl.program_id(0).to(tl.int64)
    if pid < q_programs:
        hb = pid % q_head_blocks
        i = (pid // q_head_blocks) % Sq
        b = pid // (q_head_blocks * Sq)
        pos = tl.load(SeqLens + b).to(tl.int64)
        if not Q_SAME_POSITION:
            pos = pos + i
        hq = hb * BLOCK_HQ + tl.arange(0, BLOCK_HQ)  # (names differ from the else block's: other shapes)
        hq_ok = hq < num_heads
        _rotary_rows(Q, b * sqb + i * sqs + hq * sqh, QOut, b * sob + i * sos + hq * soh, Cos, Sin, pos * scos,
                     pos * ssin, hq_ok, HEAD_DIM, ROT_HALF, BLOCK_R, BLOCK_P, INTERLEAVED)
    else:
        pid_kv = pid - q_programs
        hb = pid_kv % kv_head_blocks
        t = (pid_kv // kv_head_blocks) % S_new
        b = pid_kv // (kv_head_blocks * S_new)
        pos = tl.load(SeqLens + b).to(tl.int64) + t
        if PAGED:
            block = tl.load(BlockTable + b * sbt + pos // page_size).to(tl.int64)
            kc_base = block * skcb + (pos % page_size) * skcs
            vc_base = block * svcb + (pos % page_size) * svcs
        else:
            row = b
            if HAS_BATCH_IDX:
                row = tl.load(BatchIdx + b).to(tl.int64)
            kc_base = row * skcb + pos * skcs
            vc_base = row * svcb + pos * svcs
        hk = hb * BLOCK_HK + tl.arange(0, BLOCK_HK)
        hk_ok = hk < num_kv_heads
        _rotary_rows(K, b * skb + t * sks + hk * skh, KCache, kc_base + hk * skch, Cos, Sin, pos * scos, pos * ssin,
                     hk_ok, HEAD_DIM, ROT_HALF, BLOCK_R, BLOCK_P, INTERLEAVED)
        d = tl.arange(0, BLOCK_D)
        m = hk_ok[:, None] & (d < HEAD_DIM)[None, :]
        vt = tl.load(V + (b * svb + t * svs + hk * svh)[:, None] + d[None, :], mask=m)
        tl.store(VCache + (vc_base + hk * svch)[:, None] + d[None, :], vt, mask=m)


def _rotary_heads_block(heads, block_d):
    """Heads per program: up to ~2048 elements (a few KB) per program and tensor."""
    return max(1, min(triton.next_power_of_2(max(heads, 1)), max(1, 2048 // block_d)))


def rotary_append(q, k_cache, v_cache, k, v, cache_seqlens, cos, sin, *, interleaved: bool,
                  q_same_position: bool, cache_batch_idx=None, block_table=None) -> torch.Tensor:
    """flash_attn_with_kvcache's rotary + append, in one launch (flash-attn layout, (batch, seq,
    heads, dim)): returns q_rot, a new contiguous (B, Sq, H, D) tensor in q's dtype, q rotated
    at positions cache_seqlens[b] + i (q_same_position: cache_seqlens[b] for every i); the new
    k (rotated at cache_seqlens[b] + t) and v (unrotated) of k, v (B, S_new, Hk, D) are written
    in place at positions cache_seqlens[b] + t of row b's cache (S_new == 0: nothing written).

    k_cache / v_cache: (B_cache, S_max, Hk, D), batch row b using cache row cache_batch_idx[b]
    (int32 (B,)) or b; or paged, (num_blocks, page_size, Hk, D) with block_table (int32 (B,
    max_blocks)): position p of row b is row p % page_size of block block_table[b, p //
    page_size]. cos / sin (seqlen_ro, rotary_dim / 2) in any float dtype, rotary_dim <= D even;
    the rotation is ``genfast.reference.attention.rotary_embedding`` (fp32 math, rounded to the
    dtype; interleaved: pairs (2d, 2d + 1), else (d, d + rotary_dim / 2); dims >= rotary_dim
    copied). Index and position values are not checked (no host synchronisation, CUDA-graph
    safe): the caller keeps them in range. q, k, v, the caches: one dtype of fp16 / bf16 / fp32."""
    where = "attention (triton) rotary_append"
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{where}: {name} must be a 4-d tensor, got "
                             + (f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__))
        if t.dtype not in _DTYPES or t.dtype != q.dtype:
            raise ValueError(f"{where}: q, k, v, k_cache, v_cache must share one dtype of fp16 / bf16 / fp32, got "
                             f"{name} {t.dtype} with q {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{where}: {name} is on {t.device}, q on {q.device}")
    B, Sq, H, D = q.shape
    S_new, Hk = k.shape[1], k.shape[2]
    if k.shape != (B, S_new, Hk, D) or v.shape != k.shape:
        raise ValueError(f"{where}: k, v must be (B, S_new, Hk, D) = ({B}, S_new, Hk, {D}) alike, got "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    if k_cache.shape != v_cache.shape or k_cache.shape[2:] != (Hk, D):
        raise ValueError(f"{where}: k_cache, v_cache must be (rows, S, {Hk}, {D}) alike, got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError(f"{where}: the caches are written in place and need a unit last stride, got "
                         f"{k_cache.stride()} and {v_cache.stride()}")
    if (not isinstance(cache_seqlens, torch.Tensor) or cache_seqlens.dtype != torch.int32
            or cache_seqlens.shape != (B,) or cache_seqlens.device != q.device):
        raise ValueError(f"{where}: cache_seqlens must be int32 ({B},) on {q.device}, got "
                         + (f"{cache_seqlens.dtype} {tuple(cache_seqlens.shape)} on {cache_seqlens.device}"
                            if isinstance(cache_seqlens, torch.Tensor) else type(cache_seqlens).__name__))
    for name, t in (("cos", cos), ("sin", sin)):
        if (not isinstance(t, torch.Tensor) or t.dim() != 2 or not t.is_floating_point()
                or t.dtype == torch.float64 or t.device != q.device):
            raise ValueError(f"{where}: {name} must be a 2-d fp32 / fp16 / bf16 (seqlen_ro, rotary_dim / 2) tensor "
                             f"on {q.device}, got " + (f"{t.dtype} {tuple(t.shape)} on {t.device}"
                                                      if isinstance(t, torch.Tensor) else type(t).__name__))
    if cos.shape != sin.shape or not 0 < 2 * cos.shape[1] <= D:
        raise ValueError(f"{where}: cos, sin must be (seqlen_ro, rotary_dim / 2) alike with 0 < rotary_dim <= "
                         f"D = {D}, got {tuple(cos.shape)} and {tuple(sin.shape)}")
    cache_seqlens = cache_seqlens if cache_seqlens.stride(0) == 1 else cache_seqlens.contiguous()
    cache_batch_idx = _check_cache_index("cache_batch_idx", cache_batch_idx, B, q.device)
    paged = block_table is not None
    if paged:
        if cache_batch_idx is not None:
            raise ValueError(f"{where}: a paged cache (block_table) takes no cache_batch_idx")
        if (not isinstance(block_table, torch.Tensor) or block_table.dtype != torch.int32 or block_table.dim() != 2
                or block_table.shape[0] != B or block_table.device != q.device):
            raise ValueError(f"{where}: block_table must be int32 ({B}, max_blocks) on {q.device}, got "
                             + (f"{block_table.dtype} {tuple(block_table.shape)} on {block_table.device}"
                                if isinstance(block_table, torch.Tensor) else type(block_table).__name__))
        if k_cache.shape[1] < 1:
            raise ValueError(f"{where}: a paged cache needs pages of at least one row, got {tuple(k_cache.shape)}")
        if block_table.numel() > 0 and block_table.stride(1) != 1:
            block_table = block_table.contiguous()
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    cos = cos if cos.stride(-1) == 1 else cos.contiguous()
    sin = sin if sin.stride(-1) == 1 else sin.contiguous()
    out = torch.empty((B, Sq, H, D), dtype=q.dtype, device=q.device)
    rot_half = cos.shape[1]
    block_d = triton.next_power_of_2(D)
    block_hq, block_hk = _rotary_heads_block(H, block_d), _rotary_heads_block(Hk, block_d)
    q_head_blocks, kv_head_blocks = triton.cdiv(H, block_hq), triton.cdiv(Hk, block_hk)
    q_programs = B * Sq * q_head_blocks
    programs = q_programs + B * S_new * kv_head_blocks
    if programs == 0:
        return out
    if programs > MAX_GRID_X:
        raise ValueError(f"{where}: {programs} programs exceed CUDA's grid limit {MAX_GRID_X}")
    dummy = cache_seqlens  # int32 stand-in for absent index tensors (never read)
    elements = max(block_hq, block_hk) * block_d
    with torch.cuda.device(q.device) if q.is_cuda else _nullcontext():
        _rotary_append_kernel[(programs,)](
            q, out, k, v, k_cache, v_cache, cache_seqlens, cos, sin,
            cache_batch_idx if cache_batch_idx is not None else dummy, block_table if paged else dummy,
            q.stride(0), q.stride(1), q.stride(2), out.stride(0), out.stride(1), out.stride(2),
            k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), cos.stride(0), sin.stride(0),
            block_table.stride(0) if paged else 0, k_cache.shape[1] if paged else 0,
            Sq, H, q_head_blocks, S_new, Hk, kv_head_blocks, q_programs,
            HEAD_DIM=D, ROT_HALF=rot_half, BLOCK_R=triton.next_power_of_2(rot_half),
            BLOCK_P=triton.next_power_of_2(D - 2 * rot_half) if D > 2 * rot_half else 0, BLOCK_D=block_d,
            BLOCK_HQ=block_hq, BLOCK_HK=block_hk, INTERLEAVED=bool(interleaved),
            Q_SAME_POSITION=bool(q_same_position), HAS_BATCH_IDX=cache_batch_idx is not None, PAGED=paged,
            num_warps=max(1, min(4, elements // 512)), num_stages=1)
    return out
