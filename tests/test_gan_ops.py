"""genfast.ops.gan against float64 references: pixel_norm on every backend that runs here
(forward, first and second derivatives, layouts, odd sizes), minibatch_stddev,
conv2d_resample and modulated_conv2d against direct definitions, gradgradcheck, bad input."""
import pytest
import torch
import torch.nn.functional as F

from genfast.ops import conv2d_resample, minibatch_stddev, modulated_conv2d, pixel_norm, setup_filter
from genfast.ops.gan import DISPATCH
from genfast.reference import gan as reference
from genfast.reference.upfirdn2d import parse_padding
from genfast.reference.upfirdn2d import upfirdn2d as ref_upfirdn2d
from genfast.testing import error_vs_reference

import helpers
from op_checks.gan import PIXEL_NORM_CASES, make_x, pixel_norm_derivatives

CPU = torch.device("cpu")


def require(backend, dtype):
    helpers.require(DISPATCH, backend, CPU, dtype)


# ----------------------------------------------------------------------------- pixel_norm

@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("case", PIXEL_NORM_CASES, ids=lambda c: f"{c[2]}-{'x'.join(map(str, c[0]))}")
def test_pixel_norm_matches_reference(seed, backend, dtype, case):
    require(backend, dtype)
    shape, dim, layout = case
    x = make_x(shape, layout, dtype)
    dy = torch.randn(shape, dtype=torch.float64).to(dtype)
    w = torch.randn(shape, dtype=torch.float64).to(dtype)
    fast = pixel_norm_derivatives(lambda t: pixel_norm(t, dim, backend=backend), x, dy, w)
    ref64 = pixel_norm_derivatives(lambda t: reference.pixel_norm(t, dim), x.double(), dy.double(), w.double())
    lowp = pixel_norm_derivatives(lambda t: reference.pixel_norm(t, dim), x, dy, w)
    assert fast[0].stride() == (x if layout != "strided" else x.contiguous()).stride(), "output layout differs from x"
    for name, f, r, p in zip(["y", "dx", "d2x", "d2dy"], fast, ref64, lowp):
        if torch.isnan(p).any():
            # PyTorch's own float16 double backward overflows (r^3 of a one-channel row near
            # 0); genfast differentiates in float32, so hold it to float16 rounding instead.
            assert torch.isfinite(f).all(), f"{backend} {dtype} seed={seed} {name}: not finite"
            scale = r.abs().max().item()
            assert (f.double() - r).abs().max().item() <= 1e-2 * scale, f"{backend} {dtype} seed={seed} {name}"
            continue
        error_vs_reference(f, r, p, f"{backend} {dtype} seed={seed} {name}")


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
def test_pixel_norm_one_channel(seed, backend):
    # One channel: y = x / sqrt(x^2 + eps) ~ sign(x), whose derivative r * dy * eps / (x^2 + eps)
    # every formula (PyTorch's autograd included) gets by cancellation, so the gradient is held
    # to the float32 scale of the result rather than to PyTorch's own error
    x = torch.randn(6, 1, 2, 3) * 1.7
    dy = torch.randn_like(x)
    fast = pixel_norm_derivatives(lambda t: pixel_norm(t, 1, backend=backend), x, dy, torch.ones_like(x))
    ref = pixel_norm_derivatives(lambda t: reference.pixel_norm(t, 1), x.double(), dy.double(),
                                 torch.ones_like(x).double())
    error_vs_reference(fast[0], ref[0], reference.pixel_norm(x, 1), f"{backend} y")
    # (the second derivatives, of order r^3 ~ 1e12 near x = 0, are not compared here)
    for name, f, r in zip(["dx"], fast[1:2], ref[1:2]):
        assert torch.isfinite(f).all(), name
        assert (f.double() - r).abs().max() <= 1e-3 * max(1.0, r.abs().max().item()), f"{backend} {name} seed={seed}"


def test_pixel_norm_eps_matters(seed):
    # Tiny inputs: eps dominates the mean square, so a kernel that ignored it would differ.
    x = torch.randn(4, 8, 3, 3) * 1e-5
    for eps in (1e-8, 1e-4):
        y = pixel_norm(x, eps=eps, backend="cpu")
        torch.testing.assert_close(y, reference.pixel_norm(x.double(), 1, eps).float(), rtol=1e-5, atol=1e-9)


def test_pixel_norm_compiles(seed):
    x = torch.randn(2, 16, 4, 4)
    compiled = torch.compile(lambda t: pixel_norm(t) * 2, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), reference.pixel_norm(x) * 2)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_pixel_norm_gpu(seed, backend, dtype, layout):
    dev = torch.device("cuda")
    for shape in [(8, 512, 16, 16), (3, 37, 5, 3), (4, 33, 1, 1)]:
        x = make_x(shape, layout, dtype).to(dev)
        dy = torch.randn(shape, dtype=torch.float64, device=dev).to(dtype)
        w = torch.randn(shape, dtype=torch.float64, device=dev).to(dtype)
        fast = pixel_norm_derivatives(lambda t: pixel_norm(t, 1, backend=backend), x, dy, w)
        ref64 = pixel_norm_derivatives(lambda t: reference.pixel_norm(t, 1), x.double(), dy.double(), w.double())
        lowp = pixel_norm_derivatives(lambda t: reference.pixel_norm(t, 1), x, dy, w)
        for name, f, r, p in zip(["y", "dx", "d2x", "d2dy"], fast, ref64, lowp):
            error_vs_reference(f, r, p, f"{backend} {dtype} {shape} seed={seed} {name}")


def test_pixel_norm_bad_input():
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        pixel_norm([1.0, 2.0])
    with pytest.raises(ValueError, match="dim=4 is out of range"):
        pixel_norm(torch.randn(2, 3, 4, 4), dim=4)
    with pytest.raises(ValueError, match="eps must be a finite number > 0"):
        pixel_norm(torch.randn(2, 3), eps=0.0)
    with pytest.raises(TypeError, match="float32, float16"):
        pixel_norm(torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="unknown backend"):
        pixel_norm(torch.randn(2, 3), backend="metal")


# ----------------------------------------------------------------------------- minibatch_stddev


def minibatch_stddev_direct(x, group_size, num_channels):
    """The definition, with explicit loops: group of sample i is i % (N / G)."""
    n, c, h, w = x.shape
    g = min(group_size, n)
    groups = n // g
    extra = torch.empty(n, num_channels, h, w, dtype=x.dtype)
    for j in range(groups):
        members = x[j::groups]  # [G, C, H, W]
        std = (members.var(dim=0, unbiased=False) + 1e-8).sqrt()  # [C, H, W]
        for k in range(num_channels):
            extra[j::groups, k] = std[k * (c // num_channels):(k + 1) * (c // num_channels)].mean()
    return torch.cat([x, extra], dim=1)


@pytest.mark.parametrize("n, group_size, num_channels", [(8, 4, 1), (6, 4, 1), (6, 3, 2), (3, 4, 1), (4, 2, 3)])
def test_minibatch_stddev(seed, n, group_size, num_channels):
    c = 6 if num_channels != 3 else 9
    x = torch.randn(n, c, 3, 5, dtype=torch.float64)
    if n % min(group_size, n):
        with pytest.raises(ValueError, match="not divisible by the group size"):
            minibatch_stddev(x, group_size, num_channels)
        return
    expected = minibatch_stddev_direct(x, group_size, num_channels)
    torch.testing.assert_close(minibatch_stddev(x, group_size, num_channels), expected)
    x32 = x.float()
    error_vs_reference(minibatch_stddev(x32, group_size, num_channels), expected,
                       reference.minibatch_stddev(x32, min(group_size, n), num_channels))
    xs = torch.randn(4, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: minibatch_stddev(t, 2, 1), (xs,), fast_mode=True)


def test_minibatch_stddev_bad_input():
    with pytest.raises(ValueError, match="must be 4-D"):
        minibatch_stddev(torch.randn(4, 3, 2))
    with pytest.raises(ValueError, match="batch size 6 is not divisible by the group size 4"):
        minibatch_stddev(torch.randn(6, 3, 2, 2), group_size=4)
    with pytest.raises(ValueError, match="channel count 5 is not divisible by num_channels=2"):
        minibatch_stddev(torch.randn(4, 5, 2, 2), num_channels=2)
    with pytest.raises(TypeError, match="group_size must be an int"):
        minibatch_stddev(torch.randn(4, 4, 2, 2), group_size=2.5)


# ----------------------------------------------------------------------------- conv2d_resample


def conv2d_resample_direct(x, w, f, up, down, padding, groups, flip_weight, flip_filter):
    """The definition: zero-insert + pad + filter (upfirdn2d), conv2d, filter + decimate;
    the padding is measured on the upsampled image, as NVlabs' generic path."""
    fw, fh = reference.filter_size(f)
    px0, px1, py0, py1 = parse_padding(padding)
    if up > 1:
        px0 += (fw + up - 1) // 2
        px1 += (fw - up) // 2
        py0 += (fh + up - 1) // 2
        py1 += (fh - up) // 2
    if down > 1:
        px0 += (fw - down + 1) // 2
        px1 += (fw - down) // 2
        py0 += (fh - down + 1) // 2
        py1 += (fh - down) // 2
    x = ref_upfirdn2d(x, f if up > 1 else None, up=up, padding=[px0, px1, py0, py1], gain=up ** 2,
                      flip_filter=flip_filter)
    x = F.conv2d(x, w if flip_weight else w.flip([2, 3]), groups=groups)
    if down > 1:
        x = ref_upfirdn2d(x, f, down=down, flip_filter=flip_filter)
    return x


CONV_CASES = [  # (up, down, k, groups, padding)
    (1, 1, 3, 1, 1), (1, 1, 3, 2, [1, 0, 2, 1]), (1, 1, 1, 1, 0), (1, 1, 3, 1, [0, -1, 1, 0]),
    (2, 1, 3, 1, 1), (2, 1, 3, 2, 1), (2, 1, 1, 1, 0), (1, 2, 3, 1, 1), (1, 2, 1, 2, 0), (1, 2, 3, 2, 0),
    (2, 2, 3, 1, 1), (2, 1, 3, 1, [0, 1, 1, 0]),
]


@pytest.mark.parametrize("flip_weight", [True, False])
@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_conv2d_resample_matches_definition(seed, case, flip_weight):
    up, down, k, groups, padding = case
    x = torch.randn(2, 4, 7, 6, dtype=torch.float64)
    w = torch.randn(6, 4 // groups, k, k, dtype=torch.float64)
    f = setup_filter([1, 3, 3, 1])
    for flip_filter in (False, True):
        expected = conv2d_resample_direct(x, w, f, up, down, padding, groups, flip_weight, flip_filter)
        got = conv2d_resample(x, w, f, up, down, padding, groups, flip_weight, flip_filter)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    # float32 through genfast's upfirdn2d, channels_last input
    x32 = x.float().to(memory_format=torch.channels_last)
    got32 = conv2d_resample(x32, w.float(), f, up, down, padding, groups, flip_weight)
    low = reference.conv2d_resample(x32, w.float(), f, up, down, padding, groups, flip_weight)
    error_vs_reference(got32, conv2d_resample_direct(x, w, f, up, down, padding, groups, flip_weight, False), low)


def test_conv2d_resample_gradgradcheck(seed):
    f = setup_filter([1, 3, 3, 1])
    for up, down in ((2, 1), (1, 2)):
        x = torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
        w = torch.randn(2, 2, 3, 3, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradgradcheck(lambda a, b: conv2d_resample(a, b, f, up, down, 1), (x, w), fast_mode=True)


def test_conv2d_resample_bad_input():
    x, w = torch.randn(2, 4, 5, 5), torch.randn(3, 4, 3, 3)
    with pytest.raises(ValueError, match="x must be 4-D"):
        conv2d_resample(x[0], w)
    with pytest.raises(ValueError, match="x has 4 channels but w expects 2 input channels"):
        conv2d_resample(x, torch.randn(3, 2, 3, 3))
    with pytest.raises(TypeError, match="w must have the dtype of x"):
        conv2d_resample(x, w.double())
    with pytest.raises(ValueError, match="up must be >= 1"):
        conv2d_resample(x, w, up=0)
    with pytest.raises(TypeError, match="padding must be"):
        conv2d_resample(x, w, padding=[1, 2, 3])


# ----------------------------------------------------------------------------- modulated_conv2d


def modulated_conv2d_direct(x, weight, styles, noise, up, padding, f, demodulate, flip_weight):
    """Per sample: w_n = weight * styles[n] (per input channel), demodulated per output channel."""
    outs = []
    for n in range(x.shape[0]):
        wn = weight * styles[n].reshape(1, -1, 1, 1)
        if demodulate:
            wn = wn * (wn.square().sum(dim=[1, 2, 3], keepdim=True) + 1e-8).rsqrt()
        outs.append(conv2d_resample_direct(x[n:n + 1], wn, f, up, 1, padding, 1, flip_weight, False))
    y = torch.cat(outs)
    return y + noise if noise is not None else y


@pytest.mark.parametrize("up", [1, 2])
@pytest.mark.parametrize("demodulate", [True, False])
@pytest.mark.parametrize("fused", [True, False])
def test_modulated_conv2d_matches_definition(seed, up, demodulate, fused):
    n, i, o, res = 3, 5, 4, 6
    x = torch.randn(n, i, res, res, dtype=torch.float64)
    weight = torch.randn(o, i, 3, 3, dtype=torch.float64)
    styles = torch.randn(n, i, dtype=torch.float64) + 1
    noise = torch.randn(n, 1, res * up, res * up, dtype=torch.float64)
    f = setup_filter([1, 3, 3, 1])
    flip_weight = up == 1
    expected = modulated_conv2d_direct(x, weight, styles, noise, up, 1, f, demodulate, flip_weight)
    got = modulated_conv2d(x, weight, styles, noise, up=up, padding=1, resample_filter=f, demodulate=demodulate,
                           flip_weight=flip_weight, fused_modconv=fused)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
    x32, s32 = x.float(), styles.float()
    got32 = modulated_conv2d(x32, weight.float(), s32, noise.float(), up=up, padding=1, resample_filter=f,
                             demodulate=demodulate, flip_weight=flip_weight, fused_modconv=fused)
    low = reference.modulated_conv2d(x32, weight.float(), s32, noise.float(), up=up, padding=1, resample_filter=f,
                                     demodulate=demodulate, flip_weight=flip_weight, fused_modconv=fused)
    error_vs_reference(got32, expected, low, f"float32 fused={fused} seed={seed}")


def test_modulated_conv2d_float16_prescaling(seed):
    # Styles and weights large enough that the unscaled per-sample weights overflow float16;
    # the inf-norm pre-scaling keeps the demodulated result finite and right.
    n, i, o = 2, 8, 4
    x = torch.randn(n, i, 5, 5, dtype=torch.float64)
    weight = torch.randn(o, i, 3, 3, dtype=torch.float64) * 300
    styles = torch.randn(n, i, dtype=torch.float64) * 300
    expected = modulated_conv2d_direct(x, weight, styles, None, 1, 1, None, True, True)
    for fused in (True, False):
        try:
            got = modulated_conv2d(x.half(), weight.float(), styles.float(), padding=1, fused_modconv=fused)
        except RuntimeError as exc:  # CPU builds of torch without float16 conv
            pytest.skip(f"float16 conv2d unavailable on this CPU build: {exc}")
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), expected, rtol=2e-2, atol=2e-2)


def test_modulated_conv2d_gradgradcheck(seed):
    f = setup_filter([1, 3, 3, 1])
    x = torch.randn(2, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(2, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    styles = (torch.randn(2, 2, dtype=torch.float64) + 1).requires_grad_()
    for fused, up in ((True, 2), (False, 1)):
        def fn(a, b, c):
            return modulated_conv2d(a, b, c, up=up, padding=1, resample_filter=f, flip_weight=up == 1,
                                    fused_modconv=fused)
        assert torch.autograd.gradgradcheck(fn, (x, weight, styles), fast_mode=True)


def test_modulated_conv2d_bad_input():
    x, weight, styles = torch.randn(2, 4, 5, 5), torch.randn(3, 4, 3, 3), torch.randn(2, 4)
    with pytest.raises(ValueError, match="x must be 4-D"):
        modulated_conv2d(x[0], weight, styles)
    with pytest.raises(ValueError, match=r"styles must have shape \[batch=2, in_channels=4\], got \(2, 5\)"):
        modulated_conv2d(x, weight, torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"styles must have shape \[batch=2"):
        modulated_conv2d(x, weight, torch.randn(3, 4))
    with pytest.raises(ValueError, match="x has 4 channels but weight expects 3"):
        modulated_conv2d(x, torch.randn(3, 3, 3, 3), styles)
    with pytest.raises(ValueError, match="weight must be 4-D"):
        modulated_conv2d(x, torch.randn(3, 4), styles)
    with pytest.raises(TypeError, match="noise must be a torch.Tensor"):
        modulated_conv2d(x, weight, styles, noise=1.0)


# ----------------------------------------------------------------------------- the extension entry

_C = __import__("genfast")._ext._C
native = pytest.mark.skipif(_C is None, reason="no extension")


def _pixel_norm_native(**overrides):
    x = torch.randn(2, 5, 3)
    args = dict(out=torch.empty_like(x), x=x, dy=None, options=_C.PixelNormOptions(mode="forward", dim=1, eps=1e-8),
                num_threads=1)
    args.update(overrides)
    _C.pixel_norm_cpu(**args)
    return args


@native
def test_pixel_norm_native_entry_matches_the_reference(seed):
    args = _pixel_norm_native()
    error_vs_reference(args["out"], reference.pixel_norm(args["x"].double(), 1, 1e-8),
                       reference.pixel_norm(args["x"], 1, 1e-8))


@native
@pytest.mark.parametrize("overrides,error,match", [
    (dict(out=torch.empty(2, 3, 5)), ValueError, "pixel_norm_cpu: out must have the shape of x"),
    (dict(out=torch.empty(2, 5, 3, dtype=torch.float16)), TypeError, "pixel_norm_cpu: out must be float32"),
    (dict(out=None), ValueError, "pixel_norm_cpu: out is required, got None"),
    (dict(options=_C.PixelNormOptions(mode="grad", dim=1, eps=1e-8) if _C else None), ValueError,
     "pixel_norm_cpu: dy is required, got None"),
    (dict(options=_C.PixelNormOptions(mode="forward", dim=3, eps=1e-8) if _C else None), ValueError,
     "pixel_norm_cpu: options.dim=3 is out of range"),
    (dict(x=torch.randn(2, 5, 6)[..., ::2], out=torch.empty(2, 5, 3)), ValueError, "pixel_norm_cpu: x must be dense"),
])
def test_pixel_norm_native_entry_rejects_bad_tensors(overrides, error, match):
    with pytest.raises(error, match=match):
        _pixel_norm_native(**overrides)


@native
def test_pixel_norm_native_options_are_named_and_complete():
    with pytest.raises(TypeError):  # an unknown field
        _C.PixelNormOptions(mode="forward", dim=1, eps=1e-8, axis=1)
    with pytest.raises(TypeError):  # a missing field
        _C.PixelNormOptions(mode="forward", dim=1)
    with pytest.raises(ValueError, match="PixelNormOptions: unknown mode 'backward'"):
        _C.PixelNormOptions(mode="backward", dim=1, eps=1e-8)
    assert set(_C.PIXEL_NORM_MODES) == {"forward", "grad"}
