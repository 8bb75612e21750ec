"""The fast/reference switch shared by genfast's model classes."""
from __future__ import annotations

import contextlib
from typing import Optional

from torch import nn

from .._dispatch import BACKENDS, use_backend


class FastPathModel(nn.Module):
    """A model whose genfast ops all run on ``self.backend``: None picks the fastest backend
    that can run (the fast path), ``"reference"`` runs the plain-PyTorch specification of
    every op, and any other name from ``genfast.BACKENDS`` forces that backend.

        model = genfast.models.VAE().set_backend("reference")   # same weights, reference ops
    """

    backend: Optional[str] = None

    def set_backend(self, backend: Optional[str]) -> "FastPathModel":
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"{type(self).__name__}.set_backend: unknown backend {backend!r}; "
                             f"expected None or one of {BACKENDS}")
        for module in self.modules():  # sub-models (e.g. a GAN's generator) follow the switch
            if isinstance(module, FastPathModel):
                module.backend = backend
        return self

    def backend_scope(self):
        """Context in which this model's genfast ops run on ``self.backend``."""
        return use_backend(self.backend) if self.backend is not None else contextlib.nullcontext()
