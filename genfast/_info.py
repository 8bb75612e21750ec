"""genfast.info(): versions, the GPU, the CPU kernels' instruction-set clone, and per backend
whether it can run here (and why not)."""
from __future__ import annotations

import platform

import torch

from . import _dispatch, _ext


def _backend_rows() -> list:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    has_gpu = torch.cuda.is_available()
    rows = []
    for name in _dispatch.BACKENDS:
        if name == "cuda":
            reason = _dispatch.backend_unavailable_reason("cuda", cuda) if has_gpu else (
                _ext.cuda_unavailable_reason() or "no CUDA GPU visible to torch")
            where = "CUDA tensors"
        elif name == "triton":
            if has_gpu:
                reason, where = _dispatch.triton_unavailable_reason(cuda), "CUDA tensors"
            else:
                reason = _dispatch.triton_unavailable_reason(cpu)
                where = "CPU tensors (interpreter)" if reason is None else "CUDA tensors"
                if reason and _dispatch.triton_unavailable_reason() is None:
                    reason = "no CUDA GPU (set TRITON_INTERPRET=1 to run it on CPU tensors, slowly)"
        elif name == "cpu":
            reason, where = _ext.cpu_unavailable_reason(), "CPU tensors"
        else:
            reason, where = None, "any device"
        rows.append((name, reason is None, where if reason is None else reason))
    return rows


def info(file=None) -> dict:
    """Print (to ``file``, default stdout) and return what genfast can use on this machine."""
    from . import __version__

    try:
        import triton

        triton_version = triton.__version__
    except Exception as exc:
        triton_version = f"not available ({type(exc).__name__})"
    build = _ext.build_info()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    isa = _ext.cpu_isa_info()
    report = {
        "genfast": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "gpu": gpu,
        "extension": "loaded" if build else f"not loaded ({_ext.load_error})",
        "extension_cuda_archs": build.get("cuda_archs") or None,
        "extension_openmp": build.get("openmp"),
        "cpu": isa["cpu"],
        "cpu_isa": isa["isa"],
        "cpu_isa_widest": isa["widest"],
        "cpu_flags": isa["flags"],
        "torch_cpu_capability": isa["torch_cpu_capability"],
        "backends": {name: {"available": ok, "detail": detail} for name, ok, detail in _backend_rows()},
    }
    lines = [
        f"genfast {report['genfast']}  (python {report['python']}, torch {report['torch']}"
        f"{' + CUDA ' + report['torch_cuda'] if report['torch_cuda'] else ' CPU build'}, triton {triton_version})",
        f"GPU: {gpu or 'none'}",
        f"extension genfast._C: {report['extension']}"
        + (f"; CUDA kernels for sm {build['cuda_archs']}" if build.get("cuda")
           else "; C++ CPU kernels only" if build else "")
        + (", OpenMP" if build.get("openmp") else ""),
        f"CPU: {isa['cpu']}; flags: {isa['flags'] or 'unknown'}; torch CPU capability: {isa['torch_cpu_capability']}",
        ("CPU kernels: " + (f"{isa['isa']} clone (widest this CPU runs: {isa['widest']}; "
                            f"{_ext.CPU_ISA_ENV}=baseline|avx2|avx512 picks a narrower one)" if isa["isa"]
                            else (_ext.cpu_isa_error or "not loaded")) if build else "CPU kernels: not loaded"),
        "backends (automatic order):",
    ]
    for name, ok, detail in _backend_rows():
        lines.append(f"  {name:<10} {'yes' if ok else 'no ':<4} {detail}")
    print("\n".join(lines), file=file)
    return report
