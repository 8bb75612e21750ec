"""genfast.ops.upfirdn2d: upsample, pad, FIR-filter, downsample 2-D images (NVlabs StyleGAN2-ADA
/ StyleGAN3 semantics), and the helpers built on it: setup_filter, filter2d, upsample2d,
downsample2d.

Layers (the bias_act pattern):
  1. ``upfirdn2d()``: validates every argument (clear errors before any kernel), then goes
     through an autograd.Function whose backward is upfirdn2d again (up and down swapped, the
     filter flipped, the padding transformed), through the same Function: any order of
     derivatives.
  2. ``torch.ops.genfast.upfirdn2d``: a torch.library op (light form, with a fake kernel), an
     opaque node for torch.compile(fullgraph=True).
  3. ``DISPATCH``: backends (cuda, triton, cpu, reference), chosen at run time in the op impl.

Every backend receives the filter already prepared as a correlation kernel ``g`` (flipped
unless flip_filter, times gain ** (ndim / 2), float32, contiguous) and computes, per axis,
``y[o] = sum_k u[o * down + k] * g[k]`` with ``u`` the zero-inserted, padded input; a 1-D ``g``
is applied along x and then along y. ``x`` and ``out`` are both NCHW-contiguous or both
channels_last (NHWC in memory).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from .. import _ext
from .._dispatch import OpDispatcher
from ._define import NativeOp
from ._validate import check_backend, check_tensor, cpu_threads, is_finite, is_int, is_real, type_name
from ..reference.upfirdn2d import output_size, parse_padding
from ..reference.upfirdn2d import upfirdn2d as reference

__all__ = ["upfirdn2d", "setup_filter", "filter2d", "upsample2d", "downsample2d", "DISPATCH", "FLOAT_DTYPES"]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

DISPATCH = OpDispatcher("upfirdn2d")


# ----------------------------------------------------------------------------- layout


def is_channels_last(x: torch.Tensor) -> bool:
    """Whether upfirdn2d keeps ``x`` (and makes its output) channels_last (NHWC in memory)."""
    if x.is_contiguous():
        return False
    if x.is_contiguous(memory_format=torch.channels_last):
        return True
    return x.stride(1) < x.stride(3)  # a strided view of an NHWC tensor


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if is_channels_last(x) else torch.contiguous_format


def _output_shape(x: torch.Tensor, f: torch.Tensor, upx, upy, downx, downy, padx0, padx1, pady0, pady1) -> tuple:
    fh, fw = _filter_size(f)
    n, c, h, w = x.shape
    return (n, c, output_size(h, upy, pady0, pady1, fh, downy), output_size(w, upx, padx0, padx1, fw, downx))


def _filter_size(f: torch.Tensor) -> tuple:
    """(fh, fw); a 1-D (separable) filter has the same taps along both axes."""
    return (f.shape[0], f.shape[0]) if f.ndim == 1 else (f.shape[0], f.shape[1])


def prepared_filter(f: torch.Tensor, flip_filter: bool, gain: float) -> torch.Tensor:
    """The correlation kernel every backend applies: ``f`` flipped for a true convolution
    (unless flip_filter), times gain ** (ndim / 2) (per pass for separable filters)."""
    g = f.float()
    if not flip_filter:
        g = g.flip(list(range(g.ndim)))
    return (g * (gain ** (g.ndim / 2))).contiguous()


# ----------------------------------------------------------------------------- backends

# Every backend: fn(out, x, g, upx, upy, downx, downy, padx0, padx1, pady0, pady1) fills
# ``out`` from ``x`` with the prepared correlation filter ``g`` (see the module docstring).


# Below this many multiply-adds the C++ kernel runs on one thread (waking the team costs more).
MULTIPLY_ADDS_ONE_THREAD = 1 << 18


@functools.lru_cache(maxsize=256)
def _options(upx, upy, downx, downy, padx0, padx1, pady0, pady1):
    """The extension's Upfirdn2dOptions of one configuration."""
    return _ext._C.Upfirdn2dOptions(upx=int(upx), upy=int(upy), downx=int(downx), downy=int(downy), padx0=int(padx0),
                                    padx1=int(padx1), pady0=int(pady0), pady1=int(pady1))


# The C++ and CUDA entries read sizes, dtype, the filter's taps and the memory format from the
# tensors themselves and check out's shape against the options.


@DISPATCH.register("cpu", FLOAT_DTYPES)
def _upfirdn2d_cpu(out, x, g, upx, upy, downx, downy, padx0, padx1, pady0, pady1):
    fh, fw = _filter_size(g)
    _ext._C.upfirdn2d_cpu(out, x, g, options=_options(upx, upy, downx, downy, padx0, padx1, pady0, pady1),
                          num_threads=cpu_threads(out.numel() * fh * fw, MULTIPLY_ADDS_ONE_THREAD))


@DISPATCH.register("cuda", (torch.float32, torch.float16, torch.bfloat16, torch.float64))
def _upfirdn2d_cuda(out, x, g, upx, upy, downx, downy, padx0, padx1, pady0, pady1):
    _ext._C.upfirdn2d_cuda(out, x, g, options=_options(upx, upy, downx, downy, padx0, padx1, pady0, pady1),
                           stream=_ext.stream_of(x))


@DISPATCH.register("triton", (torch.float32, torch.float16, torch.bfloat16))
def _upfirdn2d_triton(out, x, g, upx, upy, downx, downy, padx0, padx1, pady0, pady1):
    from ..triton_kernels import upfirdn2d as kernels

    kernels.upfirdn2d(out, x, g, upx, upy, downx, downy, padx0, padx1, pady0, pady1)


@DISPATCH.register("reference", FLOAT_DTYPES)
def _upfirdn2d_reference(out, x, g, upx, upy, downx, downy, padx0, padx1, pady0, pady1):
    out.copy_(reference(x, g, (upx, upy), (downx, downy), (padx0, padx1, pady0, pady1),
                                  flip_filter=True, gain=1.0))


def _run(x, f, upx, upy, downx, downy, padx0, padx1, pady0, pady1, flip_filter, gain, backend):
    shape = _output_shape(x, f, upx, upy, downx, downy, padx0, padx1, pady0, pady1)
    fmt = _memory_format(x)
    out = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt)
    if out.numel() == 0:
        return out
    if x.numel() == 0:  # nothing but padding reaches the output
        return out.zero_()
    x = x.contiguous(memory_format=fmt)
    g = prepared_filter(f, flip_filter, gain)
    DISPATCH.run(backend or None, x.device, x.dtype, out, x, g, upx, upy, downx, downy, padx0, padx1, pady0, pady1)
    return out


# ----------------------------------------------------------------------------- torch.library


def _upfirdn2d_fake(x, f, upx, upy, downx, downy, padx0, padx1, pady0, pady1, flip_filter, gain, backend):
    shape = _output_shape(x, f, upx, upy, downx, downy, padx0, padx1, pady0, pady1)
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=_memory_format(x))


# SymInt: the backward's padding is computed from the (symbolic) sizes of x and dy, and the
# helpers' from the filter's; plain ints would make torch.compile specialise on every size.
UPFIRDN2D = NativeOp("upfirdn2d(Tensor x, Tensor f, SymInt upx, SymInt upy, SymInt downx, SymInt downy, SymInt padx0, "
                     "SymInt padx1, SymInt pady0, SymInt pady1, bool flip_filter, float gain, str backend) -> Tensor",
                     _run, _upfirdn2d_fake)


# ----------------------------------------------------------------------------- autograd


def _backward_params(params: tuple, x_shape, dy_shape, f: torch.Tensor) -> tuple:
    """upfirdn2d's adjoint is upfirdn2d with up and down swapped, the filter flipped and this
    padding, chosen so that its output has exactly x's size."""
    upx, upy, downx, downy, padx0, padx1, pady0, pady1, flip_filter, gain, backend = params
    ih, iw = x_shape[2], x_shape[3]
    oh, ow = dy_shape[2], dy_shape[3]
    fh, fw = _filter_size(f)
    padding = (fw - padx0 - 1, iw * upx - ow * downx + padx0 - upx + 1,
               fh - pady0 - 1, ih * upy - oh * downy + pady0 - upy + 1)
    return (downx, downy, upx, upy) + padding + (not flip_filter, gain, backend)


def _apply(x: torch.Tensor, f: torch.Tensor, params: tuple) -> torch.Tensor:
    if torch.is_grad_enabled() and x.requires_grad:
        return _Upfirdn2d.apply(x, f, params)
    return UPFIRDN2D(x, f, *params)


class _Upfirdn2d(torch.autograd.Function):
    """Linear in x: the backward is the adjoint op, applied through this same Function, so
    gradients of gradients (of any order) work."""

    @staticmethod
    def forward(ctx, x, f, params):
        ctx.save_for_backward(f)
        ctx.x_shape, ctx.params = tuple(x.shape), params
        return UPFIRDN2D(x, f, *params)

    @staticmethod
    def backward(ctx, dy):
        (f,) = ctx.saved_tensors
        dx = None
        if ctx.needs_input_grad[0]:
            dx = _apply(dy, f, _backward_params(ctx.params, ctx.x_shape, dy.shape, f))
        return dx, None, None


# ----------------------------------------------------------------------------- validation


_type_name = type_name
_is_int = is_int


def _parse_factor(name: str, value, op: str) -> tuple:
    """int or [x, y] of ints >= 1 -> (x, y)."""
    values = [value, value] if _is_int(value) else value
    if not isinstance(values, (list, tuple)) or len(values) != 2 or not all(_is_int(v) for v in values):
        raise TypeError(f"{op}: {name} must be an int or a list/tuple [x, y] of two ints, got {value!r}")
    if min(values) < 1:
        raise ValueError(f"{op}: {name} must be >= 1 along both axes, got {value!r}")
    return int(values[0]), int(values[1])


def _parse_padding(padding, op: str) -> tuple:
    """int, [x, y] or [x0, x1, y0, y1] of ints (negative = crop) -> (x0, x1, y0, y1)."""
    values = [padding] if _is_int(padding) else padding
    if (not isinstance(values, (list, tuple)) or len(values) not in (1, 2, 4)
            or not all(_is_int(v) for v in values)):
        raise TypeError(f"{op}: padding must be an int or a list/tuple of 2 ([x, y]) or 4 ([x0, x1, y0, y1]) ints, "
                        f"got {padding!r}")
    return parse_padding(values[0] if len(values) == 1 else tuple(int(v) for v in values))


def _check_x(x, op: str) -> None:
    check_tensor(op, "x", x, ndim=4, shape_doc=" [batch, channels, height, width]")
    check_tensor(op, "x", x, dtypes=FLOAT_DTYPES)


def _check_filter(f, x: torch.Tensor, op: str) -> torch.Tensor:
    """The filter as a float32 tensor on x's device (None: the 1x1 identity)."""
    if f is None:
        return torch.ones(1, 1, dtype=torch.float32, device=x.device)
    if not isinstance(f, torch.Tensor):
        raise TypeError(f"{op}: f must be a torch.Tensor or None, got {_type_name(f)}; build one with setup_filter()")
    if f.ndim not in (1, 2):
        raise ValueError(f"{op}: f must be 1-D [taps] (separable) or 2-D [height, width], got shape {tuple(f.shape)}")
    if f.numel() == 0:
        raise ValueError(f"{op}: f must have at least one tap, got shape {tuple(f.shape)}")
    if f.dtype != torch.float32:
        raise TypeError(f"{op}: f must be float32 (whatever x's dtype), got {f.dtype}; pass f.float()")
    if f.device != x.device:
        raise ValueError(f"{op}: f is on {f.device} but x is on {x.device}; they must be on the same device")
    if f.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{op}: gradients with respect to the filter f are not supported; pass f.detach()")
    return f


def _check_gain(gain, op: str) -> float:
    if not is_real(gain):
        raise TypeError(f"{op}: gain must be a real number, got {_type_name(gain)}")
    gain = float(gain)
    if not is_finite(gain):  # NaN included: "must be finite, got nan", as before
        raise ValueError(f"{op}: gain must be finite, got {gain}")
    return gain


def _check_backend(backend, op: str) -> str:
    return check_backend(op, backend, DISPATCH.backends)


def _validate(x, f, up, down, padding, flip_filter, gain, backend, op="upfirdn2d") -> tuple:
    _check_x(x, op)
    f = _check_filter(f, x, op)
    upx, upy = _parse_factor("up", up, op)
    downx, downy = _parse_factor("down", down, op)
    padx0, padx1, pady0, pady1 = _parse_padding(padding, op)
    if not isinstance(flip_filter, bool):
        raise TypeError(f"{op}: flip_filter must be a bool, got {_type_name(flip_filter)}")
    gain = _check_gain(gain, op)
    backend = _check_backend(backend, op)
    fh, fw = _filter_size(f)
    _, _, h, w = x.shape
    for axis, size, up_, p0, p1, taps in (("x", w, upx, padx0, padx1, fw), ("y", h, upy, pady0, pady1, fh)):
        padded = size * up_ + p0 + p1
        if padded < taps:
            raise ValueError(
                f"{op}: the output would be empty along {axis}: the upsampled and padded input has {padded} pixels "
                f"({size} x up {up_} + padding {p0} + {p1}) but the filter has {taps} taps; pad more or crop less")
    return f, (upx, upy, downx, downy, padx0, padx1, pady0, pady1, flip_filter, gain, backend)


# ----------------------------------------------------------------------------- public ops


def upfirdn2d(x: torch.Tensor, f: Optional[torch.Tensor], up=1, down=1, padding=0, flip_filter: bool = False,
              gain: float = 1, backend: Optional[str] = None) -> torch.Tensor:
    """Pad, upsample, FIR-filter and downsample a batch of 2-D images (NVlabs semantics).

    Per channel: insert ``up - 1`` zeros after each pixel; pad with zeros (negative padding
    crops); convolve with ``f`` keeping only outputs whose footprint lies inside the padded
    image (a true convolution; ``flip_filter=True`` makes it a correlation); keep every
    ``down``-th pixel.

    Args:
        x: [N, C, H, W], float32, float16, bfloat16 or float64; any layout (channels_last is
            kept in the output).
        f: float32 filter, [taps] (separable: along x then y, each pass scaled by
            gain ** 0.5) or [fh, fw] (one pass scaled by gain), or None (identity). Not
            differentiated. See ``setup_filter``.
        up, down: int or [x, y], integer factors >= 1.
        padding: int, [x, y] or [x0, x1, y0, y1], with respect to the upsampled image.
        flip_filter: False = convolution, True = correlation.
        gain: overall scale of the signal.
        backend: ``'cuda'``, ``'triton'``, ``'cpu'``, ``'reference'`` or None (automatic, or
            the ``GENFAST_BACKEND`` environment variable).

    Returns [N, C, (H * up + pady0 + pady1 - fh) // down + 1, (W * up + padx0 + padx1 - fw) // down + 1].
    Differentiable to any order with respect to ``x``.
    """
    f, params = _validate(x, f, up, down, padding, flip_filter, gain, backend)
    return _apply(x, f, params)


def setup_filter(f, device=torch.device("cpu"), normalize: bool = True, flip_filter: bool = False, gain: float = 1,
                 separable: Optional[bool] = None) -> torch.Tensor:
    """Build a float32 FIR filter for ``upfirdn2d`` from a tensor, numpy array, list, scalar or
    None (identity), as NVlabs' setup_filter: a 1-D filter stays separable when ``separable``
    (default: when it has >= 8 taps), else it becomes its outer product; ``normalize`` divides
    by the sum (unit DC gain); ``flip_filter`` flips it; ``gain`` scales it by
    gain ** (ndim / 2)."""
    if f is None:
        f = 1
    try:
        f = torch.as_tensor(f, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError("setup_filter: f must be a tensor, array, list or number, "
                        f"got {_type_name(f)} ({exc})") from None
    if f.ndim not in (0, 1, 2):
        raise ValueError(f"setup_filter: f must be 0-D, 1-D or 2-D, got shape {tuple(f.shape)}")
    if f.numel() == 0:
        raise ValueError("setup_filter: f must have at least one tap")
    if f.ndim == 0:
        f = f[None]
    if separable is None:
        separable = f.ndim == 1 and f.numel() >= 8
    if f.ndim == 1 and not separable:
        f = torch.outer(f, f)
    if f.ndim != (1 if separable else 2):
        raise ValueError(f"setup_filter: separable=True needs a 1-D filter, got shape {tuple(f.shape)}")
    if normalize:
        total = f.sum()
        if total == 0:
            raise ValueError("setup_filter: cannot normalize a filter whose taps sum to zero; pass normalize=False")
        f = f / total
    if flip_filter:
        f = f.flip(list(range(f.ndim)))
    f = f * (_check_gain(gain, "setup_filter") ** (f.ndim / 2))
    return f.to(device=device)


def _filter_taps(f, x, op) -> tuple:
    """(fw, fh) of a filter argument for the helpers' padding arithmetic (after validation)."""
    _check_x(x, op)
    f = _check_filter(f, x, op)
    fh, fw = _filter_size(f)
    return f, fw, fh


def filter2d(x: torch.Tensor, f: Optional[torch.Tensor], padding=0, flip_filter: bool = False, gain: float = 1,
             backend: Optional[str] = None) -> torch.Tensor:
    """Filter with ``f``, padded so that the output has x's size; ``padding`` (int, [x, y] or
    [x0, x1, y0, y1]) adds to that, negative values crop."""
    op = "filter2d"
    f, fw, fh = _filter_taps(f, x, op)
    padx0, padx1, pady0, pady1 = _parse_padding(padding, op)
    p = [padx0 + fw // 2, padx1 + (fw - 1) // 2, pady0 + fh // 2, pady1 + (fh - 1) // 2]
    f, params = _validate(x, f, 1, 1, p, flip_filter, gain, backend, op)
    return _apply(x, f, params)


def upsample2d(x: torch.Tensor, f: Optional[torch.Tensor], up=2, padding=0, flip_filter: bool = False,
               gain: float = 1, backend: Optional[str] = None) -> torch.Tensor:
    """Upsample by ``up`` (int or [x, y]) with the filter ``f``; the output is ``up`` times the
    input's size, plus ``padding`` (negative crops). The gain is multiplied by upx * upy to
    make up for the inserted zeros."""
    op = "upsample2d"
    f, fw, fh = _filter_taps(f, x, op)
    upx, upy = _parse_factor("up", up, op)
    padx0, padx1, pady0, pady1 = _parse_padding(padding, op)
    p = [padx0 + (fw + upx - 1) // 2, padx1 + (fw - upx) // 2, pady0 + (fh + upy - 1) // 2, pady1 + (fh - upy) // 2]
    f, params = _validate(x, f, (upx, upy), 1, p, flip_filter, _check_gain(gain, op) * upx * upy, backend, op)
    return _apply(x, f, params)


def downsample2d(x: torch.Tensor, f: Optional[torch.Tensor], down=2, padding=0, flip_filter: bool = False,
                 gain: float = 1, backend: Optional[str] = None) -> torch.Tensor:
    """Downsample by ``down`` (int or [x, y]) with the filter ``f``; the output is the input's
    size divided by ``down``, plus ``padding`` (with respect to the input; negative crops)."""
    op = "downsample2d"
    f, fw, fh = _filter_taps(f, x, op)
    downx, downy = _parse_factor("down", down, op)
    padx0, padx1, pady0, pady1 = _parse_padding(padding, op)
    p = [padx0 + (fw - downx + 1) // 2, padx1 + (fw - downx) // 2,
         pady0 + (fh - downy + 1) // 2, pady1 + (fh - downy) // 2]
    f, params = _validate(x, f, 1, (downx, downy), p, flip_filter, gain, backend, op)
    return _apply(x, f, params)


def selected_backend(x: torch.Tensor, backend: Optional[str] = None) -> str:
    """The backend ``upfirdn2d`` would run on for ``x`` (for diagnostics and benchmarks)."""
    return DISPATCH.select(backend, x.device, x.dtype)
