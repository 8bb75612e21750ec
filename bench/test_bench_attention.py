"""pytest-benchmark suite of genfast's fused attention: every provider that runs here
(genfast backends, torch SDPA and its single backends, FlexAttention, flash-attn) in fwd and
fwd+bwd, plus one decode case.

    pytest bench/test_bench_attention.py --benchmark-disable -q   # each case once, checked
    pytest bench/test_bench_attention.py --benchmark-only         # the numbers

Sizes: CPU (1, 8, 1024, 64) float32; GPU (4, 16, 4096, 128) bfloat16. The cases and providers
are genfast.bench.attention's, the same the ``python -m genfast bench attention`` CLI runs.
"""
import pytest
import torch

from genfast.bench import attention as suite
from genfast.bench.pytest_support import benchmark_case
from genfast.bench.timing import dtype_name, strict_dispatch

if torch.cuda.is_available():
    DEVICE = torch.device("cuda", torch.cuda.current_device())
    SHAPE, DTYPE = (4, 16, 4096, 128), torch.bfloat16
    DECODE = dict(B=16, H=32, Hk=8, S=8192, D=128)
else:
    DEVICE = torch.device("cpu")
    SHAPE, DTYPE = (1, 8, 1024, 64), torch.float32
    DECODE = dict(B=4, H=16, Hk=4, S=2048, D=64)
MODES = ("fwd", "fwd+bwd")

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


@pytest.fixture(scope="module", autouse=True)
def strict():
    with strict_dispatch():
        yield


def _bench(benchmark, case, provider):
    benchmark_case(benchmark, case, provider, group=f"attention {case.mode} {dtype_name(DTYPE)} "
                                                    f"{'x'.join(map(str, case.shape))} {case.act}")


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", suite.PROVIDERS)
def test_attention(benchmark, provider, mode, causal):
    _bench(benchmark, suite.build_case(mode, SHAPE, DTYPE, causal, DEVICE), provider)


@pytest.mark.parametrize("provider", suite.PROVIDERS)
def test_attention_decode(benchmark, provider):
    _bench(benchmark, suite.build_decode_case(dtype=DTYPE, device=DEVICE, **DECODE), provider)
