"""pytest-benchmark suite of genfast.ops.upfirdn2d: every provider that runs here (genfast
backends, the eager reference = pad + grouped conv2d, torch.compile of it) in fwd and fwd+bwd,
for 2x up- and downsampling with the StyleGAN2 4x4 and StyleGAN3 12-tap separable filters.

    pytest bench/test_bench_upfirdn2d.py --benchmark-disable -q   # each case once, checked
    pytest bench/test_bench_upfirdn2d.py --benchmark-only         # the numbers

Sizes: CPU float32 (2, 64, 64, 64) / (2, 32, 128, 128); GPU float16 StyleGAN2 256^2 and
StyleGAN3 1024^2 layers. The cases are genfast.bench.upfirdn2d's, the ones the CLI runs.
"""
import pytest
import torch

from genfast.bench import upfirdn2d as suite
from genfast.bench.pytest_support import benchmark_case
from genfast.bench.timing import dtype_name, strict_dispatch

if torch.cuda.is_available():
    DEVICE = torch.device("cuda", torch.cuda.current_device())
    CASES, DTYPE = suite.GPU_QUICK_CASES, torch.float16
else:
    DEVICE = torch.device("cpu")
    CASES, DTYPE = suite.CPU_QUICK_CASES, torch.float32

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


@pytest.fixture(scope="module", autouse=True)
def strict():
    # A backend that cannot run must fail here, not be timed under another backend's name.
    with strict_dispatch():
        yield


@pytest.mark.parametrize("mode", suite.MODES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0].label}-{'x'.join(map(str, c[1]))}")
@pytest.mark.parametrize("provider", suite.PROVIDERS)
def test_upfirdn2d(benchmark, provider, case, mode):
    variant, shape = case
    bench_case = suite.build_case(mode, variant, shape, DTYPE, DEVICE)
    benchmark_case(benchmark, bench_case, provider, group=f"upfirdn2d {mode} {dtype_name(DTYPE)} {'x'.join(map(str, shape))} {variant.label}")
