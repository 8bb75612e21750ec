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
from genfast.bench.timing import GENFAST, dtype_name, outputs_close, strict_dispatch

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
    spec = case.providers[provider]
    if spec.unavailable:
        pytest.skip(f"{provider}: {spec.unavailable}")
    try:
        inputs = case.make_inputs(0)
        try:
            thunk = spec.factory(inputs)
        except Exception as exc:
            if spec.kind == GENFAST:
                raise
            pytest.skip(f"{provider} cannot run here: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        if spec.kind == GENFAST:
            ref = case.providers[case.reference].factory(inputs)()
            ok, err = outputs_close(thunk(), ref, DTYPE)
            assert ok, f"{provider} {case.mode}: output differs from {case.reference} (max error {err:.3g} x max|ref|)"
            del ref
        run = thunk
        if DEVICE.type == "cuda":
            def run():
                out = thunk()
                torch.cuda.synchronize(DEVICE)
                return out
        benchmark.group = f"attention {case.mode} {dtype_name(DTYPE)} {'x'.join(map(str, case.shape))} {case.act}"
        benchmark.extra_info["flops"] = case.extra["flops"]
        benchmark(run)
        stats = getattr(getattr(benchmark, "stats", None), "stats", None)
        if stats is not None and getattr(stats, "median", 0):
            benchmark.extra_info["tflops"] = case.extra["flops"] / stats.median / 1e12
    finally:
        if case.cleanup is not None:
            case.cleanup()


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", suite.PROVIDERS)
def test_attention(benchmark, provider, mode, causal):
    _bench(benchmark, suite.build_case(mode, SHAPE, DTYPE, causal, DEVICE), provider)


@pytest.mark.parametrize("provider", suite.PROVIDERS)
def test_attention_decode(benchmark, provider):
    _bench(benchmark, suite.build_decode_case(dtype=DTYPE, device=DEVICE, **DECODE), provider)
