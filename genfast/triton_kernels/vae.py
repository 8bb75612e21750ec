"""VAE reparameterisation + KL in Triton: the same passes as kernels/vae.cu.

Tensors are contiguous [rows, cols]; one program per (row, chunk of CHUNK_COLS columns). The
forward writes z and the chunk's KL partial (no atomics: the caller sums partials in order,
so results are deterministic); the backward writes dmu and dlogvar in one pass.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _forward_kernel(mu_ptr, lv_ptr, eps_ptr, z_ptr, kl_ptr, cols, chunks,
                    CHUNK: tl.constexpr, BLOCK: tl.constexpr, WRITE_Z: tl.constexpr, WRITE_KL: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    row = pid // chunks
    start = (pid % chunks) * CHUNK
    base = row * cols
    kl = tl.zeros([BLOCK], dtype=tl.float32)
    for offset in range(0, CHUNK, BLOCK):
        col = start + offset + tl.arange(0, BLOCK)
        inside = col < cols
        m = tl.load(mu_ptr + base + col, mask=inside, other=0.0).to(tl.float32)
        lv = tl.load(lv_ptr + base + col, mask=inside, other=0.0).to(tl.float32)
        if WRITE_Z:
            e = tl.load(eps_ptr + base + col, mask=inside, other=0.0).to(tl.float32)
            z = m + tl.exp(0.5 * lv) * e
            tl.store(z_ptr + base + col, z.to(z_ptr.dtype.element_ty), mask=inside)
        if WRITE_KL:
            kl += tl.where(inside, 1.0 + lv - m * m - tl.exp(lv), 0.0)
    if WRITE_KL:
        tl.store(kl_ptr + pid, -0.5 * tl.sum(kl, axis=0))


@triton.jit
def _backward_kernel(mu_ptr, lv_ptr, eps_ptr, dz_ptr, dkl_ptr, dmu_ptr, dlv_ptr, cols, chunks,
                     CHUNK: tl.constexpr, BLOCK: tl.constexpr, HAS_DZ: tl.constexpr, HAS_DKL: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    row = pid // chunks
    start = (pid % chunks) * CHUNK
    base = row * cols
    dkl = tl.load(dkl_ptr + row).to(tl.float32) if HAS_DKL else 0.0
    for offset in range(0, CHUNK, BLOCK):
        col = start + offset + tl.arange(0, BLOCK)
        inside = col < cols
        m = tl.load(mu_ptr + base + col, mask=inside, other=0.0).to(tl.float32)
        lv = tl.load(lv_ptr + base + col, mask=inside, other=0.0).to(tl.float32)
        sigma = tl.exp(0.5 * lv)
        if HAS_DZ:
            g = tl.load(dz_ptr + base + col, mask=inside, other=0.0).to(tl.float32)
            e = tl.load(eps_ptr + base + col, mask=inside, other=0.0).to(tl.float32)
            dmu = g + dkl * m
            dlv = 0.5 * (g * e * sigma + dkl * (sigma * sigma - 1.0))
        else:
            dmu = dkl * m
            dlv = 0.5 * dkl * (sigma * sigma - 1.0)
        tl.store(dmu_ptr + base + col, dmu.to(dmu_ptr.dtype.element_ty), mask=inside)
        tl.store(dlv_ptr + base + col, dlv.to(dlv_ptr.dtype.element_ty), mask=inside)


def _block(chunk: int, cols: int) -> int:
    return min(1024, chunk, triton.next_power_of_2(max(cols, 16)))


def forward(mu, logvar, eps, z, kl_partial, rows, cols, chunk):
    chunks = triton.cdiv(cols, chunk)
    dummy = mu
    _forward_kernel[(rows * chunks,)](
        mu, logvar, eps if eps is not None else dummy, z if z is not None else dummy,
        kl_partial if kl_partial is not None else dummy, cols, chunks,
        CHUNK=chunk, BLOCK=_block(chunk, cols), WRITE_Z=z is not None, WRITE_KL=kl_partial is not None, num_warps=4)


def backward(mu, logvar, eps, dz, dkl, dmu, dlogvar, rows, cols, chunk):
    chunks = triton.cdiv(cols, chunk)
    dummy = mu
    _backward_kernel[(rows * chunks,)](
        mu, logvar, eps, dz if dz is not None else dummy, dkl if dkl is not None else dummy, dmu, dlogvar,
        cols, chunks, CHUNK=chunk, BLOCK=_block(chunk, cols), HAS_DZ=dz is not None, HAS_DKL=dkl is not None,
        num_warps=4)
