"""genfast.ops.filtered_lrelu: StyleGAN3's fused bias + upsample + leaky ReLU + clamp +
downsample (NVlabs semantics), without the upsampled intermediate ever reaching memory.

Layers (the bias_act pattern):
  1. ``filtered_lrelu()``: validates every argument (clear errors before any kernel), then an
     autograd.Function.
  2. ``torch.ops.genfast.filtered_lrelu`` (forward, also returns the sign record) and
     ``torch.ops.genfast.filtered_lrelu_masked`` (the backward chain): torch.library ops
     (light form, with fake kernels), opaque nodes for torch.compile(fullgraph=True).
  3. ``DISPATCH``: backends (cuda, triton, cpu, reference), chosen at run time in the op impl.

Every backend runs one generic fused chain per (n, c) plane, in one of two modes:

    T  = upfirdn(in, g1, up=u1, pad (p1x, p1y))       the intermediate, (th, tw) pixels
    T' = ACT:  clamp(lrelu(T + 0) * gain)              (bias added to ``in`` before stage 1)
         MASK: T * {gain, gain * slope, 0}[code]       (code read from the sign record)
    out = upfirdn(T', g2, down=d2, pad (p2x, p2y))     zero outside T; (oh, ow) pixels

with ``g1``/``g2`` prepared correlation filters (1-D = separable, applied along x then y).
The forward is ACT with (fu, up, padding) then (fd, down). The sign record: one uint8 per
pixel of T (N, C, th, tw), 0 = positive (slope 1), 1 = negative (z <= 0: slope ``slope``),
2 = clamped (derivative 0); a byte instead of NVlabs' 2 bits, so the backward reads it
without bit twiddling (th * tw bytes per plane: for up=2 about the size of x in float32).
The forward writes it only when a gradient is needed; the backward does not recompute it.

The backward is MASK mode run as the adjoint chain: (fd flipped, up=down) then (fu flipped,
down=up), giving dx; db = dx summed over N, H, W. It is linear in dy with a fixed mask, so its
own derivative is MASK mode in the forward direction (and so on, to any order).
Derivatives with respect to x through the mask are zero almost everywhere (leaky ReLU and
clamp are piecewise linear) and are returned as zero, exactly as the math says; at the kinks
themselves the op is not differentiable.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional

import torch

from .. import _ext
from .._dispatch import OpDispatcher
from ._define import NativeOp
from ._validate import check_backend, check_real, check_tensor, cpu_threads, is_int, type_name
from ..reference.filtered_lrelu import filtered_lrelu as reference  # noqa: F401  (the spec)
from ..reference.upfirdn2d import upfirdn2d as reference_upfirdn2d

__all__ = ["filtered_lrelu", "DISPATCH", "FLOAT_DTYPES", "selected_backend"]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# The backends' mode argument (the Triton kernel's MODE constexpr); the C++ entries take the name.
ACT, MASK = 0, 1
MODE_NAMES = {ACT: "act", MASK: "mask"}
# The sign record's bytes (see the module docstring): every backend writes and reads these, so a
# forward on one backend and a backward on another agree. The C++/CUDA kernels' values are
# _C.FILTERED_LRELU_SIGN_CODES (tests check they are these).
CODE_POSITIVE, CODE_NEGATIVE, CODE_CLAMPED = 0, 1, 2

DISPATCH = OpDispatcher("filtered_lrelu")


class Plan(NamedTuple):
    """Geometry of one fused chain (see the module docstring)."""

    u1: int
    p1x: int
    p1y: int
    th: int
    tw: int
    d2: int
    p2x: int
    p2y: int
    oh: int
    ow: int


# ----------------------------------------------------------------------------- geometry


def _filter_size(f: torch.Tensor) -> tuple:
    """(fh, fw); a 1-D (separable) filter has the same taps along both axes."""
    return (f.shape[0], f.shape[0]) if f.ndim == 1 else (f.shape[0], f.shape[1])


def prepared_filter(f: torch.Tensor, flip: bool, gain: float) -> torch.Tensor:
    """The correlation kernel a backend applies: ``f`` flipped when ``flip`` (a true
    convolution), times gain ** (ndim / 2) (per pass for separable filters); float32."""
    g = f.float()
    if flip:
        g = g.flip(list(range(g.ndim)))
    return (g * (gain ** (g.ndim / 2))).contiguous()


def upsampled_size(h: int, w: int, fu: torch.Tensor, up: int, padding: tuple) -> tuple:
    """(uh, uw): size of the upsampled, padded, fu-filtered intermediate."""
    px0, px1, py0, py1 = padding
    fuh, fuw = _filter_size(fu)
    return h * up + py0 + py1 - fuh + 1, w * up + px0 + px1 - fuw + 1


def output_size(h: int, w: int, fu, fd, up: int, down: int, padding: tuple) -> tuple:
    uh, uw = upsampled_size(h, w, fu, up, padding)
    fdh, fdw = _filter_size(fd)
    return (uh - fdh) // down + 1, (uw - fdw) // down + 1


def forward_plan(h, w, fu, fd, up, down, padding) -> Plan:
    px0, _, py0, _ = padding
    uh, uw = upsampled_size(h, w, fu, up, padding)
    oh, ow = output_size(h, w, fu, fd, up, down, padding)
    return Plan(up, px0, py0, uh, uw, down, 0, 0, oh, ow)


def adjoint_plan(h, w, fu, fd, up, down, padding) -> Plan:
    """The adjoint chain, from dy (oh, ow) back to dx (h, w): each upfirdn's adjoint is
    upfirdn with up and down swapped, the filter flipped and its padding mirrored."""
    px0, _, py0, _ = padding
    uh, uw = upsampled_size(h, w, fu, up, padding)
    fuh, fuw = _filter_size(fu)
    fdh, fdw = _filter_size(fd)
    return Plan(down, fdw - 1, fdh - 1, uh, uw, up, fuw - 1 - px0, fuh - 1 - py0, h, w)


def chain_filters(fu, fd, up, flip_filter, adjoint) -> tuple:
    """(g1, g2) of the forward (or adjoint) chain."""
    gu = prepared_filter(fu, (not flip_filter) != adjoint, up * up)
    gd = prepared_filter(fd, (not flip_filter) != adjoint, 1.0)
    return (gd, gu) if adjoint else (gu, gd)


# ----------------------------------------------------------------------------- layout


def is_channels_last(x: torch.Tensor) -> bool:
    """Whether the output is made channels_last (NHWC in memory) for input ``x``."""
    if x.is_contiguous():
        return False
    if x.is_contiguous(memory_format=torch.channels_last):
        return True
    return x.stride(1) < x.stride(3)  # a strided view of an NHWC tensor


def _new_output(x: torch.Tensor, n: int, c: int, oh: int, ow: int) -> torch.Tensor:
    fmt = torch.channels_last if is_channels_last(x) else torch.contiguous_format
    return torch.empty((n, c, oh, ow), dtype=x.dtype, device=x.device, memory_format=fmt)


# ----------------------------------------------------------------------------- backends

# Every backend: fn(mode, out, signs, x, b, g1, g2, plan, gain, slope, clamp). ``x`` and
# ``out`` may have any strides (kernels take them); ``signs`` is uint8 (N, C, th, tw)
# contiguous: written in ACT mode when not None, read in MASK mode. clamp < 0: none.


@functools.lru_cache(maxsize=256)
def _options(mode: int, plan: Plan, gain: float, slope: float, clamp: float):
    """The extension's FilteredLReLUOptions of one chain (the output size comes from ``out``)."""
    return _ext._C.FilteredLReLUOptions(
        mode=MODE_NAMES[mode], up=int(plan.u1), pad1_x=int(plan.p1x), pad1_y=int(plan.p1y), tmp_h=int(plan.th),
        tmp_w=int(plan.tw), down=int(plan.d2), pad2_x=int(plan.p2x), pad2_y=int(plan.p2y), gain=float(gain),
        slope=float(slope), clamp=float(clamp))


# The C++ and CUDA entries read sizes, strides, dtype and the filters' taps from the tensors.


@DISPATCH.register("cpu", FLOAT_DTYPES)
def _filtered_lrelu_cpu(mode, out, signs, x, b, g1, g2, plan, gain, slope, clamp):
    g1h, g1w = _filter_size(g1)
    g2h, g2w = _filter_size(g2)
    _ext._C.filtered_lrelu_cpu(out, x, b=b, signs=signs, g1=g1, g2=g2, options=_options(mode, plan, gain, slope, clamp),
                               num_threads=cpu_threads(out.numel() * (g1h * g1w + g2h * g2w), 1 << 18))


@DISPATCH.register("cuda", (torch.float32, torch.float16, torch.bfloat16, torch.float64))
def _filtered_lrelu_cuda(mode, out, signs, x, b, g1, g2, plan, gain, slope, clamp):
    _ext._C.filtered_lrelu_cuda(out, x, b=b, signs=signs, g1=g1, g2=g2,
                                options=_options(mode, plan, gain, slope, clamp), stream=_ext.stream_of(x))


@DISPATCH.register("triton", (torch.float32, torch.float16, torch.bfloat16))
def _filtered_lrelu_triton(mode, out, signs, x, b, g1, g2, plan, gain, slope, clamp):
    from ..triton_kernels import filtered_lrelu as kernels

    kernels.filtered_lrelu(mode, out, signs, x, b, g1, g2, plan, gain, slope, clamp)


def _padding_to(size: int, up: int, pad0: int, taps: int, target: int, down: int = 1) -> tuple:
    """(pad0, pad1) making upfirdn's output exactly ``target`` long."""
    return pad0, (target - 1) * down + taps - size * up - pad0


@DISPATCH.register("reference", FLOAT_DTYPES)
def _filtered_lrelu_reference(mode, out, signs, x, b, g1, g2, plan, gain, slope, clamp):
    """The generic chain in plain PyTorch (reference upfirdn2d with prepared filters)."""
    n, c, h, w = x.shape
    g1h, g1w = _filter_size(g1)
    g2h, g2w = _filter_size(g2)
    if b is not None:
        x = x + b.reshape(1, -1, 1, 1)
    pad1 = _padding_to(w, plan.u1, plan.p1x, g1w, plan.tw) + _padding_to(h, plan.u1, plan.p1y, g1h, plan.th)
    t = reference_upfirdn2d(x, g1, plan.u1, 1, pad1, flip_filter=True)
    if mode == ACT:
        z = t
        v = torch.where(z > 0, z, z * slope) * gain
        code = torch.where(z > 0, CODE_POSITIVE, CODE_NEGATIVE).to(torch.uint8)
        if clamp >= 0:
            clamped = (v > clamp) | (v < -clamp)
            v = v.clamp(-clamp, clamp)
            code = torch.where(clamped, CODE_CLAMPED, code).to(torch.uint8)
        if signs is not None:
            signs.copy_(code)
        t = v
    else:
        table = torch.tensor([gain, gain * slope, 0.0, 0.0], dtype=t.dtype, device=t.device)
        t = t * table[signs.long()]
    pad2 = (plan.p2x, (plan.ow - 1) * plan.d2 + g2w - plan.tw - plan.p2x,
            plan.p2y, (plan.oh - 1) * plan.d2 + g2h - plan.th - plan.p2y)
    out.copy_(reference_upfirdn2d(t, g2, 1, plan.d2, pad2, flip_filter=True))


def _chain(mode, inp, b, signs, fu, fd, up, down, padding, flip_filter, adjoint, plan, gain, slope, clamp, backend):
    n, c = inp.shape[:2]
    out = _new_output(inp, n, c, plan.oh, plan.ow)
    if out.numel() == 0:
        return out
    g1, g2 = chain_filters(fu, fd, up, flip_filter, adjoint)
    if b is not None:
        b = b.contiguous()
    DISPATCH.run(backend or None, inp.device, inp.dtype, mode, out, signs, inp, b, g1, g2, plan,
                 float(gain), float(slope), float(clamp))
    return out


# ----------------------------------------------------------------------------- torch.library

def _signs_shape(x, fu, up, padding) -> tuple:
    uh, uw = upsampled_size(x.shape[2], x.shape[3], fu, up, padding)
    return (x.shape[0], x.shape[1], uh, uw)


def _fwd_impl(x, fu, fd, b, up, down, px0, px1, py0, py1, gain, slope, clamp, flip_filter, write_signs, backend):
    padding = (px0, px1, py0, py1)
    plan = forward_plan(x.shape[2], x.shape[3], fu, fd, up, down, padding)
    signs = (torch.zeros(_signs_shape(x, fu, up, padding), dtype=torch.uint8, device=x.device) if write_signs
             else torch.empty(0, dtype=torch.uint8, device=x.device))
    if x.numel() == 0:  # only padding reaches the intermediate: it is all zero
        signs.fill_(CODE_NEGATIVE)
        return _new_output(x, x.shape[0], x.shape[1], plan.oh, plan.ow).zero_(), signs
    y = _chain(ACT, x, b, signs if write_signs else None, fu, fd, up, down, padding, flip_filter, False, plan,
               gain, slope, clamp, backend)
    return y, signs


def _masked_impl(inp, fu, fd, signs, up, down, px0, px1, py0, py1, h, w, gain, slope, flip_filter, adjoint, backend):
    padding = (px0, px1, py0, py1)
    make_plan = adjoint_plan if adjoint else forward_plan
    plan = make_plan(h, w, fu, fd, up, down, padding)
    if inp.numel() == 0:
        return _new_output(inp, inp.shape[0], inp.shape[1], plan.oh, plan.ow).zero_()
    return _chain(MASK, inp, None, signs, fu, fd, up, down, padding, flip_filter, adjoint, plan, gain, slope, -1.0,
                  backend)


def _fake_output(x, oh, ow):
    fmt = torch.channels_last if is_channels_last(x) else torch.contiguous_format
    return torch.empty((x.shape[0], x.shape[1], oh, ow), dtype=x.dtype, device=x.device, memory_format=fmt)


def _fwd_fake(x, fu, fd, b, up, down, px0, px1, py0, py1, gain, slope, clamp, flip_filter, write_signs, backend):
    padding = (px0, px1, py0, py1)
    oh, ow = output_size(x.shape[2], x.shape[3], fu, fd, up, down, padding)
    shape = _signs_shape(x, fu, up, padding) if write_signs else (0,)
    return _fake_output(x, oh, ow), torch.empty(shape, dtype=torch.uint8, device=x.device)


def _masked_fake(inp, fu, fd, signs, up, down, px0, px1, py0, py1, h, w, gain, slope, flip_filter, adjoint, backend):
    padding = (px0, px1, py0, py1)
    oh, ow = (h, w) if adjoint else output_size(h, w, fu, fd, up, down, padding)
    return _fake_output(inp, oh, ow)


# SymInt: the backward's geometry is computed from (symbolic) sizes; plain ints would make
# torch.compile specialise on them.
_GEOMETRY = "SymInt up, SymInt down, SymInt px0, SymInt px1, SymInt py0, SymInt py1"
# Returns (y, signs); signs is empty unless write_signs.
FORWARD = NativeOp(f"filtered_lrelu(Tensor x, Tensor fu, Tensor fd, Tensor? b, {_GEOMETRY}, float gain, float slope, "
                   "float clamp, bool flip_filter, bool write_signs, str backend) -> (Tensor, Tensor)",
                   _fwd_impl, _fwd_fake)
# The chain with a fixed sign mask, linear in its input: adjoint=False maps x-sized tensors to
# y-sized ones (forward direction), adjoint=True maps dy to dx. (h, w): the size of x.
MASKED = NativeOp(f"filtered_lrelu_masked(Tensor input, Tensor fu, Tensor fd, Tensor signs, {_GEOMETRY}, SymInt h, "
                  "SymInt w, float gain, float slope, bool flip_filter, bool adjoint, str backend) -> Tensor",
                  _masked_impl, _masked_fake)


# ----------------------------------------------------------------------------- autograd


class _Masked(torch.autograd.Function):
    """The chain with a fixed sign mask: linear in ``inp``, so its backward is the same chain
    in the other direction, through this same Function (derivatives of any order in dy)."""

    @staticmethod
    def forward(ctx, inp, fu, fd, signs, geometry, rest, adjoint):
        ctx.save_for_backward(fu, fd, signs)
        ctx.geometry, ctx.rest, ctx.adjoint = geometry, rest, adjoint
        return MASKED(inp, fu, fd, signs, *geometry, *rest[:3], adjoint, rest[3])

    @staticmethod
    def backward(ctx, dout):
        fu, fd, signs = ctx.saved_tensors
        return (_Masked.apply(dout, fu, fd, signs, ctx.geometry, ctx.rest, not ctx.adjoint),
                None, None, None, None, None, None)


class _FilteredLReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, b, fu, fd, params):
        up, down, px0, px1, py0, py1, gain, slope, clamp, flip_filter, backend = params
        y, signs = FORWARD(x, fu, fd, b, up, down, px0, px1, py0, py1, gain, slope, clamp, flip_filter, True, backend)
        ctx.save_for_backward(fu, fd, signs)
        ctx.geometry = (up, down, px0, px1, py0, py1, x.shape[2], x.shape[3])
        ctx.rest = (gain, slope, flip_filter, backend)
        return y

    @staticmethod
    def backward(ctx, dy):
        fu, fd, signs = ctx.saved_tensors
        need_dx, need_db = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dx = db = None
        if need_dx or need_db:
            dx = _Masked.apply(dy, fu, fd, signs, ctx.geometry, ctx.rest, True)
            if need_db:
                db = dx.sum(dim=(0, 2, 3))
        return dx if need_dx else None, db, None, None, None


# ----------------------------------------------------------------------------- validation


_type_name = type_name
_is_int = is_int


def _check_number(name: str, value, minimum: Optional[float] = None) -> float:
    # Unbounded parameters (gain, slope) must be finite; clamp (minimum 0) may be inf.
    return check_real("filtered_lrelu", name, value, minimum=minimum, finite=minimum is None, number_format="g")


def _check_filter(name: str, f, x: torch.Tensor) -> torch.Tensor:
    if f is None:
        return torch.ones(1, 1, dtype=torch.float32, device=x.device)
    if not isinstance(f, torch.Tensor):
        raise TypeError(f"filtered_lrelu: {name} must be a torch.Tensor or None, got {_type_name(f)}; "
                        "build one with genfast.ops.setup_filter()")
    if f.ndim not in (1, 2):
        raise ValueError(f"filtered_lrelu: {name} must be 1-D [taps] (separable) or 2-D [height, width], "
                         f"got shape {tuple(f.shape)}")
    if f.numel() == 0:
        raise ValueError(f"filtered_lrelu: {name} must have at least one tap, got shape {tuple(f.shape)}")
    if f.dtype != torch.float32:
        raise TypeError(f"filtered_lrelu: {name} must be float32 (whatever x's dtype), got {f.dtype}; "
                        f"pass {name}.float()")
    if f.device != x.device:
        raise ValueError(f"filtered_lrelu: {name} is on {f.device} but x is on {x.device}; "
                         "they must be on the same device")
    if f.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"filtered_lrelu: gradients with respect to the filter {name} are not supported; "
                         f"pass {name}.detach()")
    return f


def _check_factor(name: str, value) -> int:
    if not _is_int(value):
        raise TypeError(f"filtered_lrelu: {name} must be an int, got {value!r}")
    if value < 1:
        raise ValueError(f"filtered_lrelu: {name} must be >= 1, got {value}")
    return int(value)


def _parse_padding(padding) -> tuple:
    values = [padding] if _is_int(padding) else padding
    if (not isinstance(values, (list, tuple)) or len(values) not in (1, 2, 4)
            or not all(_is_int(v) for v in values)):
        raise TypeError("filtered_lrelu: padding must be an int or a list/tuple of 2 ([x, y]) or 4 "
                        f"([x0, x1, y0, y1]) ints, got {padding!r}")
    values = [int(v) for v in values]
    if len(values) == 1:
        return values[0], values[0], values[0], values[0]
    if len(values) == 2:
        return values[0], values[0], values[1], values[1]
    return tuple(values)


def _validate(x, fu, fd, b, up, down, padding, gain, slope, clamp, flip_filter, backend) -> tuple:
    check_tensor("filtered_lrelu", "x", x, ndim=4, shape_doc=" [batch, channels, height, width]")
    check_tensor("filtered_lrelu", "x", x, dtypes=FLOAT_DTYPES)
    fu = _check_filter("fu", fu, x)
    fd = _check_filter("fd", fd, x)
    if b is not None:
        if not isinstance(b, torch.Tensor):
            raise TypeError(f"filtered_lrelu: b must be a torch.Tensor or None, got {_type_name(b)}")
        if b.device != x.device:
            raise ValueError(f"filtered_lrelu: b is on {b.device} but x is on {x.device}; "
                             "they must be on the same device")
        if b.dtype != x.dtype:
            raise TypeError(f"filtered_lrelu: b must have the dtype of x ({x.dtype}), got {b.dtype}")
        if b.ndim != 1 or b.shape[0] != x.shape[1]:
            raise ValueError(f"filtered_lrelu: b must be 1-D with x.shape[1] = {x.shape[1]} elements, "
                             f"got shape {tuple(b.shape)}")
    up = _check_factor("up", up)
    down = _check_factor("down", down)
    padding = _parse_padding(padding)
    gain = _check_number("gain", gain)
    slope = _check_number("slope", slope)
    clamp = -1.0 if clamp is None else _check_number("clamp", clamp, minimum=0.0)
    if not isinstance(flip_filter, bool):
        raise TypeError(f"filtered_lrelu: flip_filter must be a bool, got {_type_name(flip_filter)}")
    backend = check_backend("filtered_lrelu", backend, DISPATCH.backends)
    h, w = x.shape[2], x.shape[3]
    uh, uw = upsampled_size(h, w, fu, up, padding)
    fdh, fdw = _filter_size(fd)
    fuh, fuw = _filter_size(fu)
    for axis, size, taps_u, taps_d in (("y", uh, fuh, fdh), ("x", uw, fuw, fdw)):
        if size < taps_d:
            raise ValueError(
                f"filtered_lrelu: the output would be empty along {axis}: the upsampled, padded and fu-filtered "
                f"image has {size} pixels but fd has {taps_d} taps (input {h}x{w}, up {up}, padding {padding}, "
                f"fu {taps_u} taps); pad more or crop less")
    return fu, fd, b, (up, down) + padding + (gain, slope, clamp, flip_filter, backend or "")


# ----------------------------------------------------------------------------- public op


def filtered_lrelu(x: torch.Tensor, fu: Optional[torch.Tensor] = None, fd: Optional[torch.Tensor] = None,
                   b: Optional[torch.Tensor] = None, up: int = 1, down: int = 1, padding=0,
                   gain: float = math.sqrt(2), slope: float = 0.2, clamp: Optional[float] = None,
                   flip_filter: bool = False, backend: Optional[str] = None) -> torch.Tensor:
    """Filtered leaky ReLU of StyleGAN3 (NVlabs semantics), fused.

    Per channel: add ``b``; upsample by ``up`` with ``fu`` (zero insertion, ``padding`` with
    respect to the upsampled image, negative crops; FIR with gain up**2); leaky ReLU with
    ``slope``, times ``gain``, clamped to ±``clamp``; FIR with ``fd`` and keep every
    ``down``-th pixel. Equal to ``genfast.reference.filtered_lrelu`` (bias_act + upfirdn2d).

    Args:
        x: [N, C, H, W], float32, float16, bfloat16 or float64; any strides (a channels_last
            input gives a channels_last output).
        fu, fd: float32 filters, [taps] (separable) or [fh, fw], or None (identity); not
            differentiated. See ``genfast.ops.setup_filter``.
        b: optional bias [C], x's dtype.
        up, down: integer factors >= 1.
        padding: int, [x, y] or [x0, x1, y0, y1].
        gain, slope: leaky ReLU scale and negative slope; clamp: None or >= 0.
        flip_filter: False = convolution, True = correlation.
        backend: ``'cuda'``, ``'triton'``, ``'cpu'``, ``'reference'`` or None (automatic,
            or the ``GENFAST_BACKEND`` environment variable).

    Returns [N, C, (H*up + py0 + py1 - (fu_h - 1) - (fd_h - 1) + down - 1) // down, (same along x)].
    Differentiable with respect to x and b (the backward uses the sign record saved by the
    forward, and is itself differentiable with respect to its incoming gradient; second
    derivatives through the activation mask are zero almost everywhere).
    """
    fu, fd, b, params = _validate(x, fu, fd, b, up, down, padding, gain, slope, clamp, flip_filter, backend)
    if torch.is_grad_enabled() and (x.requires_grad or (b is not None and b.requires_grad)):
        return _FilteredLReLU.apply(x, b, fu, fd, params)
    up, down, px0, px1, py0, py1, gain, slope, clamp, flip_filter, backend = params
    return FORWARD(x, fu, fd, b, up, down, px0, px1, py0, py1, gain, slope, clamp, flip_filter, False, backend)[0]


def selected_backend(x: torch.Tensor, backend: Optional[str] = None) -> str:
    """The backend ``filtered_lrelu`` would run on for ``x`` (for diagnostics and benchmarks)."""
    return DISPATCH.select(backend, x.device, x.dtype)
