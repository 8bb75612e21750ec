"""pytest-benchmark suite of the end-to-end model cases (``genfast.bench.models``): every model
step and sampler, each provider that runs here (``pytest bench/test_bench_models.py
--benchmark-disable -q`` runs each once as a test). Sizes: GPU the issue's (GPT-small 124M at
sequence 1024, StyleGAN2 256x256, ...); CPU the small ``cpu-quick`` preset."""
import pytest
import torch

from genfast.bench import models as suite
from genfast.bench.pytest_support import benchmark_case
from genfast.bench.timing import strict_dispatch

if torch.cuda.is_available():
    DEVICE, PRESET = torch.device("cuda", torch.cuda.current_device()), "gpu"
else:
    DEVICE, PRESET = torch.device("cpu"), "cpu-quick"

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


@pytest.fixture(scope="module", autouse=True)
def strict():
    with strict_dispatch():  # a backend that cannot run fails instead of timing another
        yield


@pytest.mark.parametrize("provider", suite.PROVIDERS)
@pytest.mark.parametrize("case", suite.CASES)
def test_models(benchmark, case, provider):
    (built,) = suite.build_cases(DEVICE, preset=PRESET, cases=(case,))
    benchmark_case(benchmark, built, provider, group=f"models {case} {built.variant}")
