"""pixel_norm in Triton (the same math as kernels/gan.cu and csrc/gan_cpu.cpp).

The dense tensor is [outer, C, S] in memory (see ``ops/gan.py``). One program owns BLOCK_S
reduction rows and walks their C elements in chunks of BLOCK_C: a first loop sums x^2 (and
dy * x for the gradient), a second writes the output. When C fits in one chunk the tile stays
in registers and x is read exactly once. Element (o, c, s) is at o * OS + c * CS + s * SS, which
covers both shapes with one kernel: S > 1 (OS = C * S, CS = S, SS = 1) and S == 1, where the
rows are the outer index (one "outer", CS = 1, SS = C). Offsets are 64-bit.
"""
from __future__ import annotations

import triton
import triton.language as tl

FORWARD, GRAD = 0, 1


@triton.jit
def _pixel_norm_kernel(out_ptr, x_ptr, dy_ptr, num_s, C, OS, CS, SS, eps,
                       MODE: tl.constexpr, ONE_CHUNK: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    tiles = tl.cdiv(num_s, BLOCK_S)
    o = pid // tiles
    s = (pid % tiles) * BLOCK_S + tl.arange(0, BLOCK_S).to(tl.int64)
    s_mask = s < num_s
    base = o * OS + s * SS  # [BLOCK_S]
    cs = tl.arange(0, BLOCK_C).to(tl.int64)
    inv_c = 1.0 / C
    if ONE_CHUNK:
        mask = (cs[:, None] < C) & s_mask[None, :]
        offs = base[None, :] + cs[:, None] * CS
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        r = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) * inv_c + eps)
        if MODE == 0:
            y = x * r[None, :]
        else:
            dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            k = r * r * r * tl.sum(dy * x, axis=0) * inv_c
            y = r[None, :] * dy - k[None, :] * x
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        sumsq = tl.zeros([BLOCK_S], dtype=tl.float32)
        sumdx = tl.zeros([BLOCK_S], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + cs
            mask = (c[:, None] < C) & s_mask[None, :]
            offs = base[None, :] + c[:, None] * CS
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            sumsq += tl.sum(x * x, axis=0)
            if MODE == 1:
                dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                sumdx += tl.sum(dy * x, axis=0)
        r = 1.0 / tl.sqrt(sumsq * inv_c + eps)
        k = r * r * r * sumdx * inv_c
        for c0 in range(0, C, BLOCK_C):
            c = c0 + cs
            mask = (c[:, None] < C) & s_mask[None, :]
            offs = base[None, :] + c[:, None] * CS
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            if MODE == 0:
                y = x * r[None, :]
            else:
                dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                y = r[None, :] * dy - k[None, :] * x
            tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def pixel_norm(mode, out, x, dy, outer, C, S, eps, interpreted=False):
    """Launch on dense tensors sharing x's layout, seen as [outer, C, S]."""
    if x.numel() == 0:
        return out
    if S == 1:  # rows of C contiguous elements, one per outer index
        num_o, num_s, OS, CS, SS = 1, outer, 0, 1, C
    else:
        num_o, num_s, OS, CS, SS = outer, S, C * S, S, 1
    tile = 512 if interpreted else 4096
    if S == 1:
        block_c = min(triton.next_power_of_2(C), tile)
        block_s = max(1, min(tile // block_c, triton.next_power_of_2(num_s)))
    else:
        block_s = min(triton.next_power_of_2(S), 64 if not interpreted else 32)
        block_c = min(triton.next_power_of_2(C), max(1, tile // block_s))
    one_chunk = block_c >= C
    grid = (num_o * triton.cdiv(num_s, block_s),)
    _pixel_norm_kernel[grid](out, x, dy if dy is not None else x, num_s, C, OS, CS, SS, float(eps),
                             MODE=mode, ONE_CHUNK=one_chunk, BLOCK_C=block_c, BLOCK_S=block_s, num_warps=8)
    return out
