"""Diffusion kernels in Triton: the same passes as kernels/diffusion.cu (see ops/diffusion.py).

Elementwise kernels run on a 2-D grid (chunks of one sample, sample), so per-sample values
(coefficient rows, clamp bounds, schedule entries, loss factors) are scalars of the program,
loaded once. Each input keeps its own dtype (Triton loads it as stored) and is converted to
the compute type (float32, or float64 when COMPUTE_F64). Offsets are 64-bit. Seeded noise is
Philox4x32-10 on counter (element index lo, hi, 0, 0) and key seed: the bits of kernels/
diffusion.h, turned into a normal by Box-Muller.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024
MAX_GRID_Y = 65535  # CUDA's limit on grid dimension 1 (samples)


@triton.jit
def _normal_noise(seed, offs):
    """Standard normal for each int64 element index in ``offs`` (see kernels/diffusion.h)."""
    c0 = (offs & 0xFFFFFFFF).to(tl.uint32)
    c1 = (offs >> 32).to(tl.uint32)
    zero = tl.zeros(offs.shape, tl.uint32)
    r0, r1, _, _ = tl.philox(seed, c0, c1, zero, zero)
    u1 = ((r0 >> 8).to(tl.float32) + 0.5) * 5.9604644775390625e-8
    u2 = ((r1 >> 8).to(tl.float32) + 0.5) * 5.9604644775390625e-8
    return tl.sqrt(-2.0 * tl.log(u1)) * tl.cos(6.283185307179586 * u2)


@triton.jit
def _sampler_step_kernel(prev_ptr, aux_ptr, x_ptr, m_ptr, mu_ptr, h1_ptr, h2_ptr, z_ptr, coef_ptr, clamp_ptr,
                         per_sample, coef_stride, clamp_value, guidance, seed,
                         HAS_AUX: tl.constexpr, HAS_MU: tl.constexpr, HAS_H1: tl.constexpr, HAS_H2: tl.constexpr,
                         NOISE: tl.constexpr, CLAMP: tl.constexpr, RESCALE: tl.constexpr,
                         COMPUTE_F64: tl.constexpr, BLOCK: tl.constexpr):
    # NOISE: 0 none, 1 tensor, 2 seeded. CLAMP: 0 none, 1 scalar bound, 2 per-sample tensor.
    cd = tl.float64 if COMPUTE_F64 else tl.float32
    b = tl.program_id(1).to(tl.int64)
    local = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = local < per_sample
    offs = b * per_sample + local
    row = coef_ptr + b * coef_stride
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(cd)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(cd)
    if HAS_MU:  # classifier-free guidance: m = uncond + g * (cond - uncond)
        mu = tl.load(mu_ptr + offs, mask=mask, other=0.0).to(cd)
        m = mu + guidance * (m - mu)
    x0 = tl.load(row + 0).to(cd) * x + tl.load(row + 1).to(cd) * m
    if CLAMP != 0:
        if CLAMP == 1:
            r = clamp_value
        else:
            r = tl.load(clamp_ptr + b).to(cd)
        # Comparisons rather than min/max so that NaN propagates like torch.clamp.
        x0 = tl.where(x0 < -r, -r, tl.where(x0 > r, r, x0))
        if RESCALE:
            x0 = x0 / r
    prev = tl.load(row + 2).to(cd) * x0 + tl.load(row + 3).to(cd) * x + tl.load(row + 4).to(cd) * m
    aux = tl.load(row + 8).to(cd) * x0 + tl.load(row + 9).to(cd) * x + tl.load(row + 10).to(cd) * m
    if HAS_H1:
        h1 = tl.load(h1_ptr + offs, mask=mask, other=0.0).to(cd)
        prev += tl.load(row + 5).to(cd) * h1
        aux += tl.load(row + 11).to(cd) * h1
    if HAS_H2:
        h2 = tl.load(h2_ptr + offs, mask=mask, other=0.0).to(cd)
        prev += tl.load(row + 6).to(cd) * h2
        aux += tl.load(row + 12).to(cd) * h2
    if NOISE == 1:
        prev += tl.load(row + 7).to(cd) * tl.load(z_ptr + offs, mask=mask, other=0.0).to(cd)
    elif NOISE == 2:
        prev += tl.load(row + 7).to(cd) * _normal_noise(seed, offs).to(cd)
    tl.store(prev_ptr + offs, prev.to(prev_ptr.dtype.element_ty), mask=mask)
    if HAS_AUX:
        tl.store(aux_ptr + offs, aux.to(aux_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _add_noise_kernel(noisy_ptr, target_ptr, x0_ptr, noise_ptr, t_ptr, signal_ptr, noise_scale_ptr,
                      per_sample, table_len, seed,
                      SEEDED: tl.constexpr, TARGET: tl.constexpr, COMPUTE_F64: tl.constexpr, BLOCK: tl.constexpr):
    cd = tl.float64 if COMPUTE_F64 else tl.float32
    b = tl.program_id(1).to(tl.int64)
    local = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = local < per_sample
    offs = b * per_sample + local
    step = tl.load(t_ptr + b)
    step = tl.minimum(tl.maximum(step, 0), table_len - 1)  # validated on the host when free
    sa = tl.load(signal_ptr + step).to(cd)
    sn = tl.load(noise_scale_ptr + step).to(cd)
    x = tl.load(x0_ptr + offs, mask=mask, other=0.0).to(cd)
    if SEEDED:
        z = _normal_noise(seed, offs).to(cd)
    else:
        z = tl.load(noise_ptr + offs, mask=mask, other=0.0).to(cd)
    out_ty = noisy_ptr.dtype.element_ty
    tl.store(noisy_ptr + offs, (sa * x + sn * z).to(out_ty), mask=mask)
    if TARGET != 0:
        if TARGET == 1:
            tgt = z
        elif TARGET == 2:
            tgt = sa * z - sn * x
        elif TARGET == 3:
            tgt = x
        else:
            tgt = z - x
        tl.store(target_ptr + offs, tgt.to(out_ty), mask=mask)


@triton.jit
def _sums_kernel(partial_ptr, a_ptr, b_ptr, per_sample, chunks, scale,
                 MODE: tl.constexpr, ITERS: tl.constexpr, COMPUTE_F64: tl.constexpr, BLOCK: tl.constexpr):
    """partial[b, chunk, :] = sums over elements [chunk * BLOCK * ITERS, +BLOCK * ITERS) of sample b."""
    cd = tl.float64 if COMPUTE_F64 else tl.float32
    b = tl.program_id(1).to(tl.int64)
    chunk = tl.program_id(0).to(tl.int64)
    base = b * per_sample
    acc0 = tl.zeros((BLOCK,), cd)
    acc1 = tl.zeros((BLOCK,), cd)
    acc2 = tl.zeros((BLOCK,), cd)
    acc3 = tl.zeros((BLOCK,), cd)
    for it in range(ITERS):
        local = (chunk * ITERS + it) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        mask = local < per_sample
        u = tl.load(a_ptr + base + local, mask=mask, other=0.0).to(cd)
        v = tl.load(b_ptr + base + local, mask=mask, other=0.0).to(cd)
        if MODE == 0:
            d = u - v
            acc0 += d * d
        else:
            g = tl.where(mask, u + scale * (v - u), 0.0)
            acc0 += v
            acc1 += v * v
            acc2 += g
            acc3 += g * g
    out = partial_ptr + (b * chunks + chunk) * (1 if MODE == 0 else 4)
    tl.store(out, tl.sum(acc0, axis=0).to(tl.float64))
    if MODE != 0:
        tl.store(out + 1, tl.sum(acc1, axis=0).to(tl.float64))
        tl.store(out + 2, tl.sum(acc2, axis=0).to(tl.float64))
        tl.store(out + 3, tl.sum(acc3, axis=0).to(tl.float64))


@triton.jit
def _combine_kernel(out_ptr, out2_ptr, a_ptr, b_ptr, factor_ptr, per_sample, alpha, beta,
                    HAS_FACTOR: tl.constexpr, HAS_OUT2: tl.constexpr, COMPUTE_F64: tl.constexpr,
                    BLOCK: tl.constexpr):
    cd = tl.float64 if COMPUTE_F64 else tl.float32
    b = tl.program_id(1).to(tl.int64)
    local = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = local < per_sample
    offs = b * per_sample + local
    u = tl.load(a_ptr + offs, mask=mask, other=0.0).to(cd)
    v = tl.load(b_ptr + offs, mask=mask, other=0.0).to(cd)
    out = alpha * u + beta * (v - u)
    if HAS_FACTOR:
        out = tl.load(factor_ptr + b).to(cd) * out
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)
    if HAS_OUT2:
        tl.store(out2_ptr + offs, (-out).to(out2_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _embedding_kernel(out_ptr, t_ptr, total, dim, half, log_period, denominator, scale,
                      FLIP: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = i < total
    row = i // dim
    col = i % dim
    j = tl.where(col < half, col, col - half)
    # diffusers' float32 order: exp(-ln(P) * j / (half - shift)), then (t * freq) * scale.
    freq = tl.exp(log_period * j.to(tl.float32) / denominator)
    t = tl.load(t_ptr + row, mask=mask, other=0).to(tl.float32)
    arg = scale * (t * freq)
    first = tl.cos(arg) if FLIP else tl.sin(arg)
    second = tl.sin(arg) if FLIP else tl.cos(arg)
    value = tl.where(col < half, first, tl.where(col < 2 * half, second, 0.0))
    tl.store(out_ptr + i, value.to(out_ptr.dtype.element_ty), mask=mask)


def _grid(per_sample: int, samples: int, block: int = BLOCK) -> tuple:
    if samples > MAX_GRID_Y:
        raise ValueError(f"genfast diffusion (triton): batch of {samples} samples exceeds {MAX_GRID_Y}")
    return (triton.cdiv(per_sample, block), samples)


def _f64(t: torch.Tensor) -> bool:
    return t.dtype == torch.float64


def sampler_step(prev, aux, x, m, mu, h1, h2, z, coefs, coef_stride, clamp, clamp_value, x0_rescale,
                 guidance_scale, seed, per_sample):
    n = x.numel()
    if n == 0:
        return
    dummy = x
    noise_mode = 2 if seed is not None else (1 if z is not None else 0)
    clamp_mode = 2 if clamp is not None else (1 if clamp_value >= 0 else 0)
    _sampler_step_kernel[_grid(per_sample, n // per_sample)](
        prev, aux if aux is not None else prev, x, m, mu if mu is not None else dummy,
        h1 if h1 is not None else dummy, h2 if h2 is not None else dummy, z if z is not None else dummy,
        coefs, clamp if clamp is not None else coefs,
        per_sample, coef_stride, float(max(clamp_value, 0.0)), float(guidance_scale), int(seed or 0),
        HAS_AUX=aux is not None, HAS_MU=mu is not None, HAS_H1=h1 is not None, HAS_H2=h2 is not None,
        NOISE=noise_mode, CLAMP=clamp_mode, RESCALE=bool(x0_rescale), COMPUTE_F64=_f64(x), BLOCK=BLOCK,
        num_warps=4,
    )


def add_noise(noisy, target, x0, noise, timesteps, signal, noise_scale, target_code, seed, per_sample):
    n = x0.numel()
    if n == 0:
        return
    _add_noise_kernel[_grid(per_sample, n // per_sample)](
        noisy, target if target is not None else noisy, x0, noise if noise is not None else x0, timesteps,
        signal, noise_scale, per_sample, signal.numel(), int(seed or 0),
        SEEDED=seed is not None, TARGET=target_code, COMPUTE_F64=_f64(x0), BLOCK=BLOCK, num_warps=4,
    )


def per_sample_sums(a, b, mode, scale, per_sample, width):
    """(B, width) float64 sums; a second small torch reduction adds the per-chunk partials."""
    samples = a.numel() // per_sample
    if samples > MAX_GRID_Y:
        raise ValueError(f"genfast diffusion (triton): batch of {samples} samples exceeds {MAX_GRID_Y}")
    iters = 4
    chunks = max(1, triton.cdiv(per_sample, BLOCK * iters))
    partial = torch.empty(samples, chunks, width, dtype=torch.float64, device=a.device)
    if a.numel():
        _sums_kernel[(chunks, samples)](partial, a, b, per_sample, chunks, float(scale), MODE=mode, ITERS=iters,
                                        COMPUTE_F64=_f64(a) or _f64(b), BLOCK=BLOCK, num_warps=4)
    else:
        partial.zero_()
    return partial.sum(dim=1)


def combine(out, out2, a, b, factor, alpha, beta, per_sample, compute_f64):
    n = a.numel()
    if n == 0:
        return
    _combine_kernel[_grid(per_sample, n // per_sample)](
        out, out2 if out2 is not None else out, a, b, factor if factor is not None else a, per_sample,
        float(alpha), float(beta), HAS_FACTOR=factor is not None, HAS_OUT2=out2 is not None,
        COMPUTE_F64=compute_f64, BLOCK=BLOCK, num_warps=4,
    )


def timestep_embedding(out, timesteps, dim, flip, log_period, denominator, scale):
    total = out.numel()
    if total == 0:
        return
    block = 256
    _embedding_kernel[(triton.cdiv(total, block),)](
        out, timesteps, total, dim, dim // 2, float(log_period), float(denominator), float(scale),
        FLIP=bool(flip), BLOCK=block, num_warps=4,
    )
