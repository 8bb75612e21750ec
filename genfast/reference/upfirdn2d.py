"""Reference upfirdn2d with the semantics of NVlabs StyleGAN2-ADA / StyleGAN3 ``upfirdn2d``.

For each channel of x (N, C, H, W), per axis:
  1. upsample by inserting ``up - 1`` zeros after every pixel,
  2. pad with zeros (negative padding crops),
  3. convolve with the FIR filter ``f`` ("valid": the footprint stays inside the padded image;
     a true convolution, i.e. the filter is flipped, unless ``flip_filter``),
  4. keep every ``down``-th pixel.

A 1-D filter (taps,) is separable: it runs along x, then along y, each pass scaled by
``gain ** 0.5``; a 2-D filter (fh, fw) runs as one pass scaled by ``gain``. Output size per
axis: ``(size * up + pad0 + pad1 - taps) // down + 1``.

Written with ordinary differentiable torch ops (pad, grouped conv2d, slicing), so autograd
gives derivatives of any order of the specification itself.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _pair(v) -> tuple:
    return (v, v) if isinstance(v, int) else tuple(v)


def parse_padding(padding) -> tuple:
    """int, [x, y] or [x0, x1, y0, y1] -> (x0, x1, y0, y1)."""
    if isinstance(padding, int):
        return padding, padding, padding, padding
    padding = tuple(padding)
    if len(padding) == 2:
        return padding[0], padding[0], padding[1], padding[1]
    return padding


def output_size(size: int, up: int, pad0: int, pad1: int, taps: int, down: int) -> int:
    """Length of one output axis (can be <= 0 for arguments that leave nothing)."""
    return (size * up + pad0 + pad1 - taps) // down + 1


def upfirdn2d(x: torch.Tensor, f: torch.Tensor | None, up=1, down=1, padding=0, flip_filter: bool = False,
              gain: float = 1.0) -> torch.Tensor:
    """Upsample, pad, FIR-filter and downsample ``x`` (N, C, H, W). ``up``/``down``: int or
    [x, y]; ``padding``: int, [x, y] or [x0, x1, y0, y1]. Arguments are assumed valid
    (``genfast.ops.upfirdn2d`` validates them). The filter is cast to x's dtype."""
    upx, upy = _pair(up)
    downx, downy = _pair(down)
    padx0, padx1, pady0, pady1 = parse_padding(padding)
    if f is None:
        f = torch.ones(1, 1, dtype=torch.float32, device=x.device)
    n, c, h, w = x.shape

    # 1. Zero insertion: each pixel followed by up - 1 zeros along each axis.
    x = x.reshape(n, c, h, 1, w, 1)
    x = F.pad(x, [0, upx - 1, 0, 0, 0, upy - 1])
    x = x.reshape(n, c, h * upy, w * upx)

    # 2. Pad, then crop where the padding is negative.
    x = F.pad(x, [max(padx0, 0), max(padx1, 0), max(pady0, 0), max(pady1, 0)])
    x = x[:, :, max(-pady0, 0): x.shape[2] - max(-pady1, 0), max(-padx0, 0): x.shape[3] - max(-padx1, 0)]

    # 3. FIR filter. conv2d is a correlation, so a true convolution flips the filter first.
    f = (f * (gain ** (f.ndim / 2))).to(x.dtype)
    if not flip_filter:
        f = f.flip(list(range(f.ndim)))
    if f.ndim == 2:
        x = F.conv2d(x, f[None, None].expand(c, 1, *f.shape), groups=c)
    else:
        x = F.conv2d(x, f.reshape(1, 1, 1, -1).expand(c, 1, 1, f.shape[0]), groups=c)
        x = F.conv2d(x, f.reshape(1, 1, -1, 1).expand(c, 1, f.shape[0], 1), groups=c)

    # 4. Keep every down-th pixel.
    return x[:, :, ::downy, ::downx]
