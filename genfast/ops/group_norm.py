"""genfast.ops.group_norm: GroupNorm with an optional fused SiLU (the diffusion-UNet hot spot).

Layers, as in every op family (see ops/bias_act.py):
  1. ``group_norm()``: the public op; validates arguments, then an autograd.Function.
  2. ``torch.ops.genfast.group_norm`` / ``group_norm_backward``: NativeOps (ops/_define.py:
     define + impl + fake), opaque nodes for torch.compile(fullgraph=True); eager calls on plain
     tensors run the impls directly.
  3. ``DISPATCH``: backends cuda, triton, cpu, reference, chosen at run time.

Kernels see ``x`` (N, C, *spatial) as N x C x S (S = product of the spatial sizes) in one of
two memory layouts, both handled without copies:
  NCHW (contiguous):           element (n, c, s) at n*C*S + c*S + s
  NHWC (channels_last, any number of spatial dims): at n*S*C + s*C + c
Any other layout is made contiguous first.

Algorithm (every backend): the forward computes per (n, group) ``mean`` and
``rstd = 1/sqrt(var + eps)`` with a numerically sound two-level scheme: exact two-pass
(mean, then sum of squared deviations) inside tiles that stay in cache, and Chan's
pairwise combination of the tiles' (count, mean, M2), so a large mean never cancels.
y = (x - mean) * rstd * w + b, then SiLU. The backward recomputes z (and SiLU') from x, mean
and rstd, sums A = sum(dz * xhat), B = sum(dz) per (n, c), from which
dweight = sum_n A, dbias = sum_n B and
dx = rstd * (w dz - (sum_g(w B) + xhat * sum_g(w A)) / M), M = (C / G) * S.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional

import torch

from .. import _ext
from .._ext import bind_positional
from .._dispatch import OpDispatcher, direct_call_allowed
from ._define import NativeOp
from ._validate import ValidatedSignatures, cacheable, check_backend, check_int, check_tensor, cpu_threads, is_finite
from ._validate import cpu_threads_per_call, is_real, tensor_key, type_name
from ..reference import group_norm as reference

__all__ = ["group_norm", "DISPATCH", "FLOAT_DTYPES", "ACTIVATIONS", "Geometry", "selected_backend"]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ACTIVATIONS = reference.ACTIVATIONS  # None or "silu"
FORWARD, BACKWARD = 0, 1

DISPATCH = OpDispatcher("group_norm")


@dataclass(frozen=True)
class Geometry:
    """x seen as N x C x S, with G groups of D = C / G channels, in NCHW or NHWC memory."""

    N: int
    C: int
    S: int
    G: int
    channels_last: bool

    @property
    def D(self) -> int:
        return self.C // self.G

    @property
    def strides(self) -> tuple:
        """(stride of n, stride of c, stride of s) in elements."""
        if self.channels_last:
            return self.S * self.C, 1, self.C
        return self.C * self.S, self.S, 1


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------- layout


def _channels_last_perm(ndim: int) -> tuple:
    return (0, *range(2, ndim), 1)


def _prepare(x: torch.Tensor) -> tuple:
    """(x in a layout the kernels read, channels_last flag): NCHW or NHWC kept, else contiguous."""
    if x.is_contiguous():
        return x, False
    if x.ndim > 2 and x.permute(_channels_last_perm(x.ndim)).is_contiguous():
        return x, True
    return x.contiguous(), False


def _geometry(x: torch.Tensor, num_groups: int, channels_last: bool) -> Geometry:
    N, C = x.shape[0], x.shape[1]
    return Geometry(N, C, math.prod(x.shape[2:]), num_groups, channels_last)


def _like(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` with exactly the memory layout of the dense tensor ``like``."""
    if t.stride() == like.stride():
        return t
    return torch.empty_like(like).copy_(t)


# ----------------------------------------------------------------------------- backends
#
# Every backend: fn(FORWARD, x, w, b, y, mean, rstd, geo, eps, silu) fills y, mean, rstd;
#                fn(BACKWARD, dy, x, mean, rstd, w, b, dx, dw, db, geo, silu) fills dx and,
#                when dw / db are given (tensors of C elements), the affine gradients.
# w and b are contiguous 1-D tensors or None; all x-sized tensors share x's layout.


def _options(num_groups: int, eps: float, silu: bool):
    """The extension's GroupNormOptions of one call signature (the backward's eps is unused)."""
    return _options_of(_ext._C.GroupNormOptions, num_groups, eps, silu)


@functools.lru_cache(maxsize=256)  # keyed by the class too: the tests' CUDA emulation module has its own
def _options_of(cls, num_groups: int, eps: float, silu: bool):
    return cls(num_groups=int(num_groups), eps=float(eps), silu=bool(silu))


# The C++ entries derive N, C, S and the layout (NCHW / NHWC) from x itself.
@DISPATCH.register("cpu", FLOAT_DTYPES)
def _group_norm_cpu(mode, *args):
    if mode == FORWARD:
        x, w, b, y, mean, rstd, geo, eps, silu = args
        _ext._C.group_norm_fwd_cpu(x, y, mean, rstd, weight=w, bias=b, options=_options(geo.G, eps, silu),
                                   num_threads=cpu_threads(x.numel()))
    else:
        dy, x, mean, rstd, w, b, dx, dw, db, geo, silu = args
        _ext._C.group_norm_bwd_cpu(dy, x, mean, rstd, dx, weight=w, bias=b, dweight=dw, dbias=db,
                                   options=_options(geo.G, 0.0, silu), num_threads=cpu_threads(x.numel()))


@DISPATCH.register("cuda", GPU_DTYPES)
def _group_norm_cuda(mode, *args):
    C_ = _ext._C
    if mode == FORWARD:
        x, w, b, y, mean, rstd, geo, eps, silu = args
        options = _options(geo.G, eps, silu)
        work = torch.empty(C_.group_norm_cuda_workspace(x, options=options), dtype=torch.float32, device=x.device)
        C_.group_norm_fwd_cuda(x, y, mean, rstd, weight=w, bias=b, workspace=work, options=options,
                               stream=_ext.stream_of(x))
    else:
        dy, x, mean, rstd, w, b, dx, dw, db, geo, silu = args
        # Per-(n, c) partial sums of the backward (reduced over n here: N x C floats), then scratch.
        work = torch.empty(2 * geo.N * geo.C + 2 * geo.N * geo.G, dtype=torch.float32, device=x.device)
        C_.group_norm_bwd_cuda(dy, x, mean, rstd, dx, weight=w, bias=b, sums=work, options=_options(geo.G, 0.0, silu),
                               stream=_ext.stream_of(x))
        sums = work[:2 * geo.N * geo.C].view(2, geo.N, geo.C)
        if dw is not None:
            torch.sum(sums[0], dim=0, out=dw) if dw.dtype == torch.float32 else dw.copy_(sums[0].sum(0))
        if db is not None:
            torch.sum(sums[1], dim=0, out=db) if db.dtype == torch.float32 else db.copy_(sums[1].sum(0))


@DISPATCH.register("triton", GPU_DTYPES)
def _group_norm_triton(mode, *args):
    from ..triton_kernels import group_norm as kernels

    if mode == FORWARD:
        kernels.forward(*args)
    else:
        kernels.backward(*args)


@DISPATCH.register("reference", FLOAT_DTYPES)
def _group_norm_reference(mode, *args):
    if mode == FORWARD:
        x, w, b, y, mean, rstd, geo, eps, silu = args
        y.copy_(reference.group_norm(x, geo.G, w, b, eps, "silu" if silu else None))
        m, r = reference.group_stats(x, geo.G, eps)  # in float64, then rounded
        mean.copy_(m)
        rstd.copy_(r)
    else:
        dy, x, mean, rstd, w, b, dx, dw, db, geo, silu = args
        # The reference recomputes the mean in float64 rather than use the rounded saved one (a
        # float32 mean of large-mean data is off by up to half an ulp of the mean; the rounding
        # of rstd is relative, hence harmless).
        mean = reference.group_stats(x, geo.G, dtype=torch.float64)[0]
        grads = backward_formula(dy, x, mean, rstd, w, b, geo.G, silu)
        dx.copy_(grads[0])
        if dw is not None:
            dw.copy_(grads[1])
        if db is not None:
            db.copy_(grads[2])


def backward_formula(dy, x, mean, rstd, w, b, num_groups, silu):
    """(dx, dweight, dbias) written out in plain torch (in float64): the algorithm every
    backend implements (autograd cannot record inside torch.library impls)."""
    N, C = x.shape[0], x.shape[1]
    G, D = num_groups, C // num_groups
    work = torch.float64
    mean, rstd = mean.to(work), rstd.to(work)
    xs = x.reshape(N, G, D, -1).to(work)
    dys = dy.reshape(N, G, D, -1).to(work)
    m, r = mean[:, :, None, None], rstd[:, :, None, None]
    ws = (w.to(work) if w is not None else torch.ones(C, dtype=work, device=x.device)).reshape(1, G, D, 1)
    bs = (b.to(work) if b is not None else torch.zeros(C, dtype=work, device=x.device)).reshape(1, G, D, 1)
    xhat = (xs - m) * r
    dz = dys
    if silu:
        z = xhat * ws + bs
        s = torch.sigmoid(z)
        dz = dys * s * (1 + z * (1 - s))
    A = (dz * xhat).sum(dim=3)  # (N, G, D)
    B = dz.sum(dim=3)
    M = D * xs.shape[3]
    sum_wa = (A * ws[..., 0]).sum(dim=2)[:, :, None, None]
    sum_wb = (B * ws[..., 0]).sum(dim=2)[:, :, None, None]
    dx = r * (dz * ws - (sum_wb + xhat * sum_wa) / M)
    return dx.reshape(x.shape), A.sum(dim=0).reshape(C), B.sum(dim=0).reshape(C)


# ----------------------------------------------------------------------------- op bodies


def _empty_stats(x: torch.Tensor, G: int) -> tuple:
    sd = stats_dtype(x.dtype)
    return (torch.empty(x.shape[0], G, dtype=sd, device=x.device),
            torch.empty(x.shape[0], G, dtype=sd, device=x.device))


def _forward_impl(x, weight, bias, num_groups, eps, silu, backend):
    x, channels_last = _prepare(x)
    y = torch.empty_like(x)
    mean, rstd = _empty_stats(x, num_groups)
    if x.numel() == 0:
        if mean.numel():  # N > 0 but empty groups: the statistics of nothing, as torch
            mean.fill_(float("nan"))
            rstd.fill_(float("nan"))
        return y, mean, rstd
    geo = _geometry(x, num_groups, channels_last)
    w = weight.contiguous() if weight is not None else None
    b = bias.contiguous() if bias is not None else None
    DISPATCH.run(backend or None, x.device, x.dtype, FORWARD, x, w, b, y, mean, rstd, geo, eps, silu)
    return y, mean, rstd


def _affine_grad_sizes(x, weight, bias, need_dw, need_db) -> tuple:
    C = x.shape[1]
    return C if need_dw and weight is not None else 0, C if need_db and bias is not None else 0


def _backward_impl(dy, x, mean, rstd, weight, bias, num_groups, silu, need_dw, need_db, backend):
    x, channels_last = _prepare(x)
    dx = torch.empty_like(x)
    n_dw, n_db = _affine_grad_sizes(x, weight, bias, need_dw, need_db)
    dw = torch.empty(n_dw, dtype=x.dtype, device=x.device)
    db = torch.empty(n_db, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return dx, dw.zero_(), db.zero_()
    geo = _geometry(x, num_groups, channels_last)
    dy = _like(dy, x)
    w = weight.contiguous() if weight is not None else None
    b = bias.contiguous() if bias is not None else None
    DISPATCH.run(backend or None, x.device, x.dtype, BACKWARD, dy, x, mean.contiguous(), rstd.contiguous(), w, b,
                 dx, dw if dw.numel() else None, db if db.numel() else None, geo, silu)
    return dx, dw, db


# ----------------------------------------------------------------------------- ops


def _output_like(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(_prepare(x)[0])


def _forward_fake(x, weight, bias, num_groups, eps, silu, backend):
    mean, rstd = _empty_stats(x, num_groups)
    return _output_like(x), mean, rstd


def _backward_fake(dy, x, mean, rstd, weight, bias, num_groups, silu, need_dw, need_db, backend):
    n_dw, n_db = _affine_grad_sizes(x, weight, bias, need_dw, need_db)
    return _output_like(x), x.new_empty(n_dw), x.new_empty(n_db)


GROUP_NORM = NativeOp("group_norm(Tensor x, Tensor? weight, Tensor? bias, SymInt num_groups, float eps, bool silu, "
                      "str backend) -> (Tensor, Tensor, Tensor)", _forward_impl, _forward_fake)
# Returns (dx, dweight, dbias); dweight (dbias) is empty unless need_dw (need_db) and weight (bias) is given.
GROUP_NORM_BACKWARD = NativeOp("group_norm_backward(Tensor dy, Tensor x, Tensor mean, Tensor rstd, Tensor? weight, "
                               "Tensor? bias, SymInt num_groups, bool silu, bool need_dw, bool need_db, str backend) "
                               "-> (Tensor, Tensor, Tensor)", _backward_impl, _backward_fake)


# ----------------------------------------------------------------------------- autograd


class _GroupNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, num_groups, eps, silu, backend):
        y, mean, rstd = GROUP_NORM(x, weight, bias, num_groups, eps, silu, backend)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.params = (num_groups, eps, silu, backend)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        num_groups, eps, silu, backend = ctx.params
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():
            # create_graph=True (double backward): the gradients of a differentiable
            # composition of the reference, so higher derivatives are exact (and slower).
            return _differentiable_backward(dy, x, weight, bias, num_groups, eps, silu, need_x, need_w, need_b)
        need_w, need_b = need_w and weight is not None, need_b and bias is not None
        dx, dw, db = GROUP_NORM_BACKWARD(dy, x, mean, rstd, weight, bias, num_groups, silu, need_w, need_b, backend)
        return (dx if need_x else None, dw if need_w else None, db if need_b else None, None, None, None, None)


def _differentiable_backward(dy, x, weight, bias, num_groups, eps, silu, need_x, need_w, need_b):
    inputs = [t for t, need in ((x, need_x), (weight, need_w), (bias, need_b)) if need and t is not None]
    with torch.enable_grad():
        leaves = [t if t.requires_grad else t.detach().requires_grad_() for t in inputs]
        lookup = {id(t): leaf for t, leaf in zip(inputs, leaves)}
        y = reference.group_norm(lookup.get(id(x), x), num_groups,
                                 lookup.get(id(weight), weight) if weight is not None else None,
                                 lookup.get(id(bias), bias) if bias is not None else None,
                                 eps, "silu" if silu else None)
        grads = torch.autograd.grad(y, leaves, dy, create_graph=True, allow_unused=True)
    found = {id(t): g for t, g in zip(inputs, grads)}
    return (found.get(id(x)) if need_x else None,
            found.get(id(weight)) if weight is not None and need_w else None,
            found.get(id(bias)) if bias is not None and need_b else None, None, None, None, None)


# ----------------------------------------------------------------------------- public op


_type_name = type_name


def _check_affine(name: str, t, x: torch.Tensor) -> None:
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"group_norm: {name} must be a torch.Tensor or None, got {_type_name(t)}")
    C = x.shape[1]
    if t.shape != (C,):
        raise ValueError(f"group_norm: {name} must have shape ({C},) (the channels of x), got {tuple(t.shape)}")
    if t.dtype != x.dtype:
        raise ValueError(f"group_norm: {name} must have the dtype of x ({x.dtype}), got {t.dtype}; "
                         f"pass {name}.to(x.dtype)")
    if t.device != x.device:
        raise ValueError(f"group_norm: {name} is on {t.device} but x is on {x.device}; they must be on the same device")


def validate(x, num_groups, weight=None, bias=None, eps=1e-5, activation=None, backend=None) -> tuple:
    """Checks every argument (clear errors before any kernel); returns (eps, silu, backend)."""
    check_tensor("group_norm", "x", x, dtypes=FLOAT_DTYPES)
    if x.ndim < 2:
        raise ValueError("group_norm: x must have shape (N, C, *) with at least 2 dimensions, "
                         f"got shape {tuple(x.shape)}")
    num_groups = check_int("group_norm", "num_groups", num_groups, type_error=ValueError)
    C = x.shape[1]
    if num_groups < 1:
        raise ValueError(f"group_norm: num_groups must be >= 1, got {num_groups}")
    if C % num_groups != 0:
        raise ValueError(f"group_norm: the {C} channels of x (x.shape[1]) are not divisible by num_groups={num_groups}")
    _check_affine("weight", weight, x)
    _check_affine("bias", bias, x)
    if not is_real(eps):
        raise ValueError(f"group_norm: eps must be a real number, got {_type_name(eps)}")
    eps = float(eps)
    if not (eps >= 0 and is_finite(eps)):
        raise ValueError(f"group_norm: eps must be a finite number >= 0, got {eps}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"group_norm: unknown activation {activation!r}; expected None or 'silu'")
    return num_groups, eps, activation == "silu", check_backend("group_norm", backend, DISPATCH.backends)


def group_norm(
    x: torch.Tensor,
    num_groups: int,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
    activation: Optional[str] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """``torch.nn.functional.group_norm(x, num_groups, weight, bias, eps)``, followed by SiLU
    when ``activation == "silu"``, in one fused pass (statistics in float32, float64 for
    float64 input).

    Args:
        x: (N, C, *) with any number of spatial dimensions (also none); float32, float16,
            bfloat16 or float64. Contiguous and channels_last (NHWC / NDHWC) memory are read
            as they are; other layouts are made contiguous. The output keeps x's layout.
        num_groups: number of groups; must divide C.
        weight, bias: optional (C,) tensors with x's dtype and device.
        eps: added to the variance.
        activation: None or ``"silu"``.
        backend: ``'cuda'``, ``'triton'``, ``'cpu'``, ``'reference'`` or None (automatic, or
            the ``GENFAST_BACKEND`` environment variable).

    Differentiable with respect to x, weight and bias (fused kernels); higher derivatives
    (create_graph=True) go through a differentiable composition of the reference.
    """
    # Validation once per call signature (see ValidatedSignatures), then, for an eager call
    # without autograd on contiguous tensors, the call prepared for it (OpDispatcher.call_prepared).
    signature = checked = None
    if direct_call_allowed(x, weight, bias) and cacheable(num_groups, eps, activation, backend):
        signature = (x.shape, x.dtype, x.device, tensor_key(weight), tensor_key(bias), num_groups, eps, activation,
                     backend)
        checked = _VALIDATED.get(signature)
    if checked is None:
        checked = validate(x, num_groups, weight, bias, eps, activation, backend)
        if signature is not None:
            _VALIDATED.add(signature, checked)
    num_groups, eps, silu, backend = checked
    if torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad)
                                    or (bias is not None and bias.requires_grad)):
        return _GroupNorm.apply(x, weight, bias, num_groups, eps, silu, backend)
    if (signature is not None and x.is_contiguous() and (weight is None or weight.is_contiguous())
            and (bias is None or bias.is_contiguous())):
        y = DISPATCH.call_prepared(signature, lambda: _prepare_forward(x, num_groups, eps, silu, backend), x, weight,
                                   bias)
        if y is not None:
            return y
    return GROUP_NORM(x, weight, bias, num_groups, eps, silu, backend)[0]


_VALIDATED = ValidatedSignatures()


def _prepare_forward(x, num_groups, eps, silu, backend):
    """The forward of one validated signature for contiguous tensors: a function
    (x, weight, bias) -> y (_forward_impl without the layout work and the dispatch), or None
    for an empty x."""
    name = DISPATCH.select(backend or None, x.device, x.dtype)
    if x.numel() == 0:
        return None
    stats_like = torch.empty((), dtype=stats_dtype(x.dtype), device=x.device).expand(x.shape[0], num_groups)
    if name == "cpu":  # the extension directly, its options struct made once
        native = bind_positional(_ext._C.group_norm_fwd_cpu,
                                 ("x", "y", "mean", "rstd", "weight", "bias", "num_threads"),
                                 options=_options(num_groups, eps, silu))
        threads = cpu_threads_per_call(x.numel())

        def run(x, weight, bias, y, mean, rstd):
            native(x, y, mean, rstd, weight, bias, threads())
    else:
        fn, geo = DISPATCH.backends[name].fn, _geometry(x, num_groups, False)

        def run(x, weight, bias, y, mean, rstd):
            fn(FORWARD, x, weight, bias, y, mean, rstd, geo, eps, silu)

    def call(x, weight, bias):
        y, mean, rstd = torch.empty_like(x), torch.empty_like(stats_like), torch.empty_like(stats_like)
        run(x, weight, bias, y, mean, rstd)
        return y

    return call


def selected_backend(x: torch.Tensor, backend: Optional[str] = None) -> str:
    """The backend ``group_norm`` would run on for ``x`` (for diagnostics and benchmarks)."""
    return DISPATCH.select(backend, x.device, x.dtype)
