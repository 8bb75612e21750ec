"""Drop-in GroupNorm modules backed by ``genfast.ops.group_norm``."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..ops.group_norm import group_norm


class GroupNorm(nn.GroupNorm):
    """Drop-in for ``torch.nn.GroupNorm``: same constructor, attributes and ``state_dict``
    keys (``weight``, ``bias``; none with ``affine=False``), computed by genfast's fused
    kernels. ``backend`` picks a genfast backend (None: automatic)."""

    _activation: Optional[str] = None

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 device=None, dtype=None, backend: Optional[str] = None):
        super().__init__(num_groups, num_channels, eps, affine, device=device, dtype=dtype)
        self.backend = backend

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(input.dtype) if self.weight is not None else None
        b = self.bias.to(input.dtype) if self.bias is not None else None
        return group_norm(input, self.num_groups, w, b, self.eps, activation=self._activation, backend=self.backend)

    @classmethod
    def from_torch(cls, module: nn.GroupNorm, backend: Optional[str] = None):
        """A genfast module with ``module``'s settings, sharing its parameters (no copy)."""
        if not isinstance(module, nn.GroupNorm):
            raise TypeError(f"{cls.__name__}.from_torch: expected a torch.nn.GroupNorm, got {type(module).__name__}")
        ref = module.weight if module.weight is not None else None
        new = cls(module.num_groups, module.num_channels, module.eps, module.affine,
                  device=ref.device if ref is not None else None, dtype=ref.dtype if ref is not None else None,
                  backend=backend)
        if module.affine:
            new.weight = module.weight
            new.bias = module.bias
        new.train(module.training)
        return new


class GroupNormSiLU(GroupNorm):
    """``torch.nn.GroupNorm`` followed by SiLU, fused (the diffusion-UNet ``norm`` + ``nonlinearity``
    pair). Same constructor and ``state_dict`` keys as ``torch.nn.GroupNorm``, so it loads a
    GroupNorm's weights; ``from_torch(group_norm_module)`` wraps an existing one."""

    _activation = "silu"
