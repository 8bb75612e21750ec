"""Reference GroupNorm (+ optional SiLU): exactly ``torch.nn.functional.group_norm`` followed
by ``torch.nn.functional.silu`` when asked. Plain differentiable torch ops, so autograd gives
the first and higher derivatives of the specification itself.

Also the statistics the fast backends save for their backward: per (sample, group) ``mean``
and ``rstd = 1 / sqrt(biased variance + eps)``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

ACTIVATIONS = (None, "silu")


def group_norm(
    x: torch.Tensor,
    num_groups: int,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
    activation: Optional[str] = None,
) -> torch.Tensor:
    """``F.group_norm(x, num_groups, weight, bias, eps)``, then SiLU if ``activation == "silu"``.

    Arguments are assumed valid (``genfast.ops.group_norm`` validates them).
    """
    # On contiguous memory: torch's CPU channels_last kernel computes the variance as
    # E[x^2] - E[x]^2, which loses every digit when the mean is large (even in float64).
    y = F.group_norm(x.contiguous(), num_groups, weight, bias, eps)
    return F.silu(y) if activation == "silu" else y


def group_stats(x: torch.Tensor, num_groups: int, eps: float = 1e-5, dtype: Optional[torch.dtype] = None) -> tuple:
    """(mean, rstd), each (N, num_groups), computed in float64 from ``x`` (N, C, *) and
    returned in ``dtype``, by default float32 (float64 for float64 input), as the fast
    backends save them."""
    n = x.shape[0]
    groups = x.detach().reshape(n, num_groups, -1).double()
    mean = groups.mean(dim=2)
    var = (groups - mean[:, :, None]).square().mean(dim=2)
    out = dtype or (torch.float64 if x.dtype == torch.float64 else torch.float32)
    return mean.to(out), torch.rsqrt(var + eps).to(out)
