"""``python -m genfast bench [OPS] [--quick]``: every op against its baselines on one device.

Prints a header (device, measured copy bandwidth), progress lines on stderr, then the table;
writes CSV, JSON and a PNG plot under ``--out``. Exit status 1 if a genfast backend failed
its correctness check (or raised), else 0.

Op suites register in ``OPS``: a module with ``build_cases(device, quick, use_compile)``
(an iterable of ``genfast.bench.timing.Case``) and ``count_cases(device, quick)``.
"""
from __future__ import annotations

import argparse
import time

import torch

from . import attention, bias_act, diffusion, filtered_lrelu, gan, group_norm, schedulers, upfirdn2d, vae
from . import models, overhead
from .timing import copy_buffer_bytes, measure_copy_bandwidth, progress, run_case, strict_dispatch

OPS = {
    "attention": attention,
    "bias_act": bias_act,
    "diffusion": diffusion,
    "filtered_lrelu": filtered_lrelu,
    "gan": gan,
    "group_norm": group_norm,
    "schedulers": schedulers,
    "upfirdn2d": upfirdn2d,
    "vae": vae,
    "models": models,
    "overhead": overhead,
}


def _op_name(value: str) -> str:
    if value not in OPS:
        raise argparse.ArgumentTypeError(f"invalid op {value!r} (choose from {', '.join(OPS)})")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ops", nargs="*", type=_op_name, metavar="OP",
                        help=f"ops to benchmark (default: all): {', '.join(OPS)}")
    parser.add_argument("--quick", action="store_true",
                        help="smallest useful set: one size, the default activation, shorter timing")
    parser.add_argument("--out", default="bench_results", metavar="DIR",
                        help="folder for the CSV, JSON and PNG results (default: bench_results)")
    parser.add_argument("--device", default=None,
                        help="device to run on (default: cuda if torch.cuda.is_available() else cpu)")
    parser.add_argument("--no-compile", dest="no_compile", action="store_true",
                        help="skip the torch.compile baseline")
    parser.add_argument("--no-plot", dest="no_plot", action="store_true", help="do not write the PNG plot")


def _resolve_device(name) -> torch.device:
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA GPU is visible to torch")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise ValueError(f"--device {name}: only cpu and cuda are supported")
    return device


def run(args) -> int:
    from .report import device_name, format_table, metadata, write_all

    started = time.perf_counter()
    try:
        device = _resolve_device(getattr(args, "device", None))
    except (RuntimeError, ValueError) as exc:
        print(f"genfast bench: {exc}", flush=True)
        return 2
    quick = bool(getattr(args, "quick", False))
    use_compile = not getattr(args, "no_compile", False)
    ops = list(dict.fromkeys(getattr(args, "ops", None) or OPS))

    name = device_name(device)
    extra = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    progress(f"measuring copy bandwidth on {device} ({copy_buffer_bytes(device, quick) >> 20} MiB dst.copy_(src))...")
    copy_gbps = measure_copy_bandwidth(device, quick=quick)
    print(f"genfast bench: {', '.join(ops)} on {device} ({name}{extra}); "
          f"copy bandwidth {copy_gbps:.1f} GB/s (read+write){'; quick' if quick else ''}", flush=True)

    rows = []
    with strict_dispatch():
        for op in ops:
            suite = OPS[op]
            total = suite.count_cases(device, quick)
            for i, case in enumerate(suite.build_cases(device, quick=quick, use_compile=use_compile), 1):
                progress(f"[{op} {i}/{total}] {case.label} ({time.perf_counter() - started:.0f} s)")
                rows.extend(run_case(case, copy_gbps, quick=quick, log=progress))

    print()
    print(format_table(rows), flush=True)
    print()
    meta = metadata(device, copy_gbps, quick)
    meta["ops"] = ops
    meta["elapsed_s"] = round(time.perf_counter() - started, 1)
    paths = write_all(rows, meta, getattr(args, "out", "bench_results"), device,
                      plot=not getattr(args, "no_plot", False))
    for path in paths:
        print(f"wrote {path}")
    failed = [r for r in rows if r["kind"] == "genfast" and r["status"] in ("FAIL", "ERROR")]
    print(f"done in {time.perf_counter() - started:.0f} s", flush=True)
    if failed:
        names = ", ".join(sorted({f"{r['provider']} ({r['status']})" for r in failed}))
        print(f"genfast bench: {len(failed)} row(s) of genfast backends failed: {names}", flush=True)
        return 1
    return 0
