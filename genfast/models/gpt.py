"""A decoder-only Transformer (GPT-2 style) on genfast's fused attention, with KV-cache
generation through ``genfast.flash_attn_with_kvcache`` (decode kernel, cache appended in place)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.attention import CausalSelfAttention, KVCache, _sdpa_with_cache  # noqa: F401 (_sdpa_with_cache: tests)
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


def _attention(config: GPTConfig) -> CausalSelfAttention:
    if config.n_embd % config.n_head:
        raise ValueError(f"GPT: n_embd ({config.n_embd}) must be divisible by n_head ({config.n_head})")
    return CausalSelfAttention(config.n_embd, config.n_head, bias=config.bias, dropout=config.dropout,
                               rotary=config.position == "rotary", rotary_base=config.rotary_base,
                               attention=config.attention)


# nanoGPT's names of the attention's Linears (GPT's own before it used genfast.nn.CausalSelfAttention)
_NANOGPT_ATTENTION_NAMES = {"c_attn": "qkv", "c_proj": "proj"}


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
        self.attn = _attention(config)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.resid_dropout(self.attn(self.ln_1(x)))
        return x + self.mlp(self.ln_2(x))

    def forward_cached(self, x: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """x: the new tokens (B, S_new, C); appends their keys/values to ``cache``."""
        x = x + self.attn(self.ln_1(x), cache)
        return x + self.mlp(self.ln_2(x))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints with nanoGPT's attention names (attn.c_attn.*, attn.c_proj.*) load too.
        for old, new in _NANOGPT_ATTENTION_NAMES.items():
            for key in [k for k in state_dict if k.startswith(f"{prefix}attn.{old}.")]:
                state_dict[f"{prefix}attn.{new}." + key[len(f"{prefix}attn.{old}."):]] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class GPT(FastPathModel):
    """GPT-2-style decoder (nanoGPT layout; GPT-2 small is the default config, ~124M
    parameters). ``forward(idx, targets=None)`` -> (logits, loss).

    Parameter names: nanoGPT's, except that each block's attention is a
    ``genfast.nn.CausalSelfAttention``, so ``state_dict()`` and ``named_parameters()`` name its
    Linears ``h.<i>.attn.qkv`` and ``h.<i>.attn.proj`` (nanoGPT: ``c_attn``, ``c_proj``; same
    shapes and layout). ``load_state_dict`` accepts both names, and nanoGPT's ``transformer.``
    prefix and causal-mask buffers (``attn.bias``), so old GPT checkpoints and nanoGPT state
    dicts load unchanged."""

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
            if name.endswith(("mlp.c_proj.weight", "attn.proj.weight")):  # GPT-2's scaled residual init
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        self.set_backend(backend)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # nanoGPT's layout: its modules under "transformer.", and (without flash) a causal-mask
        # buffer "transformer.h.<i>.attn.bias" that genfast's kernels do not need.
        for key in [k for k in state_dict if k.startswith(f"{prefix}transformer.")]:
            value = state_dict.pop(key)
            name = key[len(f"{prefix}transformer."):]
            if not (name.startswith("h.") and name.endswith(".attn.bias")):
                state_dict[prefix + name] = value
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def _embed(self, idx: torch.Tensor, offset) -> torch.Tensor:
        """Token (+ learned position) embeddings of idx (B, S) at positions offset + t; ``offset``
        an int, or an int (B, 1) tensor of per-row positions (no check: callers bound them)."""
        b, s = idx.shape
        if isinstance(offset, int) and offset + s > self.config.block_size:
            raise ValueError(f"GPT: sequence of {offset + s} tokens exceeds block_size {self.config.block_size}")
        x = self.wte(idx)
        if self.wpe is not None:
            x = x + self.wpe(offset + torch.arange(s, device=idx.device))
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
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: Optional[int] = None,
                 top_p: Optional[float] = None, use_cache: bool = True,
                 generator: Optional[torch.Generator] = None, page_size: int = 16):
        """Append ``max_new_tokens`` sampled tokens to ``idx`` (B, S). temperature 0 = greedy.
        With ``use_cache`` the prompt is prefilled once into a per-layer KV cache and every new
        token runs the decode kernel against it; without, the whole sequence is re-run.

        ``idx`` may also be a list of 1-D prompts of different lengths: they are served together
        from a paged cache (``page_size`` rows per page, each row holding only its own pages),
        each prompt prefilled on its own tokens (no padding) and every decode step batched over
        all rows at their own positions; returns a list (each prompt + its new tokens)."""
        if max_new_tokens < 0:
            raise ValueError(f"GPT.generate: max_new_tokens must be >= 0, got {max_new_tokens}")
        if isinstance(idx, (list, tuple)):
            return self._generate_ragged(list(idx), max_new_tokens, temperature, top_k, top_p, generator, page_size)
        if idx.shape[1] + max_new_tokens > self.config.block_size:
            raise ValueError(f"GPT.generate: {idx.shape[1]} + {max_new_tokens} tokens exceed block_size "
                             f"{self.config.block_size}")
        if not use_cache:
            for _ in range(max_new_tokens):
                logits, _ = self(idx)
                idx = torch.cat([idx, _sample(logits[:, -1], temperature, top_k, top_p, generator)], dim=1)
            return idx
        b, total = idx.shape[0], idx.shape[1] + max_new_tokens
        dtype = self.wte.weight.dtype
        caches = [block.attn.init_cache(b, total, device=idx.device, dtype=dtype) for block in self.h]
        new_tokens, offset = idx, 0
        with self.backend_scope():
            for _ in range(max_new_tokens):
                x = self._embed(new_tokens, offset)
                for block, cache in zip(self.h, caches):
                    x = block.forward_cached(x, cache)
                logits = self.lm_head(self.ln_f(x[:, -1]))
                offset += new_tokens.shape[1]
                new_tokens = _sample(logits, temperature, top_k, top_p, generator)
                idx = torch.cat([idx, new_tokens], dim=1)
        return idx


    def _generate_ragged(self, prompts: list, max_new_tokens: int, temperature, top_k, top_p, generator,
                         page_size: int) -> list:
        if not prompts or any(not isinstance(p, torch.Tensor) or p.ndim != 1 or p.numel() == 0 for p in prompts):
            got = [tuple(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__ for p in prompts]
            raise ValueError(f"GPT.generate: a list idx holds non-empty 1-D token tensors, got {got}")
        if self.config.attention != "genfast":
            raise ValueError("GPT.generate: prompts of different lengths need attention='genfast' (a paged cache)")
        lengths = [p.numel() for p in prompts]
        if max(lengths) + max_new_tokens > self.config.block_size:
            raise ValueError(f"GPT.generate: {max(lengths)} + {max_new_tokens} tokens exceed block_size "
                             f"{self.config.block_size}")
        device, dtype = prompts[0].device, self.wte.weight.dtype
        capacities = [n + max_new_tokens for n in lengths]
        caches = [block.attn.init_paged_cache(capacities, page_size, device=device, dtype=dtype) for block in self.h]
        outputs = [[p] for p in prompts]
        if max_new_tokens == 0:
            return prompts
        with self.backend_scope():
            last = []
            for b, prompt in enumerate(prompts):  # prefill: each prompt's own tokens only
                x = self._embed(prompt[None], 0)
                for block, cache in zip(self.h, caches):
                    x = block.forward_cached(x, cache.row(b))
                last.append(self.lm_head(self.ln_f(x[:, -1])))
            positions = torch.tensor(lengths, device=device)[:, None]
            for step in range(max_new_tokens):
                logits = torch.cat(last) if step == 0 else self.lm_head(self.ln_f(x[:, -1]))
                new_tokens = _sample(logits, temperature, top_k, top_p, generator)
                for b in range(len(prompts)):
                    outputs[b].append(new_tokens[b])
                if step + 1 == max_new_tokens:
                    break
                x = self._embed(new_tokens, positions + step)
                for block, cache in zip(self.h, caches):
                    x = block.forward_cached(x, cache)
        return [torch.cat(parts) for parts in outputs]


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
