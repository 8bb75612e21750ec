"""Shared by tests/test_filtered_lrelu.py and tests/test_filtered_lrelu_cuda_emulated.py: the
configurations and the forward + gradient check against the float64 reference."""
import math

import torch

from genfast.ops import filtered_lrelu, setup_filter
from genfast.reference import filtered_lrelu as reference
from genfast.reference.upfirdn2d import upfirdn2d as reference_upfirdn2d
from genfast.testing import error_vs_reference

GAIN, SLOPE = math.sqrt(2), 0.2
CPU = torch.device("cpu")


def make_x(shape, dtype, layout, device=CPU):
    x = torch.randn(shape, dtype=torch.float64)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "strided":  # not dense: every other column of a wider tensor
        x = torch.randn(*shape[:-1], 2 * shape[-1], dtype=torch.float64)[..., ::2]
    elif layout == "permuted":  # dense, in no standard order
        x = torch.randn(shape[2], shape[0], shape[3], shape[1], dtype=torch.float64).permute(1, 3, 0, 2)
    assert x.shape == torch.Size(shape)
    return x.to(device=device, dtype=dtype)


def make_filter(kind, taps, device=CPU):
    """A random lowpass-like float32 filter: 'sep' = 1-D [taps], 'full' = 2-D [taps, taps - 1]."""
    if kind == "sep":
        return setup_filter(torch.rand(taps) + 0.2, device=device)
    f = torch.rand(taps, max(1, taps - 1)) + 0.2
    return (f / f.sum()).to(device)


def pre_activation(x64, b64, fu, up, padding, flip):
    """The upsampled intermediate z (before the activation), float64."""
    if b64 is not None:
        x64 = x64 + b64.reshape(1, -1, 1, 1)
    return reference_upfirdn2d(x64, fu, up=up, padding=padding, gain=up ** 2, flip_filter=flip)


def avoid_kinks(x, b, fu, up, padding, flip, clamp, gain=GAIN, slope=SLOPE, delta=1e-4):
    """Move x (kept in its dtype) until no upsampled pixel z lies within ``delta`` of the
    lrelu kink (z = 0) or the clamp edges (|lrelu(z) gain| = clamp), where the derivative
    jumps and no comparison is meaningful: pushes the bad pixels outwards along the adjoint."""
    dtype = x.dtype
    fu = torch.ones(1, 1) if fu is None else fu
    b64 = None if b is None else b.double()
    # Pixels whose footprint lies in the padding are exactly 0 (no x reaches them): every
    # implementation agrees there, and x cannot move them.
    # sensitivity[p] = |dz_p / dx|^2, to scale each pixel's push.
    sensitivity = pre_activation(torch.ones(x.shape, dtype=torch.float64), None, fu.double().square(), up, padding,
                                 flip) * up ** 2
    reached = sensitivity > 1e-12
    for _ in range(60):
        x64 = x.double().requires_grad_()
        z = pre_activation(x64, b64, fu, up, padding, flip)
        v = torch.where(z > 0, z, z * slope) * gain
        bad = z.abs() < delta
        if clamp is not None:
            bad |= (v.abs() - clamp).abs() < delta
        bad &= reached
        if not bad.any():
            return x
        # Each bad pixel moves by about 4 delta away from its kink (neighbours by less).
        direction = torch.where(z >= 0, 1.0, -1.0).double() * bad / sensitivity.clamp_min(1e-12)
        (g,) = torch.autograd.grad((z * direction).sum(), x64)
        moved = (x.double() + 4 * delta * g).to(dtype)
        # In 16-bit dtypes the push can be below one ulp: then move those elements by one ulp.
        stuck = (moved == x) & (g != 0)
        ulp = torch.finfo(dtype).eps * x.double().abs().clamp_min(1e-3)
        x = torch.where(stuck, (x.double() + torch.sign(g) * ulp).to(dtype), moved)
    raise AssertionError("could not move the inputs off the kinks")


def default_padding(fu, fd):
    """Enough padding for a valid output of about up/down times the input."""
    taps = (1 if fu is None else fu[1]) + (1 if fd is None else fd[1])
    return [taps // 2, (taps - 1) // 2]


def run_both(fn, x, b, dy):
    """(y, dx, db) of fn via autograd (db None without a bias)."""
    x = x.detach().requires_grad_()
    b = b.detach().requires_grad_() if b is not None else None
    y = fn(x, b)
    grads = torch.autograd.grad(y, [x] + ([b] if b is not None else []), dy)
    return y.detach(), grads[0], (grads[1] if b is not None else None)


def check(backend, dtype, up=2, down=2, fu=("sep", 6), fd=("sep", 12), padding=None, flip=False, clamp=None,
          layout="contiguous", shape=(2, 3, 9, 11), use_bias=True, gain=GAIN, slope=SLOPE, device=CPU):
    fu_t = None if fu is None else make_filter(*fu, device=device)
    fd_t = None if fd is None else make_filter(*fd, device=device)
    padding = default_padding(fu, fd) if padding is None else padding
    b = (torch.randn(shape[1], dtype=torch.float64) * 0.5).to(device=device, dtype=dtype) if use_bias else None
    for attempt in range(5):  # a rare draw has pixels the push cannot free (16-bit, up 4, clamp): draw again
        try:
            x = avoid_kinks(make_x(shape, dtype, layout, device).cpu(), None if b is None else b.cpu(),
                            None if fu_t is None else fu_t.cpu(), up, padding, flip, clamp, gain, slope).to(device)
            break
        except AssertionError:
            if attempt == 4:
                raise
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "permuted":
        x = x.permute(2, 0, 3, 1).contiguous().permute(1, 3, 0, 2)
    elif layout == "strided":
        x = torch.cat([x, x], dim=-1)[..., : shape[-1]]  # a non-dense view holding the same values
        assert not x.is_contiguous()
    kwargs = dict(fu=fu_t, fd=fd_t, up=up, down=down, padding=padding, gain=gain, slope=slope, clamp=clamp,
                  flip_filter=flip)

    def fast(x_, b_):
        return filtered_lrelu(x_, b=b_, backend=backend, **kwargs)

    def ref(x_, b_):
        return reference(x_, b=b_, **kwargs)

    got_y = fast(x, b)
    dy = torch.randn(got_y.shape, dtype=torch.float64).to(device=device, dtype=dtype)
    got = run_both(fast, x, b, dy)
    up64 = (lambda t: None if t is None else t.double())
    want = run_both(ref, up64(x), up64(b), up64(dy))
    lowp = run_both(ref, x, b, dy)
    for name, g, w, p in zip(("y", "dx", "db"), got, want, lowp):
        if w is None:
            continue
        assert g.dtype == dtype, f"{name}: dtype {g.dtype}, expected {dtype}"
        error_vs_reference(g, w, p, name=f"{backend} {dtype} {name} up={up} down={down} fu={fu} fd={fd} "
                                          f"pad={padding} flip={flip} clamp={clamp} {layout}")
    torch.testing.assert_close(got_y, got[0], rtol=0, atol=0)  # with and without the sign record
    if layout == "channels_last":
        assert got[0].is_contiguous(memory_format=torch.channels_last)
    return got


# (up, down, fu, fd, padding, flip, clamp): factors {1, 2, 4}, separable/full, padding forms.
CONFIGS = [
    (2, 2, ("sep", 12), ("sep", 12), [10, 9, 11, 8], False, None),  # StyleGAN3's common layer
    (2, 2, ("sep", 6), ("sep", 6), None, True, 0.8),
    (1, 2, ("full", 3), ("sep", 5), [2, 3], False, 0.6),
    (2, 1, ("sep", 4), ("full", 3), 3, True, None),
    (4, 2, ("sep", 8), ("full", 4), [6, 5, 4, 7], False, 1.1),
    (2, 4, ("full", 4), ("sep", 8), [9, 7, 8, 10], True, None),
    (1, 1, ("full", 3), ("full", 2), [-1, 3, 2, 0], False, 0.9),  # negative padding crops
    (4, 4, ("sep", 12), ("sep", 12), [12, 13], False, None),
    (1, 4, None, ("sep", 8), [3, 4], False, None),  # fu = None: identity
    (4, 1, ("sep", 8), None, [4, 3], True, 0.7),  # fd = None
]


CONFIG_IDS = [f"up{c[0]}-down{c[1]}-{c[2] and c[2][0]}-{c[3] and c[3][0]}-{'flip' if c[5] else 'conv'}"
              f"-{'clamp' if c[6] else 'noclamp'}" for c in CONFIGS]
