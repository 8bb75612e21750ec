"""Loading of the native extension ``genfast._C`` and the glue that hands it tensors.

The extension never links libtorch: it receives raw data addresses, sizes, a dtype code and,
for CUDA, the stream handle. Everything is validated in Python before a kernel runs.
Importing genfast never fails because of the extension: a missing or broken build is
recorded here with its reason, and the dispatcher falls back to another backend.
"""
from __future__ import annotations

import functools

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
                       "which has no built extension: install it with `pip install -e .`, or run from another directory")

# Must match csrc/common.h DType.
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


def build_info() -> dict:
    """What the extension was built with; empty when it could not be loaded."""
    return dict(_C.build_info()) if _C is not None else {}


def cpu_unavailable_reason() -> str | None:
    if _C is None:
        return f"the genfast._C extension could not be loaded ({load_error})"
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
