"""The CUDA pixel_norm kernels' exact source (kernels/gan.cu), run on the CPU.

CI has nvcc but no GPU: the kernels and their real bindings are compiled as host C++ over the
SIMT emulator (tests/cuda_emulation) and called through genfast's own CUDA backend code
(genfast/ops/gan.py _pixel_norm_cuda, autograd included) on CPU tensors: forward, first and
second derivatives against the float64 reference, both kernels (rows: channels innermost,
scalar and 16-byte vector loads; columns: channels strided). The same checks run on a real
GPU in tests/test_gan_ops.py (marked gpu).
"""
import pytest
import torch

from cuda_emulation import build
from genfast.ops import pixel_norm
from genfast.reference import gan as reference
from genfast.testing import error_vs_reference
from op_checks import gan as checks

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CASES = checks.PIXEL_NORM_CASES + [
    ((3, 40, 2, 3), 1, "channels_last"),  # S == 1 and C a multiple of every vector width
    ((2, 70, 3, 1), 1, "contiguous"),  # S == 3: one partial tile of 32 columns, C not a multiple of 8
    ((2, 5, 67), 1, "contiguous"),  # S == 67: three tiles of columns, the last one partial
]


emulated, extension = build.cuda_backend_fixtures("gan", "pixel_norm_cuda")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[2]}-{'x'.join(map(str, c[0]))}")
def test_pixel_norm_matches_reference(seed, dtype, case):
    shape, dim, layout = case
    x = checks.make_x(shape, layout, dtype)
    dy = torch.randn(shape, dtype=torch.float64).to(dtype)
    w = torch.randn(shape, dtype=torch.float64).to(dtype)
    fast = checks.pixel_norm_derivatives(lambda t: pixel_norm(t, dim, backend="cuda"), x, dy, w)
    ref64 = checks.pixel_norm_derivatives(lambda t: reference.pixel_norm(t, dim), x.double(), dy.double(), w.double())
    lowp = checks.pixel_norm_derivatives(lambda t: reference.pixel_norm(t, dim), x, dy, w)
    for name, f, r, p in zip(["y", "dx", "d2x", "d2dy"], fast, ref64, lowp):
        error_vs_reference(f, r, p, f"cuda {dtype} seed={seed} {name}")


def test_pixel_norm_misaligned(seed):
    """A data pointer off the 16-byte grid: the rows kernel must take its scalar path."""
    x = torch.randn(1 + 6 * 64)[1:].view(6, 64)
    assert x.data_ptr() % 16 != 0
    error_vs_reference(pixel_norm(x, -1, backend="cuda"), reference.pixel_norm(x.double(), -1),
                       reference.pixel_norm(x, -1))


def test_pixel_norm_one_channel(seed):
    x = torch.randn(6, 1, 2, 3) * 1.7
    error_vs_reference(pixel_norm(x, 1, backend="cuda"), reference.pixel_norm(x.double(), 1),
                       reference.pixel_norm(x, 1))
