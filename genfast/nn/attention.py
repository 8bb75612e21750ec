"""Attention modules built on genfast's fused attention.

* ``MultiheadAttention``: a torch.nn.MultiheadAttention (same constructor, parameters,
  state_dict keys and forward signature) whose ``need_weights=False`` path runs genfast's
  kernel; ``need_weights=True`` (torch's default) and the rarely used add_bias_kv /
  add_zero_attn options run torch's own math. ``MultiheadAttention.from_torch(module)``.
* ``CausalSelfAttention``: GPT-style block (fused QKV Linear, optional GQA, optional rotary
  embedding applied just before the kernel, KV cache for generation with
  ``flash_attn_with_kvcache``).
* ``register_transformers_attention()``: registers genfast as a Hugging Face transformers
  attention implementation (``attn_implementation="genfast"``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..ops.attention import flash_attn_func, flash_attn_with_kvcache, scaled_dot_product_attention

__all__ = ["MultiheadAttention", "CausalSelfAttention", "KVCache", "apply_rotary", "register_transformers_attention"]


def _as_additive(mask: Optional[torch.Tensor], dtype: torch.dtype, name: str) -> Optional[torch.Tensor]:
    """torch.nn.MultiheadAttention masks (bool True = NOT allowed, or additive float) -> additive."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, -math.inf)
    if not mask.is_floating_point():
        raise TypeError(f"MultiheadAttention: {name} must be bool or floating point, got {mask.dtype}")
    return mask.to(dtype)


class MultiheadAttention(torch.nn.MultiheadAttention):
    """Drop-in torch.nn.MultiheadAttention; ``need_weights=False`` runs genfast's fused kernel.

    ``backend`` (keyword-only) picks the genfast backend (None: automatic)."""

    def __init__(self, *args, backend: Optional[str] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = backend

    @classmethod
    def from_torch(cls, module: torch.nn.MultiheadAttention, backend: Optional[str] = None) -> "MultiheadAttention":
        """A genfast MultiheadAttention with ``module``'s configuration and weights (copied)."""
        if not isinstance(module, torch.nn.MultiheadAttention):
            raise TypeError(f"from_torch: expected a torch.nn.MultiheadAttention, got {type(module).__name__}")
        ref = module.in_proj_weight if module.in_proj_weight is not None else module.q_proj_weight
        new = cls(module.embed_dim, module.num_heads, dropout=module.dropout, bias=module.in_proj_bias is not None,
                  add_bias_kv=module.bias_k is not None, add_zero_attn=module.add_zero_attn, kdim=module.kdim,
                  vdim=module.vdim, batch_first=module.batch_first, device=ref.device, dtype=ref.dtype,
                  backend=backend)
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        return new

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if need_weights or self.bias_k is not None or self.add_zero_attn:
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal)
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint")  # torch's message
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        # Now (L, N, E) like torch's functional; projections keep that layout.
        L, N, E = query.shape
        S = key.shape[0]
        H, hd = self.num_heads, self.head_dim
        if self._qkv_same_embed_dim:
            w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        b_q = b_k = b_v = None
        if self.in_proj_bias is not None:
            b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        if self._qkv_same_embed_dim and query is key and key is value:
            q, k, v = F.linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)  # fused QKV
        else:
            q, k, v = F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)
        # (L, N, H*hd) -> (N, H, L, hd)
        q = q.reshape(L, N, H, hd).permute(1, 2, 0, 3)
        k = k.reshape(S, N, H, hd).permute(1, 2, 0, 3)
        v = v.reshape(S, N, H, hd).permute(1, 2, 0, 3)
        use_causal = is_causal and key_padding_mask is None
        bias = None
        if not use_causal:
            am = _as_additive(attn_mask, q.dtype, "attn_mask")
            if am is not None:
                am = am.reshape(1, 1, L, S) if am.dim() == 2 else am.reshape(N, H, L, S)
            kpm = _as_additive(key_padding_mask, q.dtype, "key_padding_mask")
            if kpm is not None:
                kpm = kpm.reshape(N, 1, 1, S)
            bias = am if kpm is None else (kpm if am is None else am + kpm)
        dropout = self.dropout if self.training else 0.0
        out = scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout, is_causal=use_causal,
                                           backend=self.backend)
        out = out.permute(2, 0, 1, 3).reshape(L, N, E)  # (L, N, E)
        out = self.out_proj(out)
        if not batched:
            out = out.squeeze(1)
        elif self.batch_first:
            out = out.transpose(0, 1)
        return out, None


# ----------------------------------------------------------------------------- GPT-style block


def apply_rotary(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotary embedding (GPT-NeoX "rotate half" form) of x (B, S, H, D) at integer positions
    (S,) or (B, S); computed in fp32, returned in x's dtype."""
    D = x.shape[-1]
    inv_freq = 1.0 / (base ** (torch.arange(0, D, 2, device=x.device, dtype=torch.float32) / D))
    angles = positions.to(torch.float32)[..., None] * inv_freq  # (S, D/2) or (B, S, D/2)
    if angles.dim() == 2:
        angles = angles[None]
    cos, sin = angles.cos()[:, :, None, :], angles.sin()[:, :, None, :]
    xf = x.float()
    x1, x2 = xf[..., : D // 2], xf[..., D // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


@dataclass
class KVCache:
    """Preallocated keys/values (B, S_max, Hk, D) and the number of valid positions per row.

    ``length``: the number of cached positions when every row has the same, kept on the host so
    the ``attention="sdpa"`` path can slice the cache without a device sync (``init_cache``
    starts it at 0, the SDPA path advances it, the genfast path sets it to None: unknown, read
    from ``seqlens``). Set it to None after changing ``seqlens`` yourself."""

    k: torch.Tensor
    v: torch.Tensor
    seqlens: torch.Tensor  # int32 (B,)
    length: Optional[int] = None
    # A paged cache (``init_paged_cache``): k / v are a pool of pages (num_blocks, page_size,
    # Hk, D) and row b's position p lives in page block_table[b, p // page_size].
    block_table: Optional[torch.Tensor] = None

    def row(self, b: int) -> "KVCache":
        """Batch row b alone, sharing this cache's memory (its seqlens entry is a view)."""
        if self.block_table is not None:
            return KVCache(self.k, self.v, self.seqlens[b:b + 1], None, self.block_table[b:b + 1])
        return KVCache(self.k[b:b + 1], self.v[b:b + 1], self.seqlens[b:b + 1], None)


def _sdpa_with_cache(q, k, v, k_cache, v_cache, offset: int) -> torch.Tensor:
    """The SDPA baseline of a cached step: writes k, v (B, S, Hk, D) at ``offset`` (every row
    of the batch has the same length), then attends to the first offset + S cached positions,
    causally aligned to the bottom right."""
    s = q.shape[1]
    end = offset + s
    k_cache[:, offset:end] = k
    v_cache[:, offset:end] = v
    keys, values = k_cache[:, :end].transpose(1, 2), v_cache[:, :end].transpose(1, 2)
    mask = None
    if s > 1 and offset > 0:  # new token i sees the cache and new tokens up to itself
        mask = torch.ones(s, end, dtype=torch.bool, device=q.device).tril(offset)
    gqa = {"enable_gqa": True} if q.shape[2] != k.shape[2] else {}
    y = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask,
                                       is_causal=s > 1 and offset == 0, **gqa)
    return y.transpose(1, 2)


class CausalSelfAttention(torch.nn.Module):
    """GPT-style causal self-attention: fused QKV projection, GQA (``num_kv_heads``), optional
    rotary embedding, dropout, output projection. ``forward(x, cache=None)``: x (B, S, E); with a
    ``KVCache`` (``init_cache``), the new keys/values are appended in place and the S new tokens
    attend to everything cached (generation / chunked prefill).

    ``attention``: ``"genfast"`` (the fused kernels, following ``backend``) or ``"sdpa"``
    (torch's ``F.scaled_dot_product_attention``, a baseline for benchmarks; with a cache every
    row must have the same length)."""

    def __init__(self, embed_dim: int, num_heads: int, num_kv_heads: Optional[int] = None, bias: bool = True,
                 dropout: float = 0.0, rotary: bool = False, rotary_base: float = 10000.0,
                 backend: Optional[str] = None, device=None, dtype=None, attention: str = "genfast"):
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"CausalSelfAttention: embed_dim {embed_dim} is not a multiple of num_heads {num_heads}")
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_heads % num_kv_heads != 0:
            raise ValueError(f"CausalSelfAttention: num_heads {num_heads} is not a multiple of "
                             f"num_kv_heads {num_kv_heads}")
        if attention not in ("genfast", "sdpa"):
            raise ValueError(f"CausalSelfAttention: attention must be 'genfast' or 'sdpa', got {attention!r}")
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.dropout, self.rotary, self.rotary_base, self.backend = dropout, rotary, rotary_base, backend
        self.attention = attention
        kw = dict(device=device, dtype=dtype)
        self.qkv = torch.nn.Linear(embed_dim, (num_heads + 2 * num_kv_heads) * self.head_dim, bias=bias, **kw)
        self.proj = torch.nn.Linear(embed_dim, embed_dim, bias=bias, **kw)

    def init_cache(self, batch_size: int, max_seq_len: int, device=None, dtype=None) -> KVCache:
        w = self.qkv.weight
        shape = (batch_size, max_seq_len, self.num_kv_heads, self.head_dim)
        device, dtype = device or w.device, dtype or w.dtype
        return KVCache(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype),
                       torch.zeros(batch_size, dtype=torch.int32, device=device), length=0)

    def init_paged_cache(self, capacities, page_size: int = 16, device=None, dtype=None) -> KVCache:
        """A paged cache for rows of different lengths: row b gets ceil(capacities[b] /
        page_size) pages of one pool (num_blocks, page_size, Hk, D), so memory follows the
        rows' own lengths, not the longest one's. Read through ``flash_attn_with_kvcache``'s
        ``block_table`` (``attention="genfast"`` only)."""
        w = self.qkv.weight
        device, dtype = device or w.device, dtype or w.dtype
        pages = [max(1, -(-int(c) // page_size)) for c in capacities]
        table = torch.zeros(len(pages), max(pages, default=1), dtype=torch.int32)
        first = 0
        for b, n in enumerate(pages):  # unused table entries stay 0: never read (past seqlens)
            table[b, :n] = torch.arange(first, first + n, dtype=torch.int32)
            first += n
        shape = (first, page_size, self.num_kv_heads, self.head_dim)
        return KVCache(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype),
                       torch.zeros(len(pages), dtype=torch.int32, device=device), length=0,
                       block_table=table.to(device))

    def forward(self, x: torch.Tensor, cache: Optional[KVCache] = None) -> torch.Tensor:
        B, S, E = x.shape
        H, Hk, hd = self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = self.qkv(x).split([H * hd, Hk * hd, Hk * hd], dim=-1)
        q, k, v = q.reshape(B, S, H, hd), k.reshape(B, S, Hk, hd), v.reshape(B, S, Hk, hd)
        if cache is None:
            if self.rotary:
                pos = torch.arange(S, device=x.device)
                q, k = apply_rotary(q, pos, self.rotary_base), apply_rotary(k, pos, self.rotary_base)
            dropout_p = self.dropout if self.training else 0.0
            if self.attention == "sdpa":
                gqa = {"enable_gqa": True} if Hk != H else {}
                out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                     dropout_p=dropout_p, is_causal=True, **gqa).transpose(1, 2)
            else:
                out = flash_attn_func(q, k, v, dropout_p=dropout_p, causal=True, backend=self.backend)
        else:
            if self.rotary:  # per-row positions from the device tensor: no host sync
                pos = cache.seqlens.to(torch.int64)[:, None] + torch.arange(S, device=x.device)[None, :]
                q, k = apply_rotary(q, pos, self.rotary_base), apply_rotary(k, pos, self.rotary_base)
            if self.attention == "sdpa":
                if cache.block_table is not None:
                    raise ValueError("CausalSelfAttention(attention='sdpa'): a paged cache needs attention='genfast'")
                offset = self._common_length(cache)
                out = _sdpa_with_cache(q, k, v, cache.k, cache.v, offset)
                cache.length = offset + S
            else:
                out = flash_attn_with_kvcache(q, cache.k, cache.v, k, v, cache_seqlens=cache.seqlens,
                                              block_table=cache.block_table, causal=True, backend=self.backend)
                # Lengths are tracked on the device only; not reading the host copy keeps a
                # compiled decode step from specialising (recompiling) on it.
                cache.length = None
            cache.seqlens.add_(S)
        return self.proj(out.reshape(B, S, E))

    @staticmethod
    def _common_length(cache: KVCache) -> int:
        if cache.length is not None:
            return cache.length
        lengths = cache.seqlens.tolist()  # host sync: a cache built without init_cache
        if any(n != lengths[0] for n in lengths):
            raise ValueError(f"CausalSelfAttention(attention='sdpa'): every cache row must have the same length, "
                             f"got seqlens {lengths}")
        return lengths[0]


# ----------------------------------------------------------------------------- transformers

# The adapter lives in genfast.integrations.transformers; re-exported here for existing callers.
from ..integrations.transformers import register_transformers_attention  # noqa: E402
