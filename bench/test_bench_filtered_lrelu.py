"""pytest-benchmark suite of genfast.ops.filtered_lrelu on StyleGAN3's common layer (36x36,
up 2 / down 2, 12-tap filters): every provider that runs here (genfast backends, the eager
reference chain, torch.compile of it) in fwd and fwd+bwd.

    pytest bench/test_bench_filtered_lrelu.py --benchmark-disable -q   # each case once, checked
    pytest bench/test_bench_filtered_lrelu.py --benchmark-only         # the numbers

Sizes: CPU (2, 32, 36, 36) float32; GPU (8, 256, 36, 36) float16. The cases and providers are
genfast.bench.filtered_lrelu's, the same the ``python -m genfast bench`` CLI runs.
"""
import pytest
import torch

from genfast.bench import filtered_lrelu as suite
from genfast.bench.pytest_support import benchmark_case
from genfast.bench.timing import dtype_name, strict_dispatch

if torch.cuda.is_available():
    DEVICE = torch.device("cuda", torch.cuda.current_device())
    SHAPE, DTYPE = (8, 256, 36, 36), torch.float16
else:
    DEVICE = torch.device("cpu")
    SHAPE, DTYPE = (2, 32, 36, 36), torch.float32

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


@pytest.fixture(scope="module", autouse=True)
def strict():
    # A backend that cannot run must fail here, not be timed under another backend's name.
    with strict_dispatch():
        yield


@pytest.mark.parametrize("mode", suite.MODES)
@pytest.mark.parametrize("provider", suite.PROVIDERS)
def test_filtered_lrelu(benchmark, provider, mode):
    case = suite.build_case(mode, SHAPE, DTYPE, DEVICE)
    benchmark_case(benchmark, case, provider, group=f"filtered_lrelu {mode} {dtype_name(DTYPE)} {'x'.join(map(str, SHAPE))}")
