"""Shared by tests/test_bias_act.py and tests/test_bias_act_cuda_emulated.py: the forward, first
and second derivative check of a backend against the float64 reference."""
import torch

from genfast.ops import bias_act
from genfast.ops.bias_act import ACTIVATIONS
from genfast.reference import bias_act as reference
from genfast.testing import error_vs_reference

from helpers import random_tensor

ACTS = list(ACTIVATIONS)
CPU = torch.device("cpu")


def make_x(shape, dtype, layout, device=CPU):
    """Random input in the given memory layout (all four are 4-D, values ~N(0, 1.5))."""
    return random_tensor(shape, dtype, layout, device, scale=1.5)


def spec_params(act, gain=None):
    spec = ACTIVATIONS[act]
    return spec.default_alpha, spec.default_gain if gain is None else gain


def avoid_discontinuities(x, b, dim, act, clamp, gain=None, delta=2e-3):
    """Move elements off the kinks of the spec (z = 0, |f(z) gain| = clamp), where the
    derivative jumps and no low-precision comparison is meaningful."""
    alpha, gain = spec_params(act, gain)
    shape = [-1 if i == dim else 1 for i in range(x.ndim)]
    for _ in range(20):
        z = x.double() + (b.double().reshape(shape) if b is not None else 0)
        bad = z.abs() < delta
        if clamp is not None:
            v = reference(z, None, act=act, alpha=alpha, gain=gain)
            bad |= (v.abs() - clamp).abs() < delta
        if not bad.any():
            return x
        x = torch.where(bad, x + 4 * delta, x)
    raise AssertionError("could not move inputs off the discontinuities")


def evaluate(fn, x, b, dy, w_x, w_b):
    """y, first derivatives (x, b) and second derivatives (x, b, dy) of fn, via autograd."""
    x = x.detach().requires_grad_()
    b = b.detach().requires_grad_() if b is not None else None
    dy = dy.detach().requires_grad_()
    inputs = [x] + ([b] if b is not None else [])
    y = fn(x, b)
    grads = torch.autograd.grad(y, inputs, dy, create_graph=True)
    weights = [w_x] + ([w_b] if b is not None else [])
    penalty = sum((g * w).sum() for g, w in zip(grads, weights))
    grads2 = torch.autograd.grad(penalty, inputs + [dy], allow_unused=True, materialize_grads=True)
    return [y.detach()] + [g.detach() for g in grads] + [g.detach() for g in grads2]


NAMES_WITH_BIAS = ["y", "dx", "db", "d2x", "d2b", "d2dy"]
NAMES_NO_BIAS = ["y", "dx", "d2x", "d2dy"]


def check_against_reference(backend, dtype, act, layout, use_bias, clamp, shape=(3, 37, 5, 7), dim=1, device=CPU):
    x = make_x(shape, dtype, layout, device)
    b = (torch.randn(shape[dim], dtype=torch.float64) * 0.5).to(device=device, dtype=dtype) if use_bias else None
    x = avoid_discontinuities(x, b, dim, act, clamp)
    dy = torch.randn(shape, dtype=dtype, device=device)
    w_x = torch.randn(shape, dtype=dtype, device=device)
    w_b = torch.randn(shape[dim], dtype=dtype, device=device)

    def fast(x_, b_):
        return bias_act(x_, b_, dim=dim, act=act, clamp=clamp, backend=backend)

    def ref(x_, b_):
        return reference(x_, b_, dim=dim, act=act, clamp=clamp)

    def upcast(t):
        return None if t is None else t.double()

    got = evaluate(fast, x, b, dy, w_x, w_b)
    want = evaluate(ref, upcast(x), upcast(b), upcast(dy), upcast(w_x), upcast(w_b))
    lowp = evaluate(ref, x, b, dy, w_x, w_b)
    names = NAMES_WITH_BIAS if use_bias else NAMES_NO_BIAS
    for name, g, w, p in zip(names, got, want, lowp):
        assert g.dtype == dtype, f"{name}: dtype {g.dtype}, expected {dtype}"
        error_vs_reference(g, w, p, name=f"{backend} {act} {layout} {dtype} {name}")
    # The output keeps the layout of a dense input.
    if layout in ("contiguous", "channels_last", "permuted"):
        assert got[0].stride() == x.stride(), f"layout not kept: {got[0].stride()} vs {x.stride()}"
