"""Shared by tests/test_gan_ops.py and tests/test_gan_cuda_emulated.py: pixel_norm cases, inputs
and derivatives."""
import torch

from helpers import random_tensor

# (shape, dim, layout): NCHW over channels (S > 1), channels_last (S == 1), non-dense, features
# of a 2-D batch (long rows: several chunks in the Triton kernel), a permuted dense tensor.
PIXEL_NORM_CASES = [
    ((3, 37, 5, 3), 1, "contiguous"),
    ((2, 13, 3, 5), 1, "channels_last"),
    ((3, 11, 4, 3), 1, "strided"),
    ((5, 600), -1, "contiguous"),
    ((4, 9, 2, 3), 1, "permuted"),
]


def make_x(shape, layout, dtype):
    return random_tensor(shape, dtype, layout, scale=1.7)


def pixel_norm_derivatives(fn, x, dy, w):
    """y, dx and the second derivatives (x, dy) of sum(dx * w)."""
    x = x.detach().requires_grad_()
    dy = dy.detach().requires_grad_()
    y = fn(x)
    (dx,) = torch.autograd.grad(y, x, dy, create_graph=True)
    d2x, d2dy = torch.autograd.grad((dx * w).sum(), (x, dy))
    return [y.detach(), dx.detach(), d2x, d2dy]
