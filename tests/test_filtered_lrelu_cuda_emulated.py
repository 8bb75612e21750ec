"""The CUDA filtered_lrelu kernel's exact source (kernels/filtered_lrelu.cu), run on the CPU.

CI has nvcc but no GPU: the kernel and its real bindings are compiled as host C++ over the
SIMT emulator (tests/cuda_emulation) and called through genfast's own CUDA backend code
(genfast/ops/filtered_lrelu.py _filtered_lrelu_cuda, autograd included: the backward runs the
same kernel on the sign record) on CPU tensors: every configuration (the unrolled StyleGAN3
specialisation and the general path), layouts, several output tiles, y, dx and db against the
float64 reference. The same checks run on a real GPU in tests/test_filtered_lrelu.py (gpu).
"""
import pytest
import torch

from cuda_emulation import build
from op_checks import filtered_lrelu as checks


emulated, extension = build.cuda_backend_fixtures("filtered_lrelu", "filtered_lrelu_cuda")


@pytest.mark.parametrize("config", checks.CONFIGS, ids=checks.CONFIG_IDS)
def test_matches_reference(seed, config):
    up, down, fu, fd, padding, flip, clamp = config
    checks.check("cuda", torch.float32, up, down, fu, fd, padding, flip, clamp, shape=(2, 3, 7, 9))


# The other storage types on the unrolled StyleGAN3 specialisation, the general path with the
# largest tiles (float64: above 48 KiB of shared memory, the opt-in) and negative padding.
@pytest.mark.parametrize("config", [checks.CONFIGS[i] for i in (0, 7, 6)],
                         ids=[checks.CONFIG_IDS[i] for i in (0, 7, 6)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_storage_types(seed, dtype, config):
    up, down, fu, fd, padding, flip, clamp = config
    checks.check("cuda", dtype, up, down, fu, fd, padding, flip, clamp, shape=(2, 3, 7, 9))


@pytest.mark.parametrize("layout", ["channels_last", "strided", "permuted"])
def test_layouts(seed, layout):
    checks.check("cuda", torch.float32, layout=layout, shape=(2, 5, 8, 7), clamp=0.9)
    checks.check("cuda", torch.float16, 1, 2, ("full", 3), ("sep", 4), [2, 1], True, None, layout=layout,
                    shape=(3, 4, 6, 9))


def test_odd_sizes_no_bias_and_several_tiles(seed):
    checks.check("cuda", torch.float32, shape=(1, 1, 1, 1), padding=[9, 8, 10, 7], use_bias=False)
    checks.check("cuda", torch.float32, 2, 2, ("sep", 3), ("full", 2), [1, 0, 1, 2], shape=(3, 2, 1, 13),
                 use_bias=False)
    # Outputs of 34 x 19 pixels: three by two tiles of 16 x 16, the last ones partial.
    checks.check("cuda", torch.float32, 1, 1, ("sep", 3), ("sep", 2), [1, 1], shape=(1, 2, 34, 19), clamp=0.8)
    checks.check("cuda", torch.float16, 2, 2, ("sep", 12), ("sep", 12), [10, 10, 10, 10], clamp=256.0,
                    shape=(1, 2, 20, 17))
