"""upfirdn2d in Triton: polyphase, each output pixel computed directly from the input.

One program computes a tile of one output row: [BLOCK_C channels, BLOCK_X pixels] of image n,
row oy. Along y only the filter rows that land on real input rows are visited (a scalar
loop of ceil(fh / up) steps); along x each pixel has its own phase, so the taps
k0 + j * up are gathered per pixel (ceil(fw / up) steps). Strides are passed explicitly, so
NCHW and channels_last (and the float32 intermediate of the separable case) share one kernel;
the tile is laid out along x for NCHW and along channels for NHWC. Offsets are 64-bit.

Separable filters run as two launches (x pass into a float32 intermediate, then y pass), as
NVlabs' kernel does.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _upfirdn2d_kernel(out, x, g, C, H, W, OH, OW,
                      sxn, sxc, sxh, sxw, son, soc, soh, sow,
                      upx, upy, downx, downy, padx0, pady0, offx, offy, fh, fw, tiles_x, tiles_c,
                      TAPS_Y: tl.constexpr, TAPS_X: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_X: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    tx = pid % tiles_x
    rest = pid // tiles_x
    tc = rest % tiles_c
    rest = rest // tiles_c
    oy = rest % OH
    n = rest // OH

    ox = tx * BLOCK_X + tl.arange(0, BLOCK_X).to(tl.int64)
    cc = tc * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    mask_out = (cc[:, None] < C) & (ox[None, :] < OW)

    # First input pixel and filter tap of each output (ceil division made safe for negative
    # numerators by the host's offsets, so C-style and floor division agree).
    sx = ox * downx - padx0
    ix0 = (sx + offx * upx + upx - 1) // upx - offx
    kx0 = ix0 * upx - sx
    # oy as a vector: the interpreter mis-types scalar & vector boolean masks.
    sy = oy * downy - pady0 + tl.zeros([BLOCK_X], dtype=tl.int64)
    iy0 = (sy + offy * upy + upy - 1) // upy - offy
    ky0 = iy0 * upy - sy

    x_plane = x + n * sxn + cc[:, None] * sxc
    acc = tl.zeros([BLOCK_C, BLOCK_X], dtype=tl.float32)
    for jy in tl.static_range(TAPS_Y):
        ky = ky0 + jy * upy
        iy = iy0 + jy
        row_ok = (ky < fh) & (iy >= 0) & (iy < H)
        for jx in tl.static_range(TAPS_X):
            kx = kx0 + jx * upx
            ix = ix0 + jx
            ok = (kx < fw) & (ix >= 0) & (ix < W) & row_ok
            gv = tl.load(g + ky * fw + kx, mask=ok, other=0.0)
            xv = tl.load(x_plane + iy[None, :] * sxh + ix[None, :] * sxw, mask=mask_out & ok[None, :], other=0.0)
            acc += xv.to(tl.float32) * gv[None, :]

    o_ptr = out + n * son + cc[:, None] * soc + oy * soh + ox[None, :] * sow
    tl.store(o_ptr, acc.to(out.dtype.element_ty), mask=mask_out)


def _launch(out, x, g2d, upx, upy, downx, downy, padx0, pady0, channels_last):
    n, c, h, w = x.shape
    _, _, oh, ow = out.shape
    fh, fw = g2d.shape
    if channels_last:
        block_c = min(triton.next_power_of_2(c), 64)
        block_x = max(1, min(triton.next_power_of_2(ow), 512 // block_c))
    else:
        block_x = min(triton.next_power_of_2(ow), 128)
        block_c = max(1, min(triton.next_power_of_2(c), 512 // block_x, 4))
    if x.device.type == "cpu":  # interpreter: few, moderately sized programs run fastest
        block_x, block_c = min(triton.next_power_of_2(ow), 32), min(triton.next_power_of_2(c), 8)
    tiles_x, tiles_c = triton.cdiv(ow, block_x), triton.cdiv(c, block_c)
    grid = (tiles_x * tiles_c * oh * n,)
    # Offsets that make every ceil-division numerator non-negative.
    offx = triton.cdiv(max(padx0, 0), upx) + 1
    offy = triton.cdiv(max(pady0, 0), upy) + 1
    _upfirdn2d_kernel[grid](
        out, x, g2d, c, h, w, oh, ow, *x.stride(), *out.stride(),
        upx, upy, downx, downy, padx0, pady0, offx, offy, fh, fw, tiles_x, tiles_c,
        TAPS_Y=triton.cdiv(fh, upy), TAPS_X=triton.cdiv(fw, upx), BLOCK_C=block_c, BLOCK_X=block_x,
        num_warps=4,
    )


def upfirdn2d(out, x, g, upx, upy, downx, downy, padx0, padx1, pady0, pady1):
    """Fill ``out`` (see genfast/ops/upfirdn2d.py for the contract) from ``x`` with the
    prepared correlation filter ``g`` ([fh, fw], or [taps] for two separable passes)."""
    channels_last = out.stride(1) == 1 and out.shape[1] > 1
    if g.ndim == 2:
        _launch(out, x, g, upx, upy, downx, downy, padx0, pady0, channels_last)
        return out
    n, c, h, _ = x.shape
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    mid = torch.empty((n, c, h, out.shape[3]), dtype=torch.float32, device=x.device, memory_format=fmt)
    _launch(mid, x, g.reshape(1, -1), upx, 1, downx, 1, padx0, 0, channels_last)
    _launch(out, mid, g.reshape(-1, 1), 1, upy, 1, downy, 0, pady0, channels_last)
    return out
