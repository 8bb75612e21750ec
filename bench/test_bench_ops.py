"""pytest-benchmark suite of every genfast.bench family: each case of the table below under each
of its providers that runs here (genfast backends, eager references, torch.compile baselines,
torch SDPA, diffusers, ...). A genfast provider's output is checked against the case's
reference before it is timed.

    pytest bench/ --benchmark-disable -q          # each case once, as a test (with the check)
    pytest bench/ --benchmark-only                # the numbers
    pytest bench/ --benchmark-disable -q -k attention   # one family

The cases and providers are the genfast.bench suites', the same the ``python -m genfast bench``
CLI runs; sizes below (CPU sizes are small: this runs beside the test suite). Test ids are
``<family>-<case>-<provider>``; benchmark groups name the op, mode, dtype and shape.
"""
from __future__ import annotations

import pytest
import torch

from genfast.bench import attention, bias_act, diffusion, filtered_lrelu, gan, group_norm, models, schedulers
from genfast.bench import upfirdn2d, vae
from genfast.bench.pytest_support import benchmark_case
from genfast.bench.timing import dtype_name, strict_dispatch

GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda", torch.cuda.current_device()) if GPU else torch.device("cpu")
LOWP = torch.float16 if GPU else torch.float32

# torch.compile imports torch.jit, which warns about its own deprecation.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


def _dims(shape) -> str:
    return "x".join(map(str, shape))


def _family_bias_act():
    shape = (64, 256, 64, 64) if GPU else (4, 256, 64, 64)  # 64M / 4M elements
    for mode in ("fwd", "fwd+bwd"):
        yield mode, bias_act.PROVIDERS, lambda mode=mode: (
            bias_act.build_case(mode, shape, LOWP, "lrelu", DEVICE), None)


def _family_filtered_lrelu():
    shape = (8, 256, 36, 36) if GPU else (2, 32, 36, 36)
    for mode in filtered_lrelu.MODES:
        group = f"filtered_lrelu {mode} {dtype_name(LOWP)} {_dims(shape)}"
        yield mode, filtered_lrelu.PROVIDERS, lambda mode=mode, group=group: (
            filtered_lrelu.build_case(mode, shape, LOWP, DEVICE), group)


def _family_group_norm():
    shape = (2, 320, 64, 64) if GPU else (2, 320, 32, 32)
    for mode in group_norm.MODES:
        for layout in group_norm.LAYOUTS:
            group = f"group_norm {mode} {dtype_name(LOWP)} {_dims(shape)} silu {layout}"
            yield f"{mode}-{layout}", group_norm.PROVIDERS, lambda mode=mode, layout=layout, group=group: (
                group_norm.build_case(mode, shape, LOWP, "silu", DEVICE, layout), group)


def _family_upfirdn2d():
    for mode in upfirdn2d.MODES:
        for variant, shape in (upfirdn2d.GPU_QUICK_CASES if GPU else upfirdn2d.CPU_QUICK_CASES):
            group = f"upfirdn2d {mode} {dtype_name(LOWP)} {_dims(shape)} {variant.label}"
            yield f"{mode}-{variant.label}-{_dims(shape)}", upfirdn2d.PROVIDERS, (
                lambda mode=mode, variant=variant, shape=shape, group=group:
                (upfirdn2d.build_case(mode, variant, shape, LOWP, DEVICE), group))


def _family_vae():
    shape, dtype = ((256, 16, 64, 64), torch.bfloat16) if GPU else ((16, 4, 64, 64), torch.float32)
    for mode in vae.MODES:
        yield mode, vae.PROVIDERS, lambda mode=mode: (vae.build_case(mode, shape, dtype, DEVICE), None)


def _family_diffusion():
    shapes = ((16, 4, 64, 64), (16, 4, 1024, 1024)) if GPU else ((16, 4, 64, 64),)
    # step_cfg_noise draws its noise in-kernel, so its output cannot equal the baseline's: the
    # CLI benchmarks it (with a shape-only check); here every variant is value-checked.
    for variant in (v for v in diffusion.VARIANTS if v != "step_cfg_noise"):
        for shape in shapes:
            if variant == "embedding":
                shape = (shape[0], diffusion.EMBED_DIM)
            yield f"{variant}-{_dims(shape)}", diffusion.PROVIDERS, lambda variant=variant, shape=shape: (
                diffusion.build_case(variant, shape, LOWP, DEVICE), None)


def _family_schedulers():
    shape = (1, 4, 64, 64)  # one SD latent
    for kind in ("ddim", "dpmpp_2m"):
        group = f"scheduler step {kind} {dtype_name(LOWP)} {_dims(shape)}"
        yield kind, schedulers.PROVIDERS, lambda kind=kind, group=group: (
            schedulers.build_case(kind, "step", shape, LOWP, DEVICE, measure_host=False), group)


def _family_gan():
    if GPU:
        pixel_norm_shape, mlp_batch, modconv_shape = gan.PIXEL_NORM_GPU_SHAPES[0], 1024, gan.MODCONV_GPU[0]
    else:
        pixel_norm_shape, mlp_batch, modconv_shape = (4, 512, 16, 16), 64, (2, 16, 16, 16, 2)
    # genfast's provider of the MLP and modulated_conv2d cases is named after the device
    fast = DEVICE.type
    for mode in gan.MODES:
        group = f"pixel_norm {mode} {dtype_name(LOWP)} {_dims(pixel_norm_shape)}"
        yield f"pixel_norm-{mode}", gan.GENFAST_BACKENDS + gan.BASELINES, lambda mode=mode, group=group: (
            gan.pixel_norm_case(mode, pixel_norm_shape, LOWP, DEVICE), group)
    for mode in gan.MODES:
        for net in gan.MLP_NETS:
            group = f"mlp_gan {net} {mode} {dtype_name(LOWP)} batch {mlp_batch}"
            yield f"mlp_gan-{net}-{mode}", [fast, "eager", "compile"], lambda mode=mode, net=net, group=group: (
                gan.mlp_case(mode, net, mlp_batch, LOWP, DEVICE), group)
    for fused in (True, False):
        label = "fused" if fused else "nonfused"
        group = f"modulated_conv2d fwd {label} {_dims(modconv_shape)}"
        yield f"modulated_conv2d-{label}", [fast, "eager"], lambda fused=fused, group=group: (
            gan.modconv_case("fwd", modconv_shape, LOWP, DEVICE, fused), group)


def _family_attention():
    if GPU:
        shape, dtype, decode = (4, 16, 4096, 128), torch.bfloat16, dict(B=16, H=32, Hk=8, S=8192, D=128)
    else:
        shape, dtype, decode = (1, 8, 1024, 64), torch.float32, dict(B=4, H=16, Hk=4, S=2048, D=64)

    def group(case):
        return f"attention {case.mode} {dtype_name(dtype)} {_dims(case.shape)} {case.act}"

    def build(mode, causal):
        case = attention.build_case(mode, shape, dtype, causal, DEVICE)
        return case, group(case)

    def build_decode():
        case = attention.build_decode_case(dtype=dtype, device=DEVICE, **decode)
        return case, group(case)

    for mode in ("fwd", "fwd+bwd"):
        for causal in (False, True):
            yield f"{mode}-{'causal' if causal else 'full'}", attention.PROVIDERS, (
                lambda mode=mode, causal=causal: build(mode, causal))
    yield "decode", attention.PROVIDERS, build_decode


def _family_models():
    preset = "gpu" if GPU else "cpu-quick"

    def build(name):
        (case,) = models.build_cases(DEVICE, preset=preset, cases=(name,))
        return case, f"models {name} {case.variant}"

    for name in models.CASES:
        yield name, models.PROVIDERS, lambda name=name: build(name)


FAMILIES = {"bias_act": _family_bias_act, "filtered_lrelu": _family_filtered_lrelu, "group_norm": _family_group_norm,
            "upfirdn2d": _family_upfirdn2d, "vae": _family_vae, "diffusion": _family_diffusion,
            "schedulers": _family_schedulers, "gan": _family_gan, "attention": _family_attention,
            "models": _family_models}


def _params() -> list:
    params = []
    for family, cases in FAMILIES.items():
        for case_id, providers, build in cases():
            for provider in providers:
                params.append(pytest.param(build, provider, id=f"{family}-{case_id}-{provider}"))
    return params


@pytest.fixture(scope="module", autouse=True)
def strict():
    # A backend that cannot run must fail here, not be timed under another backend's name.
    with strict_dispatch():
        yield


@pytest.mark.parametrize("build, provider", _params())
def test_bench(benchmark, build, provider):
    case, group = build()
    benchmark_case(benchmark, case, provider, group=group)
