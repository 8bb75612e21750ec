"""pytest-benchmark suite of genfast.schedulers: a DDIM and a DPM-Solver++ 2M step at SD latent
size, every provider that runs here (genfast, diffusers, the eager reference step, torch.compile
of it), the genfast output checked against diffusers' (or the eager reference's) first.

    pytest bench/test_bench_schedulers.py --benchmark-disable -q   # each case once, as a test
    pytest bench/test_bench_schedulers.py --benchmark-only         # the numbers

Sizes: batch 1 x 4x64x64 (float32 on CPU, float16 on GPU). The cases are
genfast.bench.schedulers', the same the ``python -m genfast bench schedulers`` CLI runs.
"""
import pytest
import torch

from genfast.bench import schedulers as suite
from genfast.bench.timing import GENFAST, dtype_name, outputs_close

if torch.cuda.is_available():
    DEVICE, DTYPE = torch.device("cuda", torch.cuda.current_device()), torch.float16
else:
    DEVICE, DTYPE = torch.device("cpu"), torch.float32
SHAPE = (1, 4, 64, 64)

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


@pytest.mark.parametrize("kind", ["ddim", "dpmpp_2m"])
@pytest.mark.parametrize("provider", suite.PROVIDERS)
def test_scheduler_step(benchmark, provider, kind):
    case = suite.build_case(kind, "step", SHAPE, DTYPE, DEVICE, measure_host=False)
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
            pytest.skip(f"{provider} cannot run here: {type(exc).__name__}")
        if spec.kind == GENFAST:
            ref = case.providers[case.reference].factory(inputs)()
            ok, err = outputs_close(thunk(), ref, DTYPE)
            assert ok, f"{provider} {kind}: output differs from {case.reference} (max error {err:.3g} x max|ref|)"

        def run():
            out = thunk()
            if DEVICE.type == "cuda":
                torch.cuda.synchronize(DEVICE)
            return out

        benchmark.group = f"scheduler step {kind} {dtype_name(DTYPE)} {'x'.join(map(str, SHAPE))}"
        benchmark.extra_info["bytes"] = case.bytes_moved
        benchmark(run)
    finally:
        if case.cleanup is not None:
            case.cleanup()
