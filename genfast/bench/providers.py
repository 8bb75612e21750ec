"""Provider plumbing shared by the op suites (``genfast.bench.bias_act`` & co.): the provider
table, why a provider cannot run, thunk building, the ``torch.compile`` baseline factory and
its failure memory. A suite keeps only its cases: inputs, the genfast call, the eager call.

Thunks (``thunk_factory``): a factory turns one input set (a dict) into a zero-argument
callable that runs the measured work and returns its outputs, for the correctness check:
  fwd      ``fn(*args)``
  bwd      only the backward: the outputs are built once through autograd, then
           ``torch.autograd.grad(outputs, wrt, grad_outputs, retain_graph=True)`` is timed
  fwd+bwd  both; the thunk returns the outputs followed by the gradients
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Optional, Sequence

import torch

from .timing import BASELINE, GENFAST, Provider

GENFAST_BACKENDS = ("cuda", "triton", "cpu")
BASELINES = ("eager", "compile")  # eager: the reference every genfast output is checked against
PROVIDERS = GENFAST_BACKENDS + BASELINES

TRITON_ON_CPU = "triton on CPU tensors is the interpreter, not a benchmark"
NO_COMPILE = "disabled (--no-compile)"


def case_device(device) -> torch.device:
    """``device`` as a torch.device, a bare "cuda" pinned to the current GPU (cases compare
    devices and build generators on them)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class CompileFailures:
    """torch.compile failures of one suite, by a key the suite chooses (e.g. device type and
    mode): after the first failure, later cases with the key skip the compile baseline with the
    reason instead of paying for (and failing) the compile again."""

    def __init__(self) -> None:
        self._failed: dict = {}

    def reason(self, key) -> Optional[str]:
        failed = self._failed.get(key)
        return f"torch.compile failed earlier in this process ({failed})" if failed else None

    def record(self, key, exc: BaseException) -> None:
        text = f"{type(exc).__name__}: {exc}".strip().splitlines()
        self._failed[key] = (text[0] if text else type(exc).__name__)[:200]

    def clear(self) -> None:
        self._failed.clear()


def baseline_unavailable(name: str, use_compile: bool = True, failures: Optional[CompileFailures] = None,
                         key=None) -> Optional[str]:
    """Why baseline ``name`` ("eager" or "compile") cannot be benchmarked (None: it can)."""
    if name == "eager":
        return None
    if name != "compile":
        raise ValueError(f"unknown baseline {name!r}; expected one of {BASELINES}")
    if not use_compile:
        return NO_COMPILE
    return failures.reason(key) if failures is not None else None


def provider_unavailable(name: str, device, dtype: torch.dtype, dispatch, use_compile: bool = True,
                         failures: Optional[CompileFailures] = None, key=None) -> Optional[str]:
    """Why provider ``name`` (a genfast backend of ``dispatch``, an OpDispatcher, or a baseline)
    cannot be benchmarked here (None: it can)."""
    device = torch.device(device)
    if name in BASELINES:
        return baseline_unavailable(name, use_compile, failures, key)
    if name == "triton" and device.type == "cpu":
        return TRITON_ON_CPU
    if name == "reference":
        return "the reference backend is the eager baseline"
    return dispatch.unavailable_reason(name, device, dtype)


def _gather(inputs: dict, keys: Sequence[str]) -> tuple:
    """The tensors under ``keys``; a list under a key (e.g. a module's parameters) is spread."""
    out = []
    for key in keys:
        value = inputs.get(key)
        if isinstance(value, (list, tuple)):
            out.extend(value)
        elif value is not None:
            out.append(value)
    return tuple(out)


def thunk_factory(fn: Callable, mode: str, args: Optional[Sequence[str]] = ("x",), wrt: Sequence[str] = ("x",),
                  grad_outputs: Sequence[str] = ("dy",), no_grad_forward: bool = False,
                  warm_up: bool = False) -> Callable[[dict], Callable[[], Any]]:
    """inputs -> thunk for ``fn`` in ``mode`` (see the module docstring). ``fn`` is called with
    the inputs under ``args``, or with the whole inputs dict when ``args`` is None; gradients
    are taken with respect to the inputs under ``wrt`` for the outputs' gradients under
    ``grad_outputs``. ``no_grad_forward``: run fwd under torch.no_grad(). ``warm_up``: call
    the thunk once before returning it."""
    if mode not in ("fwd", "bwd", "fwd+bwd"):
        raise ValueError(f"unknown mode {mode!r}; expected fwd, bwd or fwd+bwd")

    def factory(inputs: dict):
        call_args = (inputs,) if args is None else tuple(inputs[k] for k in args)
        if mode == "fwd":
            def thunk():
                if no_grad_forward:
                    with torch.no_grad():
                        return fn(*call_args)
                return fn(*call_args)
        else:
            targets, grads_in = _gather(inputs, wrt), _gather(inputs, grad_outputs)
            if mode == "fwd+bwd":
                def thunk():
                    out = fn(*call_args)
                    outs = out if isinstance(out, tuple) else (out,)
                    return outs + tuple(torch.autograd.grad(outs, targets, grads_in))
            else:
                out = fn(*call_args)
                outs = out if isinstance(out, tuple) else (out,)

                def thunk():
                    return torch.autograd.grad(outs, targets, grads_in, retain_graph=True)
        if warm_up:
            thunk()
        return thunk

    return factory


def compile_options(mode: str) -> contextlib.ExitStack:
    """Config for compiling (the backward is compiled at the first backward call, so the
    warm-up runs inside it too):
      * compile_threads=1: no pool of compile worker processes, which would keep warming up
        in the background after the first compile and steal the CPU from the timed calls
        (on a 2-core machine that made the first ~40 calls 50x slower);
      * bwd mode: backward is called repeatedly with retain_graph=True, which AOTAutograd's
        donated buffers (a memory optimisation) forbid.
    """
    stack = contextlib.ExitStack()
    try:
        import torch._inductor.config as inductor_config

        stack.enter_context(inductor_config.patch(compile_threads=1))
    except Exception:
        pass
    functorch_config = getattr(torch._functorch, "config", None)
    if mode == "bwd" and functorch_config is not None and hasattr(functorch_config, "donated_buffer"):
        stack.enter_context(functorch_config.patch(donated_buffer=False))
    return stack


def compile_factory(fn: Callable, mode: str, failures: CompileFailures, key, **thunk_options):
    """Factory for the torch.compile baseline of ``fn`` (compiled here, ``dynamic=False``):
    compiles and warms up on each input set, and records a failure in ``failures`` under
    ``key`` so later cases skip it. ``thunk_options``: as for ``thunk_factory``."""
    inner = thunk_factory(torch.compile(fn, dynamic=False), mode, warm_up=True, **thunk_options)

    def factory(inputs: dict):
        try:
            with compile_options(mode):
                return inner(inputs)
        except Exception as exc:
            failures.record(key, exc)
            raise

    return factory


def reset_compile() -> None:
    # One compiled function per case; resetting afterwards keeps dynamo's per-code-object
    # cache (recompile limit 8) from filling up and silently running eager, and frees memory.
    torch._dynamo.reset()


def compile_cleanup(providers: dict) -> Optional[Callable[[], None]]:
    """The case's cleanup: ``reset_compile`` when its compile baseline will run."""
    compiles = "compile" in providers and providers["compile"].unavailable is None
    return reset_compile if compiles else None


def op_providers(genfast_fn: Callable, eager_fn: Callable, mode: str, device, dtype: torch.dtype, dispatch,
                 use_compile: bool, failures: CompileFailures, key, names: Sequence[str] = PROVIDERS,
                 **thunk_options) -> dict:
    """The provider table of an op case: name -> Provider, in ``names`` order. Genfast backends
    run ``genfast_fn(*args, backend=name)``; "eager" runs ``eager_fn`` (the reference the
    others are checked against); "compile" runs ``torch.compile(eager_fn)``. A provider that
    cannot run carries the reason. ``thunk_options``: as for ``thunk_factory``."""
    providers = {}
    for name in names:
        kind = GENFAST if name in GENFAST_BACKENDS else BASELINE
        reason = provider_unavailable(name, device, dtype, dispatch, use_compile, failures, key)
        factory = None
        if reason is None:
            if kind == GENFAST:
                factory = thunk_factory(functools.partial(genfast_fn, backend=name), mode, **thunk_options)
            elif name == "eager":
                factory = thunk_factory(eager_fn, mode, **thunk_options)
            else:
                factory = compile_factory(eager_fn, mode, failures, key, **thunk_options)
        providers[name] = Provider(name, kind, factory, reason)
    return providers
