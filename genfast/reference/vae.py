"""Reference (plain PyTorch) VAE reparameterisation and KL term, the spec of genfast.ops.vae.

For a diagonal Gaussian posterior N(mu, exp(logvar)) and a standard normal prior:
    z  = mu + exp(logvar / 2) * eps                                    (reparameterisation)
    kl = -1/2 * sum over non-batch dims of (1 + logvar - mu^2 - exp(logvar))   (per sample)
"""
from __future__ import annotations

import torch


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    cd = _compute_dtype(mu)
    return (mu.to(cd) + torch.exp(0.5 * logvar.to(cd)) * eps.to(cd)).to(mu.dtype)


def kl_per_sample(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, 1)) summed over every dim but the first; float32
    (float64 for float64 inputs), shape (batch,)."""
    cd = _compute_dtype(mu)
    m, lv = mu.to(cd), logvar.to(cd)
    return -0.5 * (1 + lv - m * m - torch.exp(lv)).reshape(mu.shape[0], -1).sum(1)


def reparameterize_kl_backward(mu, logvar, eps, dz, dkl):
    """Gradients (dmu, dlogvar) of z and kl given their incoming gradients (either may be None)."""
    cd = _compute_dtype(mu)
    m, lv, e = mu.to(cd), logvar.to(cd), eps.to(cd)
    sigma = torch.exp(0.5 * lv)
    g = dz.to(cd) if dz is not None else torch.zeros((), dtype=cd, device=mu.device)
    k = (dkl.to(cd).reshape(-1, *([1] * (mu.ndim - 1))) if dkl is not None
         else torch.zeros((), dtype=cd, device=mu.device))
    dmu = g + k * m
    dlogvar = 0.5 * (g * e * sigma + k * (sigma * sigma - 1))
    return dmu.to(mu.dtype), dlogvar.to(mu.dtype)
