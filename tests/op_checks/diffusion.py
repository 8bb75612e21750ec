"""Shared by tests/test_diffusion_ops.py and tests/test_diffusion_cuda_emulated.py: inputs and the
sampler_step / add_noise / diffusion_loss / timestep_embedding checks, each for a given backend."""
import torch

from genfast.ops import diffusion as ops
from genfast.ops.diffusion import DISPATCH
from genfast.reference import diffusion as ref
from genfast.testing import error_vs_reference

import helpers
from helpers import random_tensor

CPU = torch.device("cpu")
LAYOUTS = ["contiguous", "channels_last", "strided", "batch_inner"]
SHAPE = (3, 5, 7, 9)  # odd sizes
SMALL = (2, 3, 5, 7)  # for the Triton interpreter


def require(kernel, backend, device, dtype):
    helpers.require(DISPATCH[kernel], backend, device, dtype)


def make(shape, dtype, layout="contiguous", device=CPU, scale=1.0):
    """Random N(0, scale^2) tensor in the given memory layout (4-D shapes)."""
    return random_tensor(shape, dtype, layout, device, scale=scale)


def random_coefs(batch, per_sample, device=CPU, dtype=torch.float64):
    """Every used column nonzero (13..15 are reserved zeros)."""
    shape = (batch, ref.NUM_STEP_COEFS) if per_sample else (ref.NUM_STEP_COEFS,)
    c = torch.randn(shape, dtype=torch.float64)
    c[..., 13:] = 0
    return c.to(device=device, dtype=dtype)


def upcast(t):
    return t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t


def check_step(backend, dtype, layout="contiguous", per_sample=True, clamp="none", shape=SHAPE, device=CPU,
               coefs=None, with_optional=True, out_dtype=None, aux_dtype=None, m_dtype=None):
    x = make(shape, dtype, layout, device)
    m = make(shape, m_dtype or dtype, layout, device)
    h1 = make(shape, dtype, "contiguous", device) if with_optional else None
    h2 = make(shape, dtype, layout, device) if with_optional else None
    z = make(shape, dtype, layout, device) if with_optional else None
    c = coefs if coefs is not None else random_coefs(shape[0], per_sample, device)
    bound, rescale = None, False
    if clamp == "float":
        bound = 0.8
    elif clamp in ("tensor", "rescale"):
        bound = (torch.rand(shape[0], dtype=torch.float64) + 0.5).to(device)
        rescale = clamp == "rescale"
    got = ops.sampler_step(x, m, c, h1, h2, z, x0_clamp=bound, x0_rescale=rescale, out_dtype=out_dtype,
                           aux_dtype=aux_dtype, backend=backend)
    want = ref.sampler_step(upcast(x), upcast(m), c, upcast(h1), upcast(h2), upcast(z), bound, rescale)
    lowp = ref.sampler_step(x, m, c, h1, h2, z, bound, rescale, out_dtype, aux_dtype)
    for name, g, w, p in zip(("prev", "aux"), got, want, lowp):
        assert g.dtype == p.dtype, f"{name}: dtype {g.dtype}, expected {p.dtype}"
        error_vs_reference(g, w, p, name=f"{backend} {dtype} {layout} {clamp} {name}")
    shared = not per_sample and clamp not in ("tensor", "rescale")
    if layout in ("contiguous", "channels_last") or (layout == "batch_inner" and shared):
        assert got[0].stride() == x.stride(), "dense layout not kept"
    return got


def check_every_coefficient_column(backend, column):
    """One column at a time (x0 built from both its columns), so a swapped column fails."""
    require("sampler_step", backend, CPU, torch.float32)
    c = torch.zeros(ref.NUM_STEP_COEFS, dtype=torch.float64)
    c[ref.X0_FROM_SAMPLE], c[ref.X0_FROM_MODEL] = 0.7, -1.3
    c[column] += 1.9
    prev, aux = check_step(backend, torch.float32, "contiguous", False, "none", shape=SMALL, coefs=c)
    target = prev if 2 <= column <= 7 else aux
    if column >= 2:
        assert target.abs().max() > 0.1


def check_missing_optional_tensors_count_as_zero(backend):
    require("sampler_step", backend, CPU, torch.float32)
    check_step(backend, torch.float32, per_sample=True, clamp="float", shape=SMALL, with_optional=False,
               coefs=random_coefs(SMALL[0], True))


def check_mixed_dtypes(backend):
    """fp32 sample (Euler's upcast) with an fp16 model output; prev fp16, aux fp32."""
    require("sampler_step", backend, CPU, torch.float32)
    check_step(backend, torch.float32, "channels_last", True, "tensor", shape=SMALL, m_dtype=torch.float16,
               out_dtype=torch.float16, aux_dtype=torch.float32)


def check_return_aux_false_and_float64_coefs_table_row(backend):
    require("sampler_step", backend, CPU, torch.float32)
    table = torch.randn(10, ref.NUM_STEP_COEFS, dtype=torch.float64)
    x, m, z = (torch.randn(SMALL) for _ in range(3))
    prev, aux = ops.sampler_step(x, m, table[4], noise=z, return_aux=False, backend=backend)
    assert aux is None
    want = ref.sampler_step(x.double(), m.double(), table[4], noise=z.double())[0]
    error_vs_reference(prev, want, ref.sampler_step(x, m, table[4], noise=z)[0])
    c32 = table[3].float()  # float32 coefficients are accepted too
    prev32, _ = ops.sampler_step(x, m, c32, backend=backend)
    error_vs_reference(prev32, ref.sampler_step(x.double(), m.double(), c32)[0], ref.sampler_step(x, m, c32)[0])


def check_fused_guidance(backend):
    require("sampler_step", backend, CPU, torch.float32)
    x, cond, uncond, h1 = (torch.randn(SMALL) for _ in range(4))
    c = random_coefs(SMALL[0], True)
    g = 7.5
    got = ops.sampler_step(x, cond, c, h1, model_output_uncond=uncond, guidance_scale=g, backend=backend)
    m64 = uncond.double() + g * (cond.double() - uncond.double())
    want = ref.sampler_step(x.double(), m64, c, h1.double())
    lowp = ref.sampler_step(x, ref.guided_model_output(cond, uncond, g), c, h1)
    for gg, w, p in zip(got, want, lowp):
        error_vs_reference(gg, w, p)


def noise_only_coefs():
    c = torch.zeros(ref.NUM_STEP_COEFS, dtype=torch.float64)
    c[ref.PREV_NOISE] = 1.0
    return c


def check_seeded_noise_is_the_philox_spec_and_deterministic(backend):
    require("sampler_step", backend, CPU, torch.float32)
    shape = (2, 3, 5, 7)
    x = torch.randn(shape)
    s = int.from_bytes(__import__("os").urandom(7), "little")
    z1, _ = ops.sampler_step(x, x, noise_only_coefs(), noise_seed=s, backend=backend)
    z2, _ = ops.sampler_step(x, x, noise_only_coefs(), noise_seed=s, backend=backend)
    z3, _ = ops.sampler_step(x, x, noise_only_coefs(), noise_seed=s + 1, backend=backend)
    assert torch.equal(z1, z2), "same seed, different noise"
    assert (z1 != z3).float().mean() > 0.99, "a new seed must give new noise"
    spec = ref.seeded_normal(x, s, torch.float64)
    torch.testing.assert_close(z1.double(), spec, rtol=1e-5, atol=2e-5)
    # A pure function of (seed, element offset): per-sample coefficients (another task split)
    # and add_noise (another kernel) draw the very same values.
    zb, _ = ops.sampler_step(x, x, noise_only_coefs().expand(2, -1).contiguous(), noise_seed=s, backend=backend)
    assert torch.equal(zb, z1)
    one = torch.ones(4)
    zn = ops.add_noise(torch.randn(shape), None, torch.tensor([1, 2]), one * 0, one, noise_seed=s, backend=backend)
    assert torch.equal(zn, z1)


def schedule(T=50, dtype=torch.float64):
    betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    return abar.sqrt().to(dtype), (1 - abar).sqrt().to(dtype)


def check_add_noise(backend, dtype, layout, target, shape=SHAPE, device=CPU, table_dtype=torch.float64):
    a, s = (t.to(device) for t in schedule(dtype=table_dtype))
    x0 = make(shape, dtype, layout, device)
    noise = make(shape, dtype, layout, device)
    t = torch.randint(0, a.numel(), (shape[0],), device=device)
    got = ops.add_noise(x0, noise, t, a, s, target, backend=backend)
    want = ref.add_noise(upcast(x0), upcast(noise), t, a, s, target)
    lowp = ref.add_noise(x0, noise, t, a, s, target)
    if target is None:
        got, want, lowp = (got,), (want,), (lowp,)
    for g, w, p in zip(got, want, lowp):
        assert g.dtype == dtype
        error_vs_reference(g, w, p, name=f"{backend} {dtype} {layout} {target}")


def check_add_noise_scalar_timestep_and_seeded_epsilon(backend):
    require("add_noise", backend, CPU, torch.float32)
    a, s = schedule(dtype=torch.float32)
    x0 = torch.randn(SMALL)
    t = torch.tensor(17)
    noisy, eps = ops.add_noise(x0, None, t, a, s, "epsilon", noise_seed=99, backend=backend)
    noisy1, eps1 = ops.add_noise(x0, None, t.reshape(1), a, s, "epsilon", noise_seed=99, backend=backend)
    assert torch.equal(noisy1, noisy) and torch.equal(eps1, eps)
    # The target is the drawn noise, and noisy is built from it.
    error_vs_reference(noisy, ref.add_noise(x0.double(), eps.double(), t, a, s), ref.add_noise(x0, eps, t, a, s))
    assert abs(eps.mean().item()) < 0.5 and 0.5 < eps.std().item() < 1.5


def check_diffusion_loss_forward_and_gradients(backend, use_weights, reduction):
    require("per_sample_sums", backend, CPU, torch.float32)
    shape = SMALL if backend == "triton" else SHAPE
    layout = "channels_last"
    m = make(shape, torch.float32, layout)
    t = make(shape, torch.float32, "batch_inner")
    w = torch.rand(shape[0]) + 0.1 if use_weights else None
    gout = torch.randn(shape[0]) if reduction == "none" else torch.randn(())

    def run(fn, m_, t_, w_):
        m_ = m_.detach().requires_grad_()
        t_ = t_.detach().requires_grad_()
        w_ = w_.detach().requires_grad_() if w_ is not None else None
        loss = fn(m_, t_, w_, reduction)
        inputs = [m_, t_] + ([w_] if w_ is not None else [])
        grads = torch.autograd.grad(loss, inputs, gout.to(loss.dtype))
        return [loss.detach()] + list(grads)

    got = run(lambda *a: ops.diffusion_loss(*a, backend=backend), m, t, w)
    want = run(ref.diffusion_loss, upcast(m), upcast(t), upcast(w))
    lowp = run(ref.diffusion_loss, m, t, w)
    for name, g, ww, p in zip(["loss", "dm", "dt", "dw"], got, want, lowp):
        error_vs_reference(g, ww, p, name=f"{backend} {name}")


def check_timestep_embedding(backend, dim, flip, shift, scale):
    require("timestep_embedding", backend, CPU, torch.int64)
    for t in (torch.randint(0, 1000, (5,)), torch.rand(3) * 999):
        got = ops.timestep_embedding(t, dim, flip, shift, scale, backend=backend)
        want = ref.timestep_embedding(t.double(), dim, flip, shift, scale)
        lowp = ref.timestep_embedding(t, dim, flip, shift, scale)
        assert got.dtype == torch.float32 and got.shape == (t.shape[0], dim)
        # float32 arguments up to ~1000 rad: the floor is the rounding of the argument.
        error_vs_reference(got, want, lowp, floor=2e-4 * max(1.0, abs(scale)))
