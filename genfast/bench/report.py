"""Benchmark report: aligned text table, CSV, JSON (with metadata) and a PNG bar plot."""
from __future__ import annotations

import csv
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional, Sequence

import torch

# ----------------------------------------------------------------------------- metadata


def cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
        for line in out.splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except Exception:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model_name()


def device_tag(device) -> str:
    """Short file-name-safe tag: 'cpu' or 'cuda-NVIDIA-H100-80GB-HBM3'."""
    device = torch.device(device)
    if device.type != "cuda":
        return device.type
    return "cuda-" + re.sub(r"[^A-Za-z0-9]+", "-", device_name(device)).strip("-")


def git_sha() -> Optional[str]:
    """HEAD of the repository genfast's source lives in, or None (not a checkout, no git)."""
    src = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=src, capture_output=True, text=True, timeout=10)
    except Exception:
        return None
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", sha) else None


def git_dirty() -> Optional[bool]:
    src = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=src,
                             capture_output=True, text=True, timeout=10)
    except Exception:
        return None
    return bool(out.stdout.strip()) if out.returncode == 0 else None


def command_line(argv: Optional[Sequence[str]] = None) -> str:
    argv = list(sys.argv if argv is None else argv)
    if argv and argv[0].replace("\\", "/").endswith("genfast/__main__.py"):
        argv = ["python", "-m", "genfast"] + argv[1:]
    return " ".join(shlex.quote(a) for a in argv)


def metadata(device, copy_gbps: Optional[float], quick: bool, argv: Optional[Sequence[str]] = None) -> dict:
    from .. import __version__

    device = torch.device(device)
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    from .._dispatch import environment
    from .._ext import cpu_isa_info

    # The CPU, its vector flags and the C++ kernels' clone in use (also for CUDA runs: the
    # host's CPU shapes the launch overheads), so figures from different machines are not compared.
    isa = cpu_isa_info()
    return {
        "device": device_name(device),
        "device_type": device.type,
        "cpu": isa["cpu"],
        "cpu_isa": isa["isa"],
        "cpu_flags": isa["flags"],
        "torch_cpu_capability": isa["torch_cpu_capability"],
        "device_index": device.index,
        "threads": torch.get_num_threads(),
        "copy_gbps": copy_gbps,
        "genfast": __version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_sha": git_sha(),
        "git_dirty": git_dirty(),
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command_line(argv),
        "quick": bool(quick),
        # GENFAST_AUTOTUNE=quick: the Triton attention tuned over one config of each kind only
        "autotune": "quick" if environment().quick_autotune else "full",
    }


# ----------------------------------------------------------------------------- table


def _numel(n: int) -> str:
    for unit, div in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= div:
            v = n / div
            return f"{v:g}{unit}" if v == int(v) else f"{v:.1f}{unit}"
    return str(n)


def _num(v, fmt: str) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)


def baseline_names(rows: Sequence[dict]) -> list:
    names = []
    for row in rows:
        for key in row:
            if key.startswith("vs_") and key[3:] not in names:
                names.append(key[3:])
    return names


def format_table(rows: Sequence[dict]) -> str:
    """Aligned table of the rows that ran (ok/FAIL/ERROR), then a note per provider that
    could not run (status n/a) with the reason."""
    bases = baseline_names(rows)
    header = ["op", "mode", "dtype", "shape", "numel", "act", "provider", "ms", "p20-p80 ms", "GB/s", "% copy"]
    with_tflops = any(row.get("tflops") for row in rows)  # compute-bound ops (attention)
    with_throughput = any(row.get("throughput") for row in rows)  # end-to-end cases (models)
    header += (["TFLOP/s"] if with_tflops else []) + (["per s"] if with_throughput else [])
    header += [f"vs {b}" for b in bases] + ["status"]
    right = {"numel", "ms", "p20-p80 ms", "GB/s", "% copy", "TFLOP/s", "per s"} | {f"vs {b}" for b in bases}
    lines, notes = [], {}
    body = []
    prev_case = None
    for row in rows:
        if row["status"] == "n/a":
            notes.setdefault((row["provider"], row["detail"]), []).append(row)
            continue
        case = (row["op"], row["mode"], row["dtype"], row["shape"], row["act"], row["variant"])
        if prev_case is not None and case != prev_case:
            body.append(None)  # blank separator line between cases
        prev_case = case
        act = row["act"] + (f",{row['variant']}" if row["variant"] else "")
        spread = "-" if row["p20_ms"] is None else f"{row['p20_ms']:.3f}-{row['p80_ms']:.3f}"
        status = row["status"]
        if status != "ok" and row["detail"]:
            status += f": {row['detail'][:70]}"
        cells = [row["op"], row["mode"], row["dtype"], row["shape"], _numel(row["numel"]), act, row["provider"],
                 _num(row["median_ms"], ".3f"), spread, _num(row["gbps"], ".1f"), _num(row["pct_copy"], ".1f")]
        cells += [_num(row.get("tflops"), ".3f")] if with_tflops else []
        if with_throughput:
            cells.append("-" if row.get("throughput") is None
                         else f"{row['throughput']:.4g} {row.get('unit', '')}".strip())
        cells += [("-" if row.get(f"vs_{b}") is None else f"{row[f'vs_{b}']:.2f}x") for b in bases]
        cells.append(status)
        body.append(cells)
    widths = [len(h) for h in header]
    for cells in body:
        if cells:
            widths = [max(w, len(c)) for w, c in zip(widths, cells)]

    def fmt(cells):
        out = []
        for h, w, c in zip(header, widths, cells):
            if h == "status":
                out.append(c)
            else:
                out.append(c.rjust(w) if h in right else c.ljust(w))
        return "  ".join(out).rstrip()

    lines.append(fmt(header))
    lines.append(fmt(["-" * w for w in widths]))
    for cells in body:
        lines.append("" if cells is None else fmt(cells))
    if notes:
        lines.append("")
        lines.append("not run:")
        for (provider, detail), group in notes.items():
            lines.append(f"  {provider}: {detail} ({len(group)} case{'s' if len(group) != 1 else ''})")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- files

META_COLUMNS = ("device", "cpu", "cpu_isa", "cpu_flags", "threads", "copy_gbps", "genfast", "torch", "triton",
                "git_sha", "date_utc")


def _columns(rows: Sequence[dict]) -> list:
    cols = []
    for row in rows:
        for key in row:
            if key not in cols:
                cols.append(key)
    return cols


def write_csv(rows: Sequence[dict], meta: dict, path: Path) -> Path:
    """One line per row; the main metadata repeated on every line so CSVs from several
    machines can be concatenated."""
    cols = _columns(rows) + [c for c in META_COLUMNS]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            line = {k: ("" if v is None else v) for k, v in row.items()}
            line.update({c: ("" if meta.get(c) is None else meta.get(c)) for c in META_COLUMNS})
            writer.writerow(line)
    return path


def _json_safe(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def write_json(rows: Sequence[dict], meta: dict, path: Path) -> Path:
    doc = {"metadata": meta, "rows": [{k: _json_safe(v) for k, v in row.items()} for row in rows]}
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    return path


def write_plot(rows: Sequence[dict], meta: dict, path: Path) -> Optional[Path]:
    """Grouped bars of GB/s per provider per case, with the copy bandwidth as a line.
    Returns None (after a printed note) if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:
        print(f"note: no plot ({type(exc).__name__}: {exc}); pip install matplotlib for the PNG", flush=True)
        return None
    cases, providers, values = [], [], {}
    for row in rows:
        case = (row["op"], row["mode"], row["dtype"], _numel(row["numel"]),
                row["act"] + (f",{row['variant']}" if row["variant"] else ""))
        if case not in cases:
            cases.append(case)
        if row["status"] == "ok" and row["gbps"] is not None:
            if row["provider"] not in providers:
                providers.append(row["provider"])
            values[(case, row["provider"])] = row["gbps"]
    if not cases or not providers:
        print("note: no plot (no timed rows)", flush=True)
        return None
    n, k = len(cases), len(providers)
    width = 0.8 / k
    fig_w = max(8.0, min(60.0, 1.5 + n * (0.22 * k + 0.35)))
    fig, ax = plt.subplots(figsize=(fig_w, 5.5))
    for j, provider in enumerate(providers):
        xs = [i - 0.4 + width * (j + 0.5) for i in range(n)]
        ys = [values.get((c, provider), 0.0) for c in cases]
        ax.bar(xs, ys, width=width, label=provider)
    copy = meta.get("copy_gbps")
    if copy:
        ax.axhline(copy, color="black", linestyle="--", linewidth=1,
                   label=f"copy {copy:.0f} GB/s" if copy >= 100 else f"copy {copy:.1f} GB/s")
    ax.set_xticks(range(n))
    ax.set_xticklabels([f"{c[1]} {c[2]}\n{c[3]} {c[4]}" for c in cases], rotation=60 if n > 8 else 0,
                       ha="right" if n > 8 else "center", fontsize=8)
    ax.set_ylabel("GB/s (ideal bytes of the fused op)")
    ops = ", ".join(sorted({c[0] for c in cases}))
    sha = (meta.get("git_sha") or "no git sha")[:12]
    ax.set_title(f"genfast {ops} on {meta.get('device')}, {meta.get('date_utc')}, {sha}", fontsize=9)
    ax.legend(fontsize=8, ncol=min(k + 1, 6))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_all(rows: Sequence[dict], meta: dict, out_dir, device, plot: bool = True) -> list:
    """Write bench_<device-tag>_<timestamp>.{csv,json,png} under ``out_dir``; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    base = out / f"bench_{device_tag(device)}_{stamp}"
    paths = [write_csv(rows, meta, base.with_suffix(".csv")), write_json(rows, meta, base.with_suffix(".json"))]
    if plot:
        png = write_plot(rows, meta, base.with_suffix(".png"))
        if png is not None:
            paths.append(png)
    return [Path(os.path.relpath(p)) if not os.path.isabs(out_dir) else p for p in paths]
