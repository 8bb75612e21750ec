"""pytest-benchmark suite of the fused VAE reparameterisation + KL: every provider that runs
here in fwd and fwd+bwd (``pytest bench/ --benchmark-disable -q`` runs each once as a test).
Sizes: CPU 256K float32 elements; GPU 16M bfloat16 elements."""
import pytest
import torch

from genfast.bench import vae as suite
from genfast.bench.pytest_support import benchmark_case
from genfast.bench.timing import strict_dispatch

if torch.cuda.is_available():
    DEVICE = torch.device("cuda", torch.cuda.current_device())
    SHAPE, DTYPE = (256, 16, 64, 64), torch.bfloat16
else:
    DEVICE = torch.device("cpu")
    SHAPE, DTYPE = (16, 4, 64, 64), torch.float32

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


@pytest.fixture(scope="module", autouse=True)
def strict():
    with strict_dispatch():  # a backend that cannot run fails instead of timing another
        yield


@pytest.mark.parametrize("mode", suite.MODES)
@pytest.mark.parametrize("provider", suite.PROVIDERS)
def test_vae(benchmark, provider, mode):
    benchmark_case(benchmark, suite.build_case(mode, SHAPE, DTYPE, DEVICE), provider)
