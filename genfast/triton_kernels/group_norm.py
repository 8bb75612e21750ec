"""GroupNorm (+ SiLU) in Triton: the same algorithm as the C++ and CUDA kernels
(see ``ops/group_norm.py``), for NCHW and NHWC memory through one set of strided kernels.

Work is split into programs over (n, block of channels, chunk of spatial rows), so a small
batch still fills the GPU. Every program walks its chunk in [BLOCK_S, BLOCK_C] tiles:
  forward:  _partial_moments: corrected two-pass (mean, M2) of x - shift (shift: one element
            of the group) per tile and channel, merged over the chunk's tiles with Chan's
            formula -> partials [N, C, K]
            _finalize: per (n, group), merge the group's D * K partials -> mean, rstd
            _normalize: y = (x - mean) * rstd * w + b (then SiLU)
  backward: _partial_grad_sums: A = sum(dz * xhat), B = sum(dz) per (n, c, chunk)
            (small torch sums over the chunks, channels and samples)
            _grad_input: dx = rstd * (w dz - (sum_g(w B) + xhat * sum_g(w A)) / M)
Offsets are 64-bit. Strides equal to 1 are specialised by Triton, so loads are coalesced
along whichever of (s, c) is contiguous.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

TILE = 2048  # elements per tile
TILES_PER_PROGRAM = 4


@triton.jit
def _sigmoid(z):
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def _tile(n, s0, c_ids, S, C, stride_n, stride_c, stride_s, BLOCK_S: tl.constexpr):
    s_ids = s0 + tl.arange(0, BLOCK_S).to(tl.int64)
    mask = (s_ids[:, None] < S) & (c_ids[None, :] < C)
    offsets = n * stride_n + s_ids[:, None] * stride_s + c_ids[None, :] * stride_c
    return offsets, mask


@triton.jit
def _program(K, CBLOCKS, BLOCK_C: tl.constexpr):
    """(n, channel ids, chunk k) of a 1-D grid over N x channel blocks x K chunks: one axis,
    whose limit is 2^31 - 1 (K, on axis z before, passes 65,535 once H x W > 4.19M in NHWC)."""
    # The divisions in 32 bits (pid < 2^31: grid() checks): a 64-bit one is a subroutine call,
    # around which ptxas spilled (_grad_input fp32 + SiLU, 4 B on sm_80). Results in 64 bits.
    pid = tl.program_id(0)
    k = pid % K
    rest = pid // K
    c_ids = ((rest % CBLOCKS) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    return (rest // CBLOCKS).to(tl.int64), c_ids, k.to(tl.int64)


@triton.jit
def _group_of(c_ids, D):
    """The group of each channel id, divided in 32 bits (channel ids < C < 2^31)."""
    return (c_ids.to(tl.int32) // D).to(tl.int64)


@triton.jit
def _group_shift(x_ptr, n, c_ids, C, D, stride_n, stride_c):
    """x[n, first channel of the group of c, s = 0]: every statistic is computed on x - shift,
    whose magnitude is the data's spread, so float32 partial means lose nothing to a large mean."""
    first = _group_of(c_ids, D) * D
    return tl.load(x_ptr + n * stride_n + first * stride_c, mask=c_ids < C, other=0.0).to(tl.float32)


@triton.jit
def _partial_moments(x_ptr, pmean_ptr, pm2_ptr, S, C, D, K, CBLOCKS, ROWS, stride_n, stride_c, stride_s,
                     BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    n, c_ids, k = _program(K, CBLOCKS, BLOCK_C)
    shift = _group_shift(x_ptr, n, c_ids, C, D, stride_n, stride_c)
    start = k * ROWS
    end = tl.minimum(start + ROWS, S)
    count = tl.zeros([BLOCK_C], dtype=tl.float32)
    mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for s0 in range(start, end, BLOCK_S):
        offsets, mask = _tile(n, s0, c_ids, end, C, stride_n, stride_c, stride_s, BLOCK_S)
        x = tl.where(mask, tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32) - shift[None, :], 0.0)
        rows = tl.minimum(end - s0, BLOCK_S).to(tl.float32)
        tile_mean = tl.sum(x, axis=0) / rows
        d = tl.where(mask, x - tile_mean[None, :], 0.0)
        # Corrected two-pass: the sum of deviations repairs the rounding of the first mean
        # (about ulp(tile sum) / rows, which is not small next to the spread of a large-mean tile).
        dsum = tl.sum(d, axis=0)
        tile_mean = tile_mean + dsum / rows
        tile_m2 = tl.maximum(tl.sum(d * d, axis=0) - dsum * dsum / rows, 0.0)
        # Chan et al.: merge (count, mean, m2) with the tile's (rows, tile_mean, tile_m2).
        total = count + rows
        delta = tile_mean - mean
        mean = mean + delta * (rows / total)
        m2 = m2 + tile_m2 + delta * delta * (count * rows / total)
        count = total
    out = (n * C + c_ids) * K + k
    tl.store(pmean_ptr + out, mean, mask=c_ids < C)
    tl.store(pm2_ptr + out, m2, mask=c_ids < C)


@triton.jit
def _finalize(x_ptr, pmean_ptr, pm2_ptr, mean_ptr, rstd_ptr, S, D, G, K, ROWS, M, eps, stride_n, stride_c,
              BLOCK_P: tl.constexpr):
    """One program per (n, group): merge the group's D * K partials (contiguous in [N, C, K]),
    which are moments of x - shift (see _group_shift)."""
    ng = tl.program_id(0).to(tl.int64)
    n = ng // G
    shift = tl.load(x_ptr + n * stride_n + (ng % G) * D * stride_c).to(tl.float32)
    P = D * K
    base = ng * P
    acc = tl.zeros([BLOCK_P], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P).to(tl.int64)
        valid = p < P
        cnt = tl.minimum(ROWS, S - (p % K) * ROWS).to(tl.float32)
        pm = tl.load(pmean_ptr + base + p, mask=valid, other=0.0)
        acc += tl.where(valid, cnt * pm, 0.0)
    mean = tl.sum(acc, axis=0) / M  # of x - shift
    acc = tl.zeros([BLOCK_P], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P).to(tl.int64)
        valid = p < P
        cnt = tl.minimum(ROWS, S - (p % K) * ROWS).to(tl.float32)
        pm = tl.load(pmean_ptr + base + p, mask=valid, other=0.0)
        pm2 = tl.load(pm2_ptr + base + p, mask=valid, other=0.0)
        d = pm - mean
        acc += tl.where(valid, pm2 + cnt * d * d, 0.0)
    var = tl.sum(acc, axis=0) / M
    tl.store(mean_ptr + ng, shift + mean)
    tl.store(rstd_ptr + ng, 1.0 / tl.sqrt(var + eps))


@triton.jit
def _channel_params(mean_ptr, rstd_ptr, w_ptr, b_ptr, n, c_ids, C, G, D, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                    BLOCK_C: tl.constexpr):
    cmask = c_ids < C
    stat = n * G + _group_of(c_ids, D)
    mean = tl.load(mean_ptr + stat, mask=cmask, other=0.0)
    rstd = tl.load(rstd_ptr + stat, mask=cmask, other=0.0)
    if HAS_W:
        w = tl.load(w_ptr + c_ids, mask=cmask, other=0.0).to(tl.float32)
    else:
        w = tl.full([BLOCK_C], 1.0, tl.float32)
    if HAS_B:
        b = tl.load(b_ptr + c_ids, mask=cmask, other=0.0).to(tl.float32)
    else:
        b = tl.zeros([BLOCK_C], dtype=tl.float32)
    return mean, rstd, w, b


@triton.jit
def _normalize(x_ptr, y_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, S, C, G, D, K, CBLOCKS, ROWS,
               stride_n, stride_c, stride_s, HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr,
               BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    n, c_ids, k = _program(K, CBLOCKS, BLOCK_C)
    start = k * ROWS
    end = tl.minimum(start + ROWS, S)
    mean, rstd, w, b = _channel_params(mean_ptr, rstd_ptr, w_ptr, b_ptr, n, c_ids, C, G, D, HAS_W, HAS_B, BLOCK_C)
    scale = rstd * w
    for s0 in range(start, end, BLOCK_S):
        offsets, mask = _tile(n, s0, c_ids, end, C, stride_n, stride_c, stride_s, BLOCK_S)
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        z = (x - mean[None, :]) * scale[None, :] + b[None, :]
        if SILU:
            z = z * _sigmoid(z)
        tl.store(y_ptr + offsets, z.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grad_z(dy, xhat, w, b, SILU: tl.constexpr):
    if SILU:
        z = xhat * w[None, :] + b[None, :]
        s = _sigmoid(z)
        dy = dy * s * (1.0 + z * (1.0 - s))
    return dy


@triton.jit
def _partial_grad_sums(x_ptr, dy_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, pa_ptr, pb_ptr, S, C, G, D, K, CBLOCKS,
                       ROWS, stride_n, stride_c, stride_s, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                       SILU: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    n, c_ids, k = _program(K, CBLOCKS, BLOCK_C)
    start = k * ROWS
    end = tl.minimum(start + ROWS, S)
    mean, rstd, w, b = _channel_params(mean_ptr, rstd_ptr, w_ptr, b_ptr, n, c_ids, C, G, D, HAS_W, HAS_B, BLOCK_C)
    sum_a = tl.zeros([BLOCK_C], dtype=tl.float32)
    sum_b = tl.zeros([BLOCK_C], dtype=tl.float32)
    for s0 in range(start, end, BLOCK_S):
        offsets, mask = _tile(n, s0, c_ids, end, C, stride_n, stride_c, stride_s, BLOCK_S)
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        xhat = (x - mean[None, :]) * rstd[None, :]
        dz = tl.where(mask, _grad_z(dy, xhat, w, b, SILU), 0.0)
        sum_a += tl.sum(dz * xhat, axis=0)
        sum_b += tl.sum(dz, axis=0)
    out = (n * C + c_ids) * K + k
    tl.store(pa_ptr + out, sum_a, mask=c_ids < C)
    tl.store(pb_ptr + out, sum_b, mask=c_ids < C)


@triton.jit
def _grad_input(x_ptr, dy_ptr, dx_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, gsa_ptr, gsb_ptr, S, C, G, D, K, CBLOCKS,
                ROWS, inv_m, stride_n, stride_c, stride_s, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                SILU: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    n, c_ids, k = _program(K, CBLOCKS, BLOCK_C)
    start = k * ROWS
    end = tl.minimum(start + ROWS, S)
    mean, rstd, w, b = _channel_params(mean_ptr, rstd_ptr, w_ptr, b_ptr, n, c_ids, C, G, D, HAS_W, HAS_B, BLOCK_C)
    cmask = c_ids < C
    stat = n * G + _group_of(c_ids, D)
    sum_wa = tl.load(gsa_ptr + stat, mask=cmask, other=0.0)
    sum_wb = tl.load(gsb_ptr + stat, mask=cmask, other=0.0)
    kz = rstd * w
    k0 = -rstd * sum_wb * inv_m
    kx = -rstd * sum_wa * inv_m
    for s0 in range(start, end, BLOCK_S):
        offsets, mask = _tile(n, s0, c_ids, end, C, stride_n, stride_c, stride_s, BLOCK_S)
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        xhat = (x - mean[None, :]) * rstd[None, :]
        dz = _grad_z(dy, xhat, w, b, SILU)
        dx = dz * kz[None, :] + k0[None, :] + xhat * kx[None, :]
        tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _plan(geo):
    """(BLOCK_S, BLOCK_C, ROWS per program, K chunks, channel blocks) for a geometry."""
    S, C = geo.S, geo.C
    if geo.channels_last:  # channels contiguous: wide in C
        block_c = min(triton.next_power_of_2(C), 128)
        block_s = min(triton.next_power_of_2(S), max(1, TILE // block_c))
    else:  # spatial contiguous: long in S
        block_s = min(triton.next_power_of_2(S), 1024)
        block_c = min(triton.next_power_of_2(C), max(1, TILE // block_s))
    rows = block_s * TILES_PER_PROGRAM
    return block_s, block_c, rows, triton.cdiv(S, rows), triton.cdiv(C, block_c)


MAX_GRID_X = 2**31 - 1  # CUDA's limit on grid axis x


def grid(geo, K, cblocks):
    """One grid axis over N x channel blocks x chunks (see _program)."""
    programs = geo.N * cblocks * K
    if programs > MAX_GRID_X:
        raise ValueError(f"group_norm (triton): {programs} programs exceed CUDA's grid limit {MAX_GRID_X}")
    return (programs,)


def forward(x, w, b, y, mean, rstd, geo, eps, silu):
    block_s, block_c, rows, K, cblocks = _plan(geo)
    stride_n, stride_c, stride_s = geo.strides
    launch = grid(geo, K, cblocks)
    pmean = torch.empty(geo.N, geo.C, K, dtype=torch.float32, device=x.device)
    pm2 = torch.empty_like(pmean)
    _partial_moments[launch](x, pmean, pm2, geo.S, geo.C, geo.D, K, cblocks, rows, stride_n, stride_c, stride_s,
                           BLOCK_S=block_s, BLOCK_C=block_c)
    P = geo.D * K
    _finalize[(geo.N * geo.G,)](x, pmean, pm2, mean, rstd, geo.S, geo.D, geo.G, K, rows, float(geo.D * geo.S),
                                float(eps), stride_n, stride_c, BLOCK_P=min(triton.next_power_of_2(P), 1024))
    dummy = x
    _normalize[launch](x, y, mean, rstd, w if w is not None else dummy, b if b is not None else dummy,
                       geo.S, geo.C, geo.G, geo.D, K, cblocks, rows, stride_n, stride_c, stride_s,
                     HAS_W=w is not None, HAS_B=b is not None, SILU=bool(silu), BLOCK_S=block_s, BLOCK_C=block_c)


def backward(dy, x, mean, rstd, w, b, dx, dw, db, geo, silu):
    block_s, block_c, rows, K, cblocks = _plan(geo)
    stride_n, stride_c, stride_s = geo.strides
    launch = grid(geo, K, cblocks)
    pa = torch.empty(geo.N, geo.C, K, dtype=torch.float32, device=x.device)
    pb = torch.empty_like(pa)
    dummy = x
    wp, bp = (w if w is not None else dummy), (b if b is not None else dummy)
    flags = dict(HAS_W=w is not None, HAS_B=b is not None, SILU=bool(silu), BLOCK_S=block_s, BLOCK_C=block_c)
    _partial_grad_sums[launch](x, dy, mean, rstd, wp, bp, pa, pb, geo.S, geo.C, geo.G, geo.D, K, cblocks, rows,
                             stride_n, stride_c, stride_s, **flags)
    A, B = pa.sum(dim=2), pb.sum(dim=2)  # (N, C)
    wa, wb = (A * w.float(), B * w.float()) if w is not None else (A, B)
    sum_wa = wa.view(geo.N, geo.G, geo.D).sum(dim=2)
    sum_wb = wb.view(geo.N, geo.G, geo.D).sum(dim=2)
    _grad_input[launch](x, dy, dx, mean, rstd, wp, bp, sum_wa, sum_wb, geo.S, geo.C, geo.G, geo.D, K, cblocks, rows,
                      1.0 / (geo.D * geo.S),
                      # 8 warps: on 4 (16 elements of x and dy per thread) ptxas held fp32 + SiLU
                      # at 56 registers and spilled 4 B on sm_80
                      stride_n, stride_c, stride_s, num_warps=8, **flags)
    if dw is not None:
        dw.copy_(A.sum(dim=0))
    if db is not None:
        db.copy_(B.sum(dim=0))
