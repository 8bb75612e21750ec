"""genfast.ops.group_norm (+ fused SiLU) against a float64 reference: every backend that runs
here, outputs and all gradients, layouts, odd sizes, large means, bad inputs, torch.library,
torch.compile, and the nn modules."""
import pytest
import torch
import torch.nn.functional as F

from genfast.nn import GroupNorm, GroupNormSiLU
from genfast.ops import group_norm
from genfast.ops.group_norm import DISPATCH, backward_formula
from genfast.reference import group_norm as reference
from genfast.reference.group_norm import group_stats
from genfast.testing import rounding_floor

import helpers
from op_checks.group_norm import CPU, LAYOUTS, check, make_x

# The Triton interpreter's numpy exp overflows to inf for the SiLU of very negative inputs
# (the sigmoid is then exactly 0, as it should be).
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")


def require(backend, device, dtype):
    helpers.require(DISPATCH, backend, device, dtype)


ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]

# ----------------------------------------------------------------------------- cpu


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("silu", [False, True], ids=["plain", "silu"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_cpu_matches_reference(seed, dtype, layout, silu, affine):
    require("cpu", CPU, dtype)
    check("cpu", dtype, (3, 12, 5, 7), 4, layout, silu, affine)


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
@pytest.mark.parametrize("num_groups", [4, 3, 12, 1])
@pytest.mark.parametrize("silu", [False, True], ids=["plain", "silu"])
def test_group_counts(seed, backend, num_groups, silu):
    require(backend, CPU, torch.float32)
    check(backend, torch.float32, (3, 12, 5, 7), num_groups, "contiguous", silu)
    check(backend, torch.float32, (3, 12, 5, 7), num_groups, "channels_last", silu)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("shape,layout", [
    ((3, 12), "contiguous"),               # no spatial dims
    ((3, 12, 35), "contiguous"),           # 1-D
    ((3, 12, 35), "channels_last"),        # 1-D, (N, L, C) memory
    ((2, 12, 3, 4, 5), "contiguous"),      # 3-D
    ((2, 12, 3, 4, 5), "channels_last"),   # channels_last_3d
    ((2, 12, 1, 1), "channels_last"),      # S = 1
    ((1, 6, 2, 3), "strided"),
])
def test_spatial_dims(seed, backend, shape, layout):
    require(backend, CPU, torch.float32)
    check(backend, torch.float32, shape, 3, layout, silu=True)
    check(backend, torch.float32, shape, 6, layout, silu=False, affine=False)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
def test_large_mean_does_not_cancel(seed, backend, layout):
    """Inputs with mean 2e3 and std 1: E[x^2] - E[x]^2 in float32 has an error of about
    ulp(4e6) = 0.25 per term, a quarter of the variance or more; a sound algorithm keeps it.
    (Not much larger: the saved float32 mean itself is then off by half an ulp of the mean,
    which is the same for every algorithm; test_large_mean_statistics_are_accurate checks the
    statistics themselves at 3e4.)"""
    require(backend, CPU, torch.float32)
    # Floor: the mean itself is only known to about eps * 2e3, and two correct algorithms round
    # it differently (a cancelling algorithm is off by ~0.25, far above this).
    got = check(backend, torch.float32, (2, 8, 6, 5), 2, layout, silu=True, mean=2e3, scale=1.0,
                floor=rounding_floor(torch.float32, 2e3))
    assert got[0].std() > 0.1  # not collapsed to the bias
    if DISPATCH.unavailable_reason(backend, CPU, torch.float64) is None:
        # In float64 the reference run "in low precision" is the float64 reference itself (error
        # 0), so the floor is the rounding of the inputs' magnitude: the mean itself is only
        # known to about eps * 1e8.
        check(backend, torch.float64, (2, 8, 6, 5), 2, layout, silu=False, mean=1e8, scale=1.0,
              floor=rounding_floor(torch.float64, 1e8))


def test_large_mean_statistics_are_accurate(seed):
    x = make_x((2, 8, 16, 16), torch.float32, "contiguous", mean=3e4, scale=0.5)
    want_mean, want_rstd = group_stats(x, 4)
    triton_ok = DISPATCH.unavailable_reason("triton", CPU, x.dtype) is None
    for backend in ["cpu", "reference"] + (["triton"] if triton_ok else []):
        for layout_x in (x, x.to(memory_format=torch.channels_last)):
            _, mean, rstd = torch.ops.genfast.group_norm(layout_x, None, None, 4, 1e-5, False, backend)
            assert mean.dtype == torch.float32 and mean.shape == (2, 4)
            torch.testing.assert_close(mean, want_mean, rtol=1e-6, atol=0)
            torch.testing.assert_close(rstd, want_rstd, rtol=1e-3, atol=0)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cpu_several_threads_and_blocks(seed, layout):
    """Big enough for several OpenMP tasks, several NHWC row blocks and NCHW inner chunks."""
    old = torch.get_num_threads()
    torch.set_num_threads(max(2, old))
    try:
        check("cpu", torch.float32, (2, 64, 33, 31), 8, layout, silu=True)
        check("cpu", torch.bfloat16, (2, 8, 50, 50), 2, layout, silu=False)
    finally:
        torch.set_num_threads(old)


# ----------------------------------------------------------------------------- triton (interpreter)


@pytest.mark.parametrize("silu", [False, True], ids=["plain", "silu"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_triton_matches_reference(seed, dtype, layout, silu):
    require("triton", CPU, dtype)
    check("triton", dtype, (3, 12, 5, 7), 4, layout, silu)


def test_triton_without_affine_and_with_several_chunks(seed):
    require("triton", CPU, torch.float32)
    check("triton", torch.float32, (2, 4, 3, 5), 2, "contiguous", silu=True, affine=False)
    # S = 2400 > 4 tiles of 512: several row chunks per channel, merged by the finalize kernel.
    check("triton", torch.float32, (1, 2, 2400), 1, "contiguous", silu=False)
    check("triton", torch.float32, (1, 4, 300), 2, "channels_last", silu=True)


# ----------------------------------------------------------------------------- reference & algorithm


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_reference_backend_through_dispatch(seed, layout):
    check("reference", torch.float32, (3, 12, 5, 7), 3, layout, silu=True)
    check("reference", torch.float64, (3, 12, 5, 7), 3, layout, silu=False, affine=False)


@pytest.mark.parametrize("silu", [False, True])
def test_backward_formula_matches_autograd(seed, silu):
    """The written-out backward (the algorithm of every kernel) against autograd of the spec."""
    x = torch.randn(2, 6, 4, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(2, 6, 4, 3, dtype=torch.float64)
    y = reference.group_norm(x, 3, w, b, activation="silu" if silu else None)
    want = torch.autograd.grad(y, (x, w, b), dy)
    mean, rstd = group_stats(x, 3)
    got = backward_formula(dy, x.detach(), mean, rstd, w.detach(), b.detach(), 3, silu)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("silu", [False, True])
def test_gradcheck_and_double_backward_float64(seed, backend, silu):
    require(backend, CPU, torch.float64)
    x = torch.randn(2, 6, 3, 2, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)

    def fn(x_, w_, b_):
        return group_norm(x_, 3, w_, b_, activation="silu" if silu else None, backend=backend)

    assert torch.autograd.gradcheck(fn, (x, w, b))
    # Double backward goes through a differentiable composition of the reference.
    assert torch.autograd.gradgradcheck(fn, (x, w, b))
    assert torch.autograd.gradcheck(lambda x_: fn(x_, None, None), (x.to(memory_format=torch.channels_last),))


def test_double_backward_is_not_zero(seed):
    x = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    y = group_norm(x, 2, activation="silu", backend="cpu")
    (g,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    (gg,) = torch.autograd.grad(g.square().sum(), x)
    x2 = x.detach().requires_grad_()
    y2 = reference.group_norm(x2, 2, activation="silu")
    (g2,) = torch.autograd.grad(y2.square().sum(), x2, create_graph=True)
    (gg2,) = torch.autograd.grad(g2.square().sum(), x2)
    assert gg.abs().max() > 0
    torch.testing.assert_close(gg, gg2)


def test_only_some_gradients_requested(seed):
    x = torch.randn(2, 4, 5)
    w = torch.randn(4, requires_grad=True)
    b = torch.randn(4)
    y = group_norm(x, 2, w, b, activation="silu", backend="cpu")
    (dw,) = torch.autograd.grad(y.sum(), w)
    y_ref = reference.group_norm(x, 2, w, b, activation="silu")
    (dw_ref,) = torch.autograd.grad(y_ref.sum(), w)
    torch.testing.assert_close(dw, dw_ref, rtol=1e-5, atol=1e-5)
    # Bias without weight, as F.group_norm allows.
    bb = torch.randn(4, requires_grad=True)
    (db,) = torch.autograd.grad(group_norm(x, 2, None, bb, backend="cpu").sum(), bb)
    torch.testing.assert_close(db, torch.full_like(db, 10.0))


def test_no_grad_path_and_empty_inputs():
    x = torch.randn(2, 4, 3)
    with torch.no_grad():
        y = group_norm(x, 2, backend="cpu")
    torch.testing.assert_close(y, F.group_norm(x, 2))
    for backend in ["cpu", "reference"]:
        e = torch.empty(0, 4, 3, requires_grad=True)
        y = group_norm(e, 2, torch.ones(4), torch.zeros(4), backend=backend)
        assert y.shape == (0, 4, 3)
        y.sum().backward()
        assert e.grad.shape == (0, 4, 3)


def test_nan_propagates(seed):
    x = torch.randn(2, 4, 5)
    x[0, 0, 0] = float("nan")
    for backend in ["cpu", "reference"]:
        y = group_norm(x, 2, backend=backend)
        assert torch.isnan(y[0, :2]).all()  # the group with the NaN
        assert not torch.isnan(y[0, 2:]).any() and not torch.isnan(y[1]).any()


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_groups=5), "12 channels of x .* not divisible by num_groups=5"),
    (dict(num_groups=0), "num_groups must be >= 1"),
    (dict(num_groups=2.0), "num_groups must be an int"),
    (dict(weight=torch.ones(6)), r"weight must have shape \(12,\)"),
    (dict(bias=torch.ones(12, 1)), r"bias must have shape \(12,\)"),
    (dict(weight=torch.ones(12, dtype=torch.float64)), "weight must have the dtype of x"),
    (dict(bias=torch.ones(12, device="meta")), "bias is on meta but x is on cpu"),
    (dict(weight=[1.0] * 12), "weight must be a torch.Tensor or None"),
    (dict(activation="gelu"), "unknown activation 'gelu'"),
    (dict(eps=-1.0), "eps must be a finite number >= 0"),
    (dict(eps="1e-5"), "eps must be a real number"),
    (dict(backend="tpu"), "unknown backend 'tpu'"),
])
def test_bad_arguments_raise_value_error(kwargs, match):
    args = dict(num_groups=4)
    args.update(kwargs)
    x = torch.randn(2, 12, 3)
    with pytest.raises(ValueError, match=match):
        group_norm(x, **args)


def test_bad_x_raises():
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        group_norm(torch.randn(12), 4)
    with pytest.raises(TypeError, match="x must be float32, float16, bfloat16 or float64"):
        group_norm(torch.ones(2, 4, dtype=torch.int64), 2)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        group_norm([[1.0, 2.0]], 1)


# ----------------------------------------------------------------------------- torch.library / compile


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_opcheck(seed, backend):
    x = torch.randn(3, 6, 4, 2).to(memory_format=torch.channels_last)
    w, b = torch.randn(6), torch.randn(6)
    torch.library.opcheck(torch.ops.genfast.group_norm.default, (x, w, b, 3, 1e-5, True, backend))
    torch.library.opcheck(torch.ops.genfast.group_norm.default, (x[..., ::2], None, None, 2, 1e-5, False, backend))
    _, mean, rstd = torch.ops.genfast.group_norm(x, w, b, 3, 1e-5, True, backend)
    dy = torch.randn(3, 6, 4, 2)
    torch.library.opcheck(torch.ops.genfast.group_norm_backward.default,
                          (dy, x, mean, rstd, w, b, 3, True, True, True, backend))
    torch.library.opcheck(torch.ops.genfast.group_norm_backward.default,
                          (dy, x, mean, rstd, None, None, 3, False, True, True, backend))


def _compiled_matches_eager(backend_name):
    conv = torch.nn.Conv2d(3, 8, 3, padding=1)
    norm = GroupNormSiLU(4, 8, backend="cpu")
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    params = list(conv.parameters()) + list(norm.parameters())

    def model(x):
        return norm(conv(x)).square().mean()

    x = torch.randn(2, 3, 6, 5)
    compiled = torch.compile(model, fullgraph=True, backend=backend_name)
    loss_c = compiled(x)
    loss_c.backward()
    grads_c = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    loss_e = model(x)
    loss_e.backward()
    torch.testing.assert_close(loss_c, loss_e)
    for gc, p in zip(grads_c, params):
        torch.testing.assert_close(gc, p.grad)


def test_torch_compile_fullgraph_aot_eager(seed):
    torch._dynamo.reset()
    _compiled_matches_eager("aot_eager")


def test_torch_compile_fullgraph_inductor(seed):
    torch._dynamo.reset()
    _compiled_matches_eager("inductor")


# ----------------------------------------------------------------------------- nn modules


def test_group_norm_module_is_a_drop_in(seed):
    ref = torch.nn.GroupNorm(4, 12, eps=1e-6)
    with torch.no_grad():
        ref.weight.normal_()
        ref.bias.normal_()
    mine = GroupNorm(4, 12, eps=1e-6)
    mine.load_state_dict(ref.state_dict())
    assert set(mine.state_dict()) == {"weight", "bias"}
    x = torch.randn(2, 12, 5, 3)
    torch.testing.assert_close(mine(x), ref(x))
    from_torch = GroupNorm.from_torch(ref)
    assert from_torch.weight is ref.weight and from_torch.eps == 1e-6
    torch.testing.assert_close(from_torch(x), ref(x))
    plain = GroupNorm(3, 12, affine=False)
    assert plain.weight is None and dict(plain.state_dict()) == {}
    torch.testing.assert_close(plain(x), F.group_norm(x, 3))


def test_group_norm_silu_module_loads_group_norm_weights(seed):
    ref = torch.nn.GroupNorm(3, 6)
    with torch.no_grad():
        ref.weight.normal_()
        ref.bias.normal_()
    mine = GroupNormSiLU(3, 6)
    mine.load_state_dict(ref.state_dict())
    x = torch.randn(2, 6, 4, 4).to(memory_format=torch.channels_last)
    torch.testing.assert_close(mine(x), F.silu(ref(x)))
    torch.testing.assert_close(GroupNormSiLU.from_torch(ref)(x), F.silu(ref(x)))
    assert isinstance(GroupNormSiLU.from_torch(ref), GroupNormSiLU)
    with pytest.raises(TypeError, match="expected a torch.nn.GroupNorm"):
        GroupNormSiLU.from_torch(torch.nn.LayerNorm(6))


def test_module_gradients_match_torch(seed):
    ref = torch.nn.GroupNorm(2, 4)
    mine = GroupNorm.from_torch(torch.nn.GroupNorm(2, 4))
    mine.load_state_dict(ref.state_dict())
    x = torch.randn(3, 4, 7)
    ref(x).square().sum().backward()
    mine(x).square().sum().backward()
    torch.testing.assert_close(mine.weight.grad, ref.weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mine.bias.grad, ref.bias.grad, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- GPU


GPU = torch.device("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("silu", [False, True], ids=["plain", "silu"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_backends_match_reference(seed, backend, dtype, layout, silu, affine):
    require(backend, GPU, dtype)
    check(backend, dtype, (3, 12, 5, 7), 4, layout, silu, affine, device=GPU)
    check(backend, dtype, (2, 64, 33, 17), 8, layout, silu, affine, device=GPU)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("shape,groups", [((2, 320, 64, 64), 32), ((2, 1280, 8, 8), 32), ((3, 12), 4),
                                          ((2, 12, 35), 3), ((1, 6, 20000), 2), ((2, 12, 3, 4, 5), 3)])
def test_gpu_shapes(seed, backend, shape, groups):
    require(backend, GPU, torch.float16)
    for layout in ("contiguous", "channels_last"):
        check(backend, torch.float16, shape, groups, layout, silu=True, device=GPU)
    check(backend, torch.float32, shape, groups, "contiguous", silu=False, mean=1e4, scale=1.0, device=GPU)


# ----------------------------------------------------------------------------- the extension entry

_C = __import__("genfast")._ext._C
native = pytest.mark.skipif(_C is None, reason="no extension")


def _forward_native(**overrides):
    x = torch.randn(2, 6, 5)
    args = dict(x=x, y=torch.empty_like(x), mean=torch.empty(2, 3), rstd=torch.empty(2, 3), weight=torch.randn(6),
                bias=torch.randn(6), options=_C.GroupNormOptions(num_groups=3, eps=1e-5, silu=False), num_threads=1)
    args.update(overrides)
    _C.group_norm_fwd_cpu(**args)
    return args


@native
def test_native_entry_matches_torch(seed):
    args = _forward_native()
    x, w, b = (args[k].double() for k in ("x", "weight", "bias"))
    torch.testing.assert_close(args["y"].double(), F.group_norm(x, 3, w, b, 1e-5), rtol=1e-5, atol=1e-5)
    # channels_last x: the entry reads the layout from the strides
    xl = torch.randn(2, 6, 3, 5).to(memory_format=torch.channels_last)
    args = _forward_native(x=xl, y=torch.empty_like(xl), weight=args["weight"], bias=args["bias"])
    torch.testing.assert_close(args["y"].double(), F.group_norm(xl.double(), 3, w, b, 1e-5), rtol=1e-5, atol=1e-5)


@native
@pytest.mark.parametrize("overrides,error,match", [
    (dict(y=torch.empty(2, 5, 6)), ValueError, "group_norm_fwd_cpu: y must have the shape of x"),
    (dict(mean=torch.empty(2, 2)), ValueError, "group_norm_fwd_cpu: mean must have shape \\(2, 3\\)"),
    (dict(rstd=torch.empty(2, 3, dtype=torch.float64)), TypeError, "group_norm_fwd_cpu: rstd must be float32"),
    (dict(weight=torch.randn(5)), ValueError, "group_norm_fwd_cpu: weight must have shape \\(6\\)"),
    (dict(bias=torch.randn(6, dtype=torch.float16)), TypeError, "group_norm_fwd_cpu: bias must be float32"),
    (dict(y=None), ValueError, "group_norm_fwd_cpu: y is required, got None"),
    (dict(options=_C.GroupNormOptions(num_groups=4, eps=1e-5, silu=False) if _C else None), ValueError,
     "group_norm_fwd_cpu: the 6 channels of x are not divisible by options.num_groups=4"),
    (dict(x=torch.randn(2, 6, 10)[..., ::2]), ValueError, "group_norm_fwd_cpu: x must be contiguous \\(NCHW\\) or"),
])
def test_native_entry_rejects_bad_tensors(overrides, error, match):
    if "x" in overrides:
        overrides["y"] = torch.empty(overrides["x"].shape)
    with pytest.raises(error, match=match):
        _forward_native(**overrides)


@native
def test_native_options_are_named_and_complete():
    with pytest.raises(TypeError):  # an unknown field
        _C.GroupNormOptions(num_groups=2, eps=1e-5, silu=False, affine=True)
    with pytest.raises(TypeError):  # a missing field
        _C.GroupNormOptions(num_groups=2, eps=1e-5)
    with pytest.raises(TypeError):  # positional fields
        _C.GroupNormOptions(2, 1e-5, False)
    with pytest.raises(ValueError, match="GroupNormOptions: num_groups must be >= 1"):
        _C.GroupNormOptions(num_groups=0, eps=1e-5, silu=False)
    x = torch.randn(2, 4, 3)
    with pytest.raises(ValueError, match="group_norm_bwd_cpu: dx is required, got None"):
        _C.group_norm_bwd_cpu(x, x, torch.empty(2, 2), torch.empty(2, 2), None, weight=None, bias=None, dweight=None,
                              dbias=None, options=_C.GroupNormOptions(num_groups=2, eps=1e-5, silu=True), num_threads=1)
