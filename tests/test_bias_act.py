"""genfast.ops.bias_act against the reference: every backend that runs here, forward, first
and second derivatives, layouts, odd sizes, bad inputs, torch.library and torch.compile."""
import math

import pytest
import torch

import genfast
from genfast.ops import bias_act
from genfast.ops.bias_act import ACTIVATIONS, DISPATCH
from genfast.reference import bias_act as reference
from genfast.testing import error_vs_reference

import helpers
from op_checks.bias_act import ACTS, CPU, NAMES_WITH_BIAS, avoid_discontinuities, check_against_reference, evaluate

LAYOUTS = ["contiguous", "channels_last", "strided", "permuted"]


def require(backend, device, dtype):
    helpers.require(DISPATCH, backend, device, dtype)


# ----------------------------------------------------------------------------- correctness


@pytest.mark.parametrize("use_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("clamp", [None, 0.7], ids=["noclamp", "clamp"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_cpu_backend_matches_reference(seed, dtype, act, layout, clamp, use_bias):
    require("cpu", CPU, dtype)
    check_against_reference("cpu", dtype, act, layout, use_bias, clamp)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_triton_backend_matches_reference(seed, dtype, act, layout):
    require("triton", CPU, dtype)
    check_against_reference("triton", dtype, act, layout, use_bias=True,
                            clamp=0.7 if act in ("lrelu", "swish") else None)


@pytest.mark.parametrize("act", ["lrelu", "tanh"])
def test_triton_backend_without_bias_and_channel_on_columns(seed, act):
    require("triton", CPU, torch.float32)
    check_against_reference("triton", torch.float32, act, "contiguous", use_bias=False, clamp=None)
    # dim = last: the channel is the innermost (column) index.
    check_against_reference("triton", torch.float32, act, "contiguous", use_bias=True, clamp=None,
                            shape=(2, 3, 5, 6), dim=3)


@pytest.mark.parametrize("act", ACTS)
def test_reference_backend_through_dispatch(seed, act):
    check_against_reference("reference", torch.float32, act, "channels_last", use_bias=True, clamp=0.7)


@pytest.mark.parametrize("shape,dim", [((7,), 0), ((5, 3), 1), ((2, 3, 1, 4), 1), ((2, 1, 3), 1), ((4, 6, 3), 2),
                                       ((2, 3, 4, 5), -1), ((2, 3, 4, 5, 6), 2), ((70000, 3), 0)])
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_shapes_and_dims(seed, backend, shape, dim):
    require(backend, CPU, torch.float32)
    if backend == "triton" and math.prod(shape) > 10000:
        pytest.skip("kept small for the Triton interpreter")
    x = torch.randn(shape)
    b = torch.randn(shape[dim])
    got = bias_act(x, b, dim=dim, act="lrelu", backend=backend)
    want = reference(x.double(), b.double(), dim=dim % x.ndim, act="lrelu")
    lowp = reference(x, b, dim=dim % x.ndim, act="lrelu")
    error_vs_reference(got, want, lowp)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "permuted"])
def test_cpu_fused_bias_gradient_on_several_threads(seed, layout):
    """Large enough for the C++ kernel to split rows across threads and sum db per thread."""
    old_threads = torch.get_num_threads()
    torch.set_num_threads(max(2, old_threads))
    try:
        check_against_reference("cpu", torch.float32, "lrelu", layout, use_bias=True, clamp=None,
                                shape=(4, 64, 37, 33))
        check_against_reference("cpu", torch.float16, "swish", layout, use_bias=True, clamp=None,
                                shape=(3, 32, 70, 50))
    finally:
        torch.set_num_threads(old_threads)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("act", ACTS)
def test_gradcheck_float64(seed, backend, act):
    require(backend, CPU, torch.float64)
    for clamp in (None, 0.9):
        x = avoid_discontinuities(torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(3, dtype=torch.float64) * 0,
                                  1, act, clamp, gain=1.3, delta=1e-2)
        b = torch.randn(3, dtype=torch.float64) * 0.01
        x = avoid_discontinuities(x, b, 1, act, clamp, gain=1.3, delta=1e-2)
        x.requires_grad_()
        b.requires_grad_()

        def fn(x_, b_):
            return bias_act(x_, b_, dim=1, act=act, gain=1.3, clamp=clamp, alpha=0.3, backend=backend)

        assert torch.autograd.gradcheck(fn, (x, b))
        assert torch.autograd.gradgradcheck(fn, (x, b))


# Plain-PyTorch compositions (independent of genfast.reference): act(x + b) * gain, NVlabs defaults.
PLAIN_ACTS = {"lrelu": (lambda z: torch.nn.functional.leaky_relu(z, 0.2), math.sqrt(2)),
              "tanh": (torch.tanh, 1.0),
              "swish": (torch.nn.functional.silu, math.sqrt(2))}


@pytest.mark.parametrize("clamp", [None, 0.7], ids=["noclamp", "clamp"])
@pytest.mark.parametrize("act", list(PLAIN_ACTS))
@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_one_dimensional_input_bias_along_its_only_axis(seed, backend, act, clamp):
    """x (C,), b (C,), dim=0 (NVlabs allows it): db is dx itself (nothing to sum over), also
    in the double backward (it was a 0-d sum of everything)."""
    dtype = torch.float64 if backend != "triton" else torch.float32
    require(backend, CPU, dtype)
    C = 37
    x = avoid_discontinuities(torch.randn(C, dtype=dtype) * 1.5, None, 0, act, None)
    b = torch.randn(C, dtype=dtype) * 0.5
    x = avoid_discontinuities(x, b, 0, act, clamp)
    dy, w_x, w_b = (torch.randn(C, dtype=dtype) for _ in range(3))
    func, gain = PLAIN_ACTS[act]

    def plain(x_, b_):
        y = func(x_ + b_) * gain
        return y if clamp is None else y.clamp(-clamp, clamp)

    def fast(x_, b_):
        return bias_act(x_, b_, dim=0, act=act, clamp=clamp, backend=backend)

    got = evaluate(fast, x, b, dy, w_x, w_b)
    want = evaluate(plain, x.double(), b.double(), dy.double(), w_x.double(), w_b.double())
    lowp = evaluate(plain, x, b, dy, w_x, w_b)
    for name, g, w, p in zip(NAMES_WITH_BIAS, got, want, lowp):
        assert g.shape == w.shape, f"{name}: shape {tuple(g.shape)}, expected {tuple(w.shape)}"
        error_vs_reference(g, w, p, name=f"{backend} {act} 1-D {name}")
    if dtype == torch.float64:
        xg, bg = x.clone().requires_grad_(), b.clone().requires_grad_()
        assert torch.autograd.gradcheck(fast, (xg, bg))
        assert torch.autograd.gradgradcheck(fast, (xg, bg))


def test_third_order_raises_clearly(seed):
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    y = bias_act(x, None, act="tanh", backend="cpu")
    (g,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    (gg,) = torch.autograd.grad(g.sum(), x, create_graph=True)
    with pytest.raises(NotImplementedError, match="second-order"):
        gg.sum().backward()


@pytest.mark.parametrize("act", ["lrelu", "swish"])
def test_r1_penalty_through_a_small_discriminator(seed, act):
    """GAN R1 regularisation: grad of a penalty on input gradients; cpu vs reference."""
    torch.manual_seed(seed)
    disc = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Identity(), torch.nn.Flatten(),
                               torch.nn.Linear(8 * 6 * 6, 1))
    bias = torch.nn.Parameter(torch.randn(8) * 0.1)
    images = torch.randn(4, 3, 6, 6)

    def r1(backend):
        for p in list(disc.parameters()) + [bias]:
            p.grad = None
        x = images.clone().requires_grad_()
        h = disc[0](x)
        h = bias_act(h, bias, act=act, clamp=256, backend=backend)
        score = disc[3](disc[2](h))
        (g,) = torch.autograd.grad(score.sum(), x, create_graph=True)
        penalty = g.square().sum()
        penalty.backward()
        return [None if p.grad is None else p.grad.clone() for p in list(disc.parameters()) + [bias]]

    got_all, want_all = r1("cpu"), r1("reference")
    assert [g is None for g in got_all] == [w is None for w in want_all]
    assert got_all[0] is not None  # the conv weight; the fused bias only with a curved activation
    assert (got_all[-1] is None) == (act == "lrelu")
    for got, want in zip(got_all, want_all):
        if want is not None:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_nan_propagates_like_the_reference():
    x = torch.tensor([[float("nan"), 1.0, -2.0]])
    for backend in ["cpu", "reference"]:
        y = bias_act(x, torch.zeros(3), act="lrelu", clamp=0.5, backend=backend)
        assert torch.isnan(y[0, 0])
        assert y[0, 1] == 0.5 and y[0, 2] == -0.5  # clamped: sqrt(2) and -0.4 sqrt(2)


def test_empty_tensor():
    for backend in ["cpu", "reference"]:
        x = torch.empty(0, 4, requires_grad=True)
        y = bias_act(x, torch.zeros(4), act="relu", backend=backend)
        assert y.shape == (0, 4)
        y.sum().backward()
        assert x.grad.shape == (0, 4)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(b=torch.zeros(4)), ValueError, "b has 4 elements but x.shape\\[1\\] is 3"),
    (dict(b=torch.zeros(3, 1)), ValueError, "b must be 1-D"),
    (dict(b=torch.zeros(3, dtype=torch.float64)), TypeError, "b must have the dtype of x"),
    (dict(b=[0.0, 0.0, 0.0]), TypeError, "b must be a torch.Tensor"),
    (dict(b=torch.zeros(3), dim=3), ValueError, "dim=3 is out of range"),
    (dict(b=torch.zeros(3), dim=1.0), TypeError, "dim must be an int"),
    (dict(act="gelu"), ValueError, "unknown act 'gelu'"),
    (dict(clamp=-1.0), ValueError, "clamp must be >= 0"),
    (dict(gain="2"), TypeError, "gain must be a real number"),
    (dict(alpha=float("nan")), ValueError, "alpha must not be NaN"),
    (dict(backend="tpu"), ValueError, "unknown backend 'tpu'"),
])
def test_bad_arguments_raise_clear_errors(kwargs, error, match):
    x = torch.randn(2, 3, 4)
    with pytest.raises(error, match=match):
        bias_act(x, **kwargs)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.complex64])
def test_non_float_input_raises_type_error(dtype):
    with pytest.raises(TypeError, match="x must be float32, float16, bfloat16 or float64"):
        bias_act(torch.ones(2, 3, dtype=dtype))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        bias_act([1.0, 2.0])


def test_device_mismatch_raises_value_error():
    x = torch.randn(2, 3)
    b = torch.zeros(3, device="meta")
    with pytest.raises(ValueError, match="b is on meta but x is on cpu"):
        bias_act(x, b)


# ----------------------------------------------------------------------------- the extension entry

def _native_options(**overrides):
    fields = dict(mode="forward", act="lrelu", dim=1, alpha=0.2, gain=1.0, clamp=-1.0)
    fields.update(overrides)
    return genfast._ext._C.BiasActOptions(**fields)


def _native_call(**overrides):
    x = torch.randn(2, 3, 5)
    args = dict(out=torch.empty_like(x), x=x, b=torch.randn(3), dy=None, ddx=None, db=None,
                options=_native_options(), num_threads=1)
    args.update(overrides)
    genfast._ext._C.bias_act_cpu(**args)
    return args


@pytest.mark.skipif(genfast._ext._C is None, reason="no extension")
def test_native_entry_matches_the_op(seed):
    args = _native_call()
    expected = reference(args["x"].double(), args["b"].double(), act="lrelu", gain=1.0)
    error_vs_reference(args["out"], expected, reference(args["x"], args["b"], act="lrelu", gain=1.0))
    # Every activation the Python side offers is known to the extension, by name.
    assert set(genfast._ext._C.BIAS_ACT_ACTIVATIONS) == set(ACTIVATIONS)
    assert set(genfast._ext._C.BIAS_ACT_MODES) == {"forward", "grad", "grad2"}


@pytest.mark.skipif(genfast._ext._C is None, reason="no extension")
@pytest.mark.parametrize("overrides,error,match", [
    (dict(b=torch.randn(4)), ValueError, "bias_act_cpu: b must have shape \\(3\\)"),
    (dict(out=torch.empty(2, 5, 3)), ValueError, "bias_act_cpu: out must have the shape of x"),
    (dict(out=torch.empty(2, 3, 5, dtype=torch.float64)), TypeError, "bias_act_cpu: out must be float32"),
    (dict(b=torch.randn(3, dtype=torch.float16)), TypeError, "bias_act_cpu: b must be float32"),
    (dict(out=None), ValueError, "bias_act_cpu: out is required, got None"),
    (dict(options=_native_options(mode="grad")), ValueError, "bias_act_cpu: dy is required, got None"),
    (dict(x=torch.randn(2, 3, 10)[..., ::2]), ValueError, "bias_act_cpu: x must be dense"),
    (dict(num_threads=0), ValueError, "bias_act_cpu: num_threads must be >= 1"),
])
def test_native_entry_rejects_bad_tensors(overrides, error, match):
    if "x" in overrides:
        overrides["out"] = torch.empty_like(overrides["x"])
    with pytest.raises(error, match=match):
        _native_call(**overrides)


@pytest.mark.skipif(genfast._ext._C is None, reason="no extension")
def test_native_options_are_named_and_complete():
    with pytest.raises(TypeError):  # an unknown field
        _native_options(slope=0.2)
    with pytest.raises(TypeError):  # a missing field
        genfast._ext._C.BiasActOptions(mode="forward", act="lrelu", dim=1, alpha=0.2, gain=1.0)
    with pytest.raises(TypeError):  # positional fields
        genfast._ext._C.BiasActOptions("forward", "lrelu", 1, 0.2, 1.0, -1.0)
    with pytest.raises(ValueError, match="BiasActOptions: unknown act 'gelu'"):
        _native_options(act="gelu")
    with pytest.raises(ValueError, match="BiasActOptions: unknown mode 'backward'"):
        _native_options(mode="backward")
    assert _native_options().act == "lrelu" and "BiasActOptions(mode='forward'" in repr(_native_options())
    # Tensors may come by position (prepared calls pass them so, matched by name once in
    # genfast._ext.bind_positional); a swapped pair still fails the checks against x.
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="bias_act_cpu"):
        genfast._ext._C.bias_act_cpu(torch.empty_like(x), torch.randn(3), x, None, None, None, _native_options(), 1)


# ----------------------------------------------------------------------------- torch.library / compile


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_opcheck(seed, backend):
    x = torch.randn(3, 5, 4, 2).to(memory_format=torch.channels_last)
    b = torch.randn(5)
    dy = torch.randn(3, 5, 4, 2)
    ddx = torch.randn(3, 5, 4, 2)
    params = (1, "swish", 0.0, 1.4, 0.8, backend)
    torch.library.opcheck(torch.ops.genfast.bias_act.default, (x, b, *params))
    torch.library.opcheck(torch.ops.genfast.bias_act_grad.default, (dy, x, b, True, *params))
    torch.library.opcheck(torch.ops.genfast.bias_act_grad.default, (dy, x, None, True, *params))
    torch.library.opcheck(torch.ops.genfast.bias_act_grad2.default, (ddx, dy, x, b, *params))
    torch.library.opcheck(torch.ops.genfast.bias_act.default, (x[..., ::2], None, *params))


def _compiled_matches_eager(backend_name):
    lin = torch.nn.Linear(6, 5)
    bias = torch.nn.Parameter(torch.randn(5))

    def model(x):
        return bias_act(lin(x), bias, act="lrelu", clamp=4.0, backend="cpu").square().mean()

    x = torch.randn(8, 6)
    compiled = torch.compile(model, fullgraph=True, backend=backend_name)
    loss_c = compiled(x)
    loss_c.backward()
    grads_c = [p.grad.clone() for p in (lin.weight, lin.bias, bias)]
    for p in (lin.weight, lin.bias, bias):
        p.grad = None
    loss_e = model(x)
    loss_e.backward()
    torch.testing.assert_close(loss_c, loss_e)
    for gc, p in zip(grads_c, (lin.weight, lin.bias, bias)):
        torch.testing.assert_close(gc, p.grad)


def test_torch_compile_fullgraph_aot_eager(seed):
    torch._dynamo.reset()
    _compiled_matches_eager("aot_eager")


def test_torch_compile_fullgraph_inductor(seed):
    torch._dynamo.reset()
    _compiled_matches_eager("inductor")


# ----------------------------------------------------------------------------- modules


def test_bias_act_module(seed):
    m = genfast.nn.BiasAct(5, act="lrelu", clamp=3.0, bias_init=0.1)
    x = torch.randn(2, 5, 3, requires_grad=True)
    y = m(x)
    torch.testing.assert_close(y, reference(x, m.bias, act="lrelu", clamp=3.0))
    y.sum().backward()
    assert m.bias.grad is not None and m.bias.grad.shape == (5,)
    assert genfast.nn.BiasAct(act="tanh")(x).shape == x.shape
    with pytest.raises(ValueError, match="unknown act"):
        genfast.nn.BiasAct(3, act="gelu")


def test_fused_leaky_relu_is_a_drop_in(seed):
    m = genfast.nn.FusedLeakyReLU(6, negative_slope=0.1, scale=1.7)
    assert list(m.state_dict()) == ["bias"]
    m.load_state_dict({"bias": torch.randn(6)})
    x = torch.randn(4, 6, 5, 5)
    want = torch.nn.functional.leaky_relu(x + m.bias.view(1, -1, 1, 1), 0.1) * 1.7
    torch.testing.assert_close(m(x), want)
    torch.testing.assert_close(genfast.ops.fused_leaky_relu(x, m.bias, 0.1, 1.7), want)
    assert genfast.nn.FusedLeakyReLU(6, bias=False)(x).shape == x.shape


def test_module_under_half_precision_input(seed):
    m = genfast.nn.FusedLeakyReLU(6)
    x = torch.randn(2, 6, 3, dtype=torch.float16)
    y = m(x)
    assert y.dtype == torch.float16
    error_vs_reference(y, reference(x.double(), m.bias.double(), act="lrelu"), reference(x, m.bias.half(), act="lrelu"))


# ----------------------------------------------------------------------------- GPU


GPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_gpu_backends_match_reference(seed, backend, dtype, act, layout):
    device = torch.device("cuda")
    require(backend, device, dtype)
    for use_bias, clamp, shape in ((True, None, (3, 37, 5, 7)), (True, 0.7, (4, 64, 33, 17)),
                                   (False, 0.7, (3, 37, 5, 7))):
        check_against_reference(backend, dtype, act, layout, use_bias, clamp, shape=shape, device=device)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_misaligned_and_odd_sizes(seed, backend):
    device = torch.device("cuda")
    require(backend, device, torch.float16)
    big = torch.randn(1 + 3 * 11 * 13, device=device, dtype=torch.float16)
    x = big[1:].view(3, 11, 13)  # data pointer not 16-byte aligned
    b = torch.randn(11, device=device, dtype=torch.float16)
    error_vs_reference(bias_act(x, b, act="swish", backend=backend),
                       reference(x.double(), b.double(), act="swish"), reference(x, b, act="swish"))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_64bit_indexing(backend):
    """More than 2^31 elements: the index arithmetic must not wrap."""
    device = torch.device("cuda")
    require(backend, device, torch.float16)
    n = 2 ** 31 + 4096 * 3
    if torch.cuda.get_device_properties(0).total_memory < 4 * n * 2 + (1 << 30):
        pytest.skip("not enough GPU memory")
    x = torch.empty(n // 4096, 4096, device=device, dtype=torch.float16).uniform_(-2, 2)
    b = torch.randn(n // 4096, device=device, dtype=torch.float16)
    y = bias_act(x, b, dim=0, act="lrelu", backend=backend)
    tail = slice(x.shape[0] - 3, None)
    want = reference(x[tail].float(), b[tail].float(), dim=0, act="lrelu")
    torch.testing.assert_close(y[tail].float(), want, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(y[:3].float(), reference(x[:3].float(), b[:3].float(), dim=0, act="lrelu"),
                               rtol=2e-3, atol=2e-3)


@pytest.mark.gpu
def test_gpu_compile_and_cuda_graph(seed):
    device = torch.device("cuda")
    x = torch.randn(8, 16, 9, 9, device=device, dtype=torch.float16, requires_grad=True)
    b = torch.randn(16, device=device, dtype=torch.float16, requires_grad=True)
    f = torch.compile(lambda x, b: bias_act(x, b, act="lrelu").float().square().mean(), fullgraph=True)
    f(x, b).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
