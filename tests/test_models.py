"""genfast.models: fast and reference paths agree (outputs and gradients), training lowers
the loss, and the fast/reference switch is validated."""
import copy

import pytest
import torch

import genfast
from genfast.models import VAE


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_fast_matches_reference(model, run, rtol=1e-4, atol=1e-5):
    """run(model) -> scalar loss; compares loss and every parameter gradient."""
    fast = model.set_backend(None)
    ref = copy.deepcopy(model).set_backend("reference")
    loss_fast = run(fast)
    loss_fast.backward()
    loss_ref = run(ref)
    loss_ref.backward()
    torch.testing.assert_close(loss_fast, loss_ref, rtol=rtol, atol=atol)
    g_fast, g_ref = grads(fast), grads(ref)
    assert g_fast.keys() == g_ref.keys() and g_fast
    for name in g_fast:
        torch.testing.assert_close(g_fast[name], g_ref[name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def test_vae_fast_matches_reference(seed):
    model = VAE(in_channels=1, image_size=8, latent_dim=5)
    x = torch.rand(6, 1, 8, 8)
    eps = torch.randn(6, 5)
    assert_fast_matches_reference(model, lambda m: m.loss(x, eps))


def test_vae_training_lowers_the_loss(seed):
    model = VAE(in_channels=1, image_size=8, latent_dim=4)
    prototypes = (torch.rand(4, 1, 8, 8) > 0.5).float()  # learnable structure, unlike pure noise
    x = prototypes[torch.randint(0, 4, (32,))]
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    first = model.loss(x, generator=gen).item()
    for _ in range(30):
        opt.zero_grad()
        model.loss(x, generator=gen).backward()
        opt.step()
    assert model.loss(x, generator=gen).item() < 0.9 * first
    samples = model.sample(3, generator=gen)
    assert samples.shape == (3, 1, 8, 8) and ((samples >= 0) & (samples <= 1)).all()


def test_model_backend_switch_is_validated():
    with pytest.raises(ValueError, match="unknown backend"):
        VAE().set_backend("gpu")
    with pytest.raises(ValueError, match="multiple of 4"):
        VAE(image_size=10)
    assert genfast.models.VAE(backend="reference").backend == "reference"
