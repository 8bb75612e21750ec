"""Loading of the native extension ``genfast._C`` and the glue that hands it tensors.

The extension never links libtorch: it reads each tensor's address, dtype, shape, strides and
device through the Python tensor protocol (csrc/tensor_view.h) and, for CUDA, gets the stream
handle. Everything is validated in Python before a kernel runs.
Importing genfast never fails because of the extension: a missing or broken build is
recorded here with its reason, and the dispatcher falls back to another backend.
"""
from __future__ import annotations

import functools
import inspect
import os
import platform

import torch

try:
    from . import _C as _C  # type: ignore[attr-defined]

    load_error: str | None = None
except Exception as exc:  # ImportError, or an undefined symbol from a broken build
    _C = None
    load_error = f"{type(exc).__name__}: {exc}"
    from pathlib import Path as _Path

    if (_Path(__file__).resolve().parents[1] / "CMakeLists.txt").exists():
        load_error += (f"; genfast was imported from the source checkout {_Path(__file__).resolve().parent}, "
                       "which has no built extension: install it with `pip install -e .`, or run from another "
                       "directory")

# GENFAST_CPU_ISA=baseline|avx2|avx512 runs a narrower instruction-set clone of the C++ CPU
# kernels than the widest this CPU supports (csrc/cpu_isa.h); unset or "auto": the widest.
# A name the CPU cannot run (or an unknown one) leaves the CPU backend unavailable, with the
# reason, rather than running another clone than the one asked for.
CPU_ISA_ENV = "GENFAST_CPU_ISA"
cpu_isa_error: str | None = None
if _C is not None and os.environ.get(CPU_ISA_ENV, "").strip():
    try:
        _C.set_cpu_isa(os.environ[CPU_ISA_ENV].strip().lower())
    except ValueError as exc:
        cpu_isa_error = str(exc)


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), or the platform's best guess."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_isa_info() -> dict:
    """The C++ CPU kernels' instruction-set clone in use ("baseline", "avx2", "avx512"), the
    widest this CPU runs, its vector flags, and torch's own CPU capability, so that CPU
    figures from different machines are not compared by mistake."""
    try:
        torch_capability = torch.backends.cpu.get_cpu_capability()
    except Exception:  # older torch
        torch_capability = None
    info = {"cpu": cpu_model(), "isa": None, "widest": None, "flags": None, "torch_cpu_capability": torch_capability}
    if _C is not None and hasattr(_C, "cpu_isa_info"):
        info.update(dict(_C.cpu_isa_info()))
        if cpu_isa_error is not None:
            info["isa"] = None
    return info


# torch dtype -> the extension's element-type code (csrc/common.h DType), read from the
# extension itself so the two sides cannot drift apart; empty without the extension.
DTYPE_CODES = ({getattr(torch, name): code for name, code in _C.DTYPE_CODES.items() if hasattr(torch, name)}
               if _C is not None and hasattr(_C, "DTYPE_CODES") else {})


def build_info() -> dict:
    """What the extension was built with; empty when it could not be loaded."""
    return dict(_C.build_info()) if _C is not None else {}


def cpu_unavailable_reason() -> str | None:
    if _C is None:
        return f"the genfast._C extension could not be loaded ({load_error})"
    if cpu_isa_error is not None:
        return cpu_isa_error
    return None


@functools.lru_cache(maxsize=None)  # constant for the process; asked on every op call
def cuda_unavailable_reason() -> str | None:
    """Why the extension's CUDA kernels cannot run here, or None when they can."""
    if _C is None:
        return f"the genfast._C extension could not be loaded ({load_error})"
    if not _C.build_info()["cuda"]:
        return "genfast was built without a CUDA compiler (nvcc not found at install time)"
    if not torch.cuda.is_available():
        return "no CUDA GPU visible to torch"
    count, err = _C.cuda_device_count()
    return None if count > 0 else f"the extension's CUDA runtime sees no device ({err})"


def address(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def stream_of(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


def argument_names(native) -> tuple:
    """The parameter names of an extension entry point, in order, read from the signature line
    pybind11 writes at the top of its docstring ("name(a: T, b: U, *, c: V) -> R"); a Python
    function (the tests stand in for the extension) gives its own; None where the names are
    unknown (a function taking *args or **kwargs, a docstring without the signature line)."""
    if not isinstance(getattr(native, "__doc__", None), str) or type(native).__name__ != "builtin_function_or_method":
        parameters = inspect.signature(native).parameters.values()
        if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in parameters):
            return None
        return tuple(p.name for p in parameters)
    line = (native.__doc__.lstrip().splitlines() or [""])[0]
    if "(" not in line:  # not pybind11's signature line (an overloaded function): names unknown
        return None
    inner = line[line.index("(") + 1:]
    names, depth, start = [], 0, 0
    for i, ch in enumerate(inner):  # split at the top-level commas; annotations may hold brackets
        if ch in "([":
            depth += 1
        elif ch in ")]":
            if depth == 0:
                inner = inner[:i]
                break
            depth -= 1
        elif ch == "," and depth == 0:
            names.append(inner[start:i])
            start = i + 1
    names.append(inner[start:])
    names = [part.split(":", 1)[0].split("=", 1)[0].strip() for part in names]
    return tuple(name for name in names if name and name not in ("*", "/"))


def bind_positional(native, per_call: tuple, **bound):
    """``native`` as a function of the arguments named in ``per_call`` (in that order), with the
    ``bound`` ones fixed, that passes every argument by position. pybind11 looks each keyword
    argument up by name at every call (about 0.12 us each, over 1 us for an attention call), a
    large part of a small prepared call; the names are matched once here against the entry
    point's own signature instead, so a misspelt, missing or extra name raises now."""
    names = argument_names(native)
    if names is None:  # e.g. a stand-in taking *args / **kwargs (tests): every argument by keyword
        return lambda *values: native(**dict(zip(per_call, values)), **bound)
    given = list(per_call) + list(bound)
    unknown = [n for n in given if n not in names]
    missing = [n for n in names if n not in given]
    twice = sorted({n for n in given if given.count(n) > 1})
    if unknown or missing or twice:
        raise TypeError(f"bind_positional({getattr(native, '__name__', native)}): unknown {unknown}, missing "
                        f"{missing}, given twice {twice}; its arguments are {list(names)}")
    values = {f"_bound_{n}": v for n, v in bound.items()}
    call = ", ".join(n if n in per_call else f"_bound_{n}" for n in names)
    return eval(f"lambda {', '.join(per_call)}: _native({call})", {"_native": native, **values})  # noqa: S307
