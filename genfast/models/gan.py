"""Classic GANs on genfast's fused layers: the MLP GAN of the original GAN papers' MNIST
experiments and DCGAN (Radford et al.), with the same layer shapes as the usual PyTorch code."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from ..nn.bias_act import BiasAct
from ..nn.gan import BatchNorm2dAct, FusedLinearAct
from ._base import FastPathModel


class MLPGenerator(FastPathModel):
    """latent -> hidden (Linear + ReLU, fused) ... -> image_dim (Linear + Tanh, fused)."""

    def __init__(self, latent_dim: int = 100, image_dim: int = 784, hidden: Sequence[int] = (256, 512, 1024)):
        super().__init__()
        dims = [latent_dim, *hidden]
        layers = [FusedLinearAct(a, b, activation="relu") for a, b in zip(dims[:-1], dims[1:])]
        layers.append(FusedLinearAct(dims[-1], image_dim, activation="tanh"))
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        with self.backend_scope():
            return self.net(z)


class MLPDiscriminator(FastPathModel):
    """image_dim -> hidden (Linear + LeakyReLU(0.2), fused, then dropout) ... -> 1 logit."""

    def __init__(self, image_dim: int = 784, hidden: Sequence[int] = (1024, 512, 256), dropout: float = 0.3,
                 negative_slope: float = 0.2):
        super().__init__()
        dims = [image_dim, *hidden]
        layers = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [FusedLinearAct(a, b, activation="lrelu", negative_slope=negative_slope), nn.Dropout(dropout)]
        layers.append(nn.Linear(dims[-1], 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self.backend_scope():
            return self.net(x.flatten(1))


class MLPGAN(FastPathModel):
    """The classic MNIST MLP GAN: generator 100->256->512->1024->784 (ReLU, Tanh) and
    discriminator 784->1024->512->256->1 (LeakyReLU(0.2), dropout). ``generator`` and
    ``discriminator`` are separate sub-models (one optimizer each); ``forward(z)`` generates."""

    def __init__(self, latent_dim: int = 100, image_dim: int = 784, hidden_g: Sequence[int] = (256, 512, 1024),
                 hidden_d: Sequence[int] = (1024, 512, 256), dropout: float = 0.3, backend: Optional[str] = None):
        super().__init__()
        self.latent_dim, self.image_dim = latent_dim, image_dim
        self.generator = MLPGenerator(latent_dim, image_dim, hidden_g)
        self.discriminator = MLPDiscriminator(image_dim, hidden_d, dropout)
        self.set_backend(backend)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.generator(z)


class DCGANGenerator(FastPathModel):
    """DCGAN generator: latent (N, latent_dim, 1, 1) -> ConvTranspose2d + BatchNorm + ReLU
    (BatchNorm and ReLU fused) ... -> ConvTranspose2d + Tanh, image_size = 4 * 2**k."""

    def __init__(self, latent_dim: int = 100, channels: int = 64, image_channels: int = 3, image_size: int = 64,
                 backend: Optional[str] = None):
        super().__init__()
        ups = _doublings(image_size, "DCGANGenerator")
        width = channels * 2 ** (ups - 1)
        layers = [nn.ConvTranspose2d(latent_dim, width, 4, 1, 0, bias=False), BatchNorm2dAct(width, activation="relu")]
        for _ in range(ups - 1):
            layers += [nn.ConvTranspose2d(width, width // 2, 4, 2, 1, bias=False),
                       BatchNorm2dAct(width // 2, activation="relu")]
            width //= 2
        layers += [nn.ConvTranspose2d(width, image_channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.latent_dim = latent_dim
        self.net = nn.Sequential(*layers)
        self.set_backend(backend)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        with self.backend_scope():
            return self.net(z.reshape(z.shape[0], -1, 1, 1))


class DCGANDiscriminator(FastPathModel):
    """DCGAN discriminator: Conv2d + LeakyReLU(0.2), then Conv2d + BatchNorm + LeakyReLU(0.2)
    (fused) ..., then a 4x4 Conv2d to one logit per image."""

    def __init__(self, channels: int = 64, image_channels: int = 3, image_size: int = 64,
                 backend: Optional[str] = None):
        super().__init__()
        downs = _doublings(image_size, "DCGANDiscriminator")
        layers = [nn.Conv2d(image_channels, channels, 4, 2, 1, bias=False), BiasAct(act="lrelu", alpha=0.2, gain=1.0)]
        width = channels
        for _ in range(downs - 1):
            layers += [nn.Conv2d(width, width * 2, 4, 2, 1, bias=False),
                       BatchNorm2dAct(width * 2, activation="lrelu", negative_slope=0.2)]
            width *= 2
        layers.append(nn.Conv2d(width, 1, 4, 1, 0, bias=False))
        self.net = nn.Sequential(*layers)
        self.set_backend(backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self.backend_scope():
            return self.net(x).flatten()


def _doublings(image_size: int, who: str) -> int:
    ups = (image_size // 4).bit_length() - 1
    if image_size < 8 or 4 * 2 ** ups != image_size:
        raise ValueError(f"{who}: image_size must be 4 * 2**k with k >= 1 (8, 16, 32, 64, ...), got {image_size}")
    return ups
