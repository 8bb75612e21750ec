"""The CUDA bias_act kernels' exact source (kernels/bias_act.cu), run on the CPU.

CI has nvcc but no GPU: the kernels and their real bindings are compiled as host C++ over the
SIMT emulator (tests/cuda_emulation) and called through genfast's own CUDA backend code
(genfast/ops/bias_act.py _bias_act_cuda, autograd included) on CPU tensors: forward, first and
second derivatives against the float64 reference. The same checks run on a real GPU in
tests/test_bias_act.py (marked gpu).
"""
import pytest
import torch

from cuda_emulation import build
from genfast.ops import bias_act
from genfast.reference import bias_act as reference
from genfast.testing import error_vs_reference
from op_checks import bias_act as checks

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (layout, use_bias, clamp): every layout, with and without bias and clamp.
VARIANTS = [("contiguous", True, None), ("channels_last", True, 0.7), ("strided", False, 0.7), ("permuted", True, None)]


emulated, extension = build.cuda_backend_fixtures("bias_act", "bias_act_cuda")


@pytest.mark.parametrize("act", checks.ACTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(seed, dtype, act):
    for layout, use_bias, clamp in VARIANTS:
        checks.check_against_reference("cuda", dtype, act, layout, use_bias, clamp)


@pytest.mark.parametrize("shape,dim", [((7,), 0), ((5, 3), 1), ((2, 1, 3), 1), ((4, 6, 3), 2), ((2, 3, 4, 5), -1),
                                       ((3, 2, 4, 5, 3), 2), ((1000, 3), 0)])
def test_shapes_and_dims(seed, shape, dim):
    x, b = torch.randn(shape), torch.randn(shape[dim])
    got = bias_act(x, b, dim=dim, act="lrelu", backend="cuda")
    error_vs_reference(got, reference(x.double(), b.double(), dim=dim % x.ndim, act="lrelu"),
                       reference(x, b, dim=dim % x.ndim, act="lrelu"))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_misaligned_and_odd_sizes(seed, dtype):
    """A data pointer off the 16-byte grid and a length that is no multiple of the vector:
    the kernels' scalar path and the partial last vector."""
    big = torch.randn(1 + 3 * 11 * 13, dtype=dtype)
    x = big[1:].view(3, 11, 13)
    assert x.data_ptr() % 16 != 0
    b = torch.randn(11, dtype=dtype)
    error_vs_reference(bias_act(x, b, act="swish", backend="cuda"), reference(x.double(), b.double(), act="swish"),
                       reference(x, b, act="swish"))
    y = torch.randn(3, 11, 13, dtype=dtype)  # aligned, 429 elements: the last vector is partial
    error_vs_reference(bias_act(y, b, act="elu", clamp=0.5, backend="cuda"),
                       reference(y.double(), b.double(), act="elu", clamp=0.5), reference(y, b, act="elu", clamp=0.5))
