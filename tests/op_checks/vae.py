"""Shared by tests/test_vae.py and tests/test_vae_cuda_emulated.py: shapes, inputs, the unfused
PyTorch composition and the check against the float64 reference."""
import torch

from genfast.ops import reparameterize_kl
from genfast.ops.vae import CHUNK_COLS
from genfast.reference import vae as reference
from genfast.testing import error_vs_reference

from helpers import random_tensor

CPU = torch.device("cpu")


# (batch, latent...) shapes: odd sizes, one row spanning several KL chunks, a single element.
SHAPES = [(3, 5, 7), (2, 2 * CHUNK_COLS + 37), (1, 1), (4, 3, 3, 5)]


def make_inputs(shape, dtype, device=CPU, strided=False):
    layout = "strided" if strided else "contiguous"  # strided: every other element of a wider last dim
    return tuple(random_tensor(shape, dtype, layout, device, scale=scale, shift=shift)
                 for scale, shift in ((1.0, 0.0), (0.7, -0.3), (1.0, 0.0)))


def unfused(mu, logvar, eps):
    """What VAE code writes without genfast (the pytorch/examples VAE), per-sample KL."""
    std = torch.exp(0.5 * logvar)
    z = mu + std * eps
    kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).reshape(mu.shape[0], -1).sum(1)
    return z, kl


def check_against_reference(backend, dtype, shape, device=CPU, strided=False):
    mu, logvar, eps = make_inputs(shape, dtype, device, strided)
    z, kl = reparameterize_kl(mu, logvar, eps, reduction="none", backend=backend)
    mu64, lv64, eps64 = (t.double() for t in (mu, logvar, eps))
    z64, kl64 = reference.reparameterize(mu64, lv64, eps64), reference.kl_per_sample(mu64, lv64)
    z_lowp, kl_lowp = unfused(mu, logvar, eps)
    assert z.dtype == dtype and z.shape == mu.shape
    assert kl.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and kl.shape == (shape[0],)
    error_vs_reference(z, z64, z_lowp, "z")
    # The KL is a sum over the row: PyTorch's own low-precision sum sets the bar.
    error_vs_reference(kl, kl64, kl_lowp.to(kl.dtype), "kl")

    # Gradients of an arbitrary scalar of z and kl, against float64 autograd of the unfused math.
    mu_g, lv_g = mu.clone().requires_grad_(), logvar.clone().requires_grad_()
    dz = torch.randn(shape, dtype=torch.float64).to(device=device, dtype=dtype)
    dkl = torch.randn(shape[0], dtype=torch.float64, device=device)
    z, kl = reparameterize_kl(mu_g, lv_g, eps, reduction="none", backend=backend)
    torch.autograd.backward([z, kl], [dz, dkl.to(kl.dtype)])
    m64, l64 = mu64.clone().requires_grad_(), lv64.clone().requires_grad_()
    torch.autograd.backward(list(unfused(m64, l64, eps64)), [dz.double(), dkl])
    m_lp, l_lp = mu.clone().requires_grad_(), logvar.clone().requires_grad_()
    z_lp, kl_lp = unfused(m_lp, l_lp, eps)
    torch.autograd.backward([z_lp, kl_lp], [dz, dkl.to(dtype)])
    error_vs_reference(mu_g.grad, m64.grad, m_lp.grad, "dmu")
    error_vs_reference(lv_g.grad, l64.grad, l_lp.grad, "dlogvar")
