"""pytest-benchmark suite of genfast.ops.bias_act: every provider that runs here (genfast
backends, the eager reference, torch.compile of the reference) in fwd and fwd+bwd.

    pytest bench/ --benchmark-disable -q     # each case once, as a test (with a correctness check)
    pytest bench/ --benchmark-only           # the numbers

Sizes: CPU 4M float32 elements; GPU 64M float16 elements. The cases and providers are
genfast.bench.bias_act's, the same the ``python -m genfast bench`` CLI runs.
"""
import pytest
import torch

from genfast.bench import bias_act as suite
from genfast.bench.pytest_support import benchmark_case
from genfast.bench.timing import strict_dispatch

if torch.cuda.is_available():
    DEVICE = torch.device("cuda", torch.cuda.current_device())
    SHAPE, DTYPE = (64, 256, 64, 64), torch.float16  # 64M elements
else:
    DEVICE = torch.device("cpu")
    SHAPE, DTYPE = (4, 256, 64, 64), torch.float32  # 4M elements
ACT = "lrelu"
MODES = ("fwd", "fwd+bwd")

# torch.compile imports torch.jit, which warns about its own deprecation.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


@pytest.fixture(scope="module", autouse=True)
def strict():
    # A backend that cannot run must fail here, not be timed under another backend's name.
    with strict_dispatch():
        yield


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", suite.PROVIDERS)
def test_bias_act(benchmark, provider, mode):
    benchmark_case(benchmark, suite.build_case(mode, SHAPE, DTYPE, ACT, DEVICE), provider)
