"""pytest-benchmark suite of genfast.ops.group_norm (GroupNorm + SiLU): every provider that
runs here (genfast backends, eager F.group_norm + F.silu, torch.compile of it) in fwd and
fwd+bwd, NCHW and NHWC.

    pytest bench/test_bench_group_norm.py --benchmark-disable -q   # each case once, checked
    pytest bench/test_bench_group_norm.py --benchmark-only         # the numbers

Sizes: CPU 2x320x32x32 float32; GPU 2x320x64x64 float16 (the first SD-UNet GroupNorm). The
cases and providers are genfast.bench.group_norm's, the same the CLI runs.
"""
import pytest
import torch

from genfast.bench import group_norm as suite
from genfast.bench.pytest_support import benchmark_case
from genfast.bench.timing import dtype_name, strict_dispatch

if torch.cuda.is_available():
    DEVICE = torch.device("cuda", torch.cuda.current_device())
    SHAPE, DTYPE = (2, 320, 64, 64), torch.float16
else:
    DEVICE = torch.device("cpu")
    SHAPE, DTYPE = (2, 320, 32, 32), torch.float32

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


@pytest.fixture(scope="module", autouse=True)
def strict():
    with strict_dispatch():
        yield


@pytest.mark.parametrize("layout", suite.LAYOUTS)
@pytest.mark.parametrize("mode", suite.MODES)
@pytest.mark.parametrize("provider", suite.PROVIDERS)
def test_group_norm(benchmark, provider, mode, layout):
    case = suite.build_case(mode, SHAPE, DTYPE, "silu", DEVICE, layout)
    benchmark_case(benchmark, case, provider, group=f"group_norm {mode} {dtype_name(DTYPE)} {'x'.join(map(str, SHAPE))} silu {layout}")
