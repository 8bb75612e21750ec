"""genfast.ops.filtered_lrelu against the float64 reference chain (bias_act + upfirdn2d):
every backend that runs here, forward and gradients (dx, db), up/down factors, separable and
full filters, flip, clamp, padding forms, layouts, gradcheck/gradgradcheck, bad inputs,
torch.library and torch.compile."""

import importlib

import pytest
import torch

from genfast.ops import filtered_lrelu
from genfast.ops.filtered_lrelu import CODE_CLAMPED, CODE_NEGATIVE, CODE_POSITIVE, DISPATCH
from genfast.reference import filtered_lrelu as reference
from op_checks.filtered_lrelu import (CONFIGS, CONFIG_IDS, CPU, GAIN, SLOPE, avoid_kinks, check, default_padding,
                                      make_filter, pre_activation)


def require(backend, device, dtype):
    reason = DISPATCH.unavailable_reason(backend, device, dtype)
    if reason:
        pytest.skip(f"{backend} cannot run here: {reason}")


@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_cpu_backend_matches_reference(seed, dtype, config):
    require("cpu", CPU, dtype)
    up, down, fu, fd, padding, flip, clamp = config
    check("cpu", dtype, up, down, fu, fd, padding, flip, clamp, shape=(2, 3, 7, 9))


@pytest.mark.parametrize("layout", ["channels_last", "strided", "permuted"])
def test_cpu_backend_layouts(seed, layout):
    require("cpu", CPU, torch.float32)
    check("cpu", torch.float32, layout=layout, shape=(2, 5, 8, 7), clamp=0.9)
    check("cpu", torch.float16, 1, 2, ("full", 3), ("sep", 4), [2, 1], True, None, layout=layout, shape=(3, 4, 6, 9))


def test_cpu_backend_odd_sizes_and_no_bias(seed):
    require("cpu", CPU, torch.float32)
    check("cpu", torch.float32, shape=(1, 1, 1, 1), padding=[9, 8, 10, 7], use_bias=False)
    check("cpu", torch.float32, 2, 2, ("sep", 3), ("full", 2), [1, 0, 1, 2], shape=(3, 2, 1, 13), use_bias=False)
    check("cpu", torch.float64, shape=(1, 7, 17, 3), gain=0.7, slope=0.05, clamp=0.5)


def test_cpu_backend_bands_on_several_threads(seed):
    """Few planes and tall images: the C++ kernel splits planes into bands of output rows
    (their intermediate halos overlap) across threads; signs are recorded once per pixel."""
    old = torch.get_num_threads()
    torch.set_num_threads(max(2, old))
    try:
        check("cpu", torch.float32, shape=(1, 2, 61, 23), clamp=0.8)
        check("cpu", torch.float32, 2, 4, ("full", 4), ("sep", 8), [9, 7, 8, 10], True, None, shape=(1, 1, 75, 9))
    finally:
        torch.set_num_threads(old)


TRITON_CONFIGS = [CONFIGS[1], CONFIGS[2], CONFIGS[4], CONFIGS[6]]


@pytest.mark.parametrize("config", TRITON_CONFIGS, ids=[CONFIG_IDS[CONFIGS.index(c)] for c in TRITON_CONFIGS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_triton_backend_matches_reference(seed, dtype, config):
    require("triton", CPU, dtype)
    up, down, fu, fd, padding, flip, clamp = config
    check("triton", dtype, up, down, fu, fd, padding, flip, clamp, shape=(1, 2, 6, 7))


def test_triton_backend_layouts_and_tiles(seed):
    """channels_last and a strided view; an output wider than one 16 x 16 tile."""
    require("triton", CPU, torch.float32)
    check("triton", torch.float32, layout="channels_last", shape=(1, 2, 5, 6))
    check("triton", torch.float32, 1, 1, ("sep", 3), ("sep", 2), [1, 1], layout="strided", shape=(1, 1, 5, 21),
          clamp=0.8)


@pytest.mark.parametrize("config", [CONFIGS[0], CONFIGS[2], CONFIGS[5]], ids=lambda c: f"up{c[0]}-down{c[1]}")
def test_reference_backend_through_dispatch(seed, config):
    up, down, fu, fd, padding, flip, clamp = config
    check("reference", torch.float32, up, down, fu, fd, padding, flip, clamp, layout="channels_last",
          shape=(2, 2, 6, 5))


def test_backends_agree_on_the_sign_record(seed):
    """The record the backward reads: 0 positive, 1 negative, 2 clamped, per upsampled pixel."""
    x = torch.randn(2, 3, 6, 7)
    b = torch.randn(3)
    fu, fd = make_filter("sep", 6), make_filter("full", 4)
    z = pre_activation(x.double(), b.double(), fu, 2, [4, 3, 5, 2], False)
    v = torch.where(z > 0, z, z * SLOPE) * GAIN
    # The clamp at the 75th percentile of |v|: every record code occurs (a fixed clamp of 0.5
    # clamped nothing for one seed whose |v| stayed below 0.49).
    clamp = float(v.abs().quantile(0.75))
    want = None
    for backend in ["reference", "cpu", "triton"]:
        if DISPATCH.unavailable_reason(backend, CPU, torch.float32):
            continue
        y, signs = torch.ops.genfast.filtered_lrelu(x, fu, fd, b, 2, 2, 4, 3, 5, 2, GAIN, SLOPE, clamp, False, True,
                                                    backend)
        if want is None:
            expected = torch.where(z > 0, CODE_POSITIVE, CODE_NEGATIVE)
            expected = torch.where(v.abs() > clamp, CODE_CLAMPED, expected).to(torch.uint8)
            assert signs.shape == expected.shape and signs.dtype == torch.uint8
            near = (z.abs() < 1e-5) | ((v.abs() - clamp).abs() < 1e-5)
            assert ((signs == expected) | near).all()
            assert (signs == CODE_CLAMPED).any() and (signs == CODE_NEGATIVE).any() and (signs == CODE_POSITIVE).any()
            want = signs
        else:
            # Only pixels that some output reads are recorded by the fused kernels.
            assert signs.shape == want.shape
            uh, uw = signs.shape[2:]
            oh, ow = y.shape[2:]
            used_h, used_w = min(uh, (oh - 1) * 2 + fd.shape[0]), min(uw, (ow - 1) * 2 + fd.shape[1])
            assert torch.equal(signs[..., :used_h, :used_w], want[..., :used_h, :used_w]), backend


# ----------------------------------------------------------------------------- derivatives


@pytest.mark.parametrize("backend,config", [("cpu", CONFIGS[1]), ("cpu", CONFIGS[2]), ("cpu", CONFIGS[4]),
                                            ("cpu", CONFIGS[6]), ("reference", CONFIGS[2])],
                         ids=lambda v: v if isinstance(v, str) else f"up{v[0]}-down{v[1]}")
def test_gradcheck_and_gradgradcheck_float64(seed, backend, config):
    require(backend, CPU, torch.float64)
    up, down, fu, fd, padding, flip, clamp = config
    fu_t, fd_t = make_filter(*fu), make_filter(*fd)
    padding = default_padding(fu, fd) if padding is None else padding
    b = torch.randn(2, dtype=torch.float64) * 0.3
    for attempt in range(5):  # a rare draw has pixels the push cannot free (up 4: 16 per input): draw again
        try:
            x = avoid_kinks(torch.randn(1, 2, 4, 5, dtype=torch.float64), b, fu_t, up, padding, flip, clamp, gain=1.3,
                            slope=0.3, delta=1e-2)
            break
        except AssertionError:
            if attempt == 4:
                raise
    x.requires_grad_()
    b.requires_grad_()

    def fn(x_, b_):
        return filtered_lrelu(x_, fu_t, fd_t, b_, up, down, padding, gain=1.3, slope=0.3, clamp=clamp,
                              flip_filter=flip, backend=backend)

    assert torch.autograd.gradcheck(fn, (x, b))
    assert torch.autograd.gradgradcheck(fn, (x, b))


def test_second_derivative_through_the_mask_is_zero(seed):
    """R1-style double backward: d/dx <w, dL/dx> with L = sum(y^2) is 2 J^T J w, because the
    backward is linear in dy with a fixed mask (its derivative in x is zero almost
    everywhere); the reference's autograd says the same."""
    fu = make_filter("sep", 4)
    x = avoid_kinks(torch.randn(1, 2, 5, 5, dtype=torch.float64), None, fu, 2, [3, 3], False, None)
    w = torch.randn(1, 2, 5, 5, dtype=torch.float64)
    results = []
    for fn in (lambda t: filtered_lrelu(t, fu, fu, None, 2, 2, [3, 3], backend="cpu"),
               lambda t: reference(t, fu, fu, None, 2, 2, [3, 3])):
        xg = x.clone().requires_grad_()
        (dx,) = torch.autograd.grad(fn(xg).square().sum(), xg, create_graph=True)
        (ddx,) = torch.autograd.grad((dx * w).sum(), xg)
        results.append(ddx)
    torch.testing.assert_close(results[0], results[1])
    assert results[0].abs().max() > 0


def test_empty_batch_and_identity_filters():
    for backend in ["cpu", "reference"]:
        x = torch.empty(0, 3, 4, 4, requires_grad=True)
        y = filtered_lrelu(x, None, None, torch.zeros(3), backend=backend)
        assert y.shape == (0, 3, 4, 4)
        y.sum().backward()
        assert x.grad.shape == x.shape
    # Identity filters, up = down = 1: plain bias + lrelu * gain + clamp.
    x = torch.randn(2, 3, 4, 5)
    b = torch.randn(3)
    want = (torch.nn.functional.leaky_relu(x + b.view(1, 3, 1, 1), 0.2) * GAIN).clamp(-0.5, 0.5)
    torch.testing.assert_close(filtered_lrelu(x, b=b, clamp=0.5, backend="cpu"), want)


def test_nan_propagates(seed):
    x = torch.randn(1, 1, 5, 5)
    x[0, 0, 2, 2] = float("nan")
    f = make_filter("sep", 2)
    for backend in ["cpu", "reference"]:
        y = filtered_lrelu(x, f, f, None, 2, 2, [1, 1], backend=backend)
        assert torch.isnan(y).any() and not torch.isnan(y).all()


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(b=torch.zeros(4)), ValueError, r"b must be 1-D with x.shape\[1\] = 3 elements, got shape \(4,\)"),
    (dict(b=torch.zeros(3, dtype=torch.float64)), TypeError, "b must have the dtype of x"),
    (dict(b=[0.0, 0.0, 0.0]), TypeError, "b must be a torch.Tensor or None"),
    (dict(fu=torch.ones(2, 2, 2)), ValueError, "fu must be 1-D .* or 2-D"),
    (dict(fd=torch.ones(3, dtype=torch.float64)), TypeError, "fd must be float32"),
    (dict(fu=torch.ones(0)), ValueError, "fu must have at least one tap"),
    (dict(fu=[1.0, 2.0]), TypeError, "fu must be a torch.Tensor or None"),
    (dict(up=0), ValueError, "up must be >= 1, got 0"),
    (dict(down=1.5), TypeError, "down must be an int"),
    (dict(up=True), TypeError, "up must be an int"),
    (dict(padding=[1, 2, 3]), TypeError, "padding must be an int or a list/tuple of 2"),
    (dict(fd=torch.ones(12), padding=-2), ValueError, "output would be empty along y"),
    (dict(clamp=-1.0), ValueError, "clamp must be >= 0"),
    (dict(gain="2"), TypeError, "gain must be a real number"),
    (dict(slope=float("nan")), ValueError, "slope must not be NaN"),
    (dict(flip_filter=1), TypeError, "flip_filter must be a bool"),
    (dict(backend="tpu"), ValueError, "unknown backend 'tpu'"),
])
def test_bad_arguments_raise_clear_errors(kwargs, error, match):
    x = torch.randn(2, 3, 6, 5)
    with pytest.raises(error, match=match):
        filtered_lrelu(x, **kwargs)


def test_bad_x_raises_clear_errors():
    with pytest.raises(ValueError, match=r"x must be 4-D \[batch, channels, height, width\], got shape \(3, 4, 5\)"):
        filtered_lrelu(torch.randn(3, 4, 5))
    with pytest.raises(TypeError, match="x must be float32, float16, bfloat16 or float64, got torch.int64"):
        filtered_lrelu(torch.ones(1, 1, 2, 2, dtype=torch.int64))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        filtered_lrelu([[1.0]])


def test_device_mismatch_and_filter_gradient_raise():
    x = torch.randn(1, 2, 4, 4)
    with pytest.raises(ValueError, match="b is on meta but x is on cpu"):
        filtered_lrelu(x, b=torch.zeros(2, device="meta"))
    with pytest.raises(ValueError, match="fu is on meta but x is on cpu"):
        filtered_lrelu(x, fu=torch.ones(3, device="meta"))
    with pytest.raises(ValueError, match="gradients with respect to the filter fd are not supported"):
        filtered_lrelu(x, fd=torch.ones(1, requires_grad=True))


# ----------------------------------------------------------------------------- torch.library / compile


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_opcheck(seed, backend):
    require(backend, CPU, torch.float32)
    x = torch.randn(2, 3, 5, 6).to(memory_format=torch.channels_last)
    b = torch.randn(3)
    fu, fd = make_filter("sep", 4), make_filter("full", 3)
    geometry = (2, 2, 3, 2, 2, 3)
    torch.library.opcheck(torch.ops.genfast.filtered_lrelu.default,
                          (x, fu, fd, b, *geometry, GAIN, SLOPE, 0.7, False, True, backend))
    torch.library.opcheck(torch.ops.genfast.filtered_lrelu.default,
                          (x[..., ::2], fu, fd, None, *geometry, GAIN, SLOPE, -1.0, True, False, backend))
    y, signs = torch.ops.genfast.filtered_lrelu(x, fu, fd, b, *geometry, GAIN, SLOPE, 0.7, False, True, backend)
    dy = torch.randn_like(y)
    torch.library.opcheck(torch.ops.genfast.filtered_lrelu_masked.default,
                          (dy, fu, fd, signs, *geometry, 5, 6, GAIN, SLOPE, False, True, backend))
    torch.library.opcheck(torch.ops.genfast.filtered_lrelu_masked.default,
                          (x, fu, fd, signs, *geometry, 5, 6, GAIN, SLOPE, False, False, backend))


def _compiled_matches_eager(backend_name):
    conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    bias = torch.nn.Parameter(torch.randn(4) * 0.1)
    fu, fd = make_filter("sep", 6), make_filter("sep", 6)

    def model(x):
        h = filtered_lrelu(conv(x), fu, fd, bias, 2, 2, [5, 4], clamp=3.0, backend="cpu")
        return h.square().mean()

    x = torch.randn(2, 3, 6, 7)
    compiled = torch.compile(model, fullgraph=True, backend=backend_name)
    loss_c = compiled(x)
    loss_c.backward()
    params = (conv.weight, conv.bias, bias)
    grads_c = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    loss_e = model(x)
    loss_e.backward()
    torch.testing.assert_close(loss_c, loss_e)
    for gc, p in zip(grads_c, params):
        torch.testing.assert_close(gc, p.grad)


def test_torch_compile_fullgraph_aot_eager(seed):
    require("cpu", CPU, torch.float32)
    torch._dynamo.reset()
    _compiled_matches_eager("aot_eager")


def test_torch_compile_fullgraph_inductor(seed):
    require("cpu", CPU, torch.float32)
    torch._dynamo.reset()
    _compiled_matches_eager("inductor")


# ----------------------------------------------------------------------------- GPU


GPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_gpu_backends_match_reference(seed, backend, dtype, config):
    device = torch.device("cuda")
    require(backend, device, dtype)
    up, down, fu, fd, padding, flip, clamp = config
    for layout, shape in (("contiguous", (2, 3, 7, 9)), ("channels_last", (4, 16, 36, 36)),
                          ("strided", (2, 5, 19, 23))):
        check(backend, dtype, up, down, fu, fd, padding, flip, clamp, layout=layout, shape=shape, device=device)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_stylegan3_layer_shape(seed, backend):
    """The common StyleGAN3 layer: 36x36 -> up 2 -> 12-tap filters -> down 2, 128 channels."""
    device = torch.device("cuda")
    require(backend, device, torch.float16)
    check(backend, torch.float16, 2, 2, ("sep", 12), ("sep", 12), [10, 10, 10, 10], clamp=256.0,
          shape=(4, 128, 36, 36), device=device)
    check(backend, torch.float32, 2, 2, ("sep", 12), ("sep", 12), [10, 10, 10, 10], clamp=None,
          shape=(2, 64, 36, 36), device=device)


@pytest.mark.gpu
def test_gpu_cuda_float64(seed):
    device = torch.device("cuda")
    require("cuda", device, torch.float64)
    check("cuda", torch.float64, 2, 2, ("sep", 12), ("sep", 12), [10, 9, 11, 8], clamp=0.9, shape=(2, 3, 9, 11),
          device=device)


# ----------------------------------------------------------------------------- typed native calls


def test_entry_checks_its_arguments_and_shares_the_sign_codes():
    """filtered_lrelu_cpu reads sizes, strides, dtype and taps from the tensors and checks each
    by name; the sign record's codes are the extension's."""
    pytest.importorskip("genfast._C")
    from genfast import _ext
    module = importlib.import_module("genfast.ops.filtered_lrelu")

    C = _ext._C
    assert C.FILTERED_LRELU_SIGN_CODES == {"positive": CODE_POSITIVE, "negative": CODE_NEGATIVE,
                                           "clamped": CODE_CLAMPED}
    x, f = torch.randn(2, 3, 6, 5), torch.rand(4)
    plan = module.forward_plan(6, 5, f, f, 2, 2, (2, 1, 2, 1))
    options = module._options(module.ACT, plan, 1.4, 0.2, -1.0)
    out = torch.empty(2, 3, plan.oh, plan.ow)
    signs = torch.empty(2, 3, plan.th, plan.tw, dtype=torch.uint8)
    C.filtered_lrelu_cpu(out, x, b=None, signs=signs, g1=f, g2=f, options=options, num_threads=1)
    assert torch.isfinite(out).all() and set(signs.unique().tolist()) <= {CODE_POSITIVE, CODE_NEGATIVE}
    kwargs = dict(b=None, signs=signs, g1=f, g2=f, options=options, num_threads=1)
    with pytest.raises(ValueError, match=r"filtered_lrelu_cpu: signs must have shape \(2, 3, "):
        C.filtered_lrelu_cpu(out, x, **{**kwargs, "signs": signs[:, :, 1:]})
    with pytest.raises(TypeError, match="filtered_lrelu_cpu: out must be float32"):
        C.filtered_lrelu_cpu(out.half(), x, **kwargs)
    with pytest.raises(ValueError, match=r"filtered_lrelu_cpu: b must have shape \(3\)"):
        C.filtered_lrelu_cpu(out, x, **{**kwargs, "b": torch.zeros(4)})
    with pytest.raises(ValueError, match="filtered_lrelu_cpu: g2 is required, got None"):
        C.filtered_lrelu_cpu(out, x, **{**kwargs, "g2": None})
    with pytest.raises(ValueError, match="filtered_lrelu_cpu: signs is required, got None"):
        C.filtered_lrelu_cpu(out, x, **{**kwargs, "signs": None,
                                        "options": module._options(module.MASK, plan, 1.4, 0.2, -1.0)})
    fields = dict(mode="act", up=2, pad1_x=0, pad1_y=0, tmp_h=4, tmp_w=4, down=1, pad2_x=0, pad2_y=0, gain=1.0,
                  slope=0.2, clamp=-1.0)
    with pytest.raises(TypeError):  # a missing field
        C.FilteredLReLUOptions(**{k: v for k, v in fields.items() if k != "slope"})
    with pytest.raises(TypeError):  # an unknown field
        C.FilteredLReLUOptions(**fields, flip_filter=False)
    with pytest.raises(ValueError, match="mode must be 'act' or 'mask'"):
        C.FilteredLReLUOptions(**{**fields, "mode": "relu"})


def test_filtered_lrelu_ops_are_native_ops():
    from genfast.ops._define import NativeOp

    module = importlib.import_module("genfast.ops.filtered_lrelu")
    for op in (module.FORWARD, module.MASKED):
        assert isinstance(op, NativeOp) and hasattr(torch.ops.genfast, op.name)
