"""Small StyleGAN2 (NVlabs StyleGAN2-ADA layout: mapping network, modulated-convolution
synthesis with skip ToRGB outputs, residual discriminator with minibatch std) built from
genfast's GAN layers: bias_act, upfirdn2d resampling, modulated_conv2d, pixel_norm."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ..nn.gan import EqualizedConv2d, EqualizedLinear, MinibatchStd, ModulatedConv2d, PixelNorm, ToRGB
from ..ops.upfirdn2d import setup_filter, upsample2d
from ._base import FastPathModel


def _channels(res: int, channel_base: int, channel_max: int) -> int:
    return min(channel_base // res, channel_max)


def _resolutions(img_resolution: int, who: str) -> list:
    log2 = int(math.log2(img_resolution)) if img_resolution > 0 else 0
    if img_resolution < 4 or 2 ** log2 != img_resolution:
        raise ValueError(f"{who}: img_resolution must be a power of two >= 4, got {img_resolution}")
    return [2 ** i for i in range(2, log2 + 1)]


class MappingNetwork(nn.Module):
    """z -> w: pixel norm, then ``num_layers`` equalized linear layers with lrelu (lr x0.01)."""

    def __init__(self, z_dim: int, w_dim: int, num_layers: int = 8, lr_multiplier: float = 0.01):
        super().__init__()
        self.norm = PixelNorm()
        dims = [z_dim] + [w_dim] * num_layers
        self.layers = nn.ModuleList(EqualizedLinear(a, b, activation="lrelu", lr_multiplier=lr_multiplier)
                                    for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.norm(z)
        for layer in self.layers:
            x = layer(x)
        return x


class SynthesisBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int, img_channels: int,
                 conv_clamp: Optional[float]):
        super().__init__()
        self.resolution = resolution
        if in_channels == 0:
            self.const = nn.Parameter(torch.randn([out_channels, resolution, resolution]))
            self.conv0 = None
        else:
            self.const = None
            self.conv0 = ModulatedConv2d(in_channels, out_channels, w_dim, resolution, up=2, conv_clamp=conv_clamp)
        self.conv1 = ModulatedConv2d(out_channels, out_channels, w_dim, resolution, conv_clamp=conv_clamp)
        self.torgb = ToRGB(out_channels, img_channels, w_dim, conv_clamp=conv_clamp)
        self.register_buffer("resample_filter", setup_filter([1, 3, 3, 1]))

    def forward(self, x, img, w, noise_mode: str):
        if self.const is not None:
            x = self.const.to(w.dtype).unsqueeze(0).expand(w.shape[0], -1, -1, -1)
        else:
            x = self.conv0(x, w, noise_mode=noise_mode)
        x = self.conv1(x, w, noise_mode=noise_mode)
        y = self.torgb(x, w)
        img = y if img is None else upsample2d(img, self.resample_filter.float()) + y
        return x, img


class StyleGAN2Generator(FastPathModel):
    """``forward(z, truncation_psi=1, noise_mode="random")`` -> images in about [-1, 1]."""

    def __init__(self, z_dim: int = 512, w_dim: int = 512, img_resolution: int = 256, img_channels: int = 3,
                 channel_base: int = 16384, channel_max: int = 512, mapping_layers: int = 8,
                 conv_clamp: Optional[float] = 256, backend: Optional[str] = None):
        super().__init__()
        self.z_dim, self.w_dim, self.img_resolution = z_dim, w_dim, img_resolution
        self.mapping = MappingNetwork(z_dim, w_dim, mapping_layers)
        self.register_buffer("w_avg", torch.zeros([w_dim]))
        blocks, in_ch = [], 0
        for res in _resolutions(img_resolution, "StyleGAN2Generator"):
            out_ch = _channels(res, channel_base, channel_max)
            blocks.append(SynthesisBlock(in_ch, out_ch, w_dim, res, img_channels, conv_clamp))
            in_ch = out_ch
        self.blocks = nn.ModuleList(blocks)
        self.set_backend(backend)

    def forward(self, z: torch.Tensor, truncation_psi: float = 1.0, noise_mode: str = "random",
                update_w_avg: bool = False) -> torch.Tensor:
        with self.backend_scope():
            w = self.mapping(z)
            if update_w_avg:
                self.w_avg.copy_(w.detach().mean(0).lerp(self.w_avg, 0.995))
            if truncation_psi != 1:
                w = self.w_avg.lerp(w, truncation_psi)
            x = img = None
            for block in self.blocks:
                x, img = block(x, img, w, noise_mode)
            return img


class DiscriminatorBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, conv_clamp: Optional[float]):
        super().__init__()
        self.conv0 = EqualizedConv2d(in_channels, in_channels, 3, activation="lrelu", conv_clamp=conv_clamp)
        self.conv1 = EqualizedConv2d(in_channels, out_channels, 3, activation="lrelu", down=2, conv_clamp=conv_clamp)
        self.skip = EqualizedConv2d(in_channels, out_channels, 1, bias=False, down=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.skip(x, gain=math.sqrt(0.5))
        return y + self.conv1(self.conv0(x), gain=math.sqrt(0.5))


class StyleGAN2Discriminator(FastPathModel):
    """Residual StyleGAN2 discriminator: ``forward(img)`` -> one logit per image."""

    def __init__(self, img_resolution: int = 256, img_channels: int = 3, channel_base: int = 16384,
                 channel_max: int = 512, mbstd_group_size: int = 4, conv_clamp: Optional[float] = 256,
                 backend: Optional[str] = None):
        super().__init__()
        resolutions = _resolutions(img_resolution, "StyleGAN2Discriminator")[::-1]
        top = _channels(img_resolution, channel_base, channel_max)
        self.fromrgb = EqualizedConv2d(img_channels, top, 1, activation="lrelu", conv_clamp=conv_clamp)
        self.blocks = nn.ModuleList(
            DiscriminatorBlock(_channels(res, channel_base, channel_max),
                               _channels(res // 2, channel_base, channel_max), conv_clamp) for res in resolutions[:-1])
        ch4 = _channels(4, channel_base, channel_max)
        self.mbstd = MinibatchStd(mbstd_group_size, 1)
        self.conv = EqualizedConv2d(ch4 + 1, ch4, 3, activation="lrelu", conv_clamp=conv_clamp)
        self.fc = EqualizedLinear(ch4 * 16, ch4, activation="lrelu")
        self.out = EqualizedLinear(ch4, 1)
        self.set_backend(backend)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        with self.backend_scope():
            x = self.fromrgb(img)
            for block in self.blocks:
                x = block(x)
            x = self.conv(self.mbstd(x))
            return self.out(self.fc(x.flatten(1))).flatten()


def r1_penalty(discriminator: nn.Module, real: torch.Tensor) -> torch.Tensor:
    """R1 regulariser (Mescheder et al. 2018): mean over the batch of |grad_x D(x)|^2 at real
    images. Differentiable (second order through D), so ``(gamma / 2 * r1).backward()`` works."""
    real = real.detach().requires_grad_(True)
    logits = discriminator(real)
    (grad,) = torch.autograd.grad(logits.sum(), real, create_graph=True)
    return grad.square().flatten(1).sum(1).mean()
