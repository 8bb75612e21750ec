"""Device-agnostic timing, the device's copy bandwidth, and the generic benchmark case.

Timing (``time_fn``):
  * CUDA: warm-up, then one pair of CUDA events around every call; the median (and the 20th
    and 80th percentiles) of the per-call times. Calls are timed in chunks of 25 queued
    behind a spin kernel (``torch.cuda._sleep``), so they run back to back on the GPU and the
    events measure GPU time, not the host's launch overhead. Callers pass several input sets
    (thunks) whose total size exceeds the L2 cache; calls cycle through them so no call finds
    its inputs in cache.
  * CPU: warm-up, then calls timed one by one with ``time.perf_counter`` until at least 0.5 s
    (quick: 0.15 s) and 5 calls; the median of the per-call times.

Cases (``Case``, ``Provider``, ``run_case``): an op suite (e.g. ``genfast.bench.bias_act``)
describes each measurement as a ``Case``: how to build its inputs, the ideal bytes moved, and
its providers (genfast backends and baselines), each a factory turning one input set into a
thunk. ``run_case`` checks every genfast provider's output against the reference baseline
on the same input, times every provider, and returns one row (a dict) per provider. The
provider plumbing the op suites share (table, thunks, torch.compile baseline) is in
``genfast.bench.providers``.
"""
from __future__ import annotations

import contextlib
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import torch

# ----------------------------------------------------------------------------- timing

CPU_MIN_TIME_S = 0.5
CPU_MIN_TIME_QUICK_S = 0.15
CPU_MIN_REPS = 5
GPU_WARMUP_MS, GPU_WARMUP_QUICK_MS = 25.0, 10.0
GPU_REP_MS, GPU_REP_QUICK_MS = 100.0, 40.0
GPU_MIN_REPS, GPU_MAX_REPS = 10, 1000
GPU_CHUNK = 25  # calls queued behind one spin kernel
GPU_MAX_SLEEP_MS = 100.0
DEFAULT_L2_BYTES = 64 << 20


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile of an already sorted list."""
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _summary(times_ms: Sequence[float]) -> dict:
    s = sorted(times_ms)
    return {"median_ms": statistics.median(s), "p20_ms": _quantile(s, 0.2), "p80_ms": _quantile(s, 0.8), "reps": len(s)}


def _as_thunks(fn: Union[Callable[[], Any], Sequence[Callable[[], Any]]]) -> list:
    thunks = list(fn) if isinstance(fn, (list, tuple)) else [fn]
    if not thunks or not all(callable(t) for t in thunks):
        raise TypeError("time_fn: fn must be a callable or a non-empty list of callables")
    return thunks


def _time_cpu(thunks: list, quick: bool) -> dict:
    """time_fn on the CPU: ``time_cpu_interleaved`` of one provider."""
    stats = time_cpu_interleaved({"fn": thunks}, quick)["fn"]
    if isinstance(stats, Exception):
        raise stats
    return stats


# time_cpu_interleaved: rounds per provider (each about CPU_MIN_TIME_S / this long).
CPU_INTERLEAVED_ROUNDS = 5


def time_cpu_interleaved(thunks_by_name: dict, quick: bool = False) -> dict:
    """``time_fn`` on the CPU for several providers of one case, their calls in interleaved
    rounds (each provider calls for about the same time per round; the order alternates): a
    run of a few seconds on a shared machine sees bursts of load from other jobs, which would
    otherwise land on whichever provider was being timed. Each call is one sample; every
    provider gets at least ``CPU_MIN_REPS`` of them and about ``CPU_MIN_TIME_S`` in all.
    {name: summary, or the exception the provider raised}."""
    min_time = CPU_MIN_TIME_QUICK_S if quick else CPU_MIN_TIME_S

    def calibrate(thunks):
        for i in range(1 if quick else 2):  # warm-up
            thunks[i % len(thunks)]()
        start = time.perf_counter()
        thunks[0]()
        one = max(time.perf_counter() - start, 1e-7)
        per_round = max(-(-CPU_MIN_REPS // CPU_INTERLEAVED_ROUNDS), int(min_time / CPU_INTERLEAVED_ROUNDS / one))
        return min(per_round, 10000 // CPU_INTERLEAVED_ROUNDS)

    def call_times(thunks, n):
        samples = []
        for i in range(n):
            start = time.perf_counter()
            thunks[i % len(thunks)]()
            samples.append((time.perf_counter() - start) * 1e3)
        return samples

    return _interleaved(thunks_by_name, calibrate, call_times, CPU_INTERLEAVED_ROUNDS)


def _gpu_sleep(ms: float, device: torch.device) -> None:
    """Keep the GPU busy for about ``ms`` (a spin kernel), so the host can queue work ahead."""
    try:
        khz = getattr(torch.cuda.get_device_properties(device), "clock_rate", 0) or 2_000_000
        torch.cuda._sleep(int(ms * khz))  # kHz = cycles per ms
    except Exception:  # private API: without it the calls are just not queued ahead
        pass


def _time_cuda(thunks: list, device: torch.device, quick: bool) -> dict:
    with torch.cuda.device(device):
        n = len(thunks)
        for t in thunks:  # first call of each: allocations, autotuning, lazy init
            t()
        torch.cuda.synchronize()
        # Estimate one call's GPU time (to size the loops) and host time (to queue ahead).
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        n_est = max(3, n)
        start.record()
        t0 = time.perf_counter()
        for i in range(n_est):
            thunks[i % n]()
        host_ms = (time.perf_counter() - t0) * 1e3 / n_est
        end.record()
        torch.cuda.synchronize()
        estimate_ms = max(start.elapsed_time(end) / n_est, 1e-3)
        warmup_ms = GPU_WARMUP_QUICK_MS if quick else GPU_WARMUP_MS
        rep_ms = GPU_REP_QUICK_MS if quick else GPU_REP_MS
        n_warmup = max(1, min(int(math.ceil(warmup_ms / estimate_ms)), 200))
        n_rep = max(GPU_MIN_REPS, min(int(math.ceil(rep_ms / estimate_ms)), GPU_MAX_REPS))
        for i in range(n_warmup):
            thunks[i % n]()
        # Timed in chunks; before each, a spin kernel holds the GPU while the host queues the
        # whole chunk, so the calls run back to back and the events measure GPU time, not the
        # host's launch overhead. Chunks stay short enough not to fill the launch queue.
        times, i = [], n_warmup
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(GPU_CHUNK)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(GPU_CHUNK)]
        while len(times) < n_rep:
            m = min(GPU_CHUNK, n_rep - len(times))
            torch.cuda.synchronize()
            _gpu_sleep(min(1.5 * m * host_ms + 0.2, GPU_MAX_SLEEP_MS), device)
            for j in range(m):
                starts[j].record()
                thunks[i % n]()
                ends[j].record()
                i += 1
            torch.cuda.synchronize()
            times.extend(starts[j].elapsed_time(ends[j]) for j in range(m))
        return _summary(times)


def time_fn(fn: Union[Callable[[], Any], Sequence[Callable[[], Any]]], device, quick: bool = False) -> dict:
    """Time ``fn`` on ``device``; returns ``{median_ms, p20_ms, p80_ms, reps}``.

    ``fn`` is a thunk or a list of thunks (one per input set); calls cycle through the list,
    so on a GPU several input sets whose total size exceeds L2 keep calls from hitting cache.
    """
    thunks = _as_thunks(fn)
    device = torch.device(device)
    if device.type == "cuda":
        return _time_cuda(thunks, device, quick)
    if device.type == "cpu":
        return _time_cpu(thunks, quick)
    raise ValueError(f"time_fn: unsupported device {device}")


HOST_ROUNDS = 5
HOST_MIN_ROUND_S, HOST_MIN_ROUND_QUICK_S = 0.05, 0.02


def time_host_interleaved(thunks_by_name: dict, device, quick: bool = False, calls_per_thunk: int = 1) -> dict:
    """Host time of one call of each provider of a case: rounds of back-to-back calls, each
    round timed with ``time.perf_counter`` as a whole with no synchronisation inside (the
    device is synchronised between rounds, outside the timed part), so on a GPU it measures
    what the host spends to launch a call (validation, dispatch, launch), not the kernel.
    ``calls_per_thunk``: calls one thunk makes (e.g. the steps of a sampling loop); the times
    are per call. The providers' rounds are interleaved (A B, B A, A B, ...): a small call's
    host time is a few microseconds, and on a shared machine a burst of load lasting seconds
    would land on whichever provider was being timed. {name: summary as ``time_fn``'s, or the
    exception the provider raised}."""
    device = torch.device(device)
    min_round = (HOST_MIN_ROUND_QUICK_S if quick else HOST_MIN_ROUND_S) / HOST_INTERLEAVED_SPLIT

    def calibrate(thunks):
        for i in range(max(3, len(thunks))):  # warm-up: lazy imports, caches, allocator
            thunks[i % len(thunks)]()
        synchronize(device)
        start = time.perf_counter()
        thunks[0]()
        one = max(time.perf_counter() - start, 1e-7)
        synchronize(device)
        return max(len(thunks), min(int(min_round / one) + 1, 3000))

    def round_ms(thunks, n):
        start = time.perf_counter()
        for i in range(n):
            thunks[i % len(thunks)]()
        elapsed = (time.perf_counter() - start) * 1e3 / (n * calls_per_thunk)
        synchronize(device)
        return [elapsed]

    return _interleaved(thunks_by_name, calibrate, round_ms, HOST_ROUNDS * HOST_INTERLEAVED_SPLIT)


def _interleaved(thunks_by_name: dict, calibrate, round_times, rounds: int) -> dict:
    """The rounds of several providers interleaved (A B, B A, ...): ``calibrate(thunks)`` gives
    a provider's calls per round, ``round_times(thunks, n)`` times one round (a list of
    samples). {name: summary, or the exception that provider raised (the others go on)}."""
    plans, out = {}, {}
    for name, fn in thunks_by_name.items():
        thunks = _as_thunks(fn)
        try:
            plans[name] = (thunks, calibrate(thunks))
        except Exception as exc:
            out[name] = exc
    times = {name: [] for name in plans}
    for r in range(rounds):
        order = [name for name in plans if name not in out]
        for name in (order if r % 2 == 0 else order[::-1]):
            try:
                times[name].extend(round_times(*plans[name]))
            except Exception as exc:
                out[name] = exc
    out.update({name: _summary(t) for name, t in times.items() if name not in out})
    return out


# time_host_interleaved: HOST_ROUNDS x HOST_INTERLEAVED_SPLIT rounds of at least
# HOST_MIN_ROUND_S / HOST_INTERLEAVED_SPLIT each.
HOST_INTERLEAVED_SPLIT = 3


def l2_cache_bytes(device) -> int:
    """The GPU's L2 size (DEFAULT_L2_BYTES if torch does not say); 0 for a CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return 0
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "L2_cache_size", 0) or DEFAULT_L2_BYTES)


def input_sets_for(device, bytes_per_set: int, max_sets: int = 8) -> int:
    """How many input sets to rotate through so that their total exceeds twice the L2."""
    l2 = l2_cache_bytes(device)
    if l2 == 0 or bytes_per_set <= 0:
        return 1
    return max(1, min(max_sets, int(math.ceil(2 * l2 / bytes_per_set))))


_copy_bandwidth: dict = {}


def copy_buffer_bytes(device, quick: bool = False) -> int:
    device = torch.device(device)
    if device.type == "cuda":
        return 1 << 30
    return (64 << 20) if quick else (256 << 20)


def measure_copy_bandwidth(device, quick: bool = False) -> float:
    """Device-to-device copy bandwidth in GB/s (1e9 bytes/s), counting read + write.

    ``dst.copy_(src)`` of 1 GiB on a GPU, 256 MiB on a CPU (64 MiB with ``quick``), timed
    with ``time_fn``. Cached per (device, buffer size) within the process.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    nbytes = copy_buffer_bytes(device, quick)
    key = (str(device), nbytes)
    if key not in _copy_bandwidth:
        src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
        dst = torch.empty_like(src)
        stats = time_fn(lambda: dst.copy_(src), device, quick=quick)
        _copy_bandwidth[key] = 2 * nbytes / (stats["median_ms"] * 1e-3) / 1e9
        del src, dst
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return _copy_bandwidth[key]


def synchronize(device) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- cases

GENFAST, BASELINE = "genfast", "baseline"

# Tolerance of the pre-timing correctness check, relative to the largest |reference| value
# (a max-norm check: reductions such as db have entries near zero whose relative error means
# nothing). Loose on purpose: it catches wrong kernels, not rounding differences.
CHECK_TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def _flatten(out) -> list:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _flatten(o)]
    if out is None:
        return [None]
    raise TypeError(f"unexpected output type {type(out).__name__}")


def outputs_close(out, ref, dtype: torch.dtype) -> tuple:
    """(ok, worst error relative to max |ref|) for a tensor or a tuple of tensors.

    Each pair passes if ``torch.allclose(out, ref, rtol=tol, atol=tol * max|ref|)`` with the
    dtype's ``CHECK_TOLERANCE`` (NaN/inf where the reference has none fails)."""
    outs, refs = _flatten(out), _flatten(ref)
    if len(outs) != len(refs):
        return False, math.inf
    tol = CHECK_TOLERANCE.get(dtype, 1e-2)
    ok, worst = True, 0.0
    for a, r in zip(outs, refs):
        if a is None or r is None:
            if a is not r:
                return False, math.inf
            continue
        if a.shape != r.shape:
            return False, math.inf
        work = torch.float64 if dtype == torch.float64 else torch.float32
        a, r = a.detach().to(work), r.detach().to(work)
        scale = r.abs().max().item() if r.numel() else 0.0
        scale = scale if math.isfinite(scale) and scale > 0 else 1.0
        if not torch.allclose(a, r, rtol=tol, atol=tol * scale):
            ok = False
        diff = (a - r).abs().max().item() if a.numel() else 0.0
        err = diff / scale if math.isfinite(diff) else math.inf
        worst = max(worst, err) if not math.isnan(err) else math.inf
    return ok, worst


@dataclass
class Provider:
    """One implementation to time. ``factory(inputs) -> thunk`` turns one input set into a
    zero-argument callable that runs the measured work and returns its outputs (a tensor or a
    tuple), used for the correctness check. ``unavailable``: why it cannot run (None: it can)."""

    name: str
    kind: str  # GENFAST or BASELINE
    factory: Optional[Callable[[Any], Callable[[], Any]]] = None
    unavailable: Optional[str] = None


@dataclass
class Case:
    """One measurement: an op in one mode, shape, dtype and variant, with its providers."""

    op: str
    mode: str  # 'fwd' | 'bwd' | 'fwd+bwd'
    shape: tuple
    dtype: torch.dtype
    act: str  # activation (or another op-specific variant name)
    device: torch.device
    bytes_moved: int  # ideal bytes of the fused op, the same for every provider
    make_inputs: Callable[[int], Any]  # input set number -> inputs
    providers: dict  # name -> Provider, in table order
    reference: str = "eager"  # the provider the genfast providers are checked against
    baselines: tuple = ("eager", "compile")  # providers speedups are reported against
    n_input_sets: int = 1
    variant: str = ""  # e.g. 'clamp=256'
    check: Callable = outputs_close
    cleanup: Optional[Callable[[], None]] = None  # run after the case (e.g. torch._dynamo.reset)
    extra: dict = field(default_factory=dict)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def label(self) -> str:
        shape = "x".join(str(s) for s in self.shape)
        act = self.act + (f",{self.variant}" if self.variant else "")
        return f"{self.op} {self.mode} {dtype_name(self.dtype)} {shape} {act}"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _short_error(exc: BaseException, limit: int = 300) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    return first[:limit]


def _row(case: Case, provider: Provider) -> dict:
    return {
        "op": case.op,
        "mode": case.mode,
        "dtype": dtype_name(case.dtype),
        "shape": "x".join(str(s) for s in case.shape),
        "numel": case.numel,
        "act": case.act,
        "variant": case.variant,
        "provider": provider.name,
        "kind": provider.kind,
        "status": "n/a",
        "detail": "",
        "median_ms": None,
        "p20_ms": None,
        "p80_ms": None,
        "reps": None,
        "bytes": case.bytes_moved,
        "gbps": None,
        "pct_copy": None,
        "max_rel_err": None,
    }


def run_case(case: Case, copy_gbps: Optional[float], quick: bool = False, log: Callable[[str], None] = None) -> list:
    """Check and time every provider of ``case``; one row (dict) per provider.

    Row ``status``: 'ok'; 'FAIL' (a genfast provider disagrees with the reference: not
    timed); 'ERROR' (a genfast provider raised); 'n/a' (cannot run here; ``detail`` says why).
    Speedups ``vs_<baseline>`` = baseline median / provider median.
    """
    log = log or (lambda msg: None)
    rows, ref_out = [], None
    try:
        inputs = [case.make_inputs(i) for i in range(case.n_input_sets)]
        names = list(case.providers)
        if case.reference in names:  # the reference goes first: its output checks the others
            names.remove(case.reference)
            names.insert(0, case.reference)
        results, host_timed, cpu_timed = {}, {}, {}
        for name in names:
            provider = case.providers[name]
            row = _row(case, provider)
            results[name] = row
            if provider.unavailable:
                row["detail"] = provider.unavailable
                continue
            is_genfast = provider.kind == GENFAST
            try:
                thunks = [provider.factory(inp) for inp in inputs]  # factories warm up (compile)
                if is_genfast or name == case.reference:
                    out = thunks[0]()
                    synchronize(case.device)
                    if name == case.reference:
                        ref_out = out
                    elif ref_out is None:
                        row["status"], row["detail"] = "ERROR", f"no {case.reference} output to check against"
                        continue
                    else:
                        ok, err = case.check(out, ref_out, case.dtype)
                        row["max_rel_err"] = err
                        if not ok:
                            row["status"] = "FAIL"
                            row["detail"] = f"output differs from {case.reference}: max error {err:.3g} x max|ref|"
                            log(f"    {name:<8} FAIL  ({row['detail']})")
                            continue
                    del out
                external = getattr(thunks[0], "stats", None)  # timed by the provider itself (e.g. ring ranks)
                if external is not None:
                    stats = dict(external)
                elif case.extra.get("timer") == "host":  # timed below, interleaved with the other providers
                    host_timed[name] = thunks
                    continue
                elif case.device.type == "cpu":  # likewise
                    cpu_timed[name] = thunks
                    continue
                else:
                    stats = time_fn(thunks, case.device, quick=quick)
            except Exception as exc:
                _fail_row(case, name, row, exc, log)
                continue
            finally:
                thunks = None
                if case.device.type == "cuda":
                    torch.cuda.synchronize(case.device)
            _finish_row(case, name, row, stats, copy_gbps, log)
        timed = {}
        if host_timed:
            timed.update(time_host_interleaved(host_timed, case.device, quick=quick,
                                               calls_per_thunk=case.extra.get("calls_per_thunk", 1)))
        if cpu_timed:
            timed.update(time_cpu_interleaved(cpu_timed, quick=quick))
        host_timed = cpu_timed = None
        for name, stats in timed.items():
            if isinstance(stats, Exception):
                _fail_row(case, name, results[name], stats, log)
            else:
                _finish_row(case, name, results[name], stats, copy_gbps, log)
        for name in case.providers:
            row = results[name]
            for base in case.baselines:
                key = f"vs_{base}"
                b = results.get(base)
                if name != base and b and b["status"] == "ok" and row["status"] == "ok":
                    row[key] = b["median_ms"] / row["median_ms"]
                else:
                    row[key] = None
            rows.append(row)
    finally:
        ref_out = inputs = None
        if case.cleanup is not None:
            case.cleanup()
        if case.device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _fail_row(case, name: str, row: dict, exc: Exception, log) -> None:
    """A provider that raised: a baseline that cannot run is n/a, a genfast one (or the
    reference) is an error."""
    failed_genfast = case.providers[name].kind == GENFAST or name == case.reference
    row["status"], row["detail"] = "ERROR" if failed_genfast else "n/a", _short_error(exc)
    log(f"    {name:<8} {row['status']}  ({row['detail']})")


def _finish_row(case, name: str, row: dict, stats: dict, copy_gbps, log) -> None:
    """A timed provider's row: its timing summary and the rates derived from the median."""
    row.update(stats)
    row["status"] = "ok"
    seconds = stats["median_ms"] * 1e-3
    row["gbps"] = case.bytes_moved / seconds / 1e9 if seconds > 0 and case.bytes_moved else None
    if copy_gbps and row["gbps"] is not None:
        row["pct_copy"] = 100.0 * row["gbps"] / copy_gbps
    if case.extra.get("flops"):  # compute-bound ops (attention) also report TFLOP/s
        row["tflops"] = case.extra["flops"] / seconds / 1e12 if seconds > 0 else None
    if case.extra.get("items"):  # end-to-end cases (models) also report tokens/s, images/s
        row["throughput"] = case.extra["items"] / seconds if seconds > 0 else None
        row["unit"] = case.extra.get("unit", "items/s")
    log(f"    {name:<8} {stats['median_ms']:9.3f} ms  {row['gbps'] or 0:8.1f} GB/s"
        + (f"  {row['tflops']:8.3f} TFLOP/s" if row.get("tflops") else "")
        + (f"  {row['throughput']:.4g} {row['unit']}" if row.get("throughput") else ""))


@contextlib.contextmanager
def strict_dispatch():
    """Set GENFAST_STRICT=1 for the duration: a backend that cannot run or fails raises
    instead of falling back, so a benchmark never times one backend under another's name."""
    from .._dispatch import refresh_environment

    old = os.environ.get("GENFAST_STRICT")
    os.environ["GENFAST_STRICT"] = "1"
    refresh_environment()
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("GENFAST_STRICT", None)
        else:
            os.environ["GENFAST_STRICT"] = old
        refresh_environment()


def progress(msg: str) -> None:
    """Progress line on stderr, flushed (long compiles must not look like a hang)."""
    print(msg, file=sys.stderr, flush=True)
