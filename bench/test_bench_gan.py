"""pytest-benchmark suite of the GAN layer set: pixel_norm (every provider that runs here),
the MNIST MLP-GAN stacks of FusedLinearAct vs nn.Linear + activation (eager and compiled), and
StyleGAN2 modulated_conv2d vs the reference; fwd and fwd+bwd.

    pytest bench/test_bench_gan.py --benchmark-disable -q   # each case once, with a correctness check
    pytest bench/test_bench_gan.py --benchmark-only         # the numbers

The cases and providers are genfast.bench.gan's, the same the ``python -m genfast bench gan``
CLI runs. CPU sizes are small (this runs in the test suite); GPU sizes are the suite's.
"""
import pytest
import torch

from genfast.bench import gan as suite
from genfast.bench.pytest_support import benchmark_case
from genfast.bench.timing import dtype_name, strict_dispatch

if torch.cuda.is_available():
    DEVICE = torch.device("cuda", torch.cuda.current_device())
    DTYPE = torch.float16
    PIXEL_NORM_SHAPE = suite.PIXEL_NORM_GPU_SHAPES[0]
    MLP_BATCH = 1024
    MODCONV_SHAPE = suite.MODCONV_GPU[0]
else:
    DEVICE = torch.device("cpu")
    DTYPE = torch.float32
    PIXEL_NORM_SHAPE = (4, 512, 16, 16)
    MLP_BATCH = 64
    MODCONV_SHAPE = (2, 16, 16, 16, 2)

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


@pytest.fixture(scope="module", autouse=True)
def strict():
    with strict_dispatch():
        yield


def _run(benchmark, case, provider, group):
    benchmark_case(benchmark, case, provider, group=group)


@pytest.mark.parametrize("mode", suite.MODES)
@pytest.mark.parametrize("provider", suite.GENFAST_BACKENDS + suite.BASELINES)
def test_pixel_norm(benchmark, provider, mode):
    case = suite.pixel_norm_case(mode, PIXEL_NORM_SHAPE, DTYPE, DEVICE)
    _run(benchmark, case, provider, f"pixel_norm {mode} {dtype_name(DTYPE)} {'x'.join(map(str, PIXEL_NORM_SHAPE))}")


@pytest.mark.parametrize("mode", suite.MODES)
@pytest.mark.parametrize("net", list(suite.MLP_NETS))
@pytest.mark.parametrize("provider", ["genfast", "eager", "compile"])
def test_mlp_gan(benchmark, provider, net, mode):
    case = suite.mlp_case(mode, net, MLP_BATCH, DTYPE, DEVICE)
    name = DEVICE.type if provider == "genfast" else provider
    _run(benchmark, case, name, f"mlp_gan {net} {mode} {dtype_name(DTYPE)} batch {MLP_BATCH}")


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "nonfused"])
@pytest.mark.parametrize("provider", ["genfast", "eager"])
def test_modulated_conv2d(benchmark, provider, fused):
    case = suite.modconv_case("fwd", MODCONV_SHAPE, DTYPE, DEVICE, fused)
    name = DEVICE.type if provider == "genfast" else provider
    _run(benchmark, case, name, f"modulated_conv2d fwd {'fused' if fused else 'nonfused'} {'x'.join(map(str, MODCONV_SHAPE))}")
