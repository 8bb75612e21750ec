"""Shared by tests/test_upfirdn2d.py and tests/test_upfirdn2d_cuda_emulated.py: cases, inputs and
the forward and gradient checks, each for a given backend."""
import itertools

import torch

from genfast.ops import setup_filter, upfirdn2d
from genfast.ops.upfirdn2d import DISPATCH
from genfast.reference.upfirdn2d import upfirdn2d as reference
from genfast.testing import error_vs_reference

import helpers
from helpers import random_tensor

CPU = torch.device("cpu")


def require(backend, dtype, device=CPU):
    helpers.require(DISPATCH, backend, device, dtype)


def as_pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _padding4(p):
    if isinstance(p, int):
        return p, p, p, p
    return (p[0], p[0], p[1], p[1]) if len(p) == 2 else tuple(p)


def _selection(size, up, pad0, pad1):
    """Matrix (size * up + pad0 + pad1, size) mapping input pixels to the zero-inserted,
    padded axis: row p holds input pixel (p - pad0) / up when that is a whole in-range index."""
    rows = size * up + pad0 + pad1
    s = torch.zeros(rows, size, dtype=torch.float64)
    for p in range(rows):
        src = p - pad0
        if 0 <= src < size * up and src % up == 0:
            s[p, src // up] = 1
    return s


def direct(x, f, up=1, down=1, padding=0, flip_filter=False, gain=1.0):
    """upfirdn2d by its definition, in float64: y[o] = sum_k u[o * down + k] * g[k], with the
    2-D kernel g = f * gain (outer(f, f) * gain for a separable f), flipped unless flip_filter."""
    upx, upy = as_pair(up)
    downx, downy = as_pair(down)
    px0, px1, py0, py1 = _padding4(padding)
    x = x.detach().double()
    f = torch.ones(1, 1) if f is None else f
    # The spec scales the float32 filter in float32 (gain ** 0.5 per pass when separable).
    f = (f * gain ** (f.ndim / 2)).double()
    g = torch.outer(f, f) if f.ndim == 1 else f
    if not flip_filter:
        g = g.flip([0, 1])
    u = _selection(x.shape[2], upy, py0, py1) @ x @ _selection(x.shape[3], upx, px0, px1).T
    fh, fw = g.shape
    oh = (u.shape[2] - fh) // downy + 1
    ow = (u.shape[3] - fw) // downx + 1
    y = torch.zeros(x.shape[0], x.shape[1], oh, ow, dtype=torch.float64)
    for ky, kx in itertools.product(range(fh), range(fw)):
        y += g[ky, kx] * u[:, :, ky: ky + (oh - 1) * downy + 1: downy, kx: kx + (ow - 1) * downx + 1: downx]
    return y


def make_x(shape, dtype=torch.float64, layout="contiguous"):
    return random_tensor(shape, dtype, layout)


def make_filter(taps, separable):
    """Random float32 filter (not normalized, so every tap and the gain matter)."""
    if separable:
        return torch.rand(taps) + 0.1
    fh, fw = as_pair(taps)
    return torch.randn(fh, fw)


# (up, down, padding, filter taps, separable) covering the StyleGAN cases and the odd ones.
CASES = [
    (1, 1, 0, 1, False),
    (1, 1, 1, 3, False),
    (2, 1, [2, 1], 4, True),          # upsample2d with the [1,3,3,1] family
    (1, 2, 1, 4, True),               # downsample2d
    (2, 1, [6, 5], 12, True),         # StyleGAN3 12-tap up
    (1, 2, [5, 5], 12, True),
    (2, 2, [3, 2, 1, 4], 4, False),
    (3, 1, [1, 2, 3, 0], 5, True),
    (1, 3, [2, -1, 0, 2], (3, 2), False),
    (4, 4, [-3, 2, 1, -2], 7, True),
    ([2, 3], [3, 2], [1, -1, 2, 0], (2, 5), False),
    ([1, 4], [2, 1], [0, 3, 4, 0], 6, True),
    (2, 3, -1, 2, False),
]


def case_id(case):
    up, down, pad, taps, sep = case
    return f"up{up}-down{down}-pad{pad}-f{taps}{'s' if sep else 'f'}".replace(" ", "")


def check_forward(backend, dtype, x, f, up, down, padding, flip_filter=False, gain=1.0):
    y = upfirdn2d(x, f, up, down, padding, flip_filter=flip_filter, gain=gain, backend=backend)
    ref64 = direct(x, f, up, down, padding, flip_filter, gain)
    lowp = reference(x, f, up, down, padding, flip_filter=flip_filter, gain=gain)
    assert y.dtype == dtype and y.shape == ref64.shape
    error_vs_reference(y, ref64, lowp, name=f"{backend} {dtype}")
    return y


def check_forward_cases(backend, case, seed):
    require(backend, torch.float32)
    up, down, padding, taps, separable = case
    x = make_x((2, 3, 5, 7), torch.float32)
    f = make_filter(taps, separable)
    check_forward(backend, torch.float32, x, f, up, down, padding, flip_filter=bool(seed % 2), gain=1.7)


def check_forward_dtypes_and_layouts(backend, dtype, layout):
    require(backend, dtype)
    x = make_x((1, 3, 6, 5) if backend == "triton" else (2, 5, 9, 11), dtype, layout)
    f = setup_filter([1, 3, 3, 1])
    y = check_forward(backend, dtype, x, f, 2, 1, [2, 1, 1, 2])
    expect_channels_last = layout.startswith("channels_last")
    assert y.is_contiguous(memory_format=torch.channels_last if expect_channels_last else torch.contiguous_format)
    check_forward(backend, dtype, x, make_filter(12, True), 1, 2, [5, 6, 4, 5], flip_filter=True, gain=2.0)


def check_gradients_vs_reference(backend, dtype):
    require(backend, dtype)
    up, down, padding, taps, separable = CASES[10]
    f = make_filter(taps, separable)
    x = make_x((2, 3, 5, 6), dtype, "channels_last")
    dy_shape = direct(x, f, up, down, padding).shape
    dy = torch.randn(dy_shape, dtype=torch.float64)
    w = torch.randn(x.shape, dtype=torch.float64)

    def grads(fn, x, dy, w):
        x = x.detach().requires_grad_()
        dy = dy.detach().requires_grad_()
        (dx,) = torch.autograd.grad(fn(x), x, dy, create_graph=True)
        (ddy,) = torch.autograd.grad((dx * w).sum(), dy)
        return dx.detach(), ddy

    kwargs = dict(up=up, down=down, padding=padding, flip_filter=True, gain=0.7)
    fast = grads(lambda t: upfirdn2d(t, f, backend=backend, **kwargs), x, dy.to(dtype), w.to(dtype))
    ref64 = grads(lambda t: reference(t, f, **kwargs), x.double(), dy, w)
    lowp = grads(lambda t: reference(t, f, **kwargs), x, dy.to(dtype), w.to(dtype))
    for name, a, b, c in zip(("dx", "ddy"), fast, ref64, lowp):
        error_vs_reference(a, b, c, name=f"{backend} {name}")


# Every tiled CUDA specialisation (up or down 2; 4 taps full or separable, 6 and 12 taps
# separable; 1x1 with 4x4 full), in both layouts, with sizes that leave partial tiles.
TILED = [(2, 1, 4, False), (1, 2, 4, False), (1, 1, 4, False), (2, 1, 4, True), (1, 2, 4, True),
         (2, 1, 12, True), (1, 2, 12, True), (2, 1, 6, True), (1, 2, 6, True)]
