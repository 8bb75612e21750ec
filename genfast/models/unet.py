"""A small diffusion UNet (DDPM-style) and a sampling pipeline over any genfast scheduler.

Hot spots on genfast's fast paths: GroupNorm + SiLU fused (``genfast.ops.group_norm``), the
sinusoidal timestep embedding (``genfast.ops.timestep_embedding``), fused bias + SiLU after the
time-embedding linears (``bias_act``), attention at low resolution
(``genfast.scaled_dot_product_attention``), and one fused kernel per scheduler step.
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence

import torch
from torch import nn

from ..nn.bias_act import BiasAct
from ..nn.group_norm import GroupNorm, GroupNormSiLU
from ..ops.attention import scaled_dot_product_attention
from ..ops.diffusion import timestep_embedding
from ._base import FastPathModel


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, temb_dim: int, groups: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = GroupNormSiLU(groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb = nn.Linear(temb_dim, out_ch)
        self.norm2 = GroupNormSiLU(groups, out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.norm1(x))
        h = h + self.temb(temb)[:, :, None, None]
        h = self.conv2(self.dropout(self.norm2(h)))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Self-attention over the H*W positions, multi-head, with a residual connection."""

    def __init__(self, channels: int, groups: int, heads: int):
        super().__init__()
        if channels % heads:
            raise ValueError(f"AttnBlock: channels ({channels}) must be divisible by heads ({heads})")
        self.heads = heads
        self.norm = GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(n, 3, self.heads, c // self.heads, h * w)
        q, k, v = (t.transpose(-1, -2) for t in qkv.unbind(1))  # (n, heads, hw, d)
        out = scaled_dot_product_attention(q, k, v)
        return x + self.proj(out.transpose(-1, -2).reshape(n, c, h, w))


class UNet2D(FastPathModel):
    """A small DDPM UNet: ``forward(sample, timestep)`` -> the model output (same shape).

    ``block_channels`` sets the width at each resolution (one stride-2 downsampling between
    levels); ``attention_levels`` marks levels with self-attention after each ResBlock.
    ``sample_size`` must be divisible by 2**(levels - 1).
    """

    def __init__(self, in_channels: int = 1, out_channels: Optional[int] = None, sample_size: int = 8,
                 block_channels: Sequence[int] = (32, 64), layers_per_block: int = 1,
                 attention_levels: Sequence[bool] = (False, True), norm_groups: int = 8, attention_heads: int = 4,
                 dropout: float = 0.0, backend: Optional[str] = None):
        super().__init__()
        levels = len(block_channels)
        if len(attention_levels) != levels:
            raise ValueError(f"UNet2D: attention_levels has {len(attention_levels)} entries, block_channels {levels}")
        if sample_size % (2 ** (levels - 1)):
            raise ValueError(f"UNet2D: sample_size {sample_size} must be divisible by {2 ** (levels - 1)}")
        for ch in block_channels:
            if ch % norm_groups:
                raise ValueError(f"UNet2D: block channel count {ch} is not divisible by norm_groups={norm_groups}")
        self.in_channels, self.sample_size = in_channels, sample_size
        self.out_channels = out_channels or in_channels
        base = block_channels[0]
        self.temb_dim = temb_dim = 4 * base
        self.time_in = nn.Linear(base, temb_dim, bias=False)
        self.time_act = BiasAct(temb_dim, act="swish", gain=1.0)  # fused bias + SiLU
        self.time_out = nn.Linear(temb_dim, temb_dim, bias=False)
        self.time_out_act = BiasAct(temb_dim, act="swish", gain=1.0)  # the SiLU every ResBlock applies first
        self.conv_in = nn.Conv2d(in_channels, base, 3, padding=1)

        self.down = nn.ModuleList()
        skip_channels = [base]
        ch = base
        for level, out_ch in enumerate(block_channels):
            blocks = nn.ModuleList()
            for _ in range(layers_per_block):
                blocks.append(ResBlock(ch, out_ch, temb_dim, norm_groups, dropout))
                ch = out_ch
                if attention_levels[level]:
                    blocks.append(AttnBlock(ch, norm_groups, attention_heads))
                skip_channels.append(ch)
            if level < levels - 1:
                blocks.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                skip_channels.append(ch)
            self.down.append(blocks)

        self.mid = nn.ModuleList([ResBlock(ch, ch, temb_dim, norm_groups, dropout),
                                  AttnBlock(ch, norm_groups, attention_heads),
                                  ResBlock(ch, ch, temb_dim, norm_groups, dropout)])

        self.up = nn.ModuleList()
        for level in reversed(range(levels)):
            out_ch = block_channels[level]
            blocks = nn.ModuleList()
            for _ in range(layers_per_block + 1):
                blocks.append(ResBlock(ch + skip_channels.pop(), out_ch, temb_dim, norm_groups, dropout))
                ch = out_ch
                if attention_levels[level]:
                    blocks.append(AttnBlock(ch, norm_groups, attention_heads))
            if level > 0:
                blocks.append(nn.Upsample(scale_factor=2, mode="nearest"))
                blocks.append(nn.Conv2d(ch, ch, 3, padding=1))
            self.up.append(blocks)
        self.norm_out = GroupNormSiLU(norm_groups, ch)
        self.conv_out = nn.Conv2d(ch, self.out_channels, 3, padding=1)
        self.set_backend(backend)

    def _time_embedding(self, timestep, batch: int, device) -> torch.Tensor:
        t = torch.as_tensor(timestep, device=device)
        if t.ndim == 0:
            t = t.expand(batch)
        emb = timestep_embedding(t, self.time_in.in_features, flip_sin_to_cos=True, downscale_freq_shift=0)
        return self.time_out_act(self.time_out(self.time_act(self.time_in(emb.to(self.time_in.weight.dtype)))))

    def forward(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        with self.backend_scope():
            temb = self._time_embedding(timestep, sample.shape[0], sample.device)
            h = self.conv_in(sample)
            skips = [h]
            for blocks in self.down:
                for block in blocks:
                    h = block(h, temb) if isinstance(block, ResBlock) else block(h)
                    if not isinstance(block, AttnBlock):
                        skips.append(h)
                    else:
                        skips[-1] = h
            for block in self.mid:
                h = block(h, temb) if isinstance(block, ResBlock) else block(h)
            for blocks in self.up:
                for block in blocks:
                    if isinstance(block, ResBlock):
                        h = block(torch.cat([h, skips.pop()], dim=1), temb)
                    else:
                        h = block(h)
            return self.conv_out(self.norm_out(h))


def _progress(iterable, total: int, desc: str, enabled: bool):
    """A dependency-free progress bar on stderr."""
    if not enabled:
        yield from iterable
        return
    width = 30
    for i, item in enumerate(iterable, 1):
        yield item
        done = int(width * i / total)
        print(f"\r{desc} [{'#' * done}{'.' * (width - done)}] {i}/{total}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr, flush=True)


class DiffusionPipeline:
    """Ancestral sampling with any genfast scheduler (diffusers' calling convention):
    ``images = DiffusionPipeline(unet, scheduler)(batch_size=16, num_inference_steps=50)``."""

    def __init__(self, unet: UNet2D, scheduler):
        self.unet, self.scheduler = unet, scheduler

    @torch.no_grad()
    def __call__(self, batch_size: int = 16, num_inference_steps: int = 50, generator: Optional[torch.Generator] = None,
                 progress: bool = True, device=None) -> torch.Tensor:
        unet, scheduler = self.unet, self.scheduler
        device = device or next(unet.parameters()).device
        shape = (batch_size, unet.in_channels, unet.sample_size, unet.sample_size)
        scheduler.set_timesteps(num_inference_steps, device=device)
        sample = torch.randn(shape, generator=generator, device=device) * scheduler.init_noise_sigma
        timesteps = scheduler.timesteps
        for t in _progress(timesteps, len(timesteps), "sampling", progress):
            model_input = scheduler.scale_model_input(sample, t)
            model_output = unet(model_input, t)
            sample = scheduler.step(model_output, t, sample, generator=generator).prev_sample
        return sample


__all__ = ["UNet2D", "DiffusionPipeline", "ResBlock", "AttnBlock"]
