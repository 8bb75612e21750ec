"""pytest-benchmark suite of the fused diffusion ops (genfast.bench.diffusion): every provider
that runs here for each variant (``pytest bench/ --benchmark-disable -q`` runs each once as a
test, with the correctness check against the eager reference first).
Sizes: SD latents 16x4x64x64 (CPU float32; GPU float16), and 16x4x1024x1024 (64M) on a GPU."""
import pytest
import torch

from genfast.bench import diffusion as suite
from genfast.bench.pytest_support import benchmark_case
from genfast.bench.timing import strict_dispatch

if torch.cuda.is_available():
    DEVICE = torch.device("cuda", torch.cuda.current_device())
    SHAPES, DTYPE = ((16, 4, 64, 64), (16, 4, 1024, 1024)), torch.float16
else:
    DEVICE = torch.device("cpu")
    SHAPES, DTYPE = ((16, 4, 64, 64),), torch.float32
# step_cfg_noise draws its noise in-kernel, so its output cannot equal the baseline's: the CLI
# benchmarks it (with a shape-only check); here every variant is value-checked.
VARIANTS = [v for v in suite.VARIANTS if v != "step_cfg_noise"]

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


@pytest.fixture(scope="module", autouse=True)
def strict():
    with strict_dispatch():  # a backend that cannot run fails instead of timing another
        yield


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("provider", suite.PROVIDERS)
def test_diffusion(benchmark, provider, variant, shape):
    if variant == "embedding":
        shape = (shape[0], suite.EMBED_DIM)
    benchmark_case(benchmark, suite.build_case(variant, shape, DTYPE, DEVICE), provider)
