"""Reference GAN layer ops with NVlabs StyleGAN2-ADA semantics (training/networks.py and
torch_utils/ops/conv2d_resample.py), in plain differentiable PyTorch.

* ``pixel_norm(x, dim, eps)``: ``x * rsqrt(mean(x^2 over dim) + eps)`` (``normalize_2nd_moment``).
* ``minibatch_stddev(x, group_size, num_channels)``: MinibatchStdLayer.
* ``conv2d_resample``: conv2d with optional FIR up/downsampling, the same fast paths and
  padding arithmetic as NVlabs (strided conv, transposed conv, 1x1 shortcuts).
* ``modulated_conv2d``: StyleGAN2 modulated (and demodulated) convolution.

Arguments are assumed valid (``genfast.ops.gan`` validates them). ``conv2d_resample`` and
``modulated_conv2d`` take the upfirdn2d implementation as ``upfirdn``: the reference one
by default, genfast's fast op when called from ``genfast.ops``.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .upfirdn2d import parse_padding
from .upfirdn2d import upfirdn2d as reference_upfirdn2d

DEMODULATE_EPS = 1e-8
STDDEV_EPS = 1e-8


def pixel_norm(x: torch.Tensor, dim: int = 1, eps: float = 1e-8) -> torch.Tensor:
    return x * (x.square().mean(dim=dim, keepdim=True) + eps).rsqrt()


def minibatch_stddev(x: torch.Tensor, group_size: Optional[int] = 4, num_channels: int = 1) -> torch.Tensor:
    """Appends ``num_channels`` channels: the stddev over groups of ``min(group_size, N)``
    samples (sample i is in group i % (N / G)), averaged over channels and pixels."""
    n, c, h, w = x.shape
    g = min(group_size, n) if group_size is not None else n
    f = num_channels
    y = x.reshape(g, -1, f, c // f, h, w)
    y = y - y.mean(dim=0)
    y = y.square().mean(dim=0)
    y = (y + STDDEV_EPS).sqrt()
    y = y.mean(dim=[2, 3, 4])
    y = y.reshape(-1, f, 1, 1)
    y = y.repeat(g, 1, h, w)
    return torch.cat([x, y], dim=1)


def filter_size(f: Optional[torch.Tensor]) -> tuple:
    """(fw, fh) of an upfirdn2d filter (1x1 for None)."""
    if f is None:
        return 1, 1
    if f.ndim == 1:
        return f.shape[0], f.shape[0]
    return f.shape[1], f.shape[0]


def _conv(x, w, stride=1, padding=0, groups=1, transpose=False, flip_weight=True):
    # conv2d computes a correlation (flip_weight=True); flip_weight=False asks for a convolution.
    if not flip_weight and (w.shape[2] > 1 or w.shape[3] > 1):
        w = w.flip([2, 3])
    if transpose:
        return F.conv_transpose2d(x, w, stride=stride, padding=padding, groups=groups)
    return F.conv2d(x, w, stride=stride, padding=padding, groups=groups)


def conv2d_resample(x: torch.Tensor, w: torch.Tensor, f: Optional[torch.Tensor] = None, up: int = 1, down: int = 1,
                    padding=0, groups: int = 1, flip_weight: bool = True, flip_filter: bool = False,
                    upfirdn: Callable = reference_upfirdn2d) -> torch.Tensor:
    """2-D convolution with optional up/downsampling by the FIR filter ``f`` (NVlabs
    conv2d_resample): the result equals upfirdn2d(up) -> conv2d -> upfirdn2d(down) with
    ``padding`` applied to the upsampled image, computed by the cheapest equivalent path."""
    out_channels, in_channels_per_group, kh, kw = w.shape
    fw, fh = filter_size(f)
    px0, px1, py0, py1 = parse_padding(padding)
    if up > 1:
        px0 += (fw + up - 1) // 2
        px1 += (fw - up) // 2
        py0 += (fh + up - 1) // 2
        py1 += (fh - up) // 2
    if down > 1:
        px0 += (fw - down + 1) // 2
        px1 += (fw - down) // 2
        py0 += (fh - down + 1) // 2
        py1 += (fh - down) // 2

    # 1x1 kernel, downsampling only: downsample first, then the (cheaper) convolution.
    if kw == 1 and kh == 1 and down > 1 and up == 1:
        x = upfirdn(x, f, down=down, padding=[px0, px1, py0, py1], flip_filter=flip_filter)
        return _conv(x, w, groups=groups, flip_weight=flip_weight)
    # 1x1 kernel, upsampling only: convolve first, then upsample.
    if kw == 1 and kh == 1 and up > 1 and down == 1:
        x = _conv(x, w, groups=groups, flip_weight=flip_weight)
        return upfirdn(x, f, up=up, padding=[px0, px1, py0, py1], gain=up ** 2, flip_filter=flip_filter)
    # Downsampling only: filter, then a strided convolution.
    if down > 1 and up == 1:
        x = upfirdn(x, f, padding=[px0, px1, py0, py1], flip_filter=flip_filter)
        return _conv(x, w, stride=down, groups=groups, flip_weight=flip_weight)
    # Upsampling (and maybe downsampling): transposed strided convolution, then the filter.
    if up > 1:
        if groups == 1:
            w = w.transpose(0, 1)
        else:
            w = w.reshape(groups, out_channels // groups, in_channels_per_group, kh, kw)
            w = w.transpose(1, 2)
            w = w.reshape(groups * in_channels_per_group, out_channels // groups, kh, kw)
        px0 -= kw - 1
        px1 -= kw - up
        py0 -= kh - 1
        py1 -= kh - up
        pxt = max(min(-px0, -px1), 0)
        pyt = max(min(-py0, -py1), 0)
        x = _conv(x, w, stride=up, padding=[pyt, pxt], groups=groups, transpose=True, flip_weight=not flip_weight)
        x = upfirdn(x, f, padding=[px0 + pxt, px1 + pxt, py0 + pyt, py1 + pyt], gain=up ** 2, flip_filter=flip_filter)
        if down > 1:
            x = upfirdn(x, f, down=down, flip_filter=flip_filter)
        return x
    # No resampling and symmetric non-negative padding: plain conv2d.
    if px0 == px1 and py0 == py1 and px0 >= 0 and py0 >= 0:
        return _conv(x, w, padding=[py0, px0], groups=groups, flip_weight=flip_weight)
    # General case (asymmetric or negative padding).
    x = upfirdn(x, None, padding=[px0, px1, py0, py1])
    return _conv(x, w, groups=groups, flip_weight=flip_weight)


def demodulation_coefficients(weight: torch.Tensor, styles: torch.Tensor) -> torch.Tensor:
    """dcoefs[n, o] = rsqrt(sum_{i,k} (weight[o, i, k] * styles[n, i])^2 + 1e-8), computed as
    styles^2 @ (sum_k weight^2)^T: no [N, O, I, k, k] per-sample weight is materialised."""
    return (styles.square() @ weight.square().sum(dim=[2, 3]).t() + DEMODULATE_EPS).rsqrt()


def modulated_conv2d(x: torch.Tensor, weight: torch.Tensor, styles: torch.Tensor, noise: Optional[torch.Tensor] = None,
                     up: int = 1, down: int = 1, padding=0, resample_filter: Optional[torch.Tensor] = None,
                     demodulate: bool = True, flip_weight: bool = True, fused_modconv: bool = True,
                     upfirdn: Callable = reference_upfirdn2d) -> torch.Tensor:
    """StyleGAN2 modulated convolution (NVlabs networks.modulated_conv2d).

    x [N, I, H, W], weight [O, I, kh, kw], styles [N, I], noise broadcastable to the output.
    Modulation scales input channel i of sample n by styles[n, i]; demodulation scales output
    channel o by rsqrt(sum of the squared modulated weights + 1e-8).
    """
    batch_size = x.shape[0]
    out_channels, in_channels, kh, kw = weight.shape

    # Pre-normalise to avoid float16 overflow (the demodulation cancels the scale).
    if x.dtype == torch.float16 and demodulate:
        weight = weight * (1 / math.sqrt(in_channels * kh * kw)
                           / weight.norm(float("inf"), dim=[1, 2, 3], keepdim=True))
        styles = styles / styles.norm(float("inf"), dim=1, keepdim=True)

    dcoefs = demodulation_coefficients(weight, styles) if demodulate else None

    if not fused_modconv:
        # Scale the activations before and after a shared-weight convolution.
        x = x * styles.to(x.dtype).reshape(batch_size, -1, 1, 1)
        x = conv2d_resample(x, weight.to(x.dtype), f=resample_filter, up=up, down=down, padding=padding,
                            flip_weight=flip_weight, upfirdn=upfirdn)
        if demodulate:
            x = x * dcoefs.to(x.dtype).reshape(batch_size, -1, 1, 1)
        if noise is not None:
            x = x + noise.to(x.dtype)
        return x

    # One grouped convolution (groups = N) with the per-sample weights.
    w = weight.unsqueeze(0) * styles.reshape(batch_size, 1, -1, 1, 1)
    if demodulate:
        w = w * dcoefs.reshape(batch_size, -1, 1, 1, 1)
    x = x.reshape(1, -1, *x.shape[2:])
    w = w.reshape(-1, in_channels, kh, kw)
    x = conv2d_resample(x, w.to(x.dtype), f=resample_filter, up=up, down=down, padding=padding, groups=batch_size,
                        flip_weight=flip_weight, upfirdn=upfirdn)
    x = x.reshape(batch_size, -1, *x.shape[2:])
    if noise is not None:
        x = x + noise.to(x.dtype)
    return x
