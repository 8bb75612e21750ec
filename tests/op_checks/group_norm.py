"""Shared by tests/test_group_norm.py, tests/test_group_norm_cuda_emulated.py and
tests/test_emulation_cuda_emulated.py: the forward + gradient check against the float64 reference."""
import torch

from genfast.ops import group_norm
from genfast.reference import group_norm as reference
from genfast.testing import error_vs_reference, rounding_floor

from helpers import random_tensor

CPU = torch.device("cpu")
LAYOUTS = ["contiguous", "channels_last", "strided"]


def make_x(shape, dtype, layout, device=CPU, mean=0.0, scale=1.5):
    """Random float64 values (mean + scale * N(0, 1)) cast to dtype, in the given layout."""
    return random_tensor(shape, dtype, layout, device, scale=scale, shift=mean)


def evaluate(fn, x, w, b, dy):
    """y and the gradients of <y, dy> with respect to x (and w, b when given)."""
    x = x.detach().requires_grad_()
    leaves = [x] + [t.detach().requires_grad_() for t in (w, b) if t is not None]
    w_ = leaves[1] if w is not None else None
    b_ = leaves[-1] if b is not None else None
    y = fn(x, w_, b_)
    grads = torch.autograd.grad(y, leaves, dy)
    return [y.detach()] + list(grads)


def check(backend, dtype, shape, num_groups, layout="contiguous", silu=False, affine=True, mean=0.0,
          device=CPU, scale=1.5, floor=None):
    act = "silu" if silu else None
    C = shape[1]
    x = make_x(shape, dtype, layout, device, mean=mean, scale=scale)
    w = (1 + 0.5 * torch.randn(C, dtype=torch.float64)).to(device=device, dtype=dtype) if affine else None
    b = (0.5 * torch.randn(C, dtype=torch.float64)).to(device=device, dtype=dtype) if affine else None
    dy = torch.randn(shape, dtype=dtype, device=device)

    def fast(x_, w_, b_):
        return group_norm(x_, num_groups, w_, b_, eps=1e-5, activation=act, backend=backend)

    def ref(x_, w_, b_):
        return reference.group_norm(x_, num_groups, w_, b_, eps=1e-5, activation=act)

    def upcast(t):
        return None if t is None else t.double()

    got = evaluate(fast, x, w, b, dy)
    want = evaluate(ref, upcast(x), upcast(w), upcast(b), upcast(dy))
    lowp = evaluate(ref, x, w, b, dy)
    names = ["y", "dx"] + (["dweight", "dbias"] if affine else [])
    eps = torch.finfo(dtype).eps
    # dx cancels terms of size rstd * |dy| (badly conditioned for tiny groups of nearly equal
    # values); dweight/dbias are sums over N * spatial elements, rounded in another order than
    # PyTorch's: the floors are sized to those terms, not to the result. With a large mean
    # (|mean| >> the spread) any low-precision mean is off by up to an ulp of it, which moves
    # every normalized value, after w, by `drift`; that reaches dx (times rstd |w dy|) and each
    # term of dweight/dbias (times |dy|, summed over `count` elements). Seed 3077210502: the
    # emulated CUDA dbias 3.7e-4 off while PyTorch's float32 was 1.4e-4 by luck (old floor
    # 7e-6). A mean that cancels (E[x^2] - E[x]^2) is off by eps |x|^2 rstd^2, 2000x more here.
    groups = x.double().reshape(shape[0], num_groups, -1)
    rstd_max = (groups.var(-1, unbiased=False) + 1e-5).rsqrt().max().item()
    count = x.numel() // C
    w_max = max(1.0, w.double().abs().max().item()) if affine else 1.0
    dy_max = dy.double().abs().max().item()
    drift = eps * groups.mean(-1).abs().max().item() * rstd_max * w_max
    floors = {"dx": max(4 * eps * rstd_max * dy_max, drift * rstd_max * w_max * dy_max)}
    for name, g, r, p in zip(names, got, want, lowp):
        assert g.dtype == dtype, f"{name}: dtype {g.dtype}, expected {dtype}"
        sized = floors.get(name, max(eps * r.abs().max().item(), drift * dy_max) * count ** 0.5
                           if name in ("dweight", "dbias") else 0.0)
        floor_here = max(floor or 0.0, sized, rounding_floor(dtype, r.abs().max().item()))
        error_vs_reference(g, r.to(g.device), p, floor=floor_here,
                           name=f"{backend} {dtype} {tuple(shape)} G={num_groups} {layout} "
                                f"silu={silu} affine={affine} {name}")
    if layout != "strided":  # a dense layout is kept, for the output and the input gradient
        assert got[0].stride() == x.stride(), f"layout not kept: {got[0].stride()} vs {x.stride()}"
        assert got[1].stride() == x.stride()
    return got
