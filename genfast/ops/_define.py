"""One way to define a genfast op: ``NativeOp`` registers it with torch.library (light form:
define + CPU/CUDA impl + fake kernel) and calls it cheaply.

    def _scale_fake(x, factor, backend):
        return torch.empty_like(x)

    @define_op("scale(Tensor x, float factor, str backend) -> Tensor", fake=_scale_fake)
    def scale_op(x, factor, backend):          # the impl: dispatches to a backend
        return DISPATCH.run(backend or None, x.device, x.dtype, x, factor)

    y = scale_op(x, 2.0, "")                    # eager: the impl directly; else torch.ops.genfast.scale

Calling a ``NativeOp`` runs the impl directly in plain eager mode on plain tensors (the
torch.library round trip is the largest fixed cost of a small call) and goes through
``torch.ops.genfast.<name>`` under torch.compile, tracing, dispatch modes and tensor subclasses,
which must see the registered op (see ``direct_call_allowed``). Autograd stays with each
family's ``torch.autograd.Function`` (several need double backward for GAN penalties), whose
forward and backward call NativeOps.
"""
from __future__ import annotations

import re
from typing import Callable

import torch

from .._dispatch import direct_call_allowed

LIB = torch.library.Library("genfast", "FRAGMENT")
DISPATCH_KEYS = ("CPU", "CUDA")

_ARGUMENT = re.compile(r"^\s*(?P<type>[A-Za-z0-9_\[\]?()!]+(?:\([a-z]!?\))?)\s+(?P<name>\w+)")


def tensor_positions(schema: str) -> tuple:
    """Indices of the Tensor / Tensor? arguments of a torch.library schema."""
    arguments = schema[schema.index("(") + 1: schema.rindex(") ->")]
    positions = []
    for i, argument in enumerate(a for a in arguments.split(",") if a.strip() and a.strip() != "*"):
        match = _ARGUMENT.match(argument)
        if match is None:
            raise ValueError(f"cannot read argument {argument!r} of schema {schema!r}")
        if match.group("type").startswith("Tensor"):
            positions.append(i)
    return tuple(positions)


class NativeOp:
    """A genfast op: ``schema`` (without the namespace), ``impl`` (the eager implementation,
    which dispatches to a backend) and ``fake`` (shapes and dtypes only, for torch.compile)."""

    def __init__(self, schema: str, impl: Callable, fake: Callable):
        self.name = schema[: schema.index("(")].strip()
        LIB.define(schema)
        for key in DISPATCH_KEYS:
            LIB.impl(self.name, impl, key)
        torch.library.register_fake(f"genfast::{self.name}", lib=LIB)(fake)
        self.impl, self.fake = impl, fake
        self.op = getattr(torch.ops.genfast, self.name)
        self._tensors = tensor_positions(schema)
        self.__doc__ = f"genfast::{schema}"

    def __call__(self, *args):
        if direct_call_allowed(*[args[i] for i in self._tensors if i < len(args)]):  # trailing defaults: None
            return self.impl(*args)
        return self.op(*args)

    def __repr__(self) -> str:
        return f"NativeOp({self.__doc__})"


def define_op(schema: str, *, fake: Callable) -> Callable[[Callable], NativeOp]:
    """Decorator form of ``NativeOp(schema, impl, fake)``."""
    return lambda impl: NativeOp(schema, impl, fake)
