"""Argument checks shared by every op family (clear errors naming the argument).

Every helper here must trace under ``torch.compile(fullgraph=True, dynamic=True)``: there Dynamo
turns Python floats and ints (arguments, defaults, tensor sizes) into symbolic values that
still pass ``isinstance(v, float / numbers.Real)`` but reject ``math.isnan``/``math.isfinite``
(a graph break). So the checks use plain comparisons: ``v != v`` is NaN, ``abs(v) < inf`` is
finite (False for NaN too). Comparisons against constants become guards (``s0 >= 0``) that hold
for every valid value: no recompilation when the value or a size changes. ``float()``/``int()``
of a symbolic value stay symbolic (no specialisation), so the helpers may return them.
"""
from __future__ import annotations

import functools
import math
import numbers
from typing import Optional

import torch

__all__ = ["type_name", "is_int", "is_real", "is_nan", "is_finite", "compiling", "check_tensor", "check_real",
           "check_int", "check_backend", "ValidatedSignatures", "cacheable", "tensor_key", "cpu_threads",
           "cpu_threads_per_call", "SINGLE_THREAD_ELEMENTS", "is_dense", "dense"]


def type_name(v) -> str:
    """How an argument is described in errors: its type, or dtype and device for tensors."""
    return f"torch.Tensor of {v.dtype} on {v.device}" if isinstance(v, torch.Tensor) else type(v).__name__


def is_int(v) -> bool:
    """A Python (or symbolic) int; bool is not accepted as a number."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def is_real(v) -> bool:
    """A Python (or symbolic) int or float; bool is not accepted as a number."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def is_nan(v) -> bool:
    return v != v  # math.isnan breaks the graph on symbolic floats


def is_finite(v) -> bool:
    return abs(v) < math.inf  # False for +-inf and NaN; math.isfinite breaks the graph


@functools.lru_cache(maxsize=None)
def _cuda_available() -> bool:  # fixed for the process; torch asks the driver on every call
    return torch.cuda.is_available()


def compiling() -> bool:
    """True while torch.compile traces or a CUDA graph captures: value checks that read device
    data (and would synchronise or break the graph) are skipped then."""
    if torch.compiler.is_compiling():
        return True
    return _cuda_available() and torch.cuda.is_current_stream_capturing()


def check_tensor(op: str, name: str, t, *, ndim: Optional[int] = None, dtypes=None, optional: bool = False,
                 shape_doc: str = "") -> None:
    """``t`` is a tensor (or None when ``optional``), of ``ndim`` dims and one of ``dtypes``."""
    if t is None and optional:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor{' or None' if optional else ''}, got {type_name(t)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        names = " or ".join(names.rsplit(", ", 1)) if len(dtypes) > 1 else names
        raise TypeError(f"{op}: {name} must be {names}, got {t.dtype}")
    if ndim is not None and t.ndim != ndim:
        raise ValueError(f"{op}: {name} must be {ndim}-D{shape_doc}, got shape {tuple(t.shape)}")


def check_real(op: str, name: str, value, *, minimum: Optional[float] = None, maximum: Optional[float] = None,
               max_inclusive: bool = True, finite: bool = False, or_none: bool = False,
               number_format: str = "") -> float:
    """A real number (not bool, not NaN) within [minimum, maximum] (or [minimum, maximum) when
    not ``max_inclusive``), finite if ``finite``; returned as a float (symbolic while
    compiling). ``or_none``: the error names None as allowed (the caller handles None);
    ``number_format``: format spec of the bounds and value in errors (e.g. "g")."""
    if not is_real(value):
        raise TypeError(f"{op}: {name} must be a real number{' or None' if or_none else ''}, got {type_name(value)}")
    value = float(value)
    if is_nan(value):
        raise ValueError(f"{op}: {name} must not be NaN")
    fmt = number_format
    if minimum is not None and value < minimum:
        raise ValueError(f"{op}: {name} must be >= {minimum:{fmt}}, got {value:{fmt}}")
    if maximum is not None and (value > maximum or (not max_inclusive and value == maximum)):
        raise ValueError(f"{op}: {name} must be {'<=' if max_inclusive else '<'} {maximum:{fmt}}, got {value:{fmt}}")
    if finite and not is_finite(value):
        raise ValueError(f"{op}: {name} must be finite, got {value}")
    return value


def check_int(op: str, name: str, value, *, minimum: Optional[int] = None, type_error=TypeError,
              describe=type_name) -> int:
    """A (non-bool) int >= ``minimum``, returned as an int (symbolic while compiling).
    ``type_error``/``describe``: the exception class and value description of the type error."""
    if not is_int(value):
        raise type_error(f"{op}: {name} must be an int, got {describe(value)}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{op}: {name} must be >= {minimum}, got {value}")
    return int(value)


def check_backend(op: str, backend, backends) -> str:
    """None (automatic) or one of ``backends``; returns '' for automatic (the ops' schema)."""
    if backend is not None and backend not in backends:
        raise ValueError(f"{op}: unknown backend {backend!r}; expected one of {', '.join(backends)} or None")
    return backend or ""


class ValidatedSignatures(dict):
    """Signatures of eager calls whose arguments passed validation: hashable tuples of
    everything the checks look at (shapes, dtypes, devices, scalar arguments). A call with a
    known signature skips the checks: they are a large part of a small op's host time, and a
    loop calls one op with the same signature over and over. Only exact Python scalars and
    plain tensors go into signatures (the callers decide, see ``cacheable``); a signature may
    carry what validation computed (``get``). Bounded, cleared when full. A dict, so that
    ``in`` and ``get`` are the dict's own (no Python call in the hot path)."""

    def __init__(self, limit: int = 4096):
        super().__init__()
        self._limit = limit

    def add(self, signature, value=True) -> None:
        if len(self) >= self._limit:
            self.clear()
        self[signature] = value


_PLAIN_SCALARS = frozenset((int, float, str, bool, type(None), torch.dtype))


def cacheable(*values) -> bool:
    """Whether scalar arguments may go into a ``ValidatedSignatures`` key: None, exact Python
    ints, floats, strs and bools, torch dtypes, or flat tuples/lists of them (no symbolic values, no numpy or
    tensor scalars, whose equality does not pin down what validation saw). The caller puts a
    list into its key as a tuple."""
    for v in values:
        t = type(v)
        if t in _PLAIN_SCALARS:
            continue
        if t is tuple or t is list:
            for item in v:
                if type(item) not in _PLAIN_SCALARS:
                    return False
            continue
        return False
    return True


def tensor_key(t) -> Optional[tuple]:
    """What validation sees of an optional plain tensor, for a signature: (shape, dtype, device)."""
    return None if t is None else (t.shape, t.dtype, t.device)


# Below this many elements a C++ CPU kernel runs on one thread: waking the OpenMP team costs
# more than it saves on a small problem (torch's own grain size for elementwise ops is 32768).
SINGLE_THREAD_ELEMENTS = 1 << 15


def cpu_threads(work: int, single_thread_below: int = SINGLE_THREAD_ELEMENTS) -> int:
    """num_threads for a C++ CPU entry point doing ``work`` (elements or multiply-adds)."""
    return 1 if work < single_thread_below else torch.get_num_threads()


def _one_thread() -> int:
    return 1


def cpu_threads_per_call(work: int, single_thread_below: int = SINGLE_THREAD_ELEMENTS):
    """``cpu_threads`` for a call prepared once and run many times: a function that gives the
    count at each call (torch's count is read then: torch.set_num_threads may change it)."""
    return _one_thread if work < single_thread_below else torch.get_num_threads


# ----------------------------------------------------------------------------- memory layouts
# Shared by the elementwise families (bias_act, diffusion, gan, ...): their kernels run in any
# dense layout.


def is_dense(t: torch.Tensor) -> bool:
    """True if ``t`` covers its memory without gaps or overlaps, in any dimension order."""
    if t.is_contiguous():  # the common case, without sorting the strides
        return True
    expected = 1
    for d in sorted((d for d in range(t.ndim) if t.shape[d] != 1), key=t.stride):
        if t.stride(d) != expected:
            return False
        expected *= t.shape[d]
    return True


def dense(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when it is dense (any dimension order), else a contiguous copy."""
    return t if is_dense(t) else t.contiguous()
