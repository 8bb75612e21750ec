"""genfast.ops.vae (fused reparameterisation + KL) against the float64 reference, every
backend that runs here: values, gradients, reductions, layouts, bad input, torch.compile."""
import pytest
import torch

from genfast.ops import kl_divergence, reparameterize, reparameterize_kl
from genfast.ops.vae import CHUNK_COLS, DISPATCH
from genfast.reference import vae as reference
from genfast.testing import error_vs_reference

import helpers
from helpers import random_tensor

CPU = torch.device("cpu")
# (batch, latent...) shapes: odd sizes, one row spanning several KL chunks, a single element.
SHAPES = [(3, 5, 7), (2, 2 * CHUNK_COLS + 37), (1, 1), (4, 3, 3, 5)]


def require(backend, device, dtype):
    helpers.require(DISPATCH, backend, device, dtype)


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


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_native_backends_match_reference(backend, dtype, shape, seed):
    require(backend, CPU, dtype)
    check_against_reference(backend, dtype, shape)


@pytest.mark.parametrize("shape", [(3, 5, 7), (2, CHUNK_COLS + 37)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_triton_backend_matches_reference(dtype, shape, seed):
    require("triton", CPU, dtype)
    check_against_reference("triton", dtype, shape)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_non_contiguous_inputs(backend, seed):
    check_against_reference(backend, torch.float32, (3, 6, 11), strided=True)


def test_reductions_and_single_outputs_agree(seed):
    mu, logvar, eps = make_inputs((4, 3, 5), torch.float32)
    z, kl = reparameterize_kl(mu, logvar, eps, reduction="none")
    _, kl_sum = reparameterize_kl(mu, logvar, eps, reduction="sum")
    _, kl_mean = reparameterize_kl(mu, logvar, eps, reduction="mean")
    torch.testing.assert_close(kl_sum, kl.sum())
    torch.testing.assert_close(kl_mean, kl.mean())
    torch.testing.assert_close(reparameterize(mu, logvar, eps), z)
    torch.testing.assert_close(kl_divergence(mu, logvar, reduction="none"), kl)
    # "sum" is what the PyTorch VAE example computes over the whole batch.
    expected = -0.5 * torch.sum(1 + logvar.double() - mu.double().pow(2) - logvar.double().exp())
    torch.testing.assert_close(kl_sum.double(), expected, rtol=1e-5, atol=1e-5)


def test_noise_is_drawn_like_randn_with_the_generator(seed):
    mu, logvar, _ = make_inputs((2, 7), torch.float32)
    z = reparameterize(mu, logvar, generator=torch.Generator().manual_seed(seed))
    eps = torch.randn(mu.shape, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(z, mu + torch.exp(0.5 * logvar) * eps)
    z_again = reparameterize(mu, logvar, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(z, z_again)


def test_gradcheck_float64(seed):
    mu, logvar, eps = make_inputs((2, 3, 4), torch.float64)
    mu.requires_grad_()
    logvar.requires_grad_()
    eps.requires_grad_()

    def f(m, lv, e):
        z, kl = reparameterize_kl(m, lv, e, reduction="none", backend="cpu")
        return z, kl
    assert torch.autograd.gradcheck(f, (mu, logvar, eps))


def test_gradient_through_kl_only_and_z_only(seed):
    mu, logvar, eps = make_inputs((3, 9), torch.float64)
    for which in ("kl", "z"):
        m, lv = mu.clone().requires_grad_(), logvar.clone().requires_grad_()
        z, kl = reparameterize_kl(m, lv, eps, reduction="sum")
        (kl if which == "kl" else z.sum()).backward()
        m2, l2 = mu.clone().requires_grad_(), logvar.clone().requires_grad_()
        z2, kl2 = unfused(m2, l2, eps)
        (kl2.sum() if which == "kl" else z2.sum()).backward()
        torch.testing.assert_close(m.grad, m2.grad)
        torch.testing.assert_close(lv.grad, l2.grad)


def test_second_order_gradient_raises_clearly():
    mu, logvar, eps = make_inputs((2, 3), torch.float64)
    mu.requires_grad_()
    _, kl = reparameterize_kl(mu, logvar, eps)
    (g,) = torch.autograd.grad(kl, mu, create_graph=True)
    with pytest.raises(NotImplementedError, match="first-order gradients only"):
        g.sum().backward()


def test_empty_batch():
    mu = torch.randn(0, 4)
    z, kl = reparameterize_kl(mu, mu.clone(), mu.clone(), reduction="none")
    assert z.shape == (0, 4) and kl.shape == (0,)


@pytest.mark.parametrize("bad, match", [
    (dict(mu=torch.randn(5)), "batch dimension"),
    (dict(logvar=torch.randn(2, 4)), "logvar has shape"),
    (dict(eps=torch.randn(2, 3, dtype=torch.float64)), "eps is torch.float64"),
    (dict(mu=torch.randint(0, 3, (2, 3)), logvar=torch.randint(0, 3, (2, 3))), "mu must be float"),
    (dict(logvar=[1.0]), "logvar must be a torch.Tensor"),
    (dict(reduction="batchmean"), "reduction must be one of"),
    (dict(backend="gpu"), "unknown backend"),
])
def test_bad_input_is_rejected_clearly(bad, match):
    args = dict(mu=torch.randn(2, 3), logvar=torch.randn(2, 3), eps=torch.randn(2, 3), reduction="sum", backend=None)
    args.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        reparameterize_kl(**args)


def test_opcheck_and_torch_compile_fullgraph(seed):
    mu, logvar, eps = make_inputs((3, 11), torch.float32)
    torch.library.opcheck(torch.ops.genfast.vae_forward.default, (mu, logvar, eps, True, True, "cpu"))
    torch.library.opcheck(torch.ops.genfast.vae_backward.default,
                          (mu, logvar, eps, torch.randn_like(mu), torch.randn(3), "cpu"))

    def loss(m, lv, e):
        z, kl = reparameterize_kl(m, lv, e, reduction="mean", backend="cpu")
        return (z * z).mean() + kl

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    m, lv = mu.clone().requires_grad_(), logvar.clone().requires_grad_()
    out = compiled(m, lv, eps)
    out.backward()
    m2, l2 = mu.clone().requires_grad_(), logvar.clone().requires_grad_()
    ref = loss(m2, l2, eps)
    ref.backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(m.grad, m2.grad)
    torch.testing.assert_close(lv.grad, l2.grad)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_backends_match_reference(backend, dtype, shape, seed):
    device = torch.device("cuda")
    require(backend, device, dtype)
    check_against_reference(backend, dtype, shape, device=device)
    check_against_reference(backend, dtype, shape, device=device, strided=True)
