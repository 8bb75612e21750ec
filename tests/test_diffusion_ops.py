"""genfast.ops.diffusion against the float64 references: every backend that runs here (cpu,
triton under the interpreter, reference), layouts, odd sizes, per-sample vs shared coefficients,
every coefficient column, clamp/threshold, seeded noise, loss gradients, bad input,
torch.library and torch.compile; GPU-marked tests for cuda and triton on a GPU."""
import math

import pytest
import torch

from genfast.ops import diffusion as ops
from genfast.reference import diffusion as ref
from genfast.testing import error_vs_reference

from op_checks.diffusion import (CPU, LAYOUTS, SHAPE, SMALL, noise_only_coefs, check_add_noise,
    check_add_noise_scalar_timestep_and_seeded_epsilon, check_diffusion_loss_forward_and_gradients,
    check_every_coefficient_column, check_fused_guidance, check_missing_optional_tensors_count_as_zero,
    check_mixed_dtypes, check_return_aux_false_and_float64_coefs_table_row,
    check_seeded_noise_is_the_philox_spec_and_deterministic, check_step, check_timestep_embedding, make, random_coefs,
    require, schedule, upcast)

ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
INTERP_DTYPES = [torch.float32, torch.float16]
# ----------------------------------------------------------------------------- sampler_step


@pytest.mark.parametrize("clamp", ["none", "float", "tensor", "rescale"])
@pytest.mark.parametrize("per_sample", [True, False], ids=["per_sample", "shared"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_sampler_step_cpu(seed, dtype, layout, per_sample, clamp):
    require("sampler_step", "cpu", CPU, dtype)
    check_step("cpu", dtype, layout, per_sample, clamp)


@pytest.mark.parametrize("clamp", ["none", "tensor", "rescale"])
@pytest.mark.parametrize("per_sample", [True, False], ids=["per_sample", "shared"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("dtype", INTERP_DTYPES, ids=str)
def test_sampler_step_triton(seed, dtype, layout, per_sample, clamp):
    require("sampler_step", "triton", CPU, dtype)
    check_step("triton", dtype, layout, per_sample, clamp, shape=SMALL)


@pytest.mark.parametrize("clamp", ["none", "rescale"])
def test_sampler_step_reference_backend(seed, clamp):
    check_step("reference", torch.float32, "channels_last", True, clamp)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("column", range(13))
def test_every_coefficient_column(seed, backend, column):
    check_every_coefficient_column(backend, column)


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
def test_missing_optional_tensors_count_as_zero(seed, backend):
    check_missing_optional_tensors_count_as_zero(backend)


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
def test_mixed_dtypes(seed, backend):
    check_mixed_dtypes(backend)


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
def test_return_aux_false_and_float64_coefs_table_row(seed, backend):
    check_return_aux_false_and_float64_coefs_table_row(backend)


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
def test_fused_guidance(seed, backend):
    check_fused_guidance(backend)


def test_nan_propagates_through_the_clamp():
    x = torch.tensor([[float("nan"), 2.0, -2.0, 0.3]])
    c = torch.zeros(ref.NUM_STEP_COEFS, dtype=torch.float64)
    c[ref.X0_FROM_SAMPLE] = 1.0
    c[ref.PREV_X0] = 1.0
    for backend in ["cpu", "reference"]:
        prev, _ = ops.sampler_step(x, torch.zeros_like(x), c, x0_clamp=1.0, backend=backend)
        assert torch.isnan(prev[0, 0]) and prev[0, 1] == 1.0 and prev[0, 2] == -1.0 and prev[0, 3] == 0.3


def test_empty_batch():
    for backend in ["cpu", "reference"]:
        x = torch.empty(0, 4, 3)
        prev, aux = ops.sampler_step(x, x, torch.zeros(0, 16), backend=backend)
        assert prev.shape == aux.shape == (0, 4, 3)


def test_multithreaded_large_cpu(seed):
    old = torch.get_num_threads()
    torch.set_num_threads(max(2, old))
    try:
        check_step("cpu", torch.float32, "channels_last", True, "rescale", shape=(3, 4, 101, 103))
        check_step("cpu", torch.bfloat16, "contiguous", False, "float", shape=(2, 4, 64, 130))
    finally:
        torch.set_num_threads(old)


# ----------------------------------------------------------------------------- seeded noise


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
def test_seeded_noise_is_the_philox_spec_and_deterministic(backend):
    check_seeded_noise_is_the_philox_spec_and_deterministic(backend)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_seeded_noise_statistics(backend):
    n = 1 << 18 if backend == "cpu" else 1 << 15
    x = torch.zeros(2, n // 2)
    s = int.from_bytes(__import__("os").urandom(4), "little")
    z, _ = ops.sampler_step(x, x, noise_only_coefs(), noise_seed=s, backend=backend)
    z = z.double().reshape(-1)
    mean, var = z.mean().item(), z.var().item()
    assert abs(mean) < 5 / math.sqrt(n), f"mean {mean}"
    assert abs(var - 1) < 5 * math.sqrt(2 / n), f"variance {var}"
    # Tails and symmetry of a normal: P(|z| > 2) = 0.0455, P(z > 0) = 0.5.
    assert abs((z.abs() > 2).double().mean().item() - 0.0455) < 0.005
    assert abs((z > 0).double().mean().item() - 0.5) < 5 * 0.5 / math.sqrt(n)
    # Neighbouring elements are uncorrelated.
    assert abs((z[1:] * z[:-1]).mean().item()) < 5 / math.sqrt(n)


def test_seeded_noise_with_float64_and_channels_last():
    x = make((2, 3, 4, 5), torch.float64, "channels_last")
    z, _ = ops.sampler_step(x, x, noise_only_coefs(), noise_seed=123, backend="cpu")
    zr, _ = ops.sampler_step(x, x, noise_only_coefs(), noise_seed=123, backend="reference")
    assert z.stride() == x.stride()
    torch.testing.assert_close(z, zr, rtol=1e-5, atol=2e-5)


# ----------------------------------------------------------------------------- add_noise


@pytest.mark.parametrize("target", [None] + list(ref.TARGETS))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_add_noise_cpu(seed, dtype, layout, target):
    require("add_noise", "cpu", CPU, dtype)
    check_add_noise("cpu", dtype, layout, target)


@pytest.mark.parametrize("target", [None] + list(ref.TARGETS))
@pytest.mark.parametrize("dtype", INTERP_DTYPES, ids=str)
def test_add_noise_triton(seed, dtype, target):
    require("add_noise", "triton", CPU, dtype)
    check_add_noise("triton", dtype, "channels_last", target, shape=SMALL, table_dtype=torch.float32)


@pytest.mark.parametrize("target", ["v_prediction", "flow"])
def test_add_noise_reference_backend(seed, target):
    check_add_noise("reference", torch.float32, "strided", target)


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
def test_add_noise_scalar_timestep_and_seeded_epsilon(seed, backend):
    check_add_noise_scalar_timestep_and_seeded_epsilon(backend)


# ----------------------------------------------------------------------------- diffusion_loss


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("use_weights", [True, False], ids=["weights", "noweights"])
@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
def test_diffusion_loss_forward_and_gradients(seed, backend, use_weights, reduction):
    check_diffusion_loss_forward_and_gradients(backend, use_weights, reduction)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_diffusion_loss_cpu_dtypes(seed, dtype):
    m = make(SHAPE, dtype).requires_grad_()
    t = make(SHAPE, dtype)
    w = torch.rand(SHAPE[0], dtype=dtype)
    loss = ops.diffusion_loss(m, t, w, backend="cpu")
    (dm,) = torch.autograd.grad(loss, m)
    assert dm.dtype == dtype and loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    m64 = m.detach().double().requires_grad_()
    want = ref.diffusion_loss(m64, t.double(), w.double())
    (dm64,) = torch.autograd.grad(want, m64)
    mlow = m.detach().requires_grad_()
    lowp = ref.diffusion_loss(mlow, t, w)
    (dmlow,) = torch.autograd.grad(lowp, mlow)
    error_vs_reference(loss, want, lowp)
    error_vs_reference(dm, dm64, dmlow)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_diffusion_loss_gradcheck_float64(seed, backend):
    m = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    w = torch.rand(3, dtype=torch.float64, requires_grad=True)
    for reduction in ("mean", "none"):
        assert torch.autograd.gradcheck(lambda a, b, c: ops.diffusion_loss(a, b, c, reduction, backend=backend),
                                        (m, t, w))


def test_diffusion_loss_target_without_grad_gets_none(seed):
    m = torch.randn(2, 3, requires_grad=True)
    t = torch.randn(2, 3)
    ops.diffusion_loss(m, t, backend="cpu").backward()
    assert m.grad is not None and t.grad is None


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_min_snr_weights(seed, prediction_type):
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0).float()
    t = torch.randint(0, 1000, (64,))
    w = ops.min_snr_weights(t, abar, 5.0, prediction_type)
    snr = abar.double()[t] / (1 - abar.double()[t])
    base = torch.minimum(snr, torch.full_like(snr, 5.0))
    expected = {"epsilon": base / snr, "v_prediction": base / (snr + 1), "sample": base}[prediction_type]
    torch.testing.assert_close(w.double(), expected, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="prediction_type"):
        ops.min_snr_weights(t, abar, 5.0, "x0")
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 999\]"):
        ops.min_snr_weights(torch.tensor([1000]), abar, 5.0)


# ----------------------------------------------------------------------------- cfg_combine


@pytest.mark.parametrize("rescale", [0.0, 0.7])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided", "batch_inner"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_cfg_combine_cpu(seed, dtype, layout, rescale):
    require("per_sample_combine", "cpu", CPU, dtype)
    u = make(SHAPE, dtype, layout)
    c = make(SHAPE, dtype, layout, scale=1.3)
    got = ops.cfg_combine(u, c, 7.5, rescale, backend="cpu")
    error_vs_reference(got, ref.cfg_combine(upcast(u), upcast(c), 7.5, rescale), ref.cfg_combine(u, c, 7.5, rescale))
    if layout in ("contiguous", "channels_last") or (layout == "batch_inner" and rescale == 0):
        assert got.stride() == c.stride()


@pytest.mark.parametrize("rescale", [0.0, 0.7])
@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("dtype", INTERP_DTYPES, ids=str)
def test_cfg_combine_other_backends(seed, backend, dtype, rescale):
    require("per_sample_combine", backend, CPU, dtype)
    u = make(SMALL, dtype, "channels_last")
    c = make(SMALL, dtype, "channels_last", scale=1.3)
    got = ops.cfg_combine(u, c, 5.0, rescale, backend=backend)
    error_vs_reference(got, ref.cfg_combine(upcast(u), upcast(c), 5.0, rescale), ref.cfg_combine(u, c, 5.0, rescale))


def _diffusers_rescale_noise_cfg(noise_cfg, noise_pred_text, guidance_rescale=0.0):
    """diffusers' rescale_noise_cfg (pipeline_stable_diffusion.py), verbatim; importing it needs
    transformers, which the test environment does not have."""
    std_text = noise_pred_text.std(dim=list(range(1, noise_pred_text.ndim)), keepdim=True)
    std_cfg = noise_cfg.std(dim=list(range(1, noise_cfg.ndim)), keepdim=True)
    noise_pred_rescaled = noise_cfg * (std_text / std_cfg)
    noise_cfg = guidance_rescale * noise_pred_rescaled + (1 - guidance_rescale) * noise_cfg
    return noise_cfg


def test_cfg_rescale_matches_diffusers(seed):
    u = torch.randn(2, 4, 8, 8)
    c = torch.randn(2, 4, 8, 8) * 1.2 + 0.1
    g = 6.0
    want = _diffusers_rescale_noise_cfg(u + g * (c - u), c, guidance_rescale=0.7)
    torch.testing.assert_close(ops.cfg_combine(u, c, g, 0.7, backend="cpu"), want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- timestep_embedding


@pytest.mark.parametrize("dim,flip,shift,scale", [(320, True, 0, 1), (256, False, 1, 1), (33, False, 1, 1000),
                                                  (7, True, 0.5, 2.0), (1, False, 1, 1)])
@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
def test_timestep_embedding(seed, backend, dim, flip, shift, scale):
    check_timestep_embedding(backend, dim, flip, shift, scale)


def test_timestep_embedding_matches_diffusers(seed):
    embeddings = pytest.importorskip("diffusers.models.embeddings")
    t = torch.randint(0, 1000, (8,))
    for dim, flip, shift in ((320, True, 0), (128, False, 1), (33, True, 1)):
        want = embeddings.get_timestep_embedding(t, dim, flip, shift)
        # Arguments up to 1000 rad in float32 (ulp 6e-5): libm and torch's sin/exp differ by that.
        torch.testing.assert_close(ops.timestep_embedding(t, dim, flip, shift, backend="cpu"), want,
                                   rtol=0, atol=2e-4)


# ----------------------------------------------------------------------------- bad input


def _step_args():
    x = torch.randn(2, 3, 4)
    return x, torch.randn(2, 3, 4), torch.zeros(16)


@pytest.mark.parametrize("change,error,match", [
    (dict(model_output=torch.randn(2, 3, 5)), ValueError,
     r"model_output has shape \(2, 3, 5\) but the sample has shape \(2, 3, 4\)"),
    (dict(coefs=torch.zeros(15)), ValueError, r"coefs must have shape \(16,\) or \(B, 16\)"),
    (dict(coefs=torch.zeros(3, 16)), ValueError, r"B = sample.shape\[0\] = 2, got \(3, 16\)"),
    (dict(coefs=torch.zeros(16, dtype=torch.float16)), TypeError, "coefs must be float32 or float64"),
    (dict(coefs=torch.zeros(16, device="meta")), ValueError, "coefs is on meta but the sample is on cpu"),
    (dict(coefs=[0.0] * 16), TypeError, "coefs must be a torch.Tensor"),
    (dict(history=torch.randn(2, 3)), ValueError, "history has shape"),
    (dict(noise=torch.randn(2, 3, 4).long()), TypeError, "noise must be float32"),
    (dict(x0_clamp=-1.0), ValueError, "x0_clamp must be >= 0"),
    (dict(x0_clamp=torch.ones(3)), ValueError, r"x0_clamp must have shape \(B,\)"),
    (dict(x0_rescale=True), ValueError, "x0_rescale needs x0_clamp"),
    (dict(noise=torch.randn(2, 3, 4), noise_seed=3), ValueError, "either noise or noise_seed"),
    (dict(noise_seed=-1), ValueError, "noise_seed must be in"),
    (dict(noise_seed=1.5), TypeError, "noise_seed must be an int"),
    (dict(model_output_uncond=torch.randn(2, 3, 4)), ValueError, "needs both model_output_uncond and guidance_scale"),
    (dict(out_dtype=torch.int32), TypeError, "out_dtype must be None or one of"),
    (dict(backend="tpu"), ValueError, "unknown backend 'tpu'"),
])
def test_sampler_step_bad_input(change, error, match):
    x, m, c = _step_args()
    kwargs = dict(sample=x, model_output=m, coefs=c)
    kwargs.update(change)
    with pytest.raises(error, match=match):
        ops.sampler_step(**kwargs)


@pytest.mark.parametrize("change,error,match", [
    (dict(timesteps=torch.tensor([0, 50])), ValueError, r"timesteps must lie in \[0, 49\]"),
    (dict(timesteps=torch.tensor([-1, 3])), ValueError, r"timesteps must lie in \[0, 49\]"),
    (dict(timesteps=torch.tensor([1.0, 2.0])), TypeError, "timesteps must be an integer tensor"),
    (dict(timesteps=torch.tensor([1, 2, 3])), ValueError, r"timesteps must have shape \(B,\)"),
    (dict(noise=torch.randn(2, 3)), ValueError, "noise has shape"),
    (dict(noise=None), TypeError, "noise must be a torch.Tensor"),
    (dict(signal_scale=torch.ones(50, 1)), ValueError, "signal_scale must be a non-empty 1-D table"),
    (dict(noise_scale=torch.ones(49)), ValueError, "same length"),
    (dict(target="x0"), ValueError, "target must be None or one of"),
])
def test_add_noise_bad_input(change, error, match):
    a, s = schedule()
    kwargs = dict(x0=torch.randn(2, 3, 4), noise=torch.randn(2, 3, 4), timesteps=torch.tensor([3, 4]),
                  signal_scale=a, noise_scale=s)
    kwargs.update(change)
    with pytest.raises(error, match=match):
        ops.add_noise(**kwargs)


def test_loss_cfg_embedding_bad_input():
    m = torch.randn(2, 3)
    with pytest.raises(ValueError, match="target has shape"):
        ops.diffusion_loss(m, torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"weights must have shape \(B,\)"):
        ops.diffusion_loss(m, m, torch.ones(3))
    with pytest.raises(ValueError, match="reduction must be"):
        ops.diffusion_loss(m, m, reduction="max")
    with pytest.raises(ValueError, match="uncond has shape"):
        ops.cfg_combine(torch.randn(2, 4), m, 7.5)
    with pytest.raises(ValueError, match="guidance_rescale must be >= 0"):
        ops.cfg_combine(m, m, 7.5, -0.1)
    with pytest.raises(ValueError, match="timesteps must be 1-D"):
        ops.timestep_embedding(torch.zeros(2, 2), 8)
    with pytest.raises(ValueError, match="divide by zero"):
        ops.timestep_embedding(torch.zeros(2), 2, downscale_freq_shift=1)
    with pytest.raises(ValueError, match="dim must be an int >= 1"):
        ops.timestep_embedding(torch.zeros(2), 0)


# ----------------------------------------------------------------------------- typed native calls
# The extension's entry points check every tensor by name before any kernel runs.


def _step_entry(**change):
    from genfast import _ext

    x = torch.randn(2, 3, 5)
    args = dict(prev=torch.empty_like(x), aux=None, sample=x, model_output=torch.randn(2, 3, 5),
                model_output_uncond=None, history=None, history2=None, noise=None, coefs=random_coefs(2, True),
                clamp=None, seed=None, options=ops._step_options(-1.0, False, 1.0), num_threads=1)
    args.update(change)
    prev, aux, sample, model_output = (args.pop(k) for k in ("prev", "aux", "sample", "model_output"))
    _ext._C.diffusion_sampler_step_cpu(prev, aux, sample, model_output, **args)
    return prev


def test_sampler_step_entry_runs_and_checks_its_arguments():
    pytest.importorskip("genfast._C")
    torch.manual_seed(0)
    x, m, c = torch.randn(2, 3, 5), torch.randn(2, 3, 5), random_coefs(2, True)
    error_vs_reference(_step_entry(sample=x, model_output=m, coefs=c), ref.sampler_step(x.double(), m.double(), c)[0],
                       ref.sampler_step(x, m, c)[0])
    with pytest.raises(ValueError, match="diffusion_sampler_step_cpu: model_output must have the shape of sample"):
        _step_entry(model_output=torch.randn(2, 3, 4))
    with pytest.raises(TypeError, match="diffusion_sampler_step_cpu: coefs must be float32 or float64"):
        _step_entry(coefs=torch.zeros(2, 16, dtype=torch.float16))
    with pytest.raises(TypeError, match="model_output must be float32, float16, bfloat16 or float64"):
        _step_entry(model_output=torch.zeros(2, 3, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match="model_output is required, got None"):
        _step_entry(model_output=None)
    with pytest.raises(ValueError, match=r"coefs must have shape \(2, 16\)"):
        _step_entry(coefs=torch.zeros(3, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="history must have the memory layout"):
        _step_entry(history=torch.randn(2, 5, 3).transpose(1, 2))
    with pytest.raises(ValueError, match="noise and seed are exclusive"):
        _step_entry(noise=torch.randn(2, 3, 5), seed=3)
    with pytest.raises(ValueError, match="batch dimension outermost"):
        x = torch.randn(3, 5, 2).permute(2, 0, 1)
        _step_entry(sample=x, model_output=x, prev=torch.empty_like(x))


def test_diffusion_entries_check_their_arguments():
    pytest.importorskip("genfast._C")
    from genfast import _ext

    C = _ext._C
    x = torch.randn(2, 4)
    t = torch.tensor([1, 2])
    table = torch.rand(5)
    with pytest.raises(TypeError, match="diffusion_add_noise_cpu: timesteps must be int64"):
        C.diffusion_add_noise_cpu(torch.empty_like(x), None, x, x, t.int(), table, table, seed=None,
                                  options=ops._noise_options(0), num_threads=1)
    with pytest.raises(ValueError, match=r"noise_scale must have shape \(5\)"):
        C.diffusion_add_noise_cpu(torch.empty_like(x), None, x, x, t, table, torch.rand(4), seed=None,
                                  options=ops._noise_options(0), num_threads=1)
    with pytest.raises(ValueError, match=r"diffusion_per_sample_sums_cpu: out must have shape \(2, 4\)"):
        C.diffusion_per_sample_sums_cpu(x, x, torch.empty(2, 1, dtype=torch.float64),
                                        options=ops._sums_options(ops.SUMS_CFG, 7.5), num_threads=1)
    with pytest.raises(ValueError, match=r"diffusion_combine_cpu: factor must have shape \(2\)"):
        C.diffusion_combine_cpu(torch.empty_like(x), None, x, x, factor=torch.ones(3),
                                options=ops._combine_options(1.0, 2.0), num_threads=1)
    with pytest.raises(TypeError, match="diffusion_timestep_embedding_cpu: out must be float32"):
        C.diffusion_timestep_embedding_cpu(torch.empty(2, 8, dtype=torch.float64), t,
                                           options=ops._embed_options(False, 1.0, 1.0, 10000.0), num_threads=1)


def test_diffusion_options_are_keyword_and_complete():
    pytest.importorskip("genfast._C")
    from genfast import _ext

    C = _ext._C
    with pytest.raises(TypeError):  # a missing field
        C.SamplerStepOptions(clamp_value=-1.0, x0_rescale=False)
    with pytest.raises(TypeError):  # an unknown field
        C.SamplerStepOptions(clamp_value=-1.0, x0_rescale=False, guidance_scale=1.0, clamp=2.0)
    with pytest.raises(TypeError):  # positional
        C.CombineOptions(1.0, 2.0)
    with pytest.raises(ValueError, match="target must be None, 'epsilon'"):
        C.AddNoiseOptions(target="eps")
    with pytest.raises(ValueError, match="mode must be 'loss' or 'cfg'"):
        C.PerSampleSumsOptions(mode="mse", scale=0.0)
    assert C.AddNoiseOptions(target=None).target is None
    assert C.PerSampleSumsOptions(mode="cfg", scale=2.0).width == ops.SUMS_WIDTH[ops.SUMS_CFG]
    # The names the Python side uses are the extension's.
    assert set(C.DIFFUSION_TARGETS) == set(ops.TARGETS)
    assert all(C.PerSampleSumsOptions(mode=ops.SUMS_MODE_NAMES[m], scale=0.0).width == w
               for m, w in ops.SUMS_WIDTH.items())


def test_diffusion_ops_are_native_ops():
    """Every diffusion op is defined through genfast.ops._define (one way to define an op)."""
    from genfast.ops._define import NativeOp

    for op in (ops.SAMPLER_STEP, ops.ADD_NOISE, ops.PER_SAMPLE_SUMS, ops.PER_SAMPLE_COMBINE, ops.TIMESTEP_EMBEDDING):
        assert isinstance(op, NativeOp) and hasattr(torch.ops.genfast, op.name)


# ----------------------------------------------------------------------------- torch.library / compile


def test_opcheck(seed):
    x = make((2, 3, 4, 5), torch.float32, "channels_last")
    m = make((2, 3, 4, 5), torch.float32)
    c = random_coefs(2, True)
    clamp = torch.rand(2) + 0.5
    torch.library.opcheck(torch.ops.genfast.diffusion_sampler_step.default,
                          (x, m, c, m, None, m, None, clamp, -1.0, True, 1.0, -1, True, torch.float16,
                           torch.float32, "cpu"))
    torch.library.opcheck(torch.ops.genfast.diffusion_sampler_step.default,
                          (x, m, c[0], None, None, None, m, None, 0.5, False, 3.0, 7, False, torch.float32,
                           torch.float32, "cpu"))
    a, s = schedule(dtype=torch.float32)
    torch.library.opcheck(torch.ops.genfast.diffusion_add_noise.default,
                          (x, m, torch.tensor([1, 2]), a, s, 2, -1, "cpu"))
    torch.library.opcheck(torch.ops.genfast.diffusion_per_sample_sums.default, (x, m, 1, 3.0, "cpu"))
    torch.library.opcheck(torch.ops.genfast.diffusion_per_sample_combine.default,
                          (x, m, torch.rand(2), 0.0, -1.0, True, torch.float32, torch.float32, "cpu"))
    torch.library.opcheck(torch.ops.genfast.diffusion_timestep_embedding.default,
                          (torch.tensor([3, 999]), 9, True, 1.0, 1.0, 10000.0, "cpu"))


def test_torch_compile_fullgraph_sampler_step_and_add_noise(seed):
    torch._dynamo.reset()
    a, s = schedule(dtype=torch.float32)
    coefs = random_coefs(3, False)
    bound = torch.rand(3) + 0.5

    def step(x, m, h):
        prev, aux = ops.sampler_step(x, m, coefs, h, x0_clamp=bound, noise_seed=5, backend="cpu")
        return prev * 2, aux

    def noising(x0, noise, t):
        return ops.add_noise(x0, noise, t, a, s, "v_prediction", backend="cpu")

    x, m, h = (torch.randn(SHAPE) for _ in range(3))
    t = torch.randint(0, 50, (3,))
    for fn, args in ((step, (x, m, h)), (noising, (x, m, t))):
        compiled = torch.compile(fn, fullgraph=True, backend="inductor")
        for got, want in zip(compiled(*args), fn(*args)):
            torch.testing.assert_close(got, want)


def test_torch_compile_fullgraph_loss_backward(seed):
    torch._dynamo.reset()

    def loss_fn(m, t, w):
        return ops.diffusion_loss(m, t, w, backend="cpu")

    m = torch.randn(SHAPE, requires_grad=True)
    t, w = torch.randn(SHAPE), torch.rand(SHAPE[0])
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    loss = compiled(m, t, w)
    (g,) = torch.autograd.grad(loss, m)
    m2 = m.detach().requires_grad_()
    want = loss_fn(m2, t, w)
    (g2,) = torch.autograd.grad(want, m2)
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(g, g2)


# ----------------------------------------------------------------------------- GPU


GPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_gpu_sampler_step_and_add_noise(seed, backend, dtype, layout):
    device = torch.device("cuda")
    require("sampler_step", backend, device, dtype)
    for per_sample, clamp, shape in ((True, "rescale", SHAPE), (False, "float", (4, 4, 64, 65)),
                                     (True, "none", (16, 4, 64, 64))):
        check_step(backend, dtype, layout, per_sample, clamp, shape=shape, device=device,
                   coefs=random_coefs(shape[0], per_sample, device))
    for target in [None] + list(ref.TARGETS):
        check_add_noise(backend, dtype, layout, target, shape=(5, 4, 33, 17), device=device)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_loss_cfg_embedding_and_noise(seed, backend):
    device = torch.device("cuda")
    require("per_sample_sums", backend, device, torch.float32)
    for dtype in GPU_DTYPES:
        u = make((3, 4, 64, 63), dtype, "channels_last", device)
        c = make((3, 4, 64, 63), dtype, "channels_last", device, scale=1.3)
        for rescale in (0.0, 0.7):
            error_vs_reference(ops.cfg_combine(u, c, 7.5, rescale, backend=backend),
                               ref.cfg_combine(u.double(), c.double(), 7.5, rescale),
                               ref.cfg_combine(u, c, 7.5, rescale))
        m = u.detach().requires_grad_()
        w = torch.rand(3, device=device)
        loss = ops.diffusion_loss(m, c, w, backend=backend)
        (dm,) = torch.autograd.grad(loss, m)
        m64 = u.double().requires_grad_()
        want = ref.diffusion_loss(m64, c.double(), w.double())
        (dm64,) = torch.autograd.grad(want, m64)
        mlow = u.detach().requires_grad_()
        lowp = ref.diffusion_loss(mlow, c, w)
        (dmlow,) = torch.autograd.grad(lowp, mlow)
        error_vs_reference(loss, want, lowp)
        error_vs_reference(dm, dm64, dmlow)
    t = torch.randint(0, 1000, (16,), device=device)
    error_vs_reference(ops.timestep_embedding(t, 320, True, 0, backend=backend),
                       ref.timestep_embedding(t.double(), 320, True, 0), ref.timestep_embedding(t, 320, True, 0),
                       floor=2e-4)
    x = torch.zeros(4, 1 << 16, device=device)
    z, _ = ops.sampler_step(x, x, noise_only_coefs().to(device), noise_seed=11, backend=backend)
    spec = ref.seeded_normal(x, 11, torch.float64)
    torch.testing.assert_close(z.double(), spec, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_misaligned_and_no_host_sync(backend):
    device = torch.device("cuda")
    require("sampler_step", backend, device, torch.float16)
    big = torch.randn(1 + 3 * 5 * 7 * 9, device=device, dtype=torch.float16)
    x = big[1:].view(SHAPE)  # not 16-byte aligned
    m = torch.randn(SHAPE, device=device, dtype=torch.float16)
    c = random_coefs(3, True, device)
    got = ops.sampler_step(x, m, c, backend=backend)
    want = ref.sampler_step(x.double(), m.double(), c)
    for g, w, p in zip(got, want, ref.sampler_step(x, m, c)):
        error_vs_reference(g, w, p)
    a, s = (t.to(device) for t in schedule())
    t = torch.randint(0, 50, (3,), device=device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        ops.sampler_step(x, m, c, x0_clamp=torch.ones(3, device=device), noise_seed=3, backend=backend)
        ops.add_noise(x, None, t, a, s, "v_prediction", noise_seed=4, backend=backend)
        ops.diffusion_loss(x, m, torch.ones(3, device=device), backend=backend)
        ops.cfg_combine(x, m, 7.5, 0.7, backend=backend)
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_64bit_indexing(backend):
    device = torch.device("cuda")
    require("sampler_step", backend, device, torch.float16)
    n = (1 << 31) + 4099
    x = torch.ones(1, n, device=device, dtype=torch.float16)
    c = torch.zeros(16, dtype=torch.float64, device=device)
    c[ref.PREV_SAMPLE] = 2.0
    prev, _ = ops.sampler_step(x, x, c, return_aux=False, backend=backend)
    assert prev[0, -5:].eq(2).all() and prev[0, :5].eq(2).all()
    del prev
    a = torch.ones(1, device=device)
    noisy = ops.add_noise(x, x, torch.zeros(1, dtype=torch.int64, device=device), a, a * 0.5, backend=backend)
    assert noisy[0, -3:].eq(1.5).all()
