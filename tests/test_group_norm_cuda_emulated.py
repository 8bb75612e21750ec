"""The CUDA GroupNorm (+ SiLU) kernels' exact source (kernels/group_norm.cu), run on the CPU.

CI has nvcc but no GPU: the kernels and their real bindings are compiled as host C++ over the
SIMT emulator (tests/cuda_emulation) and called through genfast's own CUDA backend code
(genfast/ops/group_norm.py _group_norm_cuda, autograd included) on CPU tensors: y, dx, dweight
and dbias against the float64 reference, NCHW and NHWC, vector and scalar paths, several
chunks and channel blocks. The same checks run on a real GPU in tests/test_group_norm.py
(marked gpu).
"""
import pytest
import torch

from cuda_emulation import build
from genfast.ops import group_norm
from genfast.reference import group_norm as reference
from genfast.testing import error_vs_reference
from op_checks import group_norm as checks

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


emulated, extension = build.cuda_backend_fixtures("group_norm", "group_norm_fwd_cuda")


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("silu", [False, True], ids=["plain", "silu"])
@pytest.mark.parametrize("layout", checks.LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(seed, dtype, layout, silu, affine, extension):
    checks.check("cuda", dtype, (3, 12, 5, 7), 4, layout, silu, affine)
    assert extension.calls.get("group_norm_bwd_cuda", 0) > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shape,groups,layout", [
    ((2, 16, 33, 17), 4, "contiguous"),     # a group of 2244 elements in 2 chunks (float32)
    ((2, 16, 33, 17), 4, "channels_last"),  # 9 chunks of rows
    ((1, 136, 3, 5), 8, "channels_last"),   # 2 blocks of channels (float32), the second one partial
    ((2, 140, 2, 3), 7, "channels_last"),   # C not a multiple of 8: the scalar path in float16
    ((1, 6, 2051), 2, "contiguous"),        # a group length no multiple of the vector: scalar path
])
def test_chunks_and_channel_blocks(seed, dtype, layout, shape, groups):
    checks.check("cuda", dtype, shape, groups, layout, silu=True)


@pytest.mark.parametrize("shape,layout", [
    ((3, 12), "contiguous"),
    ((3, 12, 35), "channels_last"),
    ((2, 12, 3, 4, 5), "contiguous"),
    ((2, 12, 3, 4, 5), "channels_last"),
    ((2, 12, 1, 1), "channels_last"),
    ((1, 6, 2, 3), "strided"),
])
def test_spatial_dims(seed, shape, layout):
    checks.check("cuda", torch.float32, shape, 3, layout, silu=True)
    checks.check("cuda", torch.float32, shape, 6, layout, silu=False, affine=False)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_large_mean_does_not_cancel(seed, layout):
    got = checks.check("cuda", torch.float32, (2, 8, 6, 5), 2, layout, silu=True, mean=2e3, scale=1.0)
    assert got[0].std() > 0.1


def test_misaligned_input(seed):
    """x off the 16-byte grid: every kernel's scalar path."""
    x = torch.randn(1 + 2 * 8 * 16)[1:].view(2, 8, 16)
    assert x.data_ptr() % 16 != 0
    w, b = torch.randn(8), torch.randn(8)
    error_vs_reference(group_norm(x, 4, w, b, backend="cuda"),
                       reference.group_norm(x.double(), 4, w.double(), b.double()), reference.group_norm(x, 4, w, b))
