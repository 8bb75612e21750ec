"""A small convolutional VAE whose reparameterisation and KL term run as one fused op."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.bias_act import BiasAct
from ..ops.vae import reparameterize_kl
from ._base import FastPathModel


class VAE(FastPathModel):
    """Convolutional VAE for small images (e.g. 1x8x8 digits, 1x28x28 MNIST, 3x32x32).

    Encoder: two stride-2 4x4 convolutions with fused bias + ReLU, then linear heads for mu and
    logvar; decoder: the mirror image with transposed convolutions, producing logits.
    ``forward(x)`` returns ``(logits, mu, logvar, kl)`` (kl per sample, float32);
    ``loss(x)`` is the negative ELBO per sample, averaged: Bernoulli (BCE-with-logits) or
    Gaussian (MSE) reconstruction summed over pixels, plus the KL.
    """

    def __init__(self, in_channels: int = 1, image_size: int = 8, latent_dim: int = 16,
                 channels: tuple = (32, 64), likelihood: str = "bernoulli", backend: Optional[str] = None):
        super().__init__()
        if image_size % 4:
            raise ValueError(f"VAE: image_size must be a multiple of 4 (two stride-2 layers), got {image_size}")
        if likelihood not in ("bernoulli", "gaussian"):
            raise ValueError(f"VAE: likelihood must be 'bernoulli' or 'gaussian', got {likelihood!r}")
        c1, c2 = channels
        self.in_channels, self.image_size, self.latent_dim, self.likelihood = \
            in_channels, image_size, latent_dim, likelihood
        self.feature_size = image_size // 4
        flat = c2 * self.feature_size ** 2
        self.enc1 = nn.Conv2d(in_channels, c1, 4, 2, 1, bias=False)
        self.enc1_act = BiasAct(c1, act="relu", gain=1.0)
        self.enc2 = nn.Conv2d(c1, c2, 4, 2, 1, bias=False)
        self.enc2_act = BiasAct(c2, act="relu", gain=1.0)
        self.to_mu = nn.Linear(flat, latent_dim)
        self.to_logvar = nn.Linear(flat, latent_dim)
        self.from_latent = nn.Linear(latent_dim, flat, bias=False)
        self.from_latent_act = BiasAct(flat, act="relu", gain=1.0)
        self.dec1 = nn.ConvTranspose2d(c2, c1, 4, 2, 1, bias=False)
        self.dec1_act = BiasAct(c1, act="relu", gain=1.0)
        self.dec2 = nn.ConvTranspose2d(c1, in_channels, 4, 2, 1)
        self.set_backend(backend)

    def encode(self, x: torch.Tensor) -> tuple:
        with self.backend_scope():
            h = self.enc2_act(self.enc2(self.enc1_act(self.enc1(x)))).flatten(1)
            return self.to_mu(h), self.to_logvar(h)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        with self.backend_scope():
            h = self.from_latent_act(self.from_latent(z))
            h = h.reshape(z.shape[0], -1, self.feature_size, self.feature_size)
            return self.dec2(self.dec1_act(self.dec1(h)))

    def forward(self, x: torch.Tensor, eps: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None) -> tuple:
        mu, logvar = self.encode(x)
        with self.backend_scope():
            z, kl = reparameterize_kl(mu, logvar, eps, generator=generator, reduction="none")
        return self.decode(z), mu, logvar, kl

    def loss(self, x: torch.Tensor, eps: Optional[torch.Tensor] = None,
             generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Negative ELBO averaged over the batch (x in [0, 1] for the Bernoulli likelihood)."""
        logits, _, _, kl = self(x, eps, generator)
        if self.likelihood == "bernoulli":
            recon = F.binary_cross_entropy_with_logits(logits, x, reduction="none")
        else:
            recon = 0.5 * (logits - x) ** 2
        return (recon.flatten(1).sum(1) + kl.to(recon.dtype)).mean()

    @torch.no_grad()
    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """n images from the prior (probabilities for Bernoulli, means for Gaussian)."""
        device = self.to_mu.weight.device
        z = torch.randn(n, self.latent_dim, device=device, generator=generator)
        out = self.decode(z)
        return torch.sigmoid(out) if self.likelihood == "bernoulli" else out
