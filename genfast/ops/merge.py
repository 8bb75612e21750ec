"""Merging partial attention states by their log-sum-exp (FlashInfer's ``merge_state``).

Attention over keys K = K_a ∪ K_b equals a weighted mix of attention over K_a and over K_b:
with lse = log(exp(lse_a) + exp(lse_b)), out = exp(lse_a - lse) out_a + exp(lse_b - lse) out_b.
Split-KV decoding and ring attention both compute such parts and merge them.
"""
from __future__ import annotations

import torch

from ._validate import type_name

__all__ = ["merge_attention_states"]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def merge_states(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor):
    """The merge without checks, for any layout where ``lse[..., None]`` broadcasts against
    ``out`` (e.g. out (B, H, S, D) with lse (B, H, S)). Computes in fp32 (fp64 for fp64
    inputs); returns (out in the compute dtype, lse in the compute dtype)."""
    cd = _compute_dtype(out_a.dtype)
    lse_a, lse_b = lse_a.to(cd), lse_b.to(cd)
    # The result does not depend on the shift, so it is detached: no gradient through the max
    # (torch.maximum splits it on ties) and none through the -inf replacement.
    shift = torch.maximum(lse_a, lse_b).detach()
    shift = torch.where(torch.isneginf(shift), torch.zeros_like(shift), shift)
    w_a, w_b = torch.exp(lse_a - shift), torch.exp(lse_b - shift)  # a part with lse -inf weighs 0
    total = w_a + w_b
    empty = total == 0  # both parts empty: out 0, lse -inf (no NaN, in value or gradient)
    safe_total = torch.where(empty, torch.ones_like(total), total)
    lse = torch.where(empty, torch.full_like(total, float("-inf")), shift + torch.log(safe_total))
    out = (w_a / safe_total)[..., None] * out_a.to(cd) + (w_b / safe_total)[..., None] * out_b.to(cd)
    return out, lse


def merge_attention_states(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor):
    """Merges two partial attention results over disjoint key sets into the result over both.

    ``out_*`` (*, S, H, D) in flash-attn layout (e.g. (B, S, H, D), or (total, H, D) of the
    varlen API) and ``lse_*`` (*, H, S): the natural-log log-sum-exp of each row's scaled scores,
    as flash-attn and genfast return with ``return_attn_probs``/``return_lse`` (FlashInfer's
    ``merge_state`` uses base 2; convert with lse * ln 2). A row whose lse is -inf in one part
    (it saw no key there) takes the other part; -inf in both gives out 0 and lse -inf.

    Returns (out in ``out_a``'s dtype, lse fp32 (fp64 for fp64 inputs)); computed in fp32,
    differentiable in all four inputs.
    """
    fn = "merge_attention_states"
    for name, t in (("out_a", out_a), ("lse_a", lse_a), ("out_b", out_b), ("lse_b", lse_b)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type_name(t)}")
        if not t.is_floating_point():
            raise TypeError(f"{fn}: {name} must be a floating-point tensor, got {t.dtype}")
    if out_a.ndim < 3:
        raise ValueError(f"{fn}: out_a must have at least 3 dims (*, S, H, D), got shape {tuple(out_a.shape)}")
    if out_b.shape != out_a.shape:
        raise ValueError(f"{fn}: out_b has shape {tuple(out_b.shape)} but out_a has {tuple(out_a.shape)}")
    if out_b.dtype != out_a.dtype:
        raise TypeError(f"{fn}: out_b has dtype {out_b.dtype} but out_a has {out_a.dtype}")
    expected = out_a.shape[:-3] + (out_a.shape[-2], out_a.shape[-3])
    for name, t in (("lse_a", lse_a), ("lse_b", lse_b)):
        if t.shape != expected:
            raise ValueError(f"{fn}: {name} must have shape (*, H, S) = {tuple(expected)} for out of shape "
                             f"{tuple(out_a.shape)}, got {tuple(t.shape)}")
    for name, t in (("lse_a", lse_a), ("out_b", out_b), ("lse_b", lse_b)):
        if t.device != out_a.device:
            raise ValueError(f"{fn}: {name} is on {t.device} but out_a is on {out_a.device}")
    # flash layout (*, S, H, D) <-> lse (*, H, S): merge in (*, H, S, D) views.
    out, lse = merge_states(out_a.transpose(-3, -2), lse_a, out_b.transpose(-3, -2), lse_b)
    return out.transpose(-3, -2).to(out_a.dtype), lse
