"""filtered_lrelu in Triton: the generic fused chain of ``genfast/ops/filtered_lrelu.py``,
one program per (plane, output tile); the intermediate tile is computed in 16 x 16 chunks, each
from its own input patch, and folded into the output at once (it never reaches memory).

Each FIR pass is a small matrix product with a banded matrix built from the filter taps
(zero insertion and striding become the band's index arithmetic):
  upsampling (separable):   T = Gy @ (X @ Gx),   Gx[i, c] = g1[u1 * (jx0 + i) - (tc0 + c) + p1x]
  downsampling (separable): Y = Dy @ (A @ Dx),   Dx[c, o] = g2[c - o * d2]
A 2-D filter sums one such product per filter row (with a 0/1 row selector on the left).
Products run in float32 (input_precision="ieee": no TF32 rounding). Offsets are 64-bit.
"""
from __future__ import annotations

import triton
import triton.language as tl

ACT, MASK = 0, 1


@triton.jit
def _band(g_ptr, row_off, k, taps):
    """Filter taps g[row_off + k] where 0 <= k < taps, else 0 (float32)."""
    valid = (k >= 0) & (k < taps)
    return tl.load(g_ptr + row_off + tl.where(valid, k, 0), mask=valid, other=0.0).to(tl.float32)


@triton.jit
def _filtered_lrelu_kernel(
    out_ptr, x_ptr, b_ptr, signs_ptr, g1_ptr, g2_ptr,
    C, in_h, in_w, s_in_n, s_in_c, s_in_h, s_in_w, s_out_n, s_out_c, s_out_h, s_out_w,
    u1, p1x, p1y, th, tw, d2, p2x, p2y, oh, ow,
    g1h, g1w, g2h, g2w, shift_x, shift_y, tiles_x, tiles, row_chunks, col_chunks,
    gain, slope, clamp,
    MODE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_CLAMP: tl.constexpr, WRITE_SIGNS: tl.constexpr,
    SEP1: tl.constexpr, SEP2: tl.constexpr,
    BOY: tl.constexpr, BOX: tl.constexpr, BTR: tl.constexpr, BTC: tl.constexpr,
    BXR: tl.constexpr, BXC: tl.constexpr,
):
    # One grid axis (x: up to 2^31 - 1 programs; N x C alone passes y's 65,535 at batch 128 x
    # 1024 channels); the tiles of a plane are consecutive programs.
    pid = tl.program_id(0).to(tl.int64)
    plane = pid // tiles
    tile = (pid % tiles).to(tl.int32)
    oy0 = (tile // tiles_x) * BOY
    ox0 = (tile % tiles_x) * BOX
    n = plane // C
    c = plane % C

    # The intermediate T rows/columns this output tile needs start at tr0, tc0; they are
    # computed in chunks of BTR x BTC (each from its own BXR x BXC input patch), so every
    # product is a small one and nothing of the size of the whole T tile lives in registers.
    tr0 = oy0 * d2 - p2y
    tc0 = ox0 * d2 - p2x
    r_t = tl.arange(0, BTR)
    c_t = tl.arange(0, BTC)
    r_x = tl.arange(0, BXR)
    c_x = tl.arange(0, BXC)
    o_y = tl.arange(0, BOY)
    o_x = tl.arange(0, BOX)
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(b_ptr + c).to(tl.float32)
    if WRITE_SIGNS:
        # This tile records the T rows/columns from its origin up to the next tile's origin
        # (to the end of T for the last tile), so each code is written once.
        need_rows = (tl.minimum(oh - oy0, BOY) - 1) * d2 + g2h
        need_cols = (tl.minimum(ow - ox0, BOX) - 1) * d2 + g2w
        own_rows = tl.where(oy0 + BOY >= oh, need_rows, tl.minimum(need_rows, BOY * d2))
        own_cols = tl.where(ox0 + BOX >= ow, need_cols, tl.minimum(need_cols, BOX * d2))

    y = tl.zeros((BOY, BOX), dtype=tl.float32)
    for rc in range(0, row_chunks):
        trc = tr0 + rc * BTR  # first T row of this chunk
        # First input row the chunk's first T row reads: ceil((t - pad) / u1), shifted to keep
        # the numerator non-negative.
        jy0 = (trc - p1y + u1 * shift_y + u1 - 1) // u1 - shift_y
        jy = jy0 + r_x
        row_in = (jy >= 0) & (jy < in_h)
        ky1 = u1 * jy[None, :] - (trc + r_t)[:, None] + p1y  # (BTR, BXR)
        tr = trc + r_t
        hd = tl.zeros((BTR, BOX), dtype=tl.float32)
        for cc in range(0, col_chunks):
            tcc = tc0 + cc * BTC
            jx0 = (tcc - p1x + u1 * shift_x + u1 - 1) // u1 - shift_x
            jx = jx0 + c_x

            # 1. Input patch (+ bias), zero outside the image.
            in_mask = row_in[:, None] & ((jx >= 0) & (jx < in_w))[None, :]
            x_offs = (n * s_in_n + c * s_in_c + jy.to(tl.int64)[:, None] * s_in_h
                      + jx.to(tl.int64)[None, :] * s_in_w)
            xt = tl.load(x_ptr + tl.where(in_mask, x_offs, 0), mask=in_mask, other=0.0).to(tl.float32)
            if HAS_BIAS:
                xt = tl.where(in_mask, xt + bias, 0.0)

            # 2. Upsampling FIR: this chunk of T (BTR x BTC).
            kx1 = u1 * jx[:, None] - (tcc + c_t)[None, :] + p1x  # (BXC, BTC)
            if SEP1:
                hx = tl.dot(xt, _band(g1_ptr, 0, kx1, g1w), input_precision="ieee")
                t = tl.dot(_band(g1_ptr, 0, ky1, g1h), hx, input_precision="ieee")
            else:
                t = tl.zeros((BTR, BTC), dtype=tl.float32)
                for ky in range(0, g1h):
                    hx = tl.dot(xt, _band(g1_ptr, ky * g1w, kx1, g1w), input_precision="ieee")
                    sel = tl.where(ky1 == ky, 1.0, 0.0)
                    t += tl.dot(sel, hx, input_precision="ieee")

            tc = tcc + c_t
            t_valid = ((tr >= 0) & (tr < th))[:, None] & ((tc >= 0) & (tc < tw))[None, :]
            s_offs = (plane * th + tr.to(tl.int64))[:, None] * tw + tc.to(tl.int64)[None, :]

            # 3. Activation (and the sign record) or the saved mask.
            if MODE == 0:
                pos = t > 0
                v = tl.where(pos, t, t * slope) * gain
                code = tl.where(pos, 0, 1)
                if HAS_CLAMP:
                    clamped = (v > clamp) | (v < -clamp)
                    v = tl.where(v > clamp, clamp, tl.where(v < -clamp, -clamp, v))
                    code = tl.where(clamped, 2, code)
                if WRITE_SIGNS:
                    own = t_valid & ((rc * BTR + r_t) < own_rows)[:, None] & ((cc * BTC + c_t) < own_cols)[None, :]
                    tl.store(signs_ptr + tl.where(own, s_offs, 0), code.to(tl.uint8), mask=own)
            else:
                code = tl.load(signs_ptr + tl.where(t_valid, s_offs, 0), mask=t_valid, other=3).to(tl.int32)
                v = t * tl.where(code == 0, gain, tl.where(code == 1, gain * slope, 0.0))
            a = tl.where(t_valid, v, 0.0)

            # 4. Horizontal downsampling of the chunk: its columns' share of hd (BTR x BOX).
            kx2 = (cc * BTC + c_t)[:, None] - o_x[None, :] * d2  # (BTC, BOX)
            if SEP2:
                hd += tl.dot(a, _band(g2_ptr, 0, kx2, g2w), input_precision="ieee")
            else:
                for ky in range(0, g2h):
                    hk = tl.dot(a, _band(g2_ptr, ky * g2w, kx2, g2w), input_precision="ieee")
                    # the 2-D filter's row ky: output row o reads T row o * d2 + ky
                    sel = tl.where((rc * BTR + r_t)[None, :] - o_y[:, None] * d2 == ky, 1.0, 0.0)  # (BOY, BTR)
                    y += tl.dot(sel, hk, input_precision="ieee")
        # 5. Vertical downsampling of the row chunk (separable filters).
        if SEP2:
            ky2 = (rc * BTR + r_t)[None, :] - o_y[:, None] * d2  # (BOY, BTR)
            y += tl.dot(_band(g2_ptr, 0, ky2, g2h), hd, input_precision="ieee")

    oy = oy0 + o_y
    ox = ox0 + o_x
    o_mask = (oy < oh)[:, None] & (ox < ow)[None, :]
    o_offs = n * s_out_n + c * s_out_c + oy.to(tl.int64)[:, None] * s_out_h + ox.to(tl.int64)[None, :] * s_out_w
    tl.store(out_ptr + tl.where(o_mask, o_offs, 0), y.to(out_ptr.dtype.element_ty), mask=o_mask)


def _pow2(v: int) -> int:
    return max(16, triton.next_power_of_2(int(v)))


def tile_sizes(plan, g1h, g1w, g2h, g2w, box: int = 16, boy: int = 16, chunk: int = 16) -> dict:
    """Block sizes: the output tile (BOY x BOX), the chunk of the intermediate T it is computed
    in (BTR x BTC) and the input patch of one chunk (BXR x BXC); powers of two >= 16, the
    minimum of tl.dot. Whole-tile T blocks (64 x 64 for StyleGAN3's up 2 / down 2 / 12 taps)
    spilled 20-23 KB per thread on sm_90 (products in FMA code keep their operands in
    registers); 16 x 16 chunks make every product 16 x 16 x 16 to 16 x 32 x 16."""
    btr = btc = chunk
    bxr = _pow2((btr - 1 + g1h - 1) // plan.u1 + 2)
    bxc = _pow2((btc - 1 + g1w - 1) // plan.u1 + 2)
    return dict(BOY=boy, BOX=box, BTR=btr, BTC=btc, BXR=bxr, BXC=bxc)


def chunk_counts(plan, g2h, g2w, sizes) -> tuple:
    """(row chunks, column chunks) of T one output tile needs: (BOY - 1) * d2 + taps rows."""
    rows = (sizes["BOY"] - 1) * plan.d2 + g2h
    cols = (sizes["BOX"] - 1) * plan.d2 + g2w
    return triton.cdiv(rows, sizes["BTR"]), triton.cdiv(cols, sizes["BTC"])


def filtered_lrelu(mode, out, signs, x, b, g1, g2, plan, gain, slope, clamp):
    """Launch on x/out of any strides; signs uint8 (N, C, th, tw) contiguous (see ops)."""
    n, c, h, w = x.shape
    g1h, g1w = (g1.shape[0], g1.shape[0]) if g1.ndim == 1 else tuple(g1.shape)
    g2h, g2w = (g2.shape[0], g2.shape[0]) if g2.ndim == 1 else tuple(g2.shape)
    sizes = tile_sizes(plan, g1h, g1w, g2h, g2w)
    tiles_x = triton.cdiv(plan.ow, sizes["BOX"])
    tiles = triton.cdiv(plan.oh, sizes["BOY"]) * tiles_x
    grid = (tiles * n * c,)
    if grid[0] > 2**31 - 1:
        raise ValueError(f"filtered_lrelu (triton): {grid[0]} programs exceed CUDA's grid limit 2^31 - 1")
    # Shifts keeping the ceil-division numerators non-negative for every tile.
    shift_x = (abs(plan.p1x) + abs(plan.p2x)) // plan.u1 + 2
    shift_y = (abs(plan.p1y) + abs(plan.p2y)) // plan.u1 + 2
    dummy = g1
    # 32-wide input patches (up 1 or 2-D filters, the adjoint of down 2): ptxas held them at
    # 128 registers and spilled 4-32 B on sm_80 and sm_90 (4 or 8 warps); allowed 255 they fit
    # in 194-232 on 4 warps (2 blocks of 4 warps per SM).
    wide = max(sizes["BXR"], sizes["BXC"]) > 16
    _filtered_lrelu_kernel[grid](
        out, x, b if b is not None else dummy, signs if signs is not None else dummy, g1, g2,
        c, h, w, *x.stride(), *out.stride(),
        *plan, g1h, g1w, g2h, g2w, shift_x, shift_y, tiles_x, tiles, *chunk_counts(plan, g2h, g2w, sizes),
        float(gain), float(slope), float(clamp),
        MODE=mode, HAS_BIAS=b is not None, HAS_CLAMP=clamp >= 0, WRITE_SIGNS=signs is not None and mode == ACT,
        SEP1=g1.ndim == 1, SEP2=g2.ndim == 1, num_warps=4, maxnreg=255 if wide else None, **sizes,
    )
    return out
