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
from genfast.bench.timing import GENFAST, dtype_name, outputs_close, strict_dispatch

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

        benchmark.group = f"filtered_lrelu {mode} {dtype_name(DTYPE)} {'x'.join(map(str, SHAPE))}"
        benchmark.extra_info["bytes"] = case.bytes_moved
        benchmark(run)
        stats = getattr(getattr(benchmark, "stats", None), "stats", None)
        if stats is not None and getattr(stats, "median", 0):
            benchmark.extra_info["gbps"] = case.bytes_moved / stats.median / 1e9
    finally:
        if case.cleanup is not None:
            case.cleanup()
