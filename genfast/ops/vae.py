"""genfast.ops.vae: fused VAE reparameterisation (z = mu + sigma * eps) and KL term.

``reparameterize_kl`` reads mu, logvar and eps once and writes z and the per-sample KL
partials in one pass; its backward writes dmu and dlogvar in one pass. The usual unfused
code (``std = exp(0.5 * logvar); z = mu + std * eps; kl = -0.5 * sum(1 + logvar - mu**2 -
logvar.exp())``) runs ~8 kernels forward and more backward. Backends: cuda, triton, cpu,
reference (see genfast/_dispatch.py); first-order gradients (a VAE needs no more).
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _ext
from .._dispatch import OpDispatcher
from ._define import NativeOp
from ._validate import check_backend, check_tensor, cpu_threads
from ..reference import vae as reference

__all__ = ["reparameterize", "kl_divergence", "reparameterize_kl", "DISPATCH", "REDUCTIONS"]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Columns per KL partial: kernels/vae.h kChunkCols, read from the extension (which checks the
# kl_partial it is given against it). Without the extension the Triton and reference backends
# use 4096 on their own: any value works for them, the partials only fix the summation order.
CHUNK_COLS = int(_ext._C.VAE_CHUNK_COLS) if _ext._C is not None else 4096
REDUCTIONS = ("none", "sum", "mean")

DISPATCH = OpDispatcher("vae")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _num_chunks(cols: int) -> int:
    return (cols + CHUNK_COLS - 1) // CHUNK_COLS


# ----------------------------------------------------------------------------- backends
# Every backend: forward(mu, logvar, eps, z, kl_partial, rows, cols) fills z (if given) and
# kl_partial [rows, chunks] (if given); backward(mu, logvar, eps, dz, dkl, dmu, dlogvar, rows,
# cols) fills dmu and dlogvar. All tensors contiguous; dz / dkl / eps may be None.


class _Cpu:
    @staticmethod
    def forward(mu, logvar, eps, z, kl_partial, rows, cols):
        _ext._C.vae_forward_cpu(mu, logvar, eps=eps, z=z, kl_partial=kl_partial, num_threads=cpu_threads(rows * cols))

    @staticmethod
    def backward(mu, logvar, eps, dz, dkl, dmu, dlogvar, rows, cols):
        _ext._C.vae_backward_cpu(mu, logvar, eps=eps, dz=dz, dkl=dkl, dmu=dmu, dlogvar=dlogvar,
                                 num_threads=cpu_threads(rows * cols))


class _Cuda:
    @staticmethod
    def forward(mu, logvar, eps, z, kl_partial, rows, cols):
        _ext._C.vae_forward_cuda(mu, logvar, eps=eps, z=z, kl_partial=kl_partial, stream=_ext.stream_of(mu))

    @staticmethod
    def backward(mu, logvar, eps, dz, dkl, dmu, dlogvar, rows, cols):
        _ext._C.vae_backward_cuda(mu, logvar, eps=eps, dz=dz, dkl=dkl, dmu=dmu, dlogvar=dlogvar,
                                  stream=_ext.stream_of(mu))


class _Triton:
    @staticmethod
    def forward(mu, logvar, eps, z, kl_partial, rows, cols):
        from ..triton_kernels import vae as kernels

        kernels.forward(mu, logvar, eps, z, kl_partial, rows, cols, CHUNK_COLS)

    @staticmethod
    def backward(mu, logvar, eps, dz, dkl, dmu, dlogvar, rows, cols):
        from ..triton_kernels import vae as kernels

        kernels.backward(mu, logvar, eps, dz, dkl, dmu, dlogvar, rows, cols, CHUNK_COLS)


class _Reference:
    @staticmethod
    def forward(mu, logvar, eps, z, kl_partial, rows, cols):
        if z is not None:
            z.copy_(reference.reparameterize(mu, logvar, eps))
        if kl_partial is not None:  # one partial per chunk, like the kernels
            cd = kl_partial.dtype
            terms = (1 + logvar.to(cd) - mu.to(cd) ** 2 - logvar.to(cd).exp()).reshape(rows, cols)
            pad = kl_partial.shape[1] * CHUNK_COLS - cols
            terms = torch.nn.functional.pad(terms, (0, pad)).reshape(rows, -1, CHUNK_COLS)
            kl_partial.copy_(-0.5 * terms.sum(2))

    @staticmethod
    def backward(mu, logvar, eps, dz, dkl, dmu, dlogvar, rows, cols):
        shaped = lambda t: t.reshape(rows, cols) if t is not None else None  # noqa: E731
        gm, gl = reference.reparameterize_kl_backward(shaped(mu), shaped(logvar), shaped(eps), shaped(dz), dkl)
        dmu.copy_(gm.reshape(dmu.shape))
        dlogvar.copy_(gl.reshape(dlogvar.shape))


def _by_direction(impl):
    """The dispatch entry of one backend: fn("forward" | "backward", *args)."""
    return lambda direction, *args: getattr(impl, direction)(*args)


DISPATCH.register("cpu", FLOAT_DTYPES, _by_direction(_Cpu))
DISPATCH.register("cuda", GPU_DTYPES, _by_direction(_Cuda))
DISPATCH.register("triton", GPU_DTYPES, _by_direction(_Triton))
DISPATCH.register("reference", FLOAT_DTYPES, _by_direction(_Reference))


def _rows_cols(t: torch.Tensor) -> tuple:
    rows = t.shape[0]
    return rows, (t.numel() // rows if rows else 0)


# ----------------------------------------------------------------------------- ops


def _forward_impl(mu, logvar, eps, want_z, want_kl, backend):
    mu, logvar = mu.contiguous(), logvar.contiguous()
    eps = eps.contiguous() if eps is not None else None
    rows, cols = _rows_cols(mu)
    cd = _compute_dtype(mu.dtype)
    z = torch.empty_like(mu) if want_z else mu.new_empty(0)
    kl = torch.zeros(rows if want_kl else 0, dtype=cd, device=mu.device)
    if rows == 0 or cols == 0:
        return z, kl
    partial = torch.empty(rows, _num_chunks(cols), dtype=cd, device=mu.device) if want_kl else None
    DISPATCH.run(backend or None, mu.device, mu.dtype, "forward", mu, logvar, eps, z if want_z else None, partial,
                 rows, cols)
    if want_kl:
        kl = partial[:, 0] if partial.shape[1] == 1 else partial.sum(1)
    return z, kl


def _backward_impl(mu, logvar, eps, dz, dkl, backend):
    mu, logvar = mu.contiguous(), logvar.contiguous()
    eps = eps.contiguous() if eps is not None else None
    dz = dz.contiguous() if dz is not None else None
    dkl = dkl.to(_compute_dtype(mu.dtype)).contiguous() if dkl is not None else None
    dmu, dlogvar = torch.empty_like(mu), torch.empty_like(logvar)
    rows, cols = _rows_cols(mu)
    if rows and cols:
        DISPATCH.run(backend or None, mu.device, mu.dtype, "backward", mu, logvar, eps, dz, dkl, dmu, dlogvar,
                     rows, cols)
    return dmu, dlogvar


def _forward_fake(mu, logvar, eps, want_z, want_kl, backend):
    z = torch.empty(mu.shape if want_z else (0,), dtype=mu.dtype, device=mu.device)
    kl = mu.new_empty(mu.shape[0] if want_kl else 0, dtype=_compute_dtype(mu.dtype))
    return z, kl


def _backward_fake(mu, logvar, eps, dz, dkl, backend):
    return torch.empty(mu.shape, dtype=mu.dtype, device=mu.device), torch.empty(logvar.shape, dtype=mu.dtype,
                                                                               device=mu.device)


# z is empty unless want_z; kl (batch,) in float32 (float64 for float64) is empty unless want_kl.
VAE_FORWARD = NativeOp("vae_forward(Tensor mu, Tensor logvar, Tensor? eps, bool want_z, bool want_kl, str backend) "
                       "-> (Tensor, Tensor)", _forward_impl, _forward_fake)
VAE_BACKWARD = NativeOp("vae_backward(Tensor mu, Tensor logvar, Tensor? eps, Tensor? dz, Tensor? dkl, str backend) "
                        "-> (Tensor, Tensor)", _backward_impl, _backward_fake)


# ----------------------------------------------------------------------------- autograd


class _ReparameterizeKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mu, logvar, eps, want_z, want_kl, backend):
        ctx.save_for_backward(mu, logvar, eps)
        ctx.backend = backend
        return VAE_FORWARD(mu, logvar, eps, want_z, want_kl, backend)

    @staticmethod
    def backward(ctx, dz, dkl):
        mu, logvar, eps = ctx.saved_tensors
        dz = dz if dz is not None and dz.numel() else None
        dkl = dkl if dkl is not None and dkl.numel() else None
        dmu, dlogvar = _ReparameterizeKLGrad.apply(mu, logvar, eps, dz, dkl, ctx.backend)
        deps = None
        if ctx.needs_input_grad[2] and dz is not None:  # eps is noise; rarely differentiated
            deps = (dz * torch.exp(0.5 * logvar.to(dz.dtype))).to(eps.dtype)
        return dmu, dlogvar, deps, None, None, None


class _ReparameterizeKLGrad(torch.autograd.Function):
    """The fused backward as a node of its own, so that differentiating it again raises
    instead of silently treating the gradient as a constant."""

    @staticmethod
    def forward(ctx, mu, logvar, eps, dz, dkl, backend):
        return VAE_BACKWARD(mu, logvar, eps, dz, dkl, backend)

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError("genfast.ops.reparameterize_kl supports first-order gradients only")


# ----------------------------------------------------------------------------- public ops


def _validate(op, mu, logvar, eps=None, reduction=None, backend=None):
    for name, t in (("mu", mu), ("logvar", logvar)):
        check_tensor(op, name, t)
    check_tensor(op, "mu", mu, dtypes=FLOAT_DTYPES)
    if mu.ndim < 2:
        raise ValueError(f"{op}: mu must have a batch dimension and at least one latent dimension "
                         f"(batch, ...), got shape {tuple(mu.shape)}")
    others = [("logvar", logvar)] + ([("eps", eps)] if eps is not None else [])
    for name, t in others:
        check_tensor(op, name, t)
        if t.shape != mu.shape:
            raise ValueError(f"{op}: {name} has shape {tuple(t.shape)} but mu has {tuple(mu.shape)}; they must match")
        if t.dtype != mu.dtype:
            raise TypeError(f"{op}: {name} is {t.dtype} but mu is {mu.dtype}; they must have the same dtype")
        if t.device != mu.device:
            raise ValueError(f"{op}: {name} is on {t.device} but mu is on {mu.device}; they must be on the same device")
    if reduction is not None and reduction not in REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    check_backend(op, backend, DISPATCH.backends)


def _reduce(kl: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "sum":
        return kl.sum()
    if reduction == "mean":
        return kl.mean()
    return kl


def _apply(mu, logvar, eps, want_z, want_kl, backend):
    needs_grad = torch.is_grad_enabled() and (mu.requires_grad or logvar.requires_grad
                                              or (eps is not None and eps.requires_grad))
    if needs_grad:
        return _ReparameterizeKL.apply(mu, logvar, eps, want_z, want_kl, backend or "")
    return VAE_FORWARD(mu, logvar, eps, want_z, want_kl, backend or "")


def reparameterize_kl(mu: torch.Tensor, logvar: torch.Tensor, eps: Optional[torch.Tensor] = None,
                      generator: Optional[torch.Generator] = None, reduction: str = "sum",
                      backend: Optional[str] = None) -> tuple:
    """Fused ``z = mu + exp(logvar / 2) * eps`` and ``kl = KL(N(mu, exp(logvar)) || N(0, I))``.

    Args:
        mu, logvar: (batch, ...) tensors of the same shape, dtype and device.
        eps: the standard-normal noise; drawn with ``torch.randn_like(mu, generator=...)``
            when None (so ``torch.manual_seed`` makes runs reproducible, as in plain PyTorch).
        reduction: ``"sum"`` (the KL summed over the whole batch, as in PyTorch's VAE
            example), ``"mean"`` (mean over the batch of per-sample sums) or ``"none"`` (batch,).
    Returns ``(z, kl)``: z like mu; kl in float32 (float64 for float64 inputs).
    Differentiable (first order) with respect to mu and logvar.
    """
    _validate("reparameterize_kl", mu, logvar, eps, reduction, backend)
    if eps is None:
        eps = torch.randn(mu.shape, dtype=mu.dtype, device=mu.device, generator=generator)
    z, kl = _apply(mu, logvar, eps, True, True, backend)
    return z, _reduce(kl, reduction)


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, eps: Optional[torch.Tensor] = None,
                   generator: Optional[torch.Generator] = None, backend: Optional[str] = None) -> torch.Tensor:
    """``z = mu + exp(logvar / 2) * eps`` in one pass (eps drawn like ``torch.randn_like`` if None)."""
    _validate("reparameterize", mu, logvar, eps, None, backend)
    if eps is None:
        eps = torch.randn(mu.shape, dtype=mu.dtype, device=mu.device, generator=generator)
    return _apply(mu, logvar, eps, True, False, backend)[0]


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor, reduction: str = "sum",
                  backend: Optional[str] = None) -> torch.Tensor:
    """``KL(N(mu, exp(logvar)) || N(0, I))`` in one pass, reduced as in ``reparameterize_kl``."""
    _validate("kl_divergence", mu, logvar, None, reduction, backend)
    return _reduce(_apply(mu, logvar, None, False, True, backend)[1], reduction)
