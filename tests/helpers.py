"""Helpers shared by the op tests (``from helpers import ...``: pytest puts tests/ on sys.path,
tests/ having no __init__.py). Test modules import these, never each other."""
from __future__ import annotations

import pytest
import torch

CPU = torch.device("cpu")

LAYOUTS = ("contiguous", "channels_last", "strided", "permuted", "batch_inner", "channels_last_strided")


def require(dispatch, backend: str, device, dtype: torch.dtype) -> None:
    """Skip the test when ``dispatch`` (an OpDispatcher) cannot run ``backend`` here."""
    reason = dispatch.unavailable_reason(backend, device, dtype)
    if reason:
        pytest.skip(f"{backend} cannot run here: {reason}")


def random_tensor(shape, dtype: torch.dtype = torch.float64, layout: str = "contiguous", device=CPU,
                  scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    """shift + scale * N(0, 1), drawn in float64 then cast to dtype, in the given memory layout:

    * contiguous; channels_last (channels innermost, any rank >= 3);
    * strided: not dense, every other element of a last dim twice as long;
    * permuted (4-D): dense, in no standard order;
    * batch_inner (4-D): dense, the batch dimension innermost;
    * channels_last_strided (4-D): channels_last and every other column.
    """
    shape = tuple(shape)
    if layout == "contiguous":
        x = torch.randn(shape, dtype=torch.float64)
    elif layout == "channels_last":
        perm = (0, *range(2, len(shape)), 1)
        x = torch.randn(shape, dtype=torch.float64)
        x = x.permute(perm).contiguous().permute(tuple(perm.index(i) for i in range(len(shape))))
    elif layout == "strided":
        x = torch.randn(*shape[:-1], 2 * shape[-1], dtype=torch.float64)[..., ::2]
    elif layout == "permuted":
        x = torch.randn(shape[2], shape[0], shape[3], shape[1], dtype=torch.float64).permute(1, 3, 0, 2)
    elif layout == "batch_inner":
        x = torch.randn(*shape[1:], shape[0], dtype=torch.float64).permute(3, 0, 1, 2)
    elif layout == "channels_last_strided":
        big = torch.randn(shape[0], shape[1], shape[2], 2 * shape[3], dtype=torch.float64)
        x = big.to(memory_format=torch.channels_last)[..., 1::2]
    else:
        raise ValueError(f"random_tensor: unknown layout {layout!r}; expected one of {LAYOUTS}")
    assert x.shape == torch.Size(shape)
    return (shift + scale * x).to(device=device, dtype=dtype)


def attention_rand(*shape, dtype: torch.dtype, device=CPU, strided: bool = False) -> torch.Tensor:
    """~N(0, 1) drawn in float64, in dtype; strided=True gives the (B, H, S, D) view of a
    (B, S, H, D) tensor (the layout flash-attention callers pass)."""
    if strided:
        B, H, S, D = shape
        return torch.randn(B, S, H, D, dtype=torch.float64).to(device, dtype).transpose(1, 2)
    return torch.randn(*shape, dtype=torch.float64).to(device, dtype)
