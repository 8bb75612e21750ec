"""genfast.ops.bias_act: fused bias + activation + gain + clamp (NVlabs StyleGAN semantics).

Layers of this module, the pattern every op family follows:
  1. ``bias_act()``: the public op. Validates arguments (clear errors before any kernel), then
     goes through an autograd.Function (first and second derivatives).
  2. ``torch.ops.genfast.bias_act*``: NativeOps (ops/_define.py: torch.library define + impl +
     fake), so torch.compile(fullgraph=True) sees them as opaque nodes; eager calls on plain
     tensors run the impls directly.
  3. ``DISPATCH``: the op's table of backends (cuda, triton, cpu, reference); the choice is
     made at run time inside the op impl, so compiled graphs stay backend-agnostic.

Kernels see a dense tensor as [outer, C, S] in memory, with C = x.shape[dim] and S the
stride of ``dim``: that covers contiguous, channels_last and any other dense permutation
without copies. Non-dense inputs (slices with gaps) are made contiguous first.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from .. import _ext
from .._ext import bind_positional
from .._dispatch import OpDispatcher, direct_call_allowed
from ._define import NativeOp
from ._validate import (ValidatedSignatures, cacheable, check_backend, check_int, check_real, check_tensor, cpu_threads,
                        cpu_threads_per_call)
from ._validate import dense as _dense
from ..reference import bias_act as reference
from ..reference.bias_act import ACTIVATIONS, add_bias, reduce_to_bias
from ..reference.bias_act import bias_act_derivative as reference_derivative

__all__ = ["bias_act", "fused_leaky_relu", "ACTIVATIONS", "DISPATCH", "FLOAT_DTYPES"]

# Modes and activation codes of the Python backends (the triton kernels number them so); the
# C++ entry points take both by name (BiasActOptions), the extension's own numbering stays inside it.
FORWARD, GRAD, GRAD2 = 0, 1, 2
MODE_NAMES = ("forward", "grad", "grad2")
ACT_CODES = {name: code for code, name in enumerate(ACTIVATIONS)}
ACTIVATION_NAMES = tuple(ACTIVATIONS)
# Activations whose second derivative is not identically zero (the rest skip GRAD2 work).
HAS_SECOND_DERIVATIVE = {"tanh", "sigmoid", "elu", "selu", "softplus", "swish"}
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

DISPATCH = OpDispatcher("bias_act")


# ----------------------------------------------------------------------------- layout


def _like(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` with exactly the memory layout of the dense tensor ``like``."""
    if t.stride() == like.stride():
        return t
    return torch.empty_like(like).copy_(t)


def _channel_geometry(x: torch.Tensor, b: Optional[torch.Tensor], dim: int) -> tuple:
    """(C, S) of the [outer, C, S] view of dense ``x``; one channel spanning everything
    (C = 1, S = n) when there is no bias to index."""
    if b is None or x.shape[dim] == 1:
        return 1, x.numel()
    return x.shape[dim], x.stride(dim)


# ----------------------------------------------------------------------------- backends


def _sum_into_bias(out: torch.Tensor, db: Optional[torch.Tensor], dim: int) -> None:
    """db = out summed over every dimension but ``dim`` (for backends without a fused sum)."""
    if db is not None:
        db.copy_(reduce_to_bias(out, dim))


# Every backend: fn(mode, act, out, db, x, b, dy, ddx, dim, C, S, alpha, gain, clamp) fills
# ``out`` and, when ``db`` is given (GRAD mode with a bias), the bias gradient sum(out).


# Keyed by the class too: the tests' CUDA emulation module binds its own BiasActOptions type.
@functools.lru_cache(maxsize=256)
def _cached_options(cls, mode: int, act: int, dim: int, alpha: float, gain: float, clamp: float):
    return cls(mode=MODE_NAMES[mode], act=ACTIVATION_NAMES[act], dim=int(dim), alpha=float(alpha), gain=float(gain),
               clamp=float(clamp))


def _options(mode, act, x, b, dim, alpha, gain, clamp):
    """The extension's BiasActOptions of one call signature. Without a bias, dim is unchecked
    by the op and unused by the kernels: 0."""
    return _cached_options(_ext._C.BiasActOptions, mode, act, dim % x.ndim if b is not None else 0, alpha, gain,
                           clamp)


@DISPATCH.register("cpu", FLOAT_DTYPES)
def _bias_act_cpu(mode, act, out, db, x, b, dy, ddx, dim, C, S, alpha, gain, clamp):
    # The C++ kernel sums db while each row of dx is still in cache. It derives C and S from x.
    _ext._C.bias_act_cpu(out, x, b=b, dy=dy, ddx=ddx, db=db, options=_options(mode, act, x, b, dim, alpha, gain, clamp),
                         num_threads=cpu_threads(x.numel()))


@DISPATCH.register("cuda", (torch.float32, torch.float16, torch.bfloat16))
def _bias_act_cuda(mode, act, out, db, x, b, dy, ddx, dim, C, S, alpha, gain, clamp):
    _ext._C.bias_act_cuda(out, x, b=b, dy=dy, ddx=ddx, options=_options(mode, act, x, b, dim, alpha, gain, clamp),
                          stream=_ext.stream_of(x))
    _sum_into_bias(out, db, dim)


@DISPATCH.register("triton", (torch.float32, torch.float16, torch.bfloat16))
def _bias_act_triton(mode, act, out, db, x, b, dy, ddx, dim, C, S, alpha, gain, clamp):
    from ..triton_kernels import bias_act as kernels

    kernels.bias_act(mode, act, out, x, b, dy, ddx, C, S, alpha, gain, clamp, db=db)


@DISPATCH.register("reference", FLOAT_DTYPES)
def _bias_act_reference(mode, act, out, db, x, b, dy, ddx, dim, C, S, alpha, gain, clamp):
    name = ACTIVATION_NAMES[act]
    clamp_arg = clamp if clamp >= 0 else None
    if mode == FORWARD:
        result = reference(x, b, dim=dim, act=name, alpha=alpha, gain=gain, clamp=clamp_arg)
    else:
        result = reference_derivative(x, b, dy, ddx if mode == GRAD2 else None, dim=dim, act=name,
                                      alpha=alpha, gain=gain, clamp=clamp_arg)
    out.copy_(result)
    _sum_into_bias(out, db, dim)


def _run(mode, x, b, dy, ddx, dim, act, alpha, gain, clamp, backend, compute_db=False):
    """Shared body of the three op impls: normalise layouts, then dispatch. Returns the
    output; for GRAD the pair (dx, db), db empty unless ``compute_db`` and there is a bias."""
    x = _dense(x)
    out = torch.empty_like(x)
    db = x.new_empty(_db_size(b, compute_db)) if mode == GRAD else None
    if x.numel() == 0:
        return (out, db.zero_()) if mode == GRAD else out
    if b is not None:
        b = b.contiguous()
    dy = _like(dy, x) if dy is not None else None
    ddx = _like(ddx, x) if ddx is not None else None
    C, S = _channel_geometry(x, b, dim)
    DISPATCH.run(backend or None, x.device, x.dtype, mode, ACT_CODES[act], out,
                 db if db is not None and db.numel() else None, x, b, dy, ddx, dim, C, S, alpha, gain, clamp)
    return (out, db) if mode == GRAD else out


def _db_size(b: Optional[torch.Tensor], compute_db: bool) -> int:
    """Length of bias_act_grad's db output: the bias length, or 0 when it is not computed."""
    return b.shape[0] if b is not None and compute_db else 0


def _output_like(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(_dense(x))


# ----------------------------------------------------------------------------- ops

_PARAMS = "int dim, str act, float alpha, float gain, float clamp, str backend"


def _fwd_impl(x, b, dim, act, alpha, gain, clamp, backend):
    return _run(FORWARD, x, b, None, None, dim, act, alpha, gain, clamp, backend)


def _grad_impl(dy, x, b, compute_db, dim, act, alpha, gain, clamp, backend):
    return _run(GRAD, x, b, dy, None, dim, act, alpha, gain, clamp, backend, compute_db)


def _grad2_impl(ddx, dy, x, b, dim, act, alpha, gain, clamp, backend):
    return _run(GRAD2, x, b, dy, ddx, dim, act, alpha, gain, clamp, backend)


def _fwd_fake(x, b, dim, act, alpha, gain, clamp, backend):
    return _output_like(x)


def _grad_fake(dy, x, b, compute_db, dim, act, alpha, gain, clamp, backend):
    return _output_like(x), x.new_empty(_db_size(b, compute_db))


def _grad2_fake(ddx, dy, x, b, dim, act, alpha, gain, clamp, backend):
    return _output_like(x)


BIAS_ACT = NativeOp(f"bias_act(Tensor x, Tensor? b, {_PARAMS}) -> Tensor", _fwd_impl, _fwd_fake)
# Returns (dx, db); db is empty unless compute_db and b is given.
BIAS_ACT_GRAD = NativeOp(f"bias_act_grad(Tensor dy, Tensor x, Tensor? b, bool compute_db, {_PARAMS}) "
                         "-> (Tensor, Tensor)", _grad_impl, _grad_fake)
BIAS_ACT_GRAD2 = NativeOp(f"bias_act_grad2(Tensor ddx, Tensor dy, Tensor x, Tensor? b, {_PARAMS}) -> Tensor",
                          _grad2_impl, _grad2_fake)


# ----------------------------------------------------------------------------- autograd


class _BiasAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, b, params):
        ctx.save_for_backward(x, b)
        ctx.params = params
        return BIAS_ACT(x, b, *params)

    @staticmethod
    def backward(ctx, dy):
        x, b = ctx.saved_tensors
        need_db = b is not None and ctx.needs_input_grad[1]
        dx, db = _BiasActGrad.apply(dy, x, b, ctx.params, need_db)
        return dx if ctx.needs_input_grad[0] else None, db if need_db else None, None


class _BiasActGrad(torch.autograd.Function):
    """(dx, db): dx = dy * gain * f'(x + b) * mask and db = sum(dx) over all dims but ``dim``,
    in one kernel where the backend can. Differentiable again: that is the double backward."""

    @staticmethod
    def forward(ctx, dy, x, b, params, compute_db):
        ctx.save_for_backward(dy, x, b)
        ctx.params, ctx.compute_db = params, compute_db
        dx, db = BIAS_ACT_GRAD(dy, x, b, compute_db, *params)
        if not compute_db:
            ctx.mark_non_differentiable(db)
        return dx, db

    @staticmethod
    def backward(ctx, ddx, ddb):
        dy, x, b = ctx.saved_tensors
        dim, act = ctx.params[0], ctx.params[1]
        if ctx.compute_db:  # db is a sum of dx, so its gradient spreads over every element
            ddx = add_bias(ddx, ddb, dim)
        d_dy = _BiasActGrad.apply(ddx, x, b, ctx.params, False)[0] if ctx.needs_input_grad[0] else None
        d_x = d_b = None
        if act in HAS_SECOND_DERIVATIVE and (ctx.needs_input_grad[1] or ctx.needs_input_grad[2]):
            d_x = _BiasActGrad2.apply(ddx, dy, x, b, ctx.params)
            if b is not None and ctx.needs_input_grad[2]:
                d_b = reduce_to_bias(d_x, dim)
        return d_dy, d_x, d_b, None, None


class _BiasActGrad2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ddx, dy, x, b, params):
        return BIAS_ACT_GRAD2(ddx, dy, x, b, *params)

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError("genfast.ops.bias_act supports first- and second-order gradients, not third")


# ----------------------------------------------------------------------------- public op


def _check_number(name: str, value, minimum: Optional[float] = None) -> float:
    return check_real("bias_act", name, value, minimum=minimum, or_none=True)


def _validate(x, b, dim, act, alpha, gain, clamp, backend):
    check_tensor("bias_act", "x", x, dtypes=FLOAT_DTYPES)
    dim = check_int("bias_act", "dim", dim)
    if b is not None:
        check_tensor("bias_act", "b", b, optional=True)
        if b.dtype != x.dtype:
            raise TypeError(f"bias_act: b must have the dtype of x ({x.dtype}), got {b.dtype}; pass b.to(x.dtype)")
        if b.device != x.device:
            raise ValueError(f"bias_act: b is on {b.device} but x is on {x.device}; they must be on the same device")
        if b.ndim != 1:
            raise ValueError(f"bias_act: b must be 1-D, got shape {tuple(b.shape)}")
        if not -x.ndim <= dim < x.ndim:
            raise ValueError(f"bias_act: dim={dim} is out of range for x with {x.ndim} dimensions")
        dim %= x.ndim
        if b.shape[0] != x.shape[dim]:
            raise ValueError(f"bias_act: b has {b.shape[0]} elements but x.shape[{dim}] is {x.shape[dim]}; "
                             "they must match")
    return (dim,) + resolve_params(act, alpha, gain, clamp, backend)


def resolve_params(act, alpha=None, gain=None, clamp=None, backend=None) -> tuple:
    """Checks the non-tensor arguments and fills in the activation's defaults:
    (act, alpha, gain, clamp (-1 for none), backend ('' for automatic))."""
    if act not in ACTIVATIONS:
        raise ValueError(f"bias_act: unknown act {act!r}; expected one of {', '.join(ACTIVATIONS)}")
    spec = ACTIVATIONS[act]
    alpha = spec.default_alpha if alpha is None else _check_number("alpha", alpha)
    gain = spec.default_gain if gain is None else _check_number("gain", gain)
    clamp = -1.0 if clamp is None else _check_number("clamp", clamp, minimum=0.0)
    return act, alpha, gain, clamp, check_backend("bias_act", backend, DISPATCH.backends)


def bias_act(
    x: torch.Tensor,
    b: Optional[torch.Tensor] = None,
    dim: int = 1,
    act: str = "linear",
    alpha: Optional[float] = None,
    gain: Optional[float] = None,
    clamp: Optional[float] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Fused bias + activation + gain + clamp: ``clamp(act(x + b) * gain, -clamp, clamp)``.

    Same semantics and defaults as NVlabs StyleGAN2-ADA / StyleGAN3 ``bias_act``:

    ========  =====  =====
    act       alpha  gain
    ========  =====  =====
    linear    0      1
    relu      0      √2
    lrelu     0.2    √2
    tanh      0      1
    sigmoid   0      1
    elu       0      1
    selu      0      1
    softplus  0      1
    swish     0      √2
    ========  =====  =====

    Args:
        x: input of any shape; float32, float16, bfloat16 or float64.
        b: optional 1-D bias of length ``x.shape[dim]``, same dtype and device as ``x``.
        dim: the dimension of ``x`` that ``b`` runs along.
        act: activation name. ``alpha`` is the lrelu slope; other activations ignore it.
        gain: output scale; ``clamp``: clamp the output to ±clamp (None: no clamp).
        backend: ``'cuda'``, ``'triton'``, ``'cpu'``, ``'reference'`` or None (automatic,
            or the ``GENFAST_BACKEND`` environment variable).

    Returns a new tensor with the layout of ``x`` (contiguous if ``x`` is not dense).
    Differentiable twice with respect to ``x`` and ``b``.
    """
    direct = direct_call_allowed(x, b)
    # Validation once per call signature (see ValidatedSignatures); the key holds everything
    # _validate looks at, and maps to its result.
    signature = params = None
    if direct and cacheable(dim, act, alpha, gain, clamp, backend):
        signature = (x.shape, x.dtype, x.device, None if b is None else (b.shape, b.dtype, b.device), dim, act,
                     alpha, gain, clamp, backend)
        params = _VALIDATED.get(signature)
    if params is None:
        params = _validate(x, b, dim, act, alpha, gain, clamp, backend)
        if signature is not None:
            _VALIDATED.add(signature, params)
    if torch.is_grad_enabled() and (x.requires_grad or (b is not None and b.requires_grad)):
        return _BiasAct.apply(x, b, params)
    if signature is not None and x.is_contiguous() and (b is None or b.is_contiguous()):
        out = DISPATCH.call_prepared(signature, lambda: _prepare_forward(x, b, params), x, b)
        if out is not None:
            return out
    # Eager calls on plain tensors skip the torch.library round trip (see direct_call_allowed).
    return _fwd_impl(x, b, *params) if direct else BIAS_ACT.op(x, b, *params)


_VALIDATED = ValidatedSignatures()


def _prepare_forward(x, b, params):
    """The forward of one validated signature for contiguous x and b (see
    OpDispatcher.call_prepared): a function (x, b) -> out (_run without the layout work and the
    dispatch), or None for an empty x."""
    dim, act, alpha, gain, clamp, backend = params
    name = DISPATCH.select(backend or None, x.device, x.dtype)
    if x.numel() == 0:
        return None
    if name == "cpu":  # the extension directly, its options struct made once
        native = bind_positional(_ext._C.bias_act_cpu, ("out", "x", "b", "num_threads"), dy=None, ddx=None, db=None,
                                 options=_options(FORWARD, ACT_CODES[act], x, b, dim, alpha, gain, clamp))
        threads = cpu_threads_per_call(x.numel())

        def call(x, b):
            out = torch.empty_like(x)
            native(out, x, b, threads())
            return out

        return call
    fn, code = DISPATCH.backends[name].fn, ACT_CODES[act]
    C, S = _channel_geometry(x, b, dim)

    def call(x, b):
        out = torch.empty_like(x)
        fn(FORWARD, code, out, None, x, b, None, None, dim, C, S, alpha, gain, clamp)
        return out

    return call


def fused_leaky_relu(input: torch.Tensor, bias: Optional[torch.Tensor] = None, negative_slope: float = 0.2,
                     scale: float = 2 ** 0.5, backend: Optional[str] = None) -> torch.Tensor:
    """Drop-in for the StyleGAN2 ports' ``fused_leaky_relu``: ``leaky_relu(input + bias) * scale``,
    with ``bias`` along dimension 1."""
    return bias_act(input, bias, dim=1, act="lrelu", alpha=negative_slope, gain=scale, backend=backend)


def selected_backend(x: torch.Tensor, backend: Optional[str] = None) -> str:
    """The backend ``bias_act`` would run on for ``x`` (for diagnostics and benchmarks)."""
    return DISPATCH.select(backend, x.device, x.dtype)
