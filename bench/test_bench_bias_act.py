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
from genfast.bench.timing import GENFAST, dtype_name, outputs_close, strict_dispatch

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
    case = suite.build_case(mode, SHAPE, DTYPE, ACT, DEVICE)
    spec = case.providers[provider]
    if spec.unavailable:
        pytest.skip(f"{provider}: {spec.unavailable}")
    try:
        inputs = case.make_inputs(0)
        try:
            thunk = spec.factory(inputs)  # compiles and warms up the torch.compile baseline
        except Exception as exc:
            if spec.kind == GENFAST:
                raise
            pytest.skip(f"{provider} cannot run here: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        if spec.kind == GENFAST:
            ref = case.providers[case.reference].factory(inputs)()
            ok, err = outputs_close(thunk(), ref, DTYPE)
            assert ok, f"{provider} {mode}: output differs from {case.reference} (max error {err:.3g} x max|ref|)"
            del ref

        if DEVICE.type == "cuda":
            def run():
                out = thunk()
                torch.cuda.synchronize(DEVICE)
                return out
        else:
            run = thunk

        benchmark.group = f"bias_act {mode} {dtype_name(DTYPE)} {'x'.join(map(str, SHAPE))} {ACT}"
        benchmark.extra_info["bytes"] = case.bytes_moved
        benchmark(run)
        stats = getattr(getattr(benchmark, "stats", None), "stats", None)
        if stats is not None and getattr(stats, "median", 0):
            benchmark.extra_info["gbps"] = case.bytes_moved / stats.median / 1e9
    finally:
        if case.cleanup is not None:
            case.cleanup()
