"""DTensor sharding strategies for genfast's attention ops, so tensor-parallel (heads sharded)
and data-parallel (batch sharded) models that pass DTensors run genfast's kernels on each
rank's local shard instead of failing with "no sharding strategy registered".

Attention is independent per batch row and per head, so every op runs unchanged on local
shards when q, k, v and what travels with them (outputs, lse, gradients, bias, ALiBi slopes,
caches) are all sharded on the batch dim, or all on the head dim, or all replicated. Inside
the ops q/k/v/out are (B, H, S, D), lse (B, H, Sq), bias (B, H, Sq, Sk), ALiBi slopes (H,) or
(B, H); the cache append works on the flash layout (B, S, Hk, D). Rules the strategies keep:

- GQA (H query heads, Hk key/value heads, H != Hk): heads shard only when the number of head
  shards divides both H and Hk, so each rank's query heads use its own key/value heads;
  otherwise the call raises (a silent all-gather, or an uneven split of the groups, would give
  a slow or a wrong result). With H == Hk an uneven split is still exact.
- Varlen (cu_seqlens): all sequences live in one batch row, so no batch sharding;
  cu_seqlens are replicated.
- Dropout (dropout_p > 0) is refused: every shard would draw its mask from the same seed.
- The KV-cache append writes into the caches in place, so it only accepts the caches'
  current placement (a redistributed cache would take the writes and be thrown away).

Importing torch.distributed.tensor costs seconds, so importing genfast does not do it: the
strategies are registered right away when DTensor is already imported, else right after its
first import (a one-shot import hook). Nothing here fails when torch.distributed is missing.
"""
from __future__ import annotations

import importlib.abc
import math
import sys
import warnings

import torch

_DTENSOR_MODULE = "torch.distributed.tensor"
BATCH_DIM, HEAD_DIM = 0, 1  # of q/k/v/out/lse/bias inside the ops
CACHE_HEAD_DIM = 2  # of k_cache/v_cache/k/v in attention_kvcache_append (flash layout)

_registered = False


def _shard_count(specs, dim: int) -> int:
    """How many shards the DTensor specs among ``specs`` split ``dim`` into (the product of the
    sizes of the mesh dims on which any of them is sharded on ``dim``)."""
    count = 1
    specs = [s for s in specs if s is not None]
    if not specs:
        return count
    mesh = specs[0].mesh
    for mesh_dim in range(mesh.ndim):
        if any(s.placements[mesh_dim].is_shard(dim) for s in specs):
            count *= mesh.size(mesh_dim)
    return count


def _heads_shardable(op: str, q, k, head_dim: int) -> bool:
    """Whether the head-sharded strategy is valid for these q and k; raises when q/k/v come
    head-sharded in a way that cannot be exact (GQA groups split unevenly)."""
    H, Hk = q.shape[head_dim], k.shape[head_dim]
    if H == Hk:
        return True  # heads are independent: any split, even uneven, is exact
    shards = _shard_count((q, k), head_dim)
    if shards > 1:
        if H % shards or Hk % shards:
            raise ValueError(
                f"genfast {op}: DTensor inputs shard the heads into {shards} parts, but grouped-query attention "
                f"with {H} query heads and {Hk} key/value heads can be head-sharded only when the number of "
                f"shards divides both (here: a divisor of {math.gcd(H, Hk)}); shard by batch, or replicate q, k "
                "and v")
        return True
    mesh = q.mesh
    return all(H % mesh.size(d) == 0 and Hk % mesh.size(d) == 0 for d in range(mesh.ndim))


def _refuse_dropout(op: str, dropout_p: float):
    if dropout_p > 0:
        raise NotImplementedError(
            f"genfast {op}: dropout_p = {dropout_p} with DTensor inputs is not supported (each shard would "
            "draw the same dropout mask from one seed); use dropout_p=0 with DTensors")


def _alibi(alibi, strategy: str, Replicate, Shard):
    """ALiBi slopes (H,) or (B, H) under the batch / heads strategy."""
    if alibi is None:
        return None
    if strategy == "batch":
        return Shard(0) if alibi.ndim == 2 else Replicate()
    return Shard(alibi.ndim - 1)


def _bias(bias, q, dim: int, Replicate, Shard):
    """A 4-D additive bias shards like q on ``dim``, unless it broadcasts there (size 1)."""
    if bias is None:
        return None
    return Shard(dim) if bias.shape[dim] == q.shape[dim] else Replicate()


def _problem_strategies(op, q, k, bias, alibi, cu_seqlens_q, cu_seqlens_k, seed, dropout_p, head_dim_ok,
                        Replicate, Shard):
    """Per strategy (replicate; batch unless varlen; heads if valid): its name and the placements
    of the q-like tensors (q/k/v/out/lse/grads), bias, ALiBi slopes, cu_seqlens and seed."""
    _refuse_dropout(op, dropout_p)
    varlen = cu_seqlens_q is not None
    strategies = [("replicate", Replicate(), None if bias is None else Replicate(),
                   None if alibi is None else Replicate())]
    if not varlen:
        strategies.append(("batch", Shard(BATCH_DIM), _bias(bias, q, BATCH_DIM, Replicate, Shard),
                           _alibi(alibi, "batch", Replicate, Shard)))
    if head_dim_ok:
        strategies.append(("heads", Shard(HEAD_DIM), _bias(bias, q, HEAD_DIM, Replicate, Shard),
                           _alibi(alibi, "heads", Replicate, Shard)))
    cu = None if not varlen else Replicate()
    seed_placement = None if seed is None else Replicate()
    return [(name, x, b, a, cu, seed_placement) for name, x, b, a in strategies]


def _scalars(n: int) -> list:
    return [None] * n


def _in_place_cache_strategies(op: str, k_cache, by_cache_placement: dict) -> list:
    """The strategies of an op that writes k_cache/v_cache in place: for each placement the
    caches have, the one (outputs, inputs) that keeps them where they are; any other placement
    is a clear error."""
    strategies = []
    for placement in dict.fromkeys(k_cache.placements):
        if placement not in by_cache_placement:
            raise ValueError(f"genfast {op}: k_cache/v_cache placement {placement} is not supported; shard the caches "
                             "on the batch dim (0, without cache_batch_idx / block_table) or the head dim (2) of "
                             "(B, S_max, Hk, D), or replicate")
        strategies.append(by_cache_placement[placement])
    return strategies


def register() -> bool:
    """Registers the strategies (idempotent); False when this torch has no DTensor."""
    global _registered
    if _registered:
        return True
    if not torch.distributed.is_available():
        return False
    try:
        from torch.distributed.tensor import Replicate, Shard
        from torch.distributed.tensor.experimental import register_sharding
    except ImportError:  # a torch without DTensor's custom-op API: DTensor calls raise DTensor's own error
        return False
    from . import attention  # noqa: F401  (defines the ops)

    ops = torch.ops.genfast

    @register_sharding(ops.attention_forward.default)
    def attention_forward_sharding(q, k, v, bias, alibi_slopes, cu_seqlens_q, cu_seqlens_k, seed, scale,
                                   window_left, window_right, align_bottom_right, softcap, dropout_p, max_seqlen_q,
                                   max_seqlen_k, return_dropout_mask, backend):
        heads_ok = _heads_shardable("attention_forward", q, k, HEAD_DIM)
        result = []
        for _, x, b, a, cu, s in _problem_strategies("attention_forward", q, k, bias, alibi_slopes, cu_seqlens_q,
                                                     cu_seqlens_k, seed, dropout_p, heads_ok, Replicate, Shard):
            keep = x if return_dropout_mask else Replicate()  # without the mask: an empty (0,) tensor
            result.append(([x, x, keep], [x, x, x, b, a, cu, cu, s] + _scalars(10)))
        return result

    @register_sharding(ops.attention_backward.default)
    def attention_backward_sharding(dout, q, k, v, out, lse, bias, alibi_slopes, cu_seqlens_q, cu_seqlens_k, seed,
                                    scale, window_left, window_right, align_bottom_right, softcap, dropout_p,
                                    max_seqlen_q, max_seqlen_k, deterministic, backend):
        heads_ok = _heads_shardable("attention_backward", q, k, HEAD_DIM)
        result = []
        for _, x, b, a, cu, s in _problem_strategies("attention_backward", q, k, bias, alibi_slopes, cu_seqlens_q,
                                                     cu_seqlens_k, seed, dropout_p, heads_ok, Replicate, Shard):
            result.append(([x, x, x], [x, x, x, x, x, x, b, a, cu, cu, s] + _scalars(10)))
        return result

    @register_sharding(ops.attention_decode.default)
    def attention_decode_sharding(q, k_cache, v_cache, cache_seqlens, alibi_slopes, scale, window_left,
                                  window_right, softcap, num_splits, backend, *cache_index):
        # cache_index: (cache_leftpad, cache_batch_idx, block_table) when given. A paged cache or
        # cache_batch_idx has no batch dim to shard (its dim 0 is a pool): replicated or heads only.
        index = [None if t is None else Replicate() for t in cache_index]
        strategies = [([Replicate(), Replicate()],
                       [Replicate()] * 4 + [None if alibi_slopes is None else Replicate()], index)]
        if all(t is None for t in cache_index[1:]):
            strategies.append(([Shard(BATCH_DIM)] * 2,
                               [Shard(BATCH_DIM)] * 4 + [_alibi(alibi_slopes, "batch", Replicate, Shard)],
                               [None if t is None else Shard(0) for t in cache_index]))
        if _heads_shardable("attention_decode", q, k_cache, HEAD_DIM):
            # cache_seqlens (B,) is per batch row: replicated when the heads are split.
            strategies.append(([Shard(HEAD_DIM)] * 2, [Shard(HEAD_DIM)] * 3 + [Replicate()]
                               + [_alibi(alibi_slopes, "heads", Replicate, Shard)], index))
        return [(outs, ins + _scalars(6) + extra) for outs, ins, extra in strategies]

    @register_sharding(ops.attention_kvcache_append.default)
    def attention_kvcache_append_sharding(k_cache, v_cache, k, v, cache_seqlens, *cache_index):
        # cache_index: (cache_batch_idx, block_table). With either, dim 0 of the caches is not the
        # batch (a pool of rows or pages): replicated or head-sharded caches, replicated index.
        if tuple(k_cache.placements) != tuple(v_cache.placements):
            raise ValueError(f"genfast attention_kvcache_append: k_cache {tuple(k_cache.placements)} and v_cache "
                             f"{tuple(v_cache.placements)} must have the same DTensor placements")
        pooled = any(t is not None for t in cache_index)
        index = [None if t is None else Replicate() for t in cache_index]
        # The caches are written in place: only strategies that keep them where they are.
        by_cache_placement = {Replicate(): [Replicate()] * 5 + index,
                              Shard(CACHE_HEAD_DIM): [Shard(CACHE_HEAD_DIM)] * 4 + [Replicate()] + index}
        if not pooled:
            by_cache_placement[Shard(BATCH_DIM)] = [Shard(BATCH_DIM)] * 5 + index
        return _in_place_cache_strategies("attention_kvcache_append", k_cache,
                                          {p: ([], inputs) for p, inputs in by_cache_placement.items()})

    @register_sharding(ops.attention_rotary_append.default)
    def attention_rotary_append_sharding(q, k_cache, v_cache, k, v, cache_seqlens, rotary_cos, rotary_sin,
                                         interleaved, q_same_position, *cache_index):
        # q / k / v / caches in flash layout (B, S, H, D): heads on dim 2 (CACHE_HEAD_DIM). The caches
        # are written in place, so only strategies that keep them where they are; cos / sin and
        # cache_seqlens are per position / per row: replicated (sharded with the batch).
        pooled = any(t is not None for t in cache_index)
        index = [None if t is None else Replicate() for t in cache_index]
        by_cache_placement = {Replicate(): ([Replicate()], [Replicate()] * 8 + [None, None] + index)}
        if not pooled:
            by_cache_placement[Shard(BATCH_DIM)] = ([Shard(BATCH_DIM)], [Shard(BATCH_DIM)] * 6 + [Replicate()] * 2
                                                    + [None, None] + index)
        if _heads_shardable("attention_rotary_append", q, k_cache, CACHE_HEAD_DIM):
            by_cache_placement[Shard(CACHE_HEAD_DIM)] = ([Shard(CACHE_HEAD_DIM)], [Shard(CACHE_HEAD_DIM)] * 5
                                                         + [Replicate()] * 3 + [None, None] + index)
        return _in_place_cache_strategies("attention_rotary_append", k_cache, by_cache_placement)

    _registered = True
    return True


class _RegisterAfterDTensorImport(importlib.abc.MetaPathFinder):
    """One-shot import hook: lets ``torch.distributed.tensor`` load, then registers."""

    def find_spec(self, name, path, target=None):
        if name != _DTENSOR_MODULE:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        for finder in sys.meta_path:
            spec = finder.find_spec(name, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _RegisteringLoader(spec.loader)
        return spec


class _RegisteringLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        try:
            register()
        except Exception as e:  # never break the user's import of DTensor; say what is missing
            from .._dispatch import BackendWarning

            warnings.warn(f"genfast: registering the DTensor sharding strategies of the attention ops failed "
                          f"({type(e).__name__}: {e}); genfast attention will not accept DTensors", BackendWarning)

    def __getattr__(self, name):  # get_resource_reader, is_package, ... of the real loader
        return getattr(self.loader, name)


def _install() -> None:
    if not torch.distributed.is_available():
        return
    if _DTENSOR_MODULE in sys.modules:
        register()
    elif not any(isinstance(f, _RegisterAfterDTensorImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterDTensorImport())


_install()
