"""Modules for fused bias + activation."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..ops.bias_act import bias_act, resolve_params


class BiasAct(nn.Module):
    """``clamp(act(x + bias) * gain)`` along ``dim``, as NVlabs' ``bias_act``.

    With ``channels`` set, the module owns a learnable ``bias`` of that length (initialised to
    ``bias_init``); without it, there is no bias. ``forward(x, b=None)`` also accepts an
    explicit bias, which then replaces the module's own.
    """

    def __init__(self, channels: Optional[int] = None, act: str = "linear", alpha: Optional[float] = None,
                 gain: Optional[float] = None, clamp: Optional[float] = None, dim: int = 1,
                 bias_init: float = 0.0, backend: Optional[str] = None):
        super().__init__()
        self.act, self.alpha, self.gain, self.clamp, self.dim, self.backend = act, alpha, gain, clamp, dim, backend
        self.bias = nn.Parameter(torch.full([channels], float(bias_init))) if channels is not None else None
        resolve_params(act, alpha, gain, clamp, backend)  # bad settings fail here, not at the first call

    def forward(self, x: torch.Tensor, b: Optional[torch.Tensor] = None) -> torch.Tensor:
        if b is None and self.bias is not None:
            b = self.bias.to(x.dtype)
        return bias_act(x, b, dim=self.dim, act=self.act, alpha=self.alpha, gain=self.gain, clamp=self.clamp,
                        backend=self.backend)

    def extra_repr(self) -> str:
        channels = None if self.bias is None else self.bias.shape[0]
        return (f"channels={channels}, act={self.act!r}, alpha={self.alpha}, gain={self.gain}, clamp={self.clamp}, "
                f"dim={self.dim}")


class FusedLeakyReLU(nn.Module):
    """Drop-in for ``FusedLeakyReLU`` of the StyleGAN2 PyTorch ports (rosinality's ``op``):
    ``leaky_relu(x + bias, negative_slope) * scale`` with the bias along dimension 1.
    Same constructor and ``state_dict`` key (``bias``)."""

    def __init__(self, channels: int, bias: bool = True, negative_slope: float = 0.2, scale: float = 2 ** 0.5):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels)) if bias else None
        self.negative_slope = negative_slope
        self.scale = scale

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        b = self.bias.to(input.dtype) if self.bias is not None else None
        return bias_act(input, b, dim=1, act="lrelu", alpha=self.negative_slope, gain=self.scale)

    def extra_repr(self) -> str:
        return (f"channels={None if self.bias is None else self.bias.shape[0]}, negative_slope={self.negative_slope}, "
                f"scale={self.scale}")
