"""The CUDA upfirdn2d kernels' exact source (kernels/upfirdn2d.cu), run on the CPU.

CI has nvcc but no GPU: the kernels and their real bindings are compiled as host C++ over the
SIMT emulator (tests/cuda_emulation) and called through genfast's own CUDA backend code
(genfast/ops/upfirdn2d.py _upfirdn2d_cuda, autograd included) on CPU tensors: the general
kernel on every case, dtype and layout, every tiled specialisation with partial tiles in both
layouts, and the gradients, against the float64 definition. The same checks run on a real
GPU in tests/test_upfirdn2d.py (marked gpu).
"""
import pytest
import torch

from cuda_emulation import build
from genfast.ops import upfirdn2d
from genfast.reference.upfirdn2d import upfirdn2d as reference
from genfast.testing import error_vs_reference
from op_checks import upfirdn2d as checks


emulated, extension = build.cuda_backend_fixtures("upfirdn2d", "upfirdn2d_cuda")


@pytest.mark.parametrize("case", checks.CASES, ids=checks.case_id)
def test_forward_cases(case, seed):
    checks.check_forward_cases("cuda", case, seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided", "channels_last_strided"])
def test_forward_dtypes_and_layouts(dtype, layout, seed):
    checks.check_forward_dtypes_and_layouts("cuda", dtype, layout)


@pytest.mark.parametrize("spec", checks.TILED, ids=lambda s: f"up{s[0]}-down{s[1]}-f{s[2]}{'s' if s[3] else 'f'}")
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_tiled_cases(spec, layout, seed):
    """Every tiled specialisation, with several tiles per axis (the last ones partial), for
    NHWC several channel blocks (the last one partial), and more planes than the emulation's
    grid (cuda.grid_cap): the kernel's grid-stride loop over planes."""
    up, down, taps, separable = spec
    shape = (2, 3, 21, 40) if layout == "contiguous" else (2, 19, 13, 30)
    x = checks.make_x(shape, torch.float16, layout)
    f = checks.make_filter(taps, separable)
    for padding in ([(taps + up - 1) // 2 + (down - 1), (taps - up) // 2, 3, -1], 0 if taps <= 4 else taps // 2):
        y = upfirdn2d(x, f, up, down, padding, gain=up * up, backend="cuda")
        error_vs_reference(y, reference(x.double(), f, up, down, padding, gain=up * up),
                           reference(x, f, up, down, padding, gain=up * up), name=f"padding {padding}")
        assert y.is_contiguous(
            memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_gradients(dtype, seed):
    checks.check_gradients_vs_reference("cuda", dtype)
