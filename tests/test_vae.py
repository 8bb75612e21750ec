"""genfast.ops.vae (fused reparameterisation + KL) against the float64 reference, every
backend that runs here: values, gradients, reductions, layouts, bad input, torch.compile."""
import pytest
import torch

from genfast.ops import kl_divergence, reparameterize, reparameterize_kl
from genfast.ops.vae import CHUNK_COLS, DISPATCH

import helpers
from op_checks.vae import CPU, SHAPES, check_against_reference, make_inputs, unfused


def require(backend, device, dtype):
    helpers.require(DISPATCH, backend, device, dtype)


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


# ----------------------------------------------------------------------------- the extension entry

_C = __import__("genfast")._ext._C
native = pytest.mark.skipif(_C is None, reason="no extension")


def _vae_forward_native(**overrides):
    mu, logvar, eps = torch.randn(3, 7), torch.randn(3, 7) * 0.5, torch.randn(3, 7)
    args = dict(mu=mu, logvar=logvar, eps=eps, z=torch.empty_like(mu), kl_partial=torch.empty(3, 1), num_threads=1)
    args.update(overrides)
    _C.vae_forward_cpu(**args)
    return args


@native
def test_native_entry_matches_the_reference(seed):
    from genfast.reference import vae as reference

    args = _vae_forward_native()
    mu, logvar, eps = (args[k].double() for k in ("mu", "logvar", "eps"))
    torch.testing.assert_close(args["z"].double(), reference.reparameterize(mu, logvar, eps), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(args["kl_partial"][:, 0].double(), reference.kl_per_sample(mu, logvar), rtol=1e-5,
                               atol=1e-5)
    assert _C.VAE_CHUNK_COLS == CHUNK_COLS


@native
@pytest.mark.parametrize("overrides,error,match", [
    (dict(logvar=torch.randn(3, 8)), ValueError, "vae_forward_cpu: logvar must have the shape of mu"),
    (dict(eps=torch.randn(3, 7, dtype=torch.float64)), TypeError, "vae_forward_cpu: eps must be float32"),
    (dict(kl_partial=torch.empty(3, 2)), ValueError, "vae_forward_cpu: kl_partial must have shape \\(3, 1\\)"),
    (dict(kl_partial=torch.empty(3, 1, dtype=torch.float16)), TypeError, "vae_forward_cpu: kl_partial must be float32"),
    (dict(eps=None), ValueError, "vae_forward_cpu: eps is required to write z"),
    (dict(logvar=None), ValueError, "vae_forward_cpu: logvar is required, got None"),
    (dict(z=torch.empty(7, 3).t()), ValueError, "vae_forward_cpu: z must be contiguous"),
])
def test_native_entry_rejects_bad_tensors(overrides, error, match):
    with pytest.raises(error, match=match):
        _vae_forward_native(**overrides)


@native
def test_native_entry_takes_named_arguments_only():
    mu = torch.randn(2, 3)
    with pytest.raises(TypeError):  # an unknown argument
        _C.vae_forward_cpu(mu, mu, eps=mu, z=None, kl_partial=None, num_threads=1, chunk=4096)
    with pytest.raises(TypeError):  # a missing argument
        _C.vae_forward_cpu(mu, mu, eps=mu, z=None, num_threads=1)
    with pytest.raises(TypeError):  # tensors after mu and logvar are keywords
        _C.vae_backward_cpu(mu, mu, mu, None, None, torch.empty_like(mu), torch.empty_like(mu), 1)
    with pytest.raises(ValueError, match="vae_backward_cpu: dlogvar is required, got None"):
        _C.vae_backward_cpu(mu, mu, eps=mu, dz=mu, dkl=None, dmu=torch.empty_like(mu), dlogvar=None, num_threads=1)
