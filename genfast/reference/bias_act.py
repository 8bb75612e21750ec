"""Reference bias_act with the semantics of NVlabs StyleGAN2-ADA / StyleGAN3 ``bias_act``:

    y = clamp(act(x + b) * gain, -clamp, clamp)

``b`` is added along ``dim``. Written with ordinary differentiable torch ops, so autograd
gives first and higher derivatives of the specification itself.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F


class Activation(NamedTuple):
    func: Callable[[torch.Tensor, float], torch.Tensor]
    default_alpha: float
    default_gain: float


# The order fixes the integer codes used by the kernels (kernels/bias_act_math.h Act).
ACTIVATIONS = {
    "linear": Activation(lambda x, alpha: x, 0.0, 1.0),
    "relu": Activation(lambda x, alpha: F.relu(x), 0.0, math.sqrt(2)),
    "lrelu": Activation(lambda x, alpha: F.leaky_relu(x, alpha), 0.2, math.sqrt(2)),
    "tanh": Activation(lambda x, alpha: torch.tanh(x), 0.0, 1.0),
    "sigmoid": Activation(lambda x, alpha: torch.sigmoid(x), 0.0, 1.0),
    "elu": Activation(lambda x, alpha: F.elu(x), 0.0, 1.0),
    "selu": Activation(lambda x, alpha: F.selu(x), 0.0, 1.0),
    "softplus": Activation(lambda x, alpha: F.softplus(x), 0.0, 1.0),
    "swish": Activation(lambda x, alpha: torch.sigmoid(x) * x, 0.0, math.sqrt(2)),
}


def _defaults(act: str, alpha: Optional[float], gain: Optional[float]) -> tuple:
    spec = ACTIVATIONS[act]
    return (spec.default_alpha if alpha is None else float(alpha),
            spec.default_gain if gain is None else float(gain))


def add_bias(x: torch.Tensor, b: Optional[torch.Tensor], dim: int) -> torch.Tensor:
    """``x + b`` with the 1-D ``b`` broadcast along dimension ``dim`` of ``x``."""
    return x if b is None else x + b.reshape([-1 if i == dim else 1 for i in range(x.ndim)])


def reduce_to_bias(t: torch.Tensor, dim: int) -> torch.Tensor:
    """The gradient of a bias added along ``dim``: ``t`` summed over every other dimension.
    A 1-D ``t`` has none, so it is returned as it is (a copy): ``t.sum(dim=[])`` would sum
    over everything (torch's convention for an empty dim list)."""
    dims = [d for d in range(t.ndim) if d != dim]
    return t.sum(dim=dims) if dims else t.clone()


def bias_act(
    x: torch.Tensor,
    b: Optional[torch.Tensor] = None,
    dim: int = 1,
    act: str = "linear",
    alpha: Optional[float] = None,
    gain: Optional[float] = None,
    clamp: Optional[float] = None,
) -> torch.Tensor:
    """Add ``b`` along ``dim``, apply ``act``, multiply by ``gain``, clamp to ±``clamp``.

    Arguments are assumed valid (``genfast.ops.bias_act`` validates them).
    """
    alpha, gain = _defaults(act, alpha, gain)
    x = ACTIVATIONS[act].func(add_bias(x, b, dim), alpha)
    if gain != 1:
        x = x * gain
    if clamp is not None and clamp >= 0:
        x = x.clamp(-clamp, clamp)
    return x


def activation_derivatives(z: torch.Tensor, act: str, alpha: float) -> tuple:
    """f(z), f'(z), f''(z) written out in plain PyTorch (the same formulas as the kernels).

    Used by the reference backend for the backward ops, which run inside torch.library
    impls where autograd cannot record; tests check them against autograd of ``bias_act``.
    """
    one, zero = torch.ones_like(z), torch.zeros_like(z)
    pos = z > 0
    if act == "linear":
        return z, one, zero
    if act == "relu":
        return F.relu(z), pos.to(z.dtype), zero
    if act == "lrelu":
        return F.leaky_relu(z, alpha), torch.where(pos, one, one * alpha), zero
    if act == "tanh":
        t = torch.tanh(z)
        return t, 1 - t * t, -2 * t * (1 - t * t)
    if act == "sigmoid":
        s = torch.sigmoid(z)
        return s, s * (1 - s), s * (1 - s) * (1 - 2 * s)
    if act == "elu":
        e = torch.exp(torch.where(pos, zero, z))
        return F.elu(z), torch.where(pos, one, e), torch.where(pos, zero, e)
    if act == "selu":
        scale, a = 1.0507009873554804934193349852946, 1.6732632423543772848170429916717
        e = torch.exp(torch.where(pos, zero, z))
        return F.selu(z), torch.where(pos, one * scale, scale * a * e), torch.where(pos, zero, scale * a * e)
    if act == "softplus":
        big, s = z > 20, torch.sigmoid(z)
        return F.softplus(z), torch.where(big, one, s), torch.where(big, zero, s * (1 - s))
    if act == "swish":
        s = torch.sigmoid(z)
        return z * s, s * (1 + z * (1 - s)), s * (1 - s) * (2 + z * (1 - 2 * s))
    raise ValueError(f"unknown act {act!r}")


def bias_act_derivative(
    x: torch.Tensor,
    b: Optional[torch.Tensor],
    dy: torch.Tensor,
    ddx: Optional[torch.Tensor] = None,
    dim: int = 1,
    act: str = "linear",
    alpha: Optional[float] = None,
    gain: Optional[float] = None,
    clamp: Optional[float] = None,
) -> torch.Tensor:
    """Without ``ddx``: dL/dx of ``bias_act`` given dL/dy = ``dy``.
    With ``ddx``: the derivative of <ddx, dL/dx> with respect to x (double backward)."""
    alpha, gain = _defaults(act, alpha, gain)
    f, d1, d2 = activation_derivatives(add_bias(x, b, dim), act, alpha)
    result = dy * gain * (d1 if ddx is None else ddx * d2)
    if clamp is not None and clamp >= 0:
        v = f * gain
        result = torch.where((v >= -clamp) & (v <= clamp), result, torch.zeros_like(result))
    return result
