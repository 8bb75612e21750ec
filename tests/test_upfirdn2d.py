"""genfast.ops.upfirdn2d against a direct float64 implementation written here (selection
matrices and shifted slices, no conv2d): the reference itself, every backend that runs here,
forward, first and second derivatives, layouts, helpers, bad inputs, torch.library and
torch.compile."""
import random

import importlib

import pytest
import torch

from genfast.ops import downsample2d, filter2d, setup_filter, upfirdn2d, upsample2d
from genfast.reference.upfirdn2d import upfirdn2d as reference
from genfast.testing import error_vs_reference

from op_checks.upfirdn2d import (CASES, TILED, as_pair, case_id, check_forward, check_forward_cases,
    check_forward_dtypes_and_layouts, check_gradients_vs_reference, direct, make_filter, make_x, require)

BACKENDS = ["reference", "cpu", "triton"]


# ----------------------------------------------------------------------------- direct spec


# ----------------------------------------------------------------------------- inputs


# ----------------------------------------------------------------------------- reference = spec


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("flip_filter", [False, True])
def test_reference_matches_definition(case, flip_filter, seed):
    up, down, padding, taps, separable = case
    x = make_x((2, 3, 7, 6))
    f = make_filter(taps, separable)
    gain = random.Random(seed).uniform(0.5, 3.0)
    y = reference(x, f, up, down, padding, flip_filter=flip_filter, gain=gain)
    torch.testing.assert_close(y, direct(x, f, up, down, padding, flip_filter, gain), rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- every backend


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_forward_cases(backend, case, seed):
    check_forward_cases(backend, case, seed)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided", "channels_last_strided"])
def test_forward_dtypes_and_layouts(backend, dtype, layout, seed):
    check_forward_dtypes_and_layouts(backend, dtype, layout)


@pytest.mark.parametrize("backend", BACKENDS)
def test_identity_and_none_filter(backend, seed):
    require(backend, torch.float32)
    x = make_x((1, 2, 4, 5), torch.float32)
    torch.testing.assert_close(upfirdn2d(x, None, backend=backend), x, rtol=0, atol=0)
    y = upfirdn2d(x, None, up=2, down=2, backend=backend)  # zero-insert then decimate: identity
    torch.testing.assert_close(y, x, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_and_padding_only_output(backend):
    require(backend, torch.float32)
    f = setup_filter([1, 2, 1])
    y = upfirdn2d(torch.randn(0, 3, 4, 4), f, up=2, padding=1, backend=backend)
    assert y.shape == (0, 3, 8, 8)
    x = torch.randn(2, 3, 4, 4)
    y = upfirdn2d(x, f, padding=[-6, 6, 0, 0], backend=backend)  # crop past the image: zeros
    assert y.shape == (2, 3, 2, 2) and (y == 0).all()


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("shape, layout, case", [
    ((1, 1, 37, 29), "contiguous", (2, 1, [6, 5], 12, True)),      # several row strips per plane
    ((1, 2, 41, 23), "contiguous", (1, 2, [1, 2, 3, 4], 4, False)),
    ((2, 70, 13, 11), "channels_last", (2, 1, [6, 5], 12, True)),  # channel blocks with a remainder
    ((1, 67, 12, 9), "channels_last", ([3, 2], [2, 3], [2, 1, 0, 3], (3, 4), False)),
])
def test_forward_larger_planes(backend, shape, layout, case, seed):
    require(backend, torch.float32)
    up, down, padding, taps, separable = case
    x = make_x(shape, torch.float32, layout)
    check_forward(backend, torch.float32, x, make_filter(taps, separable), up, down, padding, gain=1.1)


# ----------------------------------------------------------------------------- gradients


GRAD_CASES = [CASES[2], CASES[3], CASES[6], CASES[9], CASES[10], CASES[12]]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("case", GRAD_CASES, ids=case_id)
def test_gradcheck_float64(backend, case, seed):
    require(backend, torch.float64)
    up, down, padding, taps, separable = case
    x = make_x((1, 2, 5, 4)).requires_grad_()
    f = make_filter(taps, separable)

    def fn(x):
        return upfirdn2d(x, f, up, down, padding, flip_filter=bool(seed % 2), gain=1.3, backend=backend)

    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


def test_third_order_gradient(seed):
    """The backward is the same Function, so derivatives of any order exist: a third-order
    derivative through a nonlinear loss, against the reference's autograd."""
    x = make_x((1, 2, 4, 5)).requires_grad_()
    f = setup_filter([1, 3, 3, 1])

    def third(fn):
        xx = x.detach().requires_grad_()
        y = (fn(xx) ** 3).sum()
        (g1,) = torch.autograd.grad(y, xx, create_graph=True)
        (g2,) = torch.autograd.grad(g1.sin().sum(), xx, create_graph=True)
        (g3,) = torch.autograd.grad(g2.sum(), xx)
        return g3

    ours = third(lambda t: upfirdn2d(t, f, up=2, down=1, padding=[2, 1], backend="reference"))
    spec = third(lambda t: reference(t, f, 2, 1, [2, 1]))
    torch.testing.assert_close(ours, spec, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gradients_vs_reference(backend, dtype, seed):
    check_gradients_vs_reference(backend, dtype)


# ----------------------------------------------------------------------------- helpers


@pytest.mark.parametrize("taps", [1, 2, 3, 4, 12])
@pytest.mark.parametrize("factor", [1, 2, 3, [2, 4]])
def test_resampling_helpers(taps, factor, seed):
    x = make_x((2, 3, 8, 12))
    f = setup_filter(torch.rand(taps) + 0.1, separable=taps >= 8)
    fx, fy = as_pair(factor)
    y = upsample2d(x, f, up=factor, backend="reference")
    assert y.shape == (2, 3, 8 * fy, 12 * fx)
    fw = f.shape[-1]
    p = [(fw + fx - 1) // 2, (fw - fx) // 2, (fw + fy - 1) // 2, (fw - fy) // 2]
    torch.testing.assert_close(y, direct(x, f, factor, 1, p, gain=fx * fy))

    y = downsample2d(x, f, down=factor, backend="reference")
    assert y.shape == (2, 3, 8 // fy, 12 // fx)
    p = [(fw - fx + 1) // 2, (fw - fx) // 2, (fw - fy + 1) // 2, (fw - fy) // 2]
    torch.testing.assert_close(y, direct(x, f, 1, factor, p))

    y = filter2d(x, f, padding=[1, -1, 0, 2], backend="reference")
    p = [1 + fw // 2, -1 + (fw - 1) // 2, fw // 2, 2 + (fw - 1) // 2]
    assert y.shape == (2, 3, 10, 12)
    torch.testing.assert_close(y, direct(x, f, 1, 1, p))


@pytest.mark.parametrize("backend", BACKENDS)
def test_stylegan_filter_keeps_constants(backend):
    """With the normalized [1, 3, 3, 1] filter, 2x up- and downsampling keep a constant image
    constant away from the borders (the gain up * up makes up for the inserted zeros)."""
    require(backend, torch.float32)
    f = setup_filter([1, 3, 3, 1])
    ones = torch.ones(1, 2, 10, 12)
    up = upsample2d(ones, f, backend=backend)[..., 2:-2, 2:-2]
    down = downsample2d(ones, f, backend=backend)[..., 1:-1, 1:-1]
    torch.testing.assert_close(up, torch.ones_like(up))
    torch.testing.assert_close(down, torch.ones_like(down))


def test_setup_filter():
    f = setup_filter([1, 3, 3, 1])
    assert f.dtype == torch.float32 and f.shape == (4, 4)  # < 8 taps: outer product
    torch.testing.assert_close(f, torch.outer(torch.tensor([1., 3, 3, 1]), torch.tensor([1., 3, 3, 1])) / 64)
    f = setup_filter(torch.arange(1.0, 9.0))
    assert f.shape == (8,)  # >= 8 taps: separable
    torch.testing.assert_close(f, torch.arange(1.0, 9.0) / 36)
    f = setup_filter([1, 2], separable=True, normalize=False, flip_filter=True, gain=4)
    torch.testing.assert_close(f, torch.tensor([2.0, 1.0]) * 2)  # gain ** (1/2) for 1-D
    f = setup_filter([[1, 2], [3, 4]], normalize=False, gain=3)
    torch.testing.assert_close(f, torch.tensor([[3.0, 6], [9, 12]]))
    assert setup_filter(None).shape == (1, 1) and setup_filter(2.0).item() == 1.0
    with pytest.raises(ValueError, match="sum to zero"):
        setup_filter([1, -1])
    with pytest.raises(ValueError, match="0-D, 1-D or 2-D"):
        setup_filter(torch.ones(2, 2, 2))
    with pytest.raises(ValueError, match="separable=True needs a 1-D"):
        setup_filter(torch.ones(2, 2), separable=True)


# ----------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(x=torch.randn(3, 4, 4)), ValueError, "x must be 4-D"),
    (dict(x=torch.randn(1, 1, 4, 4).int()), TypeError, "x must be float32"),
    (dict(x=[1.0]), TypeError, "x must be a torch.Tensor"),
    (dict(f=torch.ones(2, 2, 2)), ValueError, "f must be 1-D"),
    (dict(f=torch.ones(0)), ValueError, "at least one tap"),
    (dict(f=torch.ones(3, dtype=torch.float64)), TypeError, "f must be float32"),
    (dict(f=[1.0, 2.0]), TypeError, "f must be a torch.Tensor or None"),
    (dict(f=torch.ones(3, device="meta")), ValueError, "same device"),
    (dict(up=0), ValueError, "up must be >= 1"),
    (dict(down=[2, 0]), ValueError, "down must be >= 1"),
    (dict(up=1.5), TypeError, "up must be an int"),
    (dict(down=True), TypeError, "down must be an int"),
    (dict(up=[1, 2, 3]), TypeError, "up must be an int"),
    (dict(padding=[1, 2, 3]), TypeError, "padding must be"),
    (dict(padding=0.5), TypeError, "padding must be"),
    (dict(padding=-3), ValueError, "output would be empty along x"),
    (dict(padding=[0, 0, -2, -2], f=torch.ones(2, 2)), ValueError, "output would be empty along y"),
    (dict(flip_filter=1), TypeError, "flip_filter must be a bool"),
    (dict(gain="2"), TypeError, "gain must be a real number"),
    (dict(gain=float("nan")), ValueError, "gain must be finite"),
    (dict(backend="fast"), ValueError, "unknown backend"),
])
def test_bad_inputs(kwargs, error, match):
    args = dict(x=torch.randn(1, 2, 4, 4), f=torch.ones(3))
    args.update(kwargs)
    x, f = args.pop("x"), args.pop("f")
    with pytest.raises(error, match=match):
        upfirdn2d(x, f, **args)


def test_filter_requiring_grad_is_refused():
    f = torch.ones(3, requires_grad=True)
    with pytest.raises(ValueError, match="filter f are not supported"):
        upfirdn2d(torch.randn(1, 1, 4, 4), f)
    with torch.no_grad():
        upfirdn2d(torch.randn(1, 1, 4, 4), f)


def test_helpers_validate():
    with pytest.raises(ValueError, match="upsample2d: x must be 4-D"):
        upsample2d(torch.randn(4, 4), None)
    with pytest.raises(ValueError, match="downsample2d: down must be >= 1"):
        downsample2d(torch.randn(1, 1, 4, 4), None, down=0)
    with pytest.raises(TypeError, match="filter2d: padding must be"):
        filter2d(torch.randn(1, 1, 4, 4), None, padding="same")


# ----------------------------------------------------------------------------- torch.library


def test_opcheck():
    x = torch.randn(2, 3, 5, 6)
    f = setup_filter([1, 3, 3, 1])
    args = (x, f, 2, 2, 1, 1, 2, 1, 2, 1, False, 1.5, "reference")
    torch.library.opcheck(torch.ops.genfast.upfirdn2d.default, args,
                          test_utils=("test_schema", "test_faketensor"))
    xl = x.to(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.genfast.upfirdn2d.default, (xl,) + args[1:],
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_torch_compile_fullgraph(backend, seed):
    require(backend, torch.float32)
    f = setup_filter([1, 3, 3, 1])

    def layer(x):
        y = upsample2d(x, f, backend=backend)
        return downsample2d(torch.nn.functional.leaky_relu(y, 0.2), f, backend=backend)

    x = make_x((2, 3, 6, 5), torch.float32).requires_grad_()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    ref = layer(x.detach().double())
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    (dx,) = torch.autograd.grad(y.sum(), x)
    xr = x.detach().double().requires_grad_()
    (dxr,) = torch.autograd.grad(layer(xr).sum(), xr)
    torch.testing.assert_close(dx.double(), dxr, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gpu_forward(backend, dtype, case, layout, seed):
    """Odd sizes and every CASES combination: mostly the CUDA general kernel."""
    device = torch.device("cuda")
    require(backend, dtype, device)
    up, down, padding, taps, separable = case
    x = make_x((3, 17, 23, 19), dtype, layout)
    f = make_filter(taps, separable)
    y = upfirdn2d(x.to(device), f.to(device), up, down, padding, flip_filter=True, gain=1.3, backend=backend)
    ref64 = direct(x, f, up, down, padding, True, 1.3)
    lowp = reference(x.to(device), f.to(device), up, down, padding, flip_filter=True, gain=1.3)
    error_vs_reference(y.cpu(), ref64, lowp.cpu(), name=f"{backend} {dtype}")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("spec", TILED, ids=lambda s: f"up{s[0]}-down{s[1]}-f{s[2]}{'s' if s[3] else 'f'}")
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", [(2, 37, 45, 70), (1, 3, 133, 9)])
def test_gpu_tiled_cases(backend, spec, layout, shape, seed):
    device = torch.device("cuda")
    require(backend, torch.float16, device)
    up, down, taps, separable = spec
    x = make_x(shape, torch.float16, layout).to(device)
    f = make_filter(taps, separable).to(device)
    for padding in ([(taps + up - 1) // 2 + (down - 1), (taps - up) // 2, 3, -1], 0 if taps <= 4 else taps // 2):
        y = upfirdn2d(x, f, up, down, padding, gain=up * up, backend=backend)
        ref64 = reference(x.double(), f, up, down, padding, gain=up * up)
        lowp = reference(x, f, up, down, padding, gain=up * up)
        error_vs_reference(y, ref64, lowp, name=f"{backend} padding {padding}")
        assert y.is_contiguous(
            memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("shape, taps, up, down", [((4, 64, 128, 128), 4, 2, 1), ((4, 64, 128, 128), 12, 1, 2),
                                                  ((2, 32, 256, 256), 12, 2, 1)])
def test_gpu_stylegan_shapes(backend, shape, taps, up, down, seed):
    device = torch.device("cuda")
    require(backend, torch.float16, device)
    x = torch.randn(shape, device=device, dtype=torch.float16)
    f = setup_filter(torch.rand(taps) + 0.1, device=device, separable=True)
    pad = [(taps + up - 1) // 2, (taps - up) // 2] if up > 1 else [(taps - down + 1) // 2, (taps - down) // 2]
    pad = [pad[0], pad[1], pad[0], pad[1]]
    y = upfirdn2d(x, f, up, down, pad, gain=up * up, backend=backend)
    ref64 = reference(x.double(), f, up, down, pad, gain=up * up)
    lowp = reference(x, f, up, down, pad, gain=up * up)
    error_vs_reference(y, ref64, lowp, name=backend)
    xg = x.detach().requires_grad_()
    (dx,) = torch.autograd.grad(upfirdn2d(xg, f, up, down, pad, backend=backend), xg, torch.ones_like(y))
    xr = x.double().requires_grad_()
    (dxr,) = torch.autograd.grad(reference(xr, f, up, down, pad), xr, torch.ones_like(ref64))
    xl = x.detach().requires_grad_()
    (dxl,) = torch.autograd.grad(reference(xl, f, up, down, pad), xl, torch.ones_like(y))
    error_vs_reference(dx, dxr, dxl, name=f"{backend} dx")


# ----------------------------------------------------------------------------- typed native calls


def test_entry_runs_and_checks_its_arguments():
    """upfirdn2d_cpu reads sizes, dtype, taps and layout from the tensors and checks each by name."""
    pytest.importorskip("genfast._C")
    from genfast import _ext
    module = importlib.import_module("genfast.ops.upfirdn2d")

    torch.manual_seed(0)
    C = _ext._C
    x, g = torch.randn(2, 3, 7, 5), torch.rand(4)
    options = module._options(2, 2, 1, 1, 2, 1, 2, 1)  # up 2, padding (2, 1, 2, 1), 4 taps: out 14 x 10
    out = torch.empty(2, 3, 14, 10)
    C.upfirdn2d_cpu(out, x, g, options=options, num_threads=1)
    want = reference(x.double(), g.double(), 2, 1, (2, 1, 2, 1), flip_filter=True)
    error_vs_reference(out, want, reference(x, g, 2, 1, (2, 1, 2, 1), flip_filter=True))
    with pytest.raises(ValueError, match=r"upfirdn2d_cpu: out must have shape \(2, 3, 14, 10\)"):
        C.upfirdn2d_cpu(torch.empty(2, 3, 15, 11), x, g, options=options, num_threads=1)
    with pytest.raises(TypeError, match="upfirdn2d_cpu: out must be float32"):
        C.upfirdn2d_cpu(out.double(), x, g, options=options, num_threads=1)
    with pytest.raises(TypeError, match="upfirdn2d_cpu: g must be float32"):
        C.upfirdn2d_cpu(out, x, g.double(), options=options, num_threads=1)
    with pytest.raises(ValueError, match="upfirdn2d_cpu: g is required, got None"):
        C.upfirdn2d_cpu(out, x, None, options=options, num_threads=1)
    with pytest.raises(ValueError, match="upfirdn2d_cpu: out must be channels_last"):
        C.upfirdn2d_cpu(out, x.to(memory_format=torch.channels_last), g, options=options, num_threads=1)
    with pytest.raises(ValueError, match="x must be contiguous or channels_last"):
        C.upfirdn2d_cpu(out, torch.randn(2, 3, 7, 10)[..., ::2], g, options=options, num_threads=1)
    with pytest.raises(TypeError):  # a missing field
        C.Upfirdn2dOptions(upx=1, upy=1, downx=1, downy=1, padx0=0, padx1=0, pady0=0)
    with pytest.raises(TypeError):  # an unknown field
        C.Upfirdn2dOptions(upx=1, upy=1, downx=1, downy=1, padx0=0, padx1=0, pady0=0, pady1=0, gain=2.0)
    with pytest.raises(ValueError, match="factors must be >= 1"):
        C.Upfirdn2dOptions(upx=0, upy=1, downx=1, downy=1, padx0=0, padx1=0, pady0=0, pady1=0)


def test_upfirdn2d_op_is_a_native_op():
    from genfast.ops._define import NativeOp

    op = importlib.import_module("genfast.ops.upfirdn2d").UPFIRDN2D
    assert isinstance(op, NativeOp) and op.op is torch.ops.genfast.upfirdn2d
