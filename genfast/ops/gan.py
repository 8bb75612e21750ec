"""genfast.ops.gan: the ops behind StyleGAN / DCGAN / MLP-GAN layers (NVlabs semantics).

* ``pixel_norm``: fused kernels (cpu C++, triton, cuda), one pass per reduction row,
  forward and backward; the second derivative goes through a differentiable backward.
* ``minibatch_stddev``: a torch composition. It is a handful of small reductions over a
  [G, N/G, F, C/F, H, W] view whose result is N*F numbers; the one big pass is the final
  ``cat`` copy, which a kernel could not avoid either (the output is a new tensor). A fused
  kernel would save little, so the composition (differentiable to any order) is the op.
* ``conv2d_resample`` and ``modulated_conv2d``: compositions of conv2d and genfast's
  ``upfirdn2d`` with the NVlabs fast paths; autograd of the composition gives first and
  second derivatives (the heavy lifting is conv2d and upfirdn2d, both twice differentiable).

pixel_norm follows the bias_act pattern: validation -> autograd.Function -> torch.library
ops -> DISPATCH. A dense tensor is seen as [outer, C, S] in memory (C = x.shape[dim],
S = x.stride(dim)): that covers NCHW, channels_last and any dense permutation without copies.
"""
from __future__ import annotations

from typing import Optional

import torch

import functools

from .. import _ext
from .._dispatch import OpDispatcher, triton_interpreted
from ..reference import gan as reference
from ._define import NativeOp
from ._validate import check_backend, check_int, check_tensor, cpu_threads, dense, is_finite, is_int, is_real, type_name
from .upfirdn2d import upfirdn2d

__all__ = ["pixel_norm", "minibatch_stddev", "conv2d_resample", "modulated_conv2d", "DISPATCH"]

# Modes of the Python backends (the triton kernel numbers them so); the C++ entries take the
# mode by name (PixelNormOptions).
FORWARD, GRAD = 0, 1
_MODE_NAMES = ("forward", "grad")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

DISPATCH = OpDispatcher("pixel_norm")


_type_name = type_name


# ----------------------------------------------------------------------------- pixel_norm backends


def _geometry(x: torch.Tensor, dim: int) -> tuple:
    """(outer, C, S) of the [outer, C, S] view of dense ``x`` along ``dim``."""
    C = x.shape[dim]
    if C == 1:
        return x.numel(), 1, 1
    S = x.stride(dim)
    return x.numel() // (C * S), C, S


# Every backend: fn(mode, out, x, dy, dim, outer, C, S, eps) fills ``out``.


def _options(mode: int, dim: int, eps: float):
    """The extension's PixelNormOptions of one call signature (the mode by name)."""
    return _options_of(_ext._C.PixelNormOptions, mode, dim, eps)


@functools.lru_cache(maxsize=256)  # keyed by the class too: the tests' CUDA emulation module has its own
def _options_of(cls, mode: int, dim: int, eps: float):
    return cls(mode=_MODE_NAMES[mode], dim=int(dim), eps=float(eps))


@DISPATCH.register("cpu", FLOAT_DTYPES)
def _pixel_norm_cpu(mode, out, x, dy, dim, outer, C, S, eps):
    # The C++ entry derives outer, C and S from x and dim.
    _ext._C.pixel_norm_cpu(out, x, dy=dy, options=_options(mode, dim % x.ndim, eps), num_threads=cpu_threads(x.numel()))


@DISPATCH.register("cuda", (torch.float32, torch.float16, torch.bfloat16))
def _pixel_norm_cuda(mode, out, x, dy, dim, outer, C, S, eps):
    _ext._C.pixel_norm_cuda(out, x, dy=dy, options=_options(mode, dim % x.ndim, eps), stream=_ext.stream_of(x))


@DISPATCH.register("triton", (torch.float32, torch.float16, torch.bfloat16))
def _pixel_norm_triton(mode, out, x, dy, dim, outer, C, S, eps):
    from ..triton_kernels import gan as kernels

    kernels.pixel_norm(mode, out, x, dy, outer, C, S, eps, interpreted=x.device.type == "cpu" and triton_interpreted())


@DISPATCH.register("reference", FLOAT_DTYPES)
def _pixel_norm_reference(mode, out, x, dy, dim, outer, C, S, eps):
    if mode == FORWARD:
        out.copy_(reference.pixel_norm(x, dim, eps))
    else:  # autograd of the spec: what PyTorch itself computes
        with torch.enable_grad():
            x_ = x.detach().requires_grad_()
            out.copy_(torch.autograd.grad(reference.pixel_norm(x_, dim, eps), x_, dy)[0])


def _like(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t if t.stride() == like.stride() else torch.empty_like(like).copy_(t)


def _run(mode, x, dy, dim, eps, backend):
    x = dense(x)
    out = torch.empty_like(x)
    if x.numel() == 0:
        return out
    dy = _like(dy, x) if dy is not None else None
    outer, C, S = _geometry(x, dim)
    DISPATCH.run(backend or None, x.device, x.dtype, mode, out, x, dy, dim, outer, C, S, eps)
    return out


def _fwd_impl(x, dim, eps, backend):
    return _run(FORWARD, x, None, dim, eps, backend)


def _grad_impl(dy, x, dim, eps, backend):
    return _run(GRAD, x, dy, dim, eps, backend)


def _fwd_fake(x, dim, eps, backend):
    return torch.empty_like(dense(x))


def _grad_fake(dy, x, dim, eps, backend):
    return torch.empty_like(dense(x))


PIXEL_NORM = NativeOp("pixel_norm(Tensor x, int dim, float eps, str backend) -> Tensor", _fwd_impl, _fwd_fake)
PIXEL_NORM_GRAD = NativeOp("pixel_norm_grad(Tensor dy, Tensor x, int dim, float eps, str backend) -> Tensor",
                           _grad_impl, _grad_fake)


class _PixelNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, eps, backend):
        ctx.save_for_backward(x)
        ctx.params = (dim, eps, backend)
        return PIXEL_NORM(x, dim, eps, backend)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        return _PixelNormGrad.apply(dy, x, *ctx.params), None, None, None


class _PixelNormGrad(torch.autograd.Function):
    """dx = r * dy - x * r^3 * mean(dy * x) by the fused kernel; its own backward (the double
    backward of pixel_norm) is double autograd of the reference forward."""

    @staticmethod
    def forward(ctx, dy, x, dim, eps, backend):
        ctx.save_for_backward(dy, x)
        ctx.params = (dim, eps)
        return PIXEL_NORM_GRAD(dy, x, dim, eps, backend)

    @staticmethod
    def backward(ctx, ddx):
        dy, x = ctx.saved_tensors
        dim, eps = ctx.params
        # 16-bit inputs are differentiated in float32: r^3 overflows float16 for small rows.
        work = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        with torch.enable_grad():
            dy_, x_ = dy.detach().to(work).requires_grad_(), x.detach().to(work).requires_grad_()
            # autograd of the forward spec rather than of the written-out dx formula, whose
            # r * dy - x * r^3 * mean(dy * x) cancels badly for one-channel rows
            (dx,) = torch.autograd.grad(reference.pixel_norm(x_, dim, eps), x_, dy_, create_graph=True)
            d_dy, d_x = torch.autograd.grad(dx, (dy_, x_), ddx.to(work), create_graph=torch.is_grad_enabled())
        return d_dy.to(dy.dtype), d_x.to(x.dtype), None, None, None


def _check_tensor(name: str, t, op: str, ndim: Optional[int] = None, shape_doc: str = "") -> None:
    check_tensor(op, name, t, dtypes=FLOAT_DTYPES, ndim=ndim, shape_doc=shape_doc)


def _check_int(name: str, value, op: str, minimum: int = 1) -> int:
    return check_int(op, name, value, minimum=minimum)


def _check_backend(backend, op: str) -> str:
    return check_backend(op, backend, DISPATCH.backends)


def pixel_norm(x: torch.Tensor, dim: int = 1, eps: float = 1e-8, backend: Optional[str] = None) -> torch.Tensor:
    """``x * rsqrt(mean(x^2 over dim) + eps)`` (ProGAN pixel norm, NVlabs normalize_2nd_moment).

    Args:
        x: any shape with at least one dimension; float32, float16, bfloat16 or float64; any
            dense layout (channels_last kept), non-dense inputs are made contiguous first.
        dim: the dimension normalised over (1: channels of NCHW; -1: features of [N, F]).
        eps: added to the mean square, > 0.
        backend: ``'cuda'``, ``'triton'``, ``'cpu'``, ``'reference'`` or None (automatic).

    Differentiable twice with respect to x.
    """
    op = "pixel_norm"
    _check_tensor("x", x, op)
    if x.ndim == 0:
        raise ValueError(f"{op}: x must have at least one dimension, got a 0-D tensor")
    dim = check_int(op, "dim", dim)
    if not -x.ndim <= dim < x.ndim:
        raise ValueError(f"{op}: dim={dim} is out of range for x with {x.ndim} dimensions")
    dim %= x.ndim
    if not is_real(eps) or not is_finite(eps) or eps <= 0:
        raise ValueError(f"{op}: eps must be a finite number > 0, got {eps!r}")
    backend = _check_backend(backend, op)
    if torch.is_grad_enabled() and x.requires_grad:
        return _PixelNorm.apply(x, dim, float(eps), backend)
    return PIXEL_NORM(x, dim, float(eps), backend)


def selected_backend(x: torch.Tensor, backend: Optional[str] = None) -> str:
    """The backend ``pixel_norm`` would run on for ``x``."""
    return DISPATCH.select(backend, x.device, x.dtype)


# ----------------------------------------------------------------------------- minibatch_stddev


def minibatch_stddev(x: torch.Tensor, group_size: Optional[int] = 4, num_channels: int = 1) -> torch.Tensor:
    """StyleGAN2 MinibatchStdLayer: appends ``num_channels`` feature maps holding the standard
    deviation across groups of ``G = min(group_size, N)`` samples (sample i is in group
    i % (N / G)), averaged over each of the ``num_channels`` channel slices and all pixels.
    ``group_size=None`` uses the whole batch as one group. N must be divisible by G and the
    channel count by ``num_channels``. Returns [N, C + num_channels, H, W]."""
    op = "minibatch_stddev"
    _check_tensor("x", x, op, 4, " [batch, channels, height, width]")
    n, c = x.shape[0], x.shape[1]
    if group_size is not None:
        group_size = _check_int("group_size", group_size, op)
    num_channels = _check_int("num_channels", num_channels, op)
    g = n if group_size is None else min(group_size, n)
    if n == 0:
        raise ValueError(f"{op}: x has an empty batch")
    if n % g != 0:
        raise ValueError(f"{op}: the batch size {n} is not divisible by the group size {g} "
                         f"(min(group_size={group_size}, N={n})); use a batch that is a multiple of the group size")
    if c % num_channels != 0:
        raise ValueError(f"{op}: the channel count {c} is not divisible by num_channels={num_channels}")
    return reference.minibatch_stddev(x, g, num_channels)


# ----------------------------------------------------------------------------- convolutions


def _check_filter(f, x, op: str):
    if f is None:
        return None
    if not isinstance(f, torch.Tensor):
        raise TypeError(f"{op}: the resample filter must be a torch.Tensor or None, got {_type_name(f)}; "
                        "build one with genfast.ops.setup_filter()")
    if f.ndim not in (1, 2) or f.dtype != torch.float32:
        raise ValueError(f"{op}: the resample filter must be a float32 1-D or 2-D tensor, got {f.dtype} "
                         f"of shape {tuple(f.shape)}")
    if f.device != x.device:
        raise ValueError(f"{op}: the resample filter is on {f.device} but x is on {x.device}")
    return f


def _check_padding(padding, op: str):
    if is_int(padding):
        return int(padding)
    if isinstance(padding, (list, tuple)) and len(padding) in (2, 4) and all(is_int(p) for p in padding):
        return [int(p) for p in padding]
    raise TypeError(f"{op}: padding must be an int, [x, y] or [x0, x1, y0, y1] of ints, got {padding!r}")


def _validate_conv(x, w, f, up, down, padding, groups, op: str, w_name: str = "w"):
    _check_tensor("x", x, op, 4, " [batch, channels, height, width]")
    _check_tensor(w_name, w, op, 4, " [out_channels, in_channels_per_group, kh, kw]")
    if w.device != x.device:
        raise ValueError(f"{op}: {w_name} is on {w.device} but x is on {x.device}")
    up = _check_int("up", up, op)
    down = _check_int("down", down, op)
    groups = _check_int("groups", groups, op)
    if x.shape[1] != w.shape[1] * groups:
        raise ValueError(f"{op}: x has {x.shape[1]} channels but {w_name} expects {w.shape[1]} input channels per "
                         f"group x {groups} group(s) = {w.shape[1] * groups}")
    if w.shape[0] % groups != 0:
        raise ValueError(f"{op}: {w_name} has {w.shape[0]} output channels, not divisible by groups={groups}")
    return _check_filter(f, x, op), up, down, _check_padding(padding, op), groups


def _ops_upfirdn(x, f, up=1, down=1, padding=0, flip_filter=False, gain=1):
    return upfirdn2d(x, f, up=up, down=down, padding=padding, flip_filter=flip_filter, gain=gain)


def conv2d_resample(x: torch.Tensor, w: torch.Tensor, f: Optional[torch.Tensor] = None, up: int = 1, down: int = 1,
                    padding=0, groups: int = 1, flip_weight: bool = True, flip_filter: bool = False) -> torch.Tensor:
    """2-D convolution with optional FIR up/downsampling (NVlabs conv2d_resample).

    Equivalent to ``upfirdn2d(x, f, up, padding) -> conv2d(w) -> upfirdn2d(f, down)`` with the
    padding measured on the upsampled image, but computed by the cheapest equivalent path:
    strided conv for downsampling, transposed strided conv for upsampling, resampling on the
    smaller side of a 1x1 conv. ``flip_weight=False`` makes the conv a true convolution.
    x [N, C, H, W]; w [O, C / groups, kh, kw] (same dtype as x); f float32 (setup_filter).
    Differentiable twice (autograd of conv2d and genfast.ops.upfirdn2d).
    """
    op = "conv2d_resample"
    f, up, down, padding, groups = _validate_conv(x, w, f, up, down, padding, groups, op)
    if w.dtype != x.dtype:
        raise TypeError(f"{op}: w must have the dtype of x ({x.dtype}), got {w.dtype}")
    return reference.conv2d_resample(x, w, f, up, down, padding, groups, bool(flip_weight), bool(flip_filter),
                                     upfirdn=_ops_upfirdn)


def modulated_conv2d(x: torch.Tensor, weight: torch.Tensor, styles: torch.Tensor, noise: Optional[torch.Tensor] = None,
                     up: int = 1, down: int = 1, padding=0, resample_filter: Optional[torch.Tensor] = None,
                     demodulate: bool = True, flip_weight: bool = True, fused_modconv: bool = True) -> torch.Tensor:
    """StyleGAN2 modulated convolution (NVlabs networks.modulated_conv2d).

    x [N, I, H, W]; weight [O, I, kh, kw]; styles [N, I]; noise broadcastable to the output
    [N, O, H', W'] (or None). Input channel i of sample n is scaled by styles[n, i]; with
    ``demodulate`` output channel o by dcoefs[n, o] = rsqrt(sum_{i,k} (weight * styles)^2 + 1e-8)
    (computed as styles^2 @ sum_k weight^2: no per-sample weight for it).

    ``fused_modconv=True``: one grouped conv (groups = N) with per-sample weights.
    ``fused_modconv=False``: x * styles -> shared-weight conv2d_resample -> * dcoefs + noise, no
    per-sample weights at all (faster for training with large batches).
    float16 x is pre-scaled by the inf-norms of weight and styles to avoid overflow (the
    demodulation cancels the scale). Differentiable twice.
    """
    op = "modulated_conv2d"
    f, up, down, padding, _ = _validate_conv(x, weight, resample_filter, up, down, padding, 1, op, "weight")
    _check_tensor("styles", styles, op, 2, " [batch, in_channels]")
    if styles.shape[0] != x.shape[0] or styles.shape[1] != weight.shape[1]:
        raise ValueError(f"{op}: styles must have shape [batch={x.shape[0]}, in_channels={weight.shape[1]}], "
                         f"got {tuple(styles.shape)}")
    if styles.device != x.device:
        raise ValueError(f"{op}: styles is on {styles.device} but x is on {x.device}")
    if noise is not None:
        if not isinstance(noise, torch.Tensor):
            raise TypeError(f"{op}: noise must be a torch.Tensor or None, got {_type_name(noise)}")
        if noise.device != x.device:
            raise ValueError(f"{op}: noise is on {noise.device} but x is on {x.device}")
    return reference.modulated_conv2d(x, weight, styles, noise, up, down, padding, f, bool(demodulate),
                                      bool(flip_weight), bool(fused_modconv), upfirdn=_ops_upfirdn)
