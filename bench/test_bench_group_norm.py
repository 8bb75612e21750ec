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
from genfast.bench.timing import GENFAST, dtype_name, outputs_close, strict_dispatch

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
            assert ok, f"{provider} {mode} {layout}: output differs from {case.reference} (max error {err:.3g} x max|ref|)"
            del ref

        if DEVICE.type == "cuda":
            def run():
                out = thunk()
                torch.cuda.synchronize(DEVICE)
                return out
        else:
            run = thunk

        benchmark.group = f"group_norm {mode} {dtype_name(DTYPE)} {'x'.join(map(str, SHAPE))} silu {layout}"
        benchmark.extra_info["bytes"] = case.bytes_moved
        benchmark(run)
        stats = getattr(getattr(benchmark, "stats", None), "stats", None)
        if stats is not None and getattr(stats, "median", 0):
            benchmark.extra_info["gbps"] = case.bytes_moved / stats.median / 1e9
    finally:
        if case.cleanup is not None:
            case.cleanup()
