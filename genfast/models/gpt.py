"""A decoder-only Transformer (GPT-2 style) on genfast's fused attention, with KV-cache
generation through ``genfast.flash_attn_with_kvcache`` (decode kernel, cache appended in place)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.attention import flash_attn_func, flash_attn_with_kvcache
from ._base import FastPathModel


@dataclass
class GPTConfig:
    vocab_size: int = 50304
    block_size: int = 1024      # maximum sequence length
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True
    position: str = "learned"   # "learned" (GPT-2) or "rotary"
    rotary_base: float = 10000.0
    attention: str = "genfast"  # "genfast" (fused, follows set_backend) or "sdpa" (torch's SDPA: a baseline)


def rotary_tables(seq_len: int, head_dim: int, base: float, device, offset: int = 0) -> tuple:
    """cos/sin tables (seq_len, head_dim // 2) for positions offset .. offset + seq_len - 1."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    pos = torch.arange(offset, offset + seq_len, device=device, dtype=torch.float32)
    angles = torch.outer(pos, inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., :d/2], x[..., d/2:]) of x (B, S, H, D) by the position's angle."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).to(x.dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        if config.n_embd % config.n_head:
            raise ValueError(f"GPT: n_embd ({config.n_embd}) must be divisible by n_head ({config.n_head})")
        self.n_head, self.head_dim = config.n_head, config.n_embd // config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.rotary = config.position == "rotary"
        self.rotary_base = config.rotary_base
        self.use_sdpa = config.attention == "sdpa"

    def _qkv(self, x: torch.Tensor, offset: int) -> tuple:
        b, s, _ = x.shape
        q, k, v = self.c_attn(x).reshape(b, s, 3, self.n_head, self.head_dim).unbind(2)  # (B, S, H, D) each
        if self.rotary:
            cos, sin = rotary_tables(s, self.head_dim, self.rotary_base, x.device, offset)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return q, k, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._qkv(x, 0)
        dropout_p = self.dropout if self.training else 0.0
        if self.use_sdpa:
            y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               dropout_p=dropout_p, is_causal=True).transpose(1, 2)
        else:
            y = flash_attn_func(q, k, v, dropout_p=dropout_p, causal=True)
        return self.resid_dropout(self.c_proj(y.reshape(x.shape)))

    def forward_cached(self, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       cache_seqlens: torch.Tensor, offset: int) -> torch.Tensor:
        """x: the new tokens (B, S_new, C) at positions offset..; appends their k/v to the caches."""
        q, k, v = self._qkv(x, offset)
        if self.use_sdpa:
            y = _sdpa_with_cache(q, k, v, k_cache, v_cache, offset)
        else:
            y = flash_attn_with_kvcache(q, k_cache, v_cache, k=k, v=v, cache_seqlens=cache_seqlens, causal=True)
        return self.c_proj(y.reshape(x.shape))


def _sdpa_with_cache(q, k, v, k_cache, v_cache, offset: int) -> torch.Tensor:
    """The SDPA baseline of the cached step: writes k, v (B, S, H, D) at ``offset`` (every row
    of the batch has the same length in ``GPT.generate``), then attends to the first
    offset + S cached positions, causally aligned to the bottom right."""
    s = q.shape[1]
    end = offset + s
    k_cache[:, offset:end] = k
    v_cache[:, offset:end] = v
    keys, values = k_cache[:, :end].transpose(1, 2), v_cache[:, :end].transpose(1, 2)
    mask = None
    if s > 1 and offset > 0:  # new token i sees the cache and new tokens up to itself
        mask = torch.ones(s, end, dtype=torch.bool, device=q.device).tril(offset)
    y = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask,
                                       is_causal=s > 1 and offset == 0)
    return y.transpose(1, 2)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))

    def forward_cached(self, x, k_cache, v_cache, cache_seqlens, offset):
        x = x + self.attn.forward_cached(self.ln_1(x), k_cache, v_cache, cache_seqlens, offset)
        return x + self.mlp(self.ln_2(x))


class GPT(FastPathModel):
    """GPT-2-style decoder (nanoGPT layout and parameter names; GPT-2 small is the default
    config, ~124M parameters). ``forward(idx, targets=None)`` -> (logits, loss)."""

    def __init__(self, config: Optional[GPTConfig] = None, backend: Optional[str] = None, **overrides):
        super().__init__()
        config = config or GPTConfig()
        for key, value in overrides.items():
            if not hasattr(config, key):
                raise ValueError(f"GPT: unknown config field {key!r}")
            setattr(config, key, value)
        if config.position not in ("learned", "rotary"):
            raise ValueError(f"GPT: position must be 'learned' or 'rotary', got {config.position!r}")
        if config.attention not in ("genfast", "sdpa"):
            raise ValueError(f"GPT: attention must be 'genfast' or 'sdpa', got {config.attention!r}")
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd) if config.position == "learned" else None
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        self.set_backend(backend)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def _embed(self, idx: torch.Tensor, offset: int) -> torch.Tensor:
        b, s = idx.shape
        if offset + s > self.config.block_size:
            raise ValueError(f"GPT: sequence of {offset + s} tokens exceeds block_size {self.config.block_size}")
        x = self.wte(idx)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(offset, offset + s, device=idx.device))
        return self.drop(x)

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None) -> tuple:
        with self.backend_scope():
            x = self._embed(idx, 0)
            for block in self.h:
                x = block(x)
            logits = self.lm_head(self.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)
        return logits, loss

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: Optional[int] = None,
                 top_p: Optional[float] = None, use_cache: bool = True,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Append ``max_new_tokens`` sampled tokens to ``idx`` (B, S). temperature 0 = greedy.
        With ``use_cache`` the prompt is prefilled once into a per-layer KV cache and every new
        token runs the decode kernel against it; without, the whole sequence is re-run."""
        if max_new_tokens < 0:
            raise ValueError(f"GPT.generate: max_new_tokens must be >= 0, got {max_new_tokens}")
        if idx.shape[1] + max_new_tokens > self.config.block_size:
            raise ValueError(f"GPT.generate: {idx.shape[1]} + {max_new_tokens} tokens exceed block_size "
                             f"{self.config.block_size}")
        if not use_cache:
            for _ in range(max_new_tokens):
                logits, _ = self(idx)
                idx = torch.cat([idx, _sample(logits[:, -1], temperature, top_k, top_p, generator)], dim=1)
            return idx
        cfg = self.config
        b, total = idx.shape[0], idx.shape[1] + max_new_tokens
        head_dim = cfg.n_embd // cfg.n_head
        dtype = self.wte.weight.dtype
        caches = [(idx.new_zeros((b, total, cfg.n_head, head_dim), dtype=dtype),
                   idx.new_zeros((b, total, cfg.n_head, head_dim), dtype=dtype)) for _ in self.h]
        cache_seqlens = torch.zeros(b, dtype=torch.int32, device=idx.device)
        new_tokens, offset = idx, 0
        with self.backend_scope():
            for _ in range(max_new_tokens):
                x = self._embed(new_tokens, offset)
                for block, (k_cache, v_cache) in zip(self.h, caches):
                    x = block.forward_cached(x, k_cache, v_cache, cache_seqlens, offset)
                logits = self.lm_head(self.ln_f(x[:, -1]))
                offset += new_tokens.shape[1]
                cache_seqlens += new_tokens.shape[1]
                new_tokens = _sample(logits, temperature, top_k, top_p, generator)
                idx = torch.cat([idx, new_tokens], dim=1)
        return idx


def _sample(logits: torch.Tensor, temperature: float, top_k: Optional[int], top_p: Optional[float],
            generator: Optional[torch.Generator]) -> torch.Tensor:
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) > top_p  # keep the smallest set reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)
