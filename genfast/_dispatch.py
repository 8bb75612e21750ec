"""Backend dispatch: one registry per op, mapping a backend name to an implementation.

Choice order for ``backend=None`` (automatic): the innermost ``genfast.use_backend(...)``
context if any, else the ``GENFAST_BACKEND`` environment variable if set, else the first
backend that can run on the tensor's device and dtype, the device's native kernels first
(``cuda`` on GPUs, ``cpu`` on CPUs), then in ``BACKENDS`` order.
An explicit backend (argument or environment) that cannot run falls back to the next one that
can, with one warning per (op, backend, reason). A backend that raises at run time is treated
the same way, unless ``GENFAST_STRICT=1`` (the tests set it, so failures are never hidden).

``GENFAST_BACKEND`` is either one name for every op (``GENFAST_BACKEND=triton``) or a comma
list of ``op=name`` pairs (``GENFAST_BACKEND=bias_act=cpu,attention=triton``).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from . import _ext

BACKENDS = ("cuda", "triton", "cpu", "reference")


class Unsupported(NotImplementedError):
    """Raised by a backend (before launching anything) for a call whose features it does not
    implement, e.g. the CUDA attention kernels with dropout: the dispatcher moves on to the next
    backend without marking this one broken (even under GENFAST_STRICT)."""


class BackendWarning(UserWarning):
    """A requested or preferred backend could not run and another one was used."""


@dataclass(frozen=True)
class Environment:
    """The environment variables genfast reads, parsed once (``refresh_environment`` re-reads
    them): every op call consults them, and ``os.environ`` lookups plus parsing on each call
    were a measurable part of a small op's host time."""

    backend: object  # None, one backend name for every op, or a dict op -> name (GENFAST_BACKEND)
    strict: bool  # GENFAST_STRICT
    triton_interpreted: bool  # TRITON_INTERPRET
    quick_autotune: bool = False  # GENFAST_AUTOTUNE=quick: one config of each kind per tuned key


def _read_environment() -> Environment:
    value = os.environ.get("GENFAST_BACKEND", "").strip()
    backend = None
    if value and "=" not in value:
        backend = value
    elif value:
        backend = {}
        for item in value.split(","):
            name, _, chosen = item.partition("=")
            backend.setdefault(name.strip(), chosen.strip())
    autotune = os.environ.get("GENFAST_AUTOTUNE", "full").strip().lower() or "full"
    if autotune not in ("full", "quick"):  # a warning, not an error: importing genfast never fails
        warnings.warn(f"GENFAST_AUTOTUNE must be 'full' or 'quick', got {autotune!r}: using 'full'", stacklevel=2)
    return Environment(backend, os.environ.get("GENFAST_STRICT", "0") not in ("", "0"),
                       os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"), autotune == "quick")


_environment = _read_environment()


def environment() -> Environment:
    return _environment


def refresh_environment() -> Environment:
    """Re-read GENFAST_BACKEND, GENFAST_STRICT and TRITON_INTERPRET after changing them in
    ``os.environ`` at run time (genfast reads them once, at import, for speed)."""
    global _environment
    _environment = _read_environment()
    for dispatcher in OpDispatcher.instances:
        dispatcher.plans.clear()
    return _environment


def triton_interpreted() -> bool:
    return _environment.triton_interpreted


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as exc:
        return f"triton is not installed ({type(exc).__name__}: {exc})"
    return None


def triton_unavailable_reason(device: torch.device | None = None) -> str | None:
    """Why Triton kernels cannot run on ``device`` (None: they can)."""
    if _triton_import_error() is not None:
        return _triton_import_error()
    if device is None:
        return None
    if device.type == "cuda":
        return None
    if device.type == "cpu" and triton_interpreted():
        return None
    if device.type == "cpu":
        return "triton runs on CPU tensors only under the interpreter (TRITON_INTERPRET=1)"
    return f"triton does not run on {device.type} tensors"


def backend_unavailable_reason(backend: str, device: torch.device) -> str | None:
    """Device-level availability of a backend, independent of the op."""
    if backend == "cuda":
        if device.type != "cuda":
            return f"the cuda backend needs CUDA tensors, got {device.type}"
        return _ext.cuda_unavailable_reason()
    if backend == "triton":
        return triton_unavailable_reason(device)
    if backend == "cpu":
        if device.type != "cpu":
            return f"the cpu backend needs CPU tensors, got {device.type}"
        return _ext.cpu_unavailable_reason()
    if backend == "reference":
        return None
    raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")


def env_backend(op: str) -> str | None:
    """The backend GENFAST_BACKEND asks for this op, or None."""
    value = _environment.backend
    return value.get(op) if isinstance(value, dict) else value


# The backend(s) asked for by the innermost use_backend() context: None, a name, or a dict
# op -> name. A ContextVar, so threads and async tasks each see their own.
_context_backend: contextvars.ContextVar = contextvars.ContextVar("genfast_backend", default=None)


@contextlib.contextmanager
def use_backend(backend):
    """Run every genfast op called inside the block (that gets no explicit ``backend=``) on
    ``backend``: a name from ``BACKENDS``, a dict ``{op: name}``, or None (automatic choice).

        with genfast.use_backend("reference"):   # the plain-PyTorch specification
            loss = model(x)
    """
    if isinstance(backend, dict):
        bad = {op: name for op, name in backend.items() if name not in BACKENDS}
    else:
        bad = {"*": backend} if backend is not None and backend not in BACKENDS else {}
    if bad:
        raise ValueError(f"use_backend: unknown backend(s) {bad}; expected names from {BACKENDS}")
    token = _context_backend.set(backend)
    try:
        yield
    finally:
        _context_backend.reset(token)


def context_backend(op: str) -> str | None:
    """The backend the innermost use_backend() context asks for this op, or None."""
    value = _context_backend.get()
    if isinstance(value, dict):
        return value.get(op)
    return value


def strict() -> bool:
    return _environment.strict


def direct_call_allowed(*tensors) -> bool:
    """Whether an op may call its implementation directly instead of through its registered
    ``torch.ops.genfast`` op: the dispatcher round trip (into C++ and back to the Python impl)
    is the largest fixed cost of a small eager call. Only in plain eager mode on plain tensors:
    torch.compile, jit tracing, dispatch modes (FakeTensor, functionalization, make_fx),
    functorch transforms and tensor subclasses (DTensor, ...) keep the registered op, which
    they need to see."""
    if not plain_eager_mode():
        return False
    for t in tensors:
        if t is not None and type(t) is not torch.Tensor:
            return False
    return True


def plain_eager_mode() -> bool:
    """direct_call_allowed without the tensors: no torch.compile, jit tracing, dispatch mode
    or functorch transform is active."""
    if torch.compiler.is_compiling() or torch._C._get_tracing_state() is not None:
        return False
    return not (torch._C._len_torch_dispatch_stack() or torch._C._are_functorch_transforms_active())


_warned: set = set()
_UNPREPARED = object()


def warn_once(key, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, BackendWarning, stacklevel=4)


@dataclass
class Backend:
    name: str
    fn: Callable
    dtypes: frozenset  # dtypes this implementation handles


@dataclass
class OpDispatcher:
    """Registry of one op's implementations."""

    op: str
    backends: dict = field(default_factory=dict)
    broken: dict = field(default_factory=dict)  # (backend, device type, dtype) -> error text
    # (requested, device, dtype) -> usable backends, best first: the choice is computed
    # once per call signature. Cleared when a backend is registered or breaks, and by
    # refresh_environment().
    plans: dict = field(default_factory=dict)
    # Optional device -> backend names to put first in the automatic order (None: the default
    # order, native kernels first).
    prefer: Optional[Callable] = None
    instances = []  # every dispatcher (a class attribute), for refresh_environment()

    def __post_init__(self):
        OpDispatcher.instances.append(self)

    def register(self, name: str, dtypes, fn: Optional[Callable] = None):
        if name not in BACKENDS:
            raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")

        def add(f):
            self.backends[name] = Backend(name, f, frozenset(dtypes))
            self.plans.clear()
            return f

        return add(fn) if fn is not None else add

    def unavailable_reason(self, name: str, device: torch.device, dtype: torch.dtype) -> str | None:
        if name not in self.backends:
            return f"{self.op} has no {name} implementation"
        reason = backend_unavailable_reason(name, device)
        if reason:
            return reason
        if dtype not in self.backends[name].dtypes:
            supported = ", ".join(sorted(str(d).replace("torch.", "") for d in self.backends[name].dtypes))
            if name == "triton" and device.type == "cpu" and dtype == torch.bfloat16:
                return "the triton interpreter has no bfloat16 arithmetic"
            return f"the {name} backend of {self.op} supports {supported}, not {str(dtype).replace('torch.', '')}"
        key = (name, device.type, dtype)
        if key in self.broken:
            return f"it failed earlier in this process ({self.broken[key]})"
        return None

    def candidates(self, requested: str | None, device: torch.device, dtype: torch.dtype) -> list:
        """Backends to try, best first; warns once when the requested one cannot run."""
        if requested is not None and requested not in BACKENDS:
            raise ValueError(f"{self.op}: unknown backend {requested!r}; expected one of {BACKENDS} or None")
        # The device's native kernels first (on CPU, the Triton interpreter is a test vehicle,
        # never the automatic choice ahead of the C++ kernels), then the rest, reference last.
        order = sorted(self.backends, key=lambda b: (b != device.type, BACKENDS.index(b)))
        preferred = self.prefer(device) if self.prefer is not None else None
        if preferred:  # an op's own measured rule for this device (e.g. attention on Hopper)
            order = [b for b in preferred if b in order] + [b for b in order if b not in preferred]
        if requested is not None:
            order = [requested] + [b for b in order if b != requested]
        usable = []
        for name in order:
            reason = self.unavailable_reason(name, device, dtype)
            if reason is None:
                usable.append(name)
            elif name == requested:
                warn_once((self.op, name, reason),
                          f"genfast.{self.op}: backend {name!r} cannot run here ({reason}); falling back.")
            elif name == device.type and backend_unavailable_reason(name, device) is not None:
                # The device's own native kernels are missing (no extension, built without
                # CUDA, driver too old): unexpected, so say it once.
                warn_once((self.op, name, reason),
                          f"genfast.{self.op}: native {name} kernels unavailable ({reason}); using a slower backend.")
        return usable

    def select(self, requested: str | None, device: torch.device, dtype: torch.dtype) -> str:
        """Name of the backend that would run (without running it)."""
        return self._usable(requested, device, dtype)[0]

    def run(self, requested: str | None, device: torch.device, dtype: torch.dtype, *args):
        """Run the requested (or automatic) backend; if one raises, mark it broken and try
        the next, unless strict (GENFAST_STRICT=1), where every failure is raised."""
        usable = self._usable(requested, device, dtype)
        for i, name in enumerate(usable):
            try:
                return self.backends[name].fn(*args)
            except (ValueError, TypeError):
                raise  # argument errors are the caller's, not a broken backend
            except Unsupported as exc:
                if i == len(usable) - 1:
                    raise RuntimeError(f"genfast.{self.op}: no backend supports this call ({exc})") from exc
                if i == 0 and self._explicit(requested) == name:
                    warn_once((self.op, name, str(exc)), f"genfast.{self.op}: backend {name!r} does not support "
                              f"this call ({exc}); using {usable[i + 1]!r}.")
            except Exception as exc:
                if strict() or i == len(usable) - 1:
                    raise
                self.broken[(name, device.type, dtype)] = f"{type(exc).__name__}: {exc}"
                self.plans.clear()
                warn_once((self.op, name, "broken"), f"genfast.{self.op}: backend {name!r} failed "
                          f"({type(exc).__name__}: {exc}); falling back to {usable[i + 1]!r}.")
        raise AssertionError("unreachable")

    def call_prepared(self, signature, prepare: Callable, *args):
        """The result of the call prepared for an eager call ``signature`` (made by ``prepare()``
        at its first use) run on ``args``; None where the signature has none (``prepare()``
        returned None) or its call failed with anything but an argument error: the caller then
        takes the general path, which handles fallbacks and warnings, and a failed call is not
        tried again. A small eager call is launch-bound, so its host path is its cost: a prepared
        call has the backend choice and the options worked out once (the thread count is read
        at each call), and only allocates and runs the kernel. Prepared calls live in ``plans`` (cleared when a backend
        is registered or breaks and by refresh_environment); the key holds the use_backend
        context and the extension module (tests swap in a CUDA emulation)."""
        asked = _context_backend.get()  # context_backend(self.op), inline: this runs at every call
        if asked is not None and type(asked) is not str:
            asked = asked.get(self.op)
        key = ("prepared", signature, asked, _ext._C)
        call = self.plans.get(key, _UNPREPARED)
        if call is _UNPREPARED:
            call = self.plans[key] = prepare()
        if call is None:
            return None
        try:
            return call(*args)
        except (ValueError, TypeError):
            raise
        except Exception:
            self.plans[key] = None
            return None

    def _explicit(self, requested: str | None) -> str | None:
        """The backend asked for by the argument, a use_backend context or GENFAST_BACKEND."""
        if requested is None:
            requested = context_backend(self.op)
        if requested is None:
            requested = env_backend(self.op)
            if requested is not None and requested not in BACKENDS:
                raise ValueError(f"GENFAST_BACKEND asks {self.op} for backend {requested!r}; "
                                 f"expected one of {BACKENDS}")
        return requested

    def _usable(self, requested: str | None, device: torch.device, dtype: torch.dtype) -> list:
        requested = self._explicit(requested)
        key = (requested, device, dtype)
        usable = self.plans.get(key)
        if usable is not None:
            return usable
        if requested is not None and strict():
            reason = self.unavailable_reason(requested, device, dtype) if requested in BACKENDS else None
            if reason:
                raise RuntimeError(f"genfast.{self.op}: backend {requested!r} cannot run here ({reason}) "
                                   "and GENFAST_STRICT is set")
        usable = self.candidates(requested, device, dtype)
        if not usable:
            raise RuntimeError(f"genfast.{self.op}: no backend can run on {device} with {dtype}")
        self.plans[key] = usable
        return usable
