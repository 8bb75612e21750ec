"""Benchmark cases of ``genfast.schedulers``: a sampler step and a 50-step loop.

Schedulers (Stable Diffusion's config: scaled_linear 0.00085..0.012, steps_offset 1):
``ddim`` (eta 0, no clipping), ``euler_a`` (draws noise every step), ``dpmpp_2m`` (keeps the
previous x0) and, in the full suite, ``dpmpp_2m_sde``. Modes:
  step    one step at step 25 of 50 (state reset before each call)
  loop50  set_timesteps(50) and 50 steps with a fixed model output (a pipeline call minus the model)
Providers: ``genfast`` (the scheduler), ``diffusers`` (the same diffusers scheduler, when
importable: the reference the genfast output is checked against), ``eager`` (the reference
``sampler_step`` with the same coefficient rows; the reference when diffusers is missing) and
``compile`` (torch.compile of it). Every provider draws its noise with the same seeded generator.
Bytes moved: the ideal fused step (read x, model output, history, noise; write prev and x0).
The variant column carries the host time per step of genfast and diffusers (perf_counter over
50 steps without synchronising: the launch overhead a pipeline sees).
"""
from __future__ import annotations

import math
import time
from typing import Iterator, Optional

import torch

from .. import schedulers as G
from ..reference.diffusion import sampler_step as reference_step
from .providers import NO_COMPILE, CompileFailures, case_device, itemsize, reset_compile
from .timing import BASELINE, GENFAST, Case, Provider, input_sets_for, synchronize

NAME = "schedulers"
SD_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 steps_offset=1)
KINDS = {
    "ddim": ("DDIMScheduler", dict(clip_sample=False, set_alpha_to_one=False)),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++")),
}
QUICK_KINDS = ("ddim", "dpmpp_2m")
MODES = ("step", "loop50")
STEPS, AT = 50, 25
PROVIDERS = ("genfast", "diffusers", "eager", "compile")
CPU_SHAPES = ((1, 4, 64, 64), (16, 4, 64, 64), (4, 16, 128, 128))
CPU_QUICK_SHAPES = ((1, 4, 64, 64),)
GPU_SHAPES = ((1, 4, 64, 64), (16, 4, 64, 64), (64, 16, 256, 256))  # the last: 67M elements
GPU_QUICK_SHAPES = GPU_SHAPES
CPU_DTYPES = (torch.float32,)
GPU_DTYPES = (torch.float16, torch.float32)

# torch.compile failures, per device type: after the first, later cases do not retry.
_compile_failures = CompileFailures()


def _diffusers():
    try:
        import diffusers  # test/bench-only dependency
        return diffusers
    except Exception:
        return None


def _make(kind: str, library, device):
    cls_name, extra = KINDS[kind]
    s = getattr(library, cls_name)(**SD_CONFIG, **extra)
    s.set_timesteps(STEPS, device=device)
    return s


def _noisy(kind):
    return kind in ("euler_a", "dpmpp_2m_sde")


def _history(kind):
    return kind.startswith("dpmpp")


def _plan(kind: str) -> list:
    """(step index, row variant, uses history) of each step of the 50-step loop."""
    if not _history(kind):
        return [(i, 0, False) for i in range(STEPS)]
    return [(i, 0 if i in (0, STEPS - 1) else 1, i not in (0, STEPS - 1)) for i in range(STEPS)]


def bytes_moved(kind: str, mode: str, shape, dtype) -> int:
    n, item = math.prod(shape), itemsize(dtype)
    per_step = 4 * n * item  # x, model output read; prev, x0 written
    if _history(kind):
        per_step += n * item
    if _noisy(kind):
        per_step += n * (4 if kind == "dpmpp_2m_sde" else item)
    return per_step * (STEPS if mode == "loop50" else 1)


def make_inputs(shape, dtype, device, seed: int = 0) -> dict:
    gen = torch.Generator(device=device).manual_seed(4321 + seed)
    r = lambda: torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(dtype)  # noqa: E731
    return {"x": r(), "m": r(), "h": r()}


def _reset(s, lib_is_genfast: bool, kind: str, at: Optional[int], h=None):
    if lib_is_genfast:
        s._step_index = at
        if _history(kind):
            s._history = h
            s.lower_order_nums = 0 if at is None else 2
    else:
        s._step_index = at
        if _history(kind):
            s.model_outputs = [None, h]
            s.lower_order_nums = 0 if at is None else 2


def _scheduler_factory(kind, mode, device, library, is_genfast):
    def factory(inputs):
        s = _make(kind, library, device)
        x, m, h = inputs["x"], inputs["m"], inputs["h"]
        gen = torch.Generator(device=device)
        if mode == "step":
            t = s.timesteps[AT]

            def thunk():
                _reset(s, is_genfast, kind, AT, h)
                gen.manual_seed(0)
                return s.step(m, t, x, generator=gen).prev_sample
        else:
            def thunk():
                s.set_timesteps(STEPS, device=device)
                gen.manual_seed(0)
                y = x
                for t in s.timesteps:
                    y = s.step(m, t, y, generator=gen).prev_sample
                return y
        return thunk
    return factory


def _eager_factory(kind, mode, device, step_fn, warm_up=False):
    def factory(inputs):
        s = _make(kind, G, device)
        table = s._table(device, torch.float32)
        x, m, h = inputs["x"], inputs["m"], inputs["h"]
        gen = torch.Generator(device=device)
        noise_dtype = torch.float32 if kind == "dpmpp_2m_sde" else m.dtype
        plan = _plan(kind) if mode == "loop50" else [(AT, 1 if _history(kind) else 0, _history(kind))]

        def thunk():
            gen.manual_seed(0)
            y, hist = x, h
            for i, variant, uses_history in plan:
                z = G.randn_tensor(m.shape, generator=gen, device=device, dtype=noise_dtype) if _noisy(kind) else None
                y, aux = step_fn(y, m, table[i, variant], history=hist if uses_history else None, noise=z,
                                 out_dtype=m.dtype)
                hist = aux
            return y
        if warm_up:
            thunk()
        return thunk
    return factory


def _compile_factory(kind, mode, device):
    """torch.compile of the reference step, compiled and warmed up on the first input set; a
    failure is remembered so later cases skip it."""
    inner = _eager_factory(kind, mode, device, torch.compile(reference_step, dynamic=False), warm_up=True)

    def factory(inputs):
        try:
            return inner(inputs)
        except Exception as exc:
            _compile_failures.record(device.type, exc)
            raise
    return factory


def host_ms_per_step(kind, library, device, shape, dtype) -> Optional[float]:
    """Host time of a step inside a 50-step loop (no synchronisation inside the loop)."""
    if library is None:
        return None
    inputs = make_inputs(shape, dtype, device)
    s = _make(kind, library, device)
    gen = torch.Generator(device=device).manual_seed(0)
    best = math.inf
    for _ in range(2):
        s.set_timesteps(STEPS, device=device)
        y = inputs["x"]
        synchronize(device)
        start = time.perf_counter()
        for t in s.timesteps:
            y = s.step(inputs["m"], t, y, generator=gen).prev_sample
        best = min(best, (time.perf_counter() - start) * 1e3 / STEPS)
        synchronize(device)
    return best


def build_case(kind: str, mode: str, shape, dtype, device="cpu", use_compile: bool = True,
               measure_host: bool = True, quick: bool = False) -> Case:
    device = case_device(device)
    diffusers = _diffusers()
    providers = {}
    providers["genfast"] = Provider("genfast", GENFAST, _scheduler_factory(kind, mode, device, G, True))
    providers["diffusers"] = Provider(
        "diffusers", BASELINE, _scheduler_factory(kind, mode, device, diffusers, False) if diffusers else None,
        None if diffusers else "diffusers is not installed")
    providers["eager"] = Provider("eager", BASELINE, _eager_factory(kind, mode, device, reference_step))
    reason = None if use_compile else NO_COMPILE
    if reason is None and quick and mode == "loop50" and device.type == "cpu":
        reason = "quick mode on CPU: compile is timed in step mode only"
    if reason is None:
        reason = _compile_failures.reason(device.type)
    compile_factory = _compile_factory(kind, mode, device) if reason is None else None
    providers["compile"] = Provider("compile", BASELINE, compile_factory, reason)
    variant = ""
    if measure_host and mode == "step":
        ours = host_ms_per_step(kind, G, device, shape, dtype)
        theirs = host_ms_per_step(kind, diffusers, device, shape, dtype)
        variant = f"host/step {ours:.3f} ms" + (f" (diffusers {theirs:.3f})" if theirs is not None else "")
    return Case(
        op=NAME, mode=mode, shape=tuple(shape), dtype=dtype, act=kind, device=device,
        bytes_moved=bytes_moved(kind, mode, shape, dtype),
        make_inputs=lambda i: make_inputs(shape, dtype, device, seed=i),
        providers=providers, reference="diffusers" if diffusers else "eager",
        baselines=("diffusers", "eager", "compile") if diffusers else ("eager", "compile"),
        n_input_sets=input_sets_for(device, 3 * math.prod(shape) * itemsize(dtype)),
        variant=variant, cleanup=reset_compile if compile_factory else None,
    )


def _suite(device, quick):
    device = torch.device(device)
    if device.type == "cuda":
        shapes, dtypes = (GPU_QUICK_SHAPES if quick else GPU_SHAPES), GPU_DTYPES
    else:
        shapes, dtypes = (CPU_QUICK_SHAPES if quick else CPU_SHAPES), CPU_DTYPES
    kinds = QUICK_KINDS if quick else tuple(KINDS)
    return [(k, mode, s, d) for s in shapes for d in dtypes for k in kinds for mode in MODES
            if not (mode == "loop50" and math.prod(s) > (1 << 22) and quick)]


def build_cases(device, quick: bool = False, use_compile: bool = True) -> Iterator[Case]:
    for kind, mode, shape, dtype in _suite(device, quick):
        yield build_case(kind, mode, shape, dtype, device, use_compile, quick=quick)


def count_cases(device, quick: bool = False) -> int:
    return len(_suite(device, quick))
