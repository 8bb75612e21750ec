"""Running one ``genfast.bench`` case under pytest-benchmark (used by the files in bench/).

``benchmark_case(benchmark, case, provider)`` skips a provider that cannot run here, checks a
genfast provider's output against the case's reference first, then times it (synchronising
the GPU inside the timed function, since pytest-benchmark times on the host).
"""
from __future__ import annotations

import pytest
import torch

from .timing import GENFAST, dtype_name


def benchmark_case(benchmark, case, provider: str, group: str = None) -> None:
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
            first = str(exc).splitlines()[0] if str(exc) else ""
            pytest.skip(f"{provider} cannot run here: {type(exc).__name__}: {first}")
        if spec.kind == GENFAST:
            ref = case.providers[case.reference].factory(inputs)()
            ok, err = case.check(thunk(), ref, case.dtype)
            assert ok, f"{provider} {case.mode}: output differs from {case.reference} (max error {err:.3g} x max|ref|)"
            del ref

        if case.device.type == "cuda":
            def run():
                out = thunk()
                torch.cuda.synchronize(case.device)
                return out
        else:
            run = thunk

        shape = "x".join(map(str, case.shape))
        benchmark.group = group or f"{case.op} {case.mode} {dtype_name(case.dtype)} {shape} {case.act}"
        benchmark.extra_info["bytes"] = case.bytes_moved
        flops = case.extra.get("flops")
        if flops:
            benchmark.extra_info["flops"] = flops
        benchmark(run)
        stats = getattr(getattr(benchmark, "stats", None), "stats", None)
        if stats is not None and getattr(stats, "median", 0):
            benchmark.extra_info["gbps"] = case.bytes_moved / stats.median / 1e9
            if flops:
                benchmark.extra_info["tflops"] = flops / stats.median / 1e12
    finally:
        if case.cleanup is not None:
            case.cleanup()
