"""The CUDA VAE kernels' exact source (kernels/vae.cu), run on the CPU.

CI has nvcc but no GPU: the kernels and their real bindings are compiled as host C++ over the
SIMT emulator (tests/cuda_emulation) and called through genfast's own CUDA backend code
(genfast/ops/vae.py _Cuda, autograd included) on CPU tensors: z, the per-sample KL (a block
reduction over chunks of columns) and the gradients against the float64 reference. The same
checks run on a real GPU in tests/test_vae.py (marked gpu).
"""
import pytest
import torch

from cuda_emulation import build
from genfast.ops import kl_divergence, reparameterize, reparameterize_kl
from genfast.reference import vae as reference
from genfast.testing import error_vs_reference
from op_checks import vae as checks

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


emulated, extension = build.cuda_backend_fixtures("vae", "vae_forward_cuda")


@pytest.mark.parametrize("shape", checks.SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(seed, dtype, shape, extension):
    checks.check_against_reference("cuda", dtype, shape)
    assert extension.calls.get("vae_backward_cuda", 0) > 0


def test_non_contiguous_inputs(seed):
    checks.check_against_reference("cuda", torch.float32, (3, 6, 11), strided=True)


def test_kl_only_and_z_only(seed):
    """The forward kernel without z (KL only) and without the KL (z only); the backward kernel
    without dz (gradient through the KL only) and without dkl (through z only)."""
    mu, logvar, eps = checks.make_inputs((3, 4100), torch.float32)
    mu64, lv64, eps64 = mu.double(), logvar.double(), eps.double()
    kl = kl_divergence(mu, logvar, reduction="none", backend="cuda")
    error_vs_reference(kl, reference.kl_per_sample(mu64, lv64), checks.unfused(mu, logvar, eps)[1], "kl only")
    z = reparameterize(mu, logvar, eps, backend="cuda")
    error_vs_reference(z, reference.reparameterize(mu64, lv64, eps64), checks.unfused(mu, logvar, eps)[0], "z only")
    for which in ("kl", "z"):
        m, lv = mu.clone().requires_grad_(), logvar.clone().requires_grad_()
        z, kl = reparameterize_kl(m, lv, eps, reduction="none", backend="cuda")
        (kl.sum() if which == "kl" else z.sum()).backward()
        results = []
        for t_mu, t_lv, t_eps in ((mu64, lv64, eps64), (mu, logvar, eps)):
            m2, l2 = t_mu.clone().requires_grad_(), t_lv.clone().requires_grad_()
            z2, kl2 = checks.unfused(m2, l2, t_eps)
            (kl2.sum() if which == "kl" else z2.sum()).backward()
            results.append((m2.grad, l2.grad))
        error_vs_reference(m.grad, results[0][0], results[1][0], f"dmu through {which} only")
        error_vs_reference(lv.grad, results[0][1], results[1][1], f"dlogvar through {which} only")
