"""Reference filtered_lrelu with the semantics of NVlabs StyleGAN3 ``filtered_lrelu``.

Per channel of x (N, C, H, W):
  1. add the bias ``b`` (C,),
  2. upsample with ``fu``: ``upfirdn2d(up=up, padding=padding, gain=up ** 2)``,
  3. leaky ReLU with ``slope``, times ``gain``, clamped to [-clamp, clamp] when ``clamp`` is set,
  4. downsample with ``fd``: ``upfirdn2d(down=down)``.

Output size per axis: ``(size * up + pad0 + pad1 - (fu_taps - 1) - (fd_taps - 1) + down - 1) // down``.
Built from the reference ``upfirdn2d`` and ``bias_act`` (ordinary differentiable torch ops,
any float dtype), so autograd gives derivatives of the specification itself.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .bias_act import bias_act
from .upfirdn2d import upfirdn2d


def filtered_lrelu(x: torch.Tensor, fu: Optional[torch.Tensor] = None, fd: Optional[torch.Tensor] = None,
                   b: Optional[torch.Tensor] = None, up: int = 1, down: int = 1, padding=0,
                   gain: float = math.sqrt(2), slope: float = 0.2, clamp: Optional[float] = None,
                   flip_filter: bool = False) -> torch.Tensor:
    """Bias, upsample, leaky ReLU (times gain, clamped), downsample. Arguments are assumed
    valid (``genfast.ops.filtered_lrelu`` validates them); ``up``/``down`` are ints,
    ``padding`` an int, [x, y] or [x0, x1, y0, y1] with respect to the upsampled image."""
    x = bias_act(x, b)
    x = upfirdn2d(x, fu, up=up, padding=padding, gain=up ** 2, flip_filter=flip_filter)
    x = bias_act(x, act="lrelu", alpha=slope, gain=gain, clamp=clamp)
    return upfirdn2d(x, fd, down=down, flip_filter=flip_filter)
