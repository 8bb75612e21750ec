"""pytest-benchmark suite of genfast.ops.upfirdn2d: every provider that runs here (genfast
backends, the eager reference = pad + grouped conv2d, torch.compile of it) in fwd and fwd+bwd,
for 2x up- and downsampling with the StyleGAN2 4x4 and StyleGAN3 12-tap separable filters.

    pytest bench/test_bench_upfirdn2d.py --benchmark-disable -q   # each case once, checked
    pytest bench/test_bench_upfirdn2d.py --benchmark-only         # the numbers

Sizes: CPU float32 (2, 64, 64, 64) / (2, 32, 128, 128); GPU float16 StyleGAN2 256^2 and
StyleGAN3 1024^2 layers. The cases are genfast.bench.upfirdn2d's, the ones the CLI runs.
"""
import pytest
import torch

from genfast.bench import upfirdn2d as suite
from genfast.bench.timing import GENFAST, dtype_name, outputs_close, strict_dispatch

if torch.cuda.is_available():
    DEVICE = torch.device("cuda", torch.cuda.current_device())
    CASES, DTYPE = suite.GPU_QUICK_CASES, torch.float16
else:
    DEVICE = torch.device("cpu")
    CASES, DTYPE = suite.CPU_QUICK_CASES, torch.float32

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


@pytest.fixture(scope="module", autouse=True)
def strict():
    # A backend that cannot run must fail here, not be timed under another backend's name.
    with strict_dispatch():
        yield


@pytest.mark.parametrize("mode", suite.MODES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0].label}-{'x'.join(map(str, c[1]))}")
@pytest.mark.parametrize("provider", suite.PROVIDERS)
def test_upfirdn2d(benchmark, provider, case, mode):
    variant, shape = case
    bench_case = suite.build_case(mode, variant, shape, DTYPE, DEVICE)
    spec = bench_case.providers[provider]
    if spec.unavailable:
        pytest.skip(f"{provider}: {spec.unavailable}")
    try:
        inputs = bench_case.make_inputs(0)
        try:
            thunk = spec.factory(inputs)  # compiles and warms up the torch.compile baseline
        except Exception as exc:
            if spec.kind == GENFAST:
                raise
            pytest.skip(f"{provider} cannot run here: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        if spec.kind == GENFAST:
            ref = bench_case.providers[bench_case.reference].factory(inputs)()
            ok, err = outputs_close(thunk(), ref, DTYPE)
            assert ok, f"{provider} {mode}: output differs from {bench_case.reference} (max error {err:.3g} x max|ref|)"
            del ref

        if DEVICE.type == "cuda":
            def run():
                out = thunk()
                torch.cuda.synchronize(DEVICE)
                return out
        else:
            run = thunk

        benchmark.group = f"upfirdn2d {mode} {dtype_name(DTYPE)} {'x'.join(map(str, shape))} {variant.label}"
        benchmark.extra_info["bytes"] = bench_case.bytes_moved
        benchmark(run)
        stats = getattr(getattr(benchmark, "stats", None), "stats", None)
        if stats is not None and getattr(stats, "median", 0):
            benchmark.extra_info["gbps"] = bench_case.bytes_moved / stats.median / 1e9
    finally:
        if bench_case.cleanup is not None:
            bench_case.cleanup()
