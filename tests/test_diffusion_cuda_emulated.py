"""The CUDA diffusion kernels' exact source (kernels/diffusion.cu), run on the CPU.

CI has nvcc but no GPU: the kernels and their real bindings are compiled as host C++ over the
SIMT emulator (tests/cuda_emulation) and called through genfast's own CUDA backend code (the
"cuda" functions of genfast/ops/diffusion.py, autograd included) on CPU tensors: sampler_step,
add_noise, the per-sample sums (loss and CFG rescale, several chunks per sample), the combine
and the timestep embedding, against the float64 references; seeded noise against the Philox
spec.
"""
import pytest
import torch

from cuda_emulation import build
from genfast.ops import diffusion as ops
from genfast.reference import diffusion as ref
from genfast.testing import error_vs_reference
from op_checks import diffusion as checks

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


emulated, extension = build.cuda_backend_fixtures("diffusion")


@pytest.mark.parametrize("layout", checks.LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sampler_step(seed, dtype, layout, extension):
    for per_sample, clamp in ((True, "none"), (False, "float"), (True, "tensor"), (False, "rescale")):
        checks.check_step("cuda", dtype, layout, per_sample, clamp)
    assert extension.calls.get("diffusion_sampler_step_cuda", 0) > 0


def test_sampler_step_every_column_and_options(seed):
    for column in range(13):
        checks.check_every_coefficient_column("cuda", column)
    checks.check_missing_optional_tensors_count_as_zero("cuda")
    checks.check_mixed_dtypes("cuda")
    checks.check_return_aux_false_and_float64_coefs_table_row("cuda")
    checks.check_fused_guidance("cuda")


def test_misaligned_operands(seed):
    """Data pointers off the vector grid: the kernels' scalar loads and stores."""
    shape = (3, 5, 7)
    x = torch.randn(1 + 105)[1:].view(shape)
    m = torch.randn(shape, dtype=torch.float16)
    c = checks.random_coefs(3, True)
    got = ops.sampler_step(x, m, c, backend="cuda")
    want = ref.sampler_step(x.double(), m.double(), c)
    for g, w, p in zip(got, want, ref.sampler_step(x, m, c)):
        error_vs_reference(g, w, p)


def test_grid_stride_loops(seed):
    """More groups of 4 elements than the emulation's grid has threads (cuda.grid_cap: 3 blocks
    of 256): every elementwise kernel's grid-stride loop, seeded noise included."""
    shape = (2, 4, 24, 24)
    checks.check_step("cuda", torch.float16, "channels_last", True, "tensor", shape=shape)
    x = torch.randn(shape)
    z, _ = ops.sampler_step(x, x, checks.noise_only_coefs(), noise_seed=seed, backend="cuda")
    torch.testing.assert_close(z.double(), ref.seeded_normal(x, seed, torch.float64), rtol=1e-5, atol=2e-5)
    checks.check_add_noise("cuda", torch.float32, "contiguous", "v_prediction", shape=shape)


def test_seeded_noise(seed):
    checks.check_seeded_noise_is_the_philox_spec_and_deterministic("cuda")
    checks.check_add_noise_scalar_timestep_and_seeded_epsilon("cuda")


@pytest.mark.parametrize("target", [None] + list(ref.TARGETS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_add_noise(seed, dtype, target):
    for layout in checks.LAYOUTS:
        checks.check_add_noise("cuda", dtype, layout, target,
                               table_dtype=torch.float32 if layout == "strided" else torch.float64)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("use_weights", [True, False], ids=["weights", "noweights"])
def test_diffusion_loss(seed, use_weights, reduction):
    checks.check_diffusion_loss_forward_and_gradients("cuda", use_weights, reduction)


def test_diffusion_loss_several_chunks_per_sample(seed):
    """Samples of 16384 + 1000 elements: two blocks of the sums kernel per sample."""
    m, t = torch.randn(2, 17384), torch.randn(2, 17384)
    got = ops.diffusion_loss(m, t, reduction="none", backend="cuda")
    error_vs_reference(got, ref.diffusion_loss(m.double(), t.double(), None, "none"),
                       ref.diffusion_loss(m, t, None, "none"))


@pytest.mark.parametrize("rescale", [0.0, 0.7])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cfg_combine(seed, dtype, rescale):
    for layout in checks.LAYOUTS:
        u = checks.make(checks.SHAPE, dtype, layout)
        c = checks.make(checks.SHAPE, dtype, layout, scale=1.3)
        got = ops.cfg_combine(u, c, 7.5, rescale, backend="cuda")
        error_vs_reference(got, ref.cfg_combine(u.double(), c.double(), 7.5, rescale),
                           ref.cfg_combine(u, c, 7.5, rescale), name=f"{dtype} {layout} rescale={rescale}")


def test_cfg_rescale_several_chunks_per_sample(seed):
    u, c = torch.randn(2, 3, 80, 80), torch.randn(2, 3, 80, 80) * 1.2 + 0.1
    error_vs_reference(ops.cfg_combine(u, c, 6.0, 0.7, backend="cuda"),
                       ref.cfg_combine(u.double(), c.double(), 6.0, 0.7), ref.cfg_combine(u, c, 6.0, 0.7))


@pytest.mark.parametrize("dim,flip,shift,scale", [(320, True, 0, 1), (256, False, 1, 1), (33, False, 1, 1000),
                                                  (7, True, 0.5, 2.0), (1, False, 1, 1)])
def test_timestep_embedding(seed, dim, flip, shift, scale):
    checks.check_timestep_embedding("cuda", dim, flip, shift, scale)
