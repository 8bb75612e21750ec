"""Context parallelism: attention over a sequence split across the ranks of a process group.

    out = genfast.distributed.ring_attention(q, k, v, causal=True)   # q, k, v: this rank's chunk

Each rank holds one chunk of the sequence (``layout="contiguous"``: rank r the r-th of W
chunks; ``layout="zigzag"``: chunks r and 2W-1-r of 2W, so causal work is even across ranks).
The key/value blocks travel around the ring with torch.distributed point-to-point calls,
overlapped with the attention of the block at hand; partial results are merged by their
log-sum-exp. The backward sends the key/value gradients around the ring with the blocks
(ring-flash-attention). Works on any process group: gloo on CPU, NCCL on GPUs.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from .ops import attention as _attn
from .ops._validate import type_name
from .ops.merge import merge_states

__all__ = ["ring_attention", "shard_sequence", "unshard_sequence", "gather_sequence", "local_cu_seqlens", "LAYOUTS"]

LAYOUTS = ("contiguous", "zigzag")


def _check_layout(fn: str, layout) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"{fn}: layout must be one of {LAYOUTS}, got {layout!r}")
    return layout


def _chunk_count(layout: str, world_size: int) -> int:
    return world_size if layout == "contiguous" else 2 * world_size


def _rank_chunks(layout: str, rank: int, world_size: int) -> tuple:
    """Indices of the chunks (of ``_chunk_count``) rank ``rank`` holds, in order."""
    return (rank,) if layout == "contiguous" else (rank, 2 * world_size - 1 - rank)


# ----------------------------------------------------------------------------- sharding helpers


def _check_cu(fn: str, cu_seqlens, length: int) -> list:
    """The values of a global ``cu_seqlens`` (int32, from 0, non-decreasing, ending at ``length``)."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.ndim != 1 or cu_seqlens.dtype != torch.int32:
        raise TypeError(f"{fn}: cu_seqlens must be a 1-D int32 tensor, got "
                        f"{cu_seqlens.dtype if isinstance(cu_seqlens, torch.Tensor) else type_name(cu_seqlens)}")
    values = cu_seqlens.tolist()
    if not values or values[0] != 0 or any(b < a for a, b in zip(values, values[1:])):
        raise ValueError(f"{fn}: cu_seqlens must start at 0 and be non-decreasing, got {values}")
    if length is not None and values[-1] != length:
        raise ValueError(f"{fn}: cu_seqlens[-1] = {values[-1]} but the sequence dim holds {length} tokens")
    return values


def _check_divisible(fn: str, values: list, n: int, layout: str, world_size: int) -> None:
    lengths = [b - a for a, b in zip(values, values[1:])]
    bad = [i for i, L in enumerate(lengths) if L % n]
    if bad:
        raise ValueError(f"{fn}: sequence {bad[0]} has length {lengths[bad[0]]}, not divisible into {n} equal chunks "
                         f"(layout {layout!r}, world_size {world_size}); every sequence must be")


def local_cu_seqlens(cu_seqlens: torch.Tensor, world_size: int, layout: str = "contiguous") -> tuple:
    """(cu_seqlens of each rank's tokens, their max_seqlen) for packed sequences with global
    ``cu_seqlens``: every rank holds ``1 / world_size`` of every sequence."""
    fn = "local_cu_seqlens"
    _check_layout(fn, layout)
    values = _check_cu(fn, cu_seqlens, None)
    _check_divisible(fn, values, _chunk_count(layout, world_size), layout, world_size)
    local = torch.div(cu_seqlens, world_size, rounding_mode="floor").to(torch.int32)
    lengths = [b - a for a, b in zip(values, values[1:])]
    return local, max(lengths, default=0) // world_size


def shard_sequence(x: torch.Tensor, dim: int, rank: int, world_size: int, layout: str = "contiguous",
                   cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Rank ``rank``'s part of the full sequence ``x`` (sequence along ``dim``), as
    ``ring_attention`` expects it. The length must divide into ``world_size`` chunks
    (``2 * world_size`` for ``"zigzag"``). With ``cu_seqlens`` (packed sequences, int32 global
    offsets), every sequence is split that way and the rank's parts are packed in order (their
    offsets: ``local_cu_seqlens``). Differentiable (a view for "contiguous" without cu_seqlens)."""
    fn = "shard_sequence"
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: x must be a torch.Tensor, got {type_name(x)}")
    _check_layout(fn, layout)
    if type(world_size) is not int or world_size < 1:
        raise ValueError(f"{fn}: world_size must be a positive int, got {world_size!r}")
    if type(rank) is not int or not 0 <= rank < world_size:
        raise ValueError(f"{fn}: rank must be an int in [0, {world_size}), got {rank!r}")
    if type(dim) is not int or not -x.ndim <= dim < x.ndim:
        raise ValueError(f"{fn}: dim {dim!r} is out of range for a tensor of {x.ndim} dims")
    n = _chunk_count(layout, world_size)
    if cu_seqlens is not None:
        values = _check_cu(fn, cu_seqlens, x.shape[dim])
        _check_divisible(fn, values, n, layout, world_size)
        return torch.cat([shard_sequence(x.narrow(dim, a, b - a), dim, rank, world_size, layout)
                          for a, b in zip(values, values[1:])], dim=dim)
    length = x.shape[dim]
    if length % n:
        raise ValueError(f"{fn}: sequence length {length} (dim {dim}) is not divisible into {n} equal chunks "
                         f"(layout {layout!r}, world_size {world_size})")
    chunks = x.chunk(n, dim=dim) if length else [x] * n
    parts = [chunks[i] for i in _rank_chunks(layout, rank, world_size)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def unshard_sequence(shards: Sequence[torch.Tensor], dim: int, layout: str = "contiguous",
                     cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The full sequence from every rank's part (``shards[r]`` from rank r): the inverse of
    ``shard_sequence`` (with the same global ``cu_seqlens`` for packed sequences). Differentiable."""
    fn = "unshard_sequence"
    _check_layout(fn, layout)
    if not isinstance(shards, (list, tuple)) or not shards:
        raise ValueError(f"{fn}: shards must be a non-empty list of tensors (one per rank), got {type_name(shards)}")
    for r, s in enumerate(shards):
        if not isinstance(s, torch.Tensor):
            raise TypeError(f"{fn}: shards[{r}] must be a torch.Tensor, got {type_name(s)}")
        if s.shape != shards[0].shape:
            raise ValueError(f"{fn}: shards[{r}] has shape {tuple(s.shape)} but shards[0] has {tuple(shards[0].shape)}")
    world_size = len(shards)
    if cu_seqlens is not None:
        values = _check_cu(fn, cu_seqlens, world_size * shards[0].shape[dim])
        _check_divisible(fn, values, _chunk_count(layout, world_size), layout, world_size)
        local = [v // world_size for v in values]
        return torch.cat([unshard_sequence([s.narrow(dim, a, b - a) for s in shards], dim, layout)
                          for a, b in zip(local, local[1:])], dim=dim)
    if layout == "contiguous":
        return torch.cat(list(shards), dim=dim)
    local = shards[0].shape[dim]
    if local % 2:
        raise ValueError(f"{fn}: zigzag shards hold two equal chunks, but their length along dim {dim} is odd "
                         f"({local})")
    chunks = [None] * (2 * world_size)
    for r, s in enumerate(shards):
        first, second = s.narrow(dim, 0, local // 2), s.narrow(dim, local // 2, local // 2)
        chunks[r], chunks[2 * world_size - 1 - r] = first, second
    return torch.cat(chunks, dim=dim)


def gather_sequence(x: torch.Tensor, dim: int, group=None, layout: str = "contiguous",
                    cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The full sequence on every rank from each rank's part (an all_gather, then
    ``unshard_sequence``; ``cu_seqlens`` global, for packed sequences). Not differentiable."""
    _check_layout("gather_sequence", layout)
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return unshard_sequence(parts, dim, layout, cu_seqlens)


# ----------------------------------------------------------------------------- the ring


class _Ring:
    """Point-to-point exchange with the ring neighbours of this rank in ``group``."""

    def __init__(self, group):
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        whole = group if group is not None else dist.group.WORLD
        # P2P calls name peers by their global rank, whatever the group.
        self.next = dist.get_global_rank(whole, (self.rank + 1) % self.world)
        self.prev = dist.get_global_rank(whole, (self.rank - 1) % self.world)

    def exchange(self, tensors):
        """Starts sending ``tensors`` to the next rank and receiving the previous rank's into
        new buffers; returns (requests, buffers): wait on the requests before reading them."""
        received = [torch.empty_like(t) for t in tensors]
        ops = [dist.P2POp(dist.isend, t, self.next, self.group) for t in tensors]
        ops += [dist.P2POp(dist.irecv, r, self.prev, self.group) for r in received]
        return dist.batch_isend_irecv(ops), received

    @staticmethod
    def wait(requests):
        for request in requests:
            request.wait()


class _Rows:
    """Which local tokens a block uses: "all", or (zigzag) the "first" or "second" chunk of
    every sequence, with their cu_seqlens and max_seqlen (None and 0 without packing)."""

    def __init__(self, local: int, layout: str, cu_seqlens=None, max_seqlen: int = 0):
        self.select = {"all": slice(None)}
        self.cu = {"all": cu_seqlens}
        self.max_seqlen = {"all": max_seqlen}
        if layout != "zigzag":
            return
        if cu_seqlens is None:
            half = local // 2
            self.select.update(first=slice(0, half), second=slice(half, None))
            self.cu.update(first=None, second=None)
            self.max_seqlen.update(first=0, second=0)
            return
        # Token t of sequence i is in its first chunk when t - cu[i] < length_i / 2.
        lengths = cu_seqlens.diff().to(torch.int64)
        device = cu_seqlens.device
        sequence = torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths)
        within = torch.arange(local, device=device) - cu_seqlens[:-1].to(torch.int64)[sequence]
        first = within < (lengths // 2)[sequence]
        half_cu = torch.div(cu_seqlens, 2, rounding_mode="floor").to(torch.int32)  # every length is even
        self.select.update(first=first.nonzero().flatten(), second=(~first).nonzero().flatten())
        self.cu.update(first=half_cu, second=half_cu)
        self.max_seqlen.update(first=max_seqlen // 2, second=max_seqlen // 2)

    def take(self, x, dim: int, which: str):
        sel = self.select[which]
        if isinstance(sel, slice):
            return x[(slice(None),) * dim + (sel,)]
        return x.index_select(dim, sel)

    def put(self, acc, dim: int, which: str, value) -> None:
        acc[(slice(None),) * dim + (self.select[which],)] = value

    def add(self, acc, dim: int, which: str, value) -> None:
        sel = self.select[which]
        if isinstance(sel, slice):
            acc[(slice(None),) * dim + (sel,)] += value
        else:
            acc.index_add_(dim, sel, value)


def _block_plan(src: int, rank: int, causal: bool, layout: str):
    """What rank ``rank``'s queries do with rank ``src``'s keys: (query rows, key rows, causal
    within the block), or None when no query sees any of those keys. Positions are global
    (per sequence when packed)."""
    if not causal:
        return "all", "all", False
    if src == rank:  # the diagonal: local causal (zigzag's two chunks are in order, so also causal)
        return "all", "all", True
    if layout == "contiguous":
        return ("all", "all", False) if src < rank else None
    if src < rank:  # both query chunks come after src's first chunk and before its second
        return "all", "first", False
    return "second", "all", False  # only the second query chunk, after both of src's chunks


def _problem(scale: float, causal: bool, max_q: int, max_k: int) -> tuple:
    # (scale, window_left, window_right, align_bottom_right, softcap, dropout_p, max_seqlen_q, max_seqlen_k)
    return (scale, -1, 0 if causal else -1, False, 0.0, 0.0, max_q, max_k)


def _block_forward(q, k, v, scale, causal, backend, rows, q_rows, k_rows):
    """Attention of one block in the contract layout: (out (B, H, S, D), lse (B, H, S))."""
    out, lse, _ = _attn.attention_forward(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, None, rows.cu[q_rows], rows.cu[k_rows], None,
        *_problem(scale, causal, rows.max_seqlen[q_rows], rows.max_seqlen[k_rows]), False, backend)
    return out, lse


def _sequence_ids(cu, total: int):
    if cu is None:
        return None
    return torch.repeat_interleave(torch.arange(cu.numel() - 1, device=cu.device), cu.diff().to(torch.int64),
                                   output_size=total)


def _reference_block_backward(dout, q, k, v, out, lse, scale, causal, cu_q, cu_k):
    """The block gradients from the global out and lse (contract layout), in plain PyTorch:
    genfast's reference backend recomputes the block's own softmax instead, which is wrong for
    a block that is only part of the keys."""
    cd = torch.float64 if q.dtype == torch.float64 else torch.float32
    dout, q, k, v, out, lse = (t.to(cd) for t in (dout, q, k, v, out, lse))
    H, Hk = q.shape[1], k.shape[1]
    kr, vr = k.repeat_interleave(H // Hk, dim=1), v.repeat_interleave(H // Hk, dim=1)
    s = torch.matmul(q, kr.transpose(-1, -2)) * scale
    allowed = torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device)
    if causal:
        allowed = allowed.tril()
    if cu_q is not None:  # packed: a query sees keys of its own sequence only
        allowed &= _sequence_ids(cu_q, s.shape[-2])[:, None] == _sequence_ids(cu_k, s.shape[-1])[None, :]
    p = torch.where(allowed, torch.exp(s - lse[..., None]), torch.zeros_like(s))
    dv = torch.matmul(p.transpose(-1, -2), dout)
    ds = p * (torch.matmul(dout, vr.transpose(-1, -2)) - (dout * out).sum(-1, keepdim=True))
    dq = torch.matmul(ds, kr) * scale
    dk = torch.matmul(ds.transpose(-1, -2), q) * scale
    B, Sk, D = k.shape[0], k.shape[2], k.shape[3]
    dk = dk.reshape(B, Hk, H // Hk, Sk, D).sum(2)
    dv = dv.reshape(B, Hk, H // Hk, Sk, D).sum(2)
    return dq, dk, dv


def _block_backward(dout, q, k, v, out, lse, scale, causal, backend, rows, q_rows, k_rows):
    """Gradients of one block (flash layout in and out) given the GLOBAL out and lse: then
    each block's softmax weights are its share of the full row, and the block gradients sum
    to the full ones."""
    args = [t.transpose(1, 2) for t in (dout, q, k, v, out)] + [lse.contiguous()]
    if backend == "reference":
        dq, dk, dv = _reference_block_backward(*args, scale, causal, rows.cu[q_rows], rows.cu[k_rows])
    else:
        dq, dk, dv = _attn.attention_backward(
            *args, None, None, rows.cu[q_rows], rows.cu[k_rows], None,
            *_problem(scale, causal, rows.max_seqlen[q_rows], rows.max_seqlen[k_rows]), False, backend)
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _ring_forward(q, k, v, scale, causal, layout, ring, backend, rows):
    out_acc = lse_acc = None  # (B, H, S, D) and (B, H, S), in the compute dtype
    k_cur, v_cur = k, v
    for step in range(ring.world):
        last = step == ring.world - 1
        if not last:  # the next block travels while this one is computed
            requests, (k_next, v_next) = ring.exchange([k_cur, v_cur])
        src = (ring.rank - step) % ring.world
        plan = _block_plan(src, ring.rank, causal, layout)
        if plan is not None:
            q_rows, k_rows, block_causal = plan
            out, lse = _block_forward(rows.take(q, 1, q_rows), rows.take(k_cur, 1, k_rows),
                                      rows.take(v_cur, 1, k_rows), scale, block_causal, backend, rows, q_rows, k_rows)
            if out_acc is None:  # step 0, the own block, always has work
                cd = _compute_dtype(q.dtype)
                out_acc, lse_acc = out.to(cd), lse.to(cd)
            else:
                merged_out, merged_lse = merge_states(rows.take(out_acc, 2, q_rows), rows.take(lse_acc, 2, q_rows),
                                                      out, lse)
                rows.put(out_acc, 2, q_rows, merged_out)
                rows.put(lse_acc, 2, q_rows, merged_lse)
        if not last:
            ring.wait(requests)
            k_cur, v_cur = k_next, v_next
    return out_acc.transpose(1, 2).to(q.dtype).contiguous(), lse_acc.to(_attn.lse_dtype(q.dtype)).contiguous()


def _ring_backward(dout, q, k, v, out, lse, scale, causal, layout, ring, backend, rows):
    cd = _compute_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=cd, device=q.device)
    k_cur, v_cur = k, v
    grad_requests = dk_in = dv_in = None  # the gradients arriving from the previous rank
    for step in range(ring.world):
        last = step == ring.world - 1
        if not last:
            kv_requests, (k_next, v_next) = ring.exchange([k_cur, v_cur])
        src = (ring.rank - step) % ring.world
        # This step's share of the gradients of src's keys and values, added to what the
        # ranks before this one computed for them; then passed on (in the compute dtype).
        dk = torch.zeros(k.shape, dtype=cd, device=k.device)
        dv = torch.zeros(v.shape, dtype=cd, device=v.device)
        plan = _block_plan(src, ring.rank, causal, layout)
        if plan is not None:
            q_rows, k_rows, block_causal = plan
            dq_b, dk_b, dv_b = _block_backward(
                rows.take(dout, 1, q_rows), rows.take(q, 1, q_rows), rows.take(k_cur, 1, k_rows),
                rows.take(v_cur, 1, k_rows), rows.take(out, 1, q_rows), rows.take(lse, 2, q_rows), scale,
                block_causal, backend, rows, q_rows, k_rows)
            rows.add(dq, 1, q_rows, dq_b.to(cd))
            rows.add(dk, 1, k_rows, dk_b.to(cd))
            rows.add(dv, 1, k_rows, dv_b.to(cd))
        if grad_requests is not None:
            ring.wait(grad_requests)
            dk += dk_in
            dv += dv_in
        if ring.world > 1:
            # After the last step this brings back the gradients of this rank's own block.
            grad_requests, (dk_in, dv_in) = ring.exchange([dk, dv])
        if not last:
            ring.wait(kv_requests)
            k_cur, v_cur = k_next, v_next
    if ring.world > 1:
        ring.wait(grad_requests)
        dk, dv = dk_in, dv_in
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, causal, layout, ring, backend, rows):
        out, lse = _ring_forward(q, k, v, scale, causal, layout, ring, backend, rows)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.options = (scale, causal, layout, ring, backend, rows)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _ring_backward(dout.contiguous(), q, k, v, out, lse, *ctx.options)
        return dq, dk, dv, None, None, None, None, None, None


def _check_same_across_ranks(fn: str, q, k, causal: bool, layout: str, scale: float, cu_seqlens, group) -> None:
    """Every rank must call with the same shapes and options, or the ring exchanges would fail
    (or wait) deep inside the backend: a small all_gather (two when packed), and every rank
    raises the same error."""
    world = dist.get_world_size(group)
    nseq = -1 if cu_seqlens is None else cu_seqlens.numel()
    checks = [("q shape, k shape, causal, layout, softmax_scale, len(cu_seqlens)",
               [*q.shape, *k.shape, int(causal), LAYOUTS.index(layout), scale, nseq])]
    if cu_seqlens is not None:
        checks.append(("cu_seqlens", cu_seqlens.tolist()))
    for names, values in checks:
        mine = torch.tensor(values, dtype=torch.float64, device=q.device)
        everyone = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(everyone, mine, group=group)
        rows = [t.tolist() for t in everyone]
        if any(row != rows[0] for row in rows):
            detail = "; ".join(f"rank {r}: {row}" for r, row in enumerate(rows))
            raise ValueError(f"{fn}: the ranks' calls differ ({names}): {detail}")


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                   softmax_scale: Optional[float] = None, group=None, layout: str = "contiguous",
                   cu_seqlens: Optional[torch.Tensor] = None, max_seqlen: Optional[int] = None,
                   return_lse: bool = False, check_ranks: bool = True, backend: Optional[str] = None):
    """Attention over a sequence split across the ranks of ``group`` (default: the world).

    q (B, S, H, D), k/v (B, S, Hk, D): this rank's part of the sequence in flash-attn layout
    (same S on every rank, H a multiple of Hk). With ``layout="contiguous"`` rank r holds the
    r-th of W equal chunks, so the ranks' outputs concatenated along the sequence are the
    single-process ``flash_attn_func`` result; ``layout="zigzag"`` (load-balanced causal) rank
    r holds chunks r and 2W-1-r of 2W, S even: shard and unshard with ``shard_sequence`` /
    ``unshard_sequence`` / ``gather_sequence``. ``causal`` masks by global position.

    Packed sequences (flash_attn_varlen_func style): q (total, H, D), k/v (total, Hk, D) with
    this rank's int32 ``cu_seqlens`` and ``max_seqlen`` (the same on every rank: each rank
    holds its share, by ``layout``, of every sequence; ``local_cu_seqlens`` computes them from
    the global offsets, and ``shard_sequence(..., cu_seqlens=global)`` shards the tokens).

    Returns out in q's layout (and lse (B, H, S), or (H, total) when packed, fp32, not
    differentiable, with ``return_lse``); gradients for q, k and v. ``check_ranks`` compares
    every rank's shapes and options first (a small all_gather); turn it off once a setup is
    known to be right. Every rank of the group must make the same calls in the same order,
    backward included (the backward passes the key/value gradients around the same ring).
    """
    fn = "ring_attention"
    packed = cu_seqlens is not None
    _attn._flash_qkv(fn, q, k, v, 3 if packed else 4)
    _attn._check_backend(fn, backend)
    if packed:  # one batch row of `total` tokens, split into sequences by cu_seqlens
        q, k, v = (t.unsqueeze(0) for t in (q, k, v))
    elif max_seqlen is not None:
        raise ValueError(f"{fn}: max_seqlen is for packed sequences; pass it with cu_seqlens")
    B, S, H, D = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"{fn}: batch sizes differ: q {B}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[1] != S or v.shape[1] != S:
        raise ValueError(f"{fn}: q, k and v must hold the same part of the sequence, but their local lengths "
                         f"differ: q {S}, k {k.shape[1]}, v {v.shape[1]}")
    _attn._check_heads(fn, H, k.shape[2], v.shape[2])
    if type(causal) is not bool:
        raise TypeError(f"{fn}: causal must be a bool, got {type_name(causal)}")
    _check_layout(fn, layout)
    if packed:
        _attn._check_cu_seqlens(fn, "cu_seqlens", cu_seqlens, S, max_seqlen, "max_seqlen", q.device, True)
        lengths = cu_seqlens.diff()
        if layout == "zigzag" and bool((lengths % 2 != 0).any()):
            raise ValueError(f"{fn}: layout 'zigzag' holds two equal chunks of every sequence per rank, so every "
                             f"local sequence length must be even, got {lengths.tolist()}")
    elif layout == "zigzag" and S % 2:
        raise ValueError(f"{fn}: layout 'zigzag' holds two equal chunks per rank, so the local sequence length "
                         f"must be even, got {S}")
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else _attn._check_scalar(fn, "softmax_scale", softmax_scale)
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{fn}: torch.distributed is not initialized (call torch.distributed.init_process_group)")
    ring = _Ring(group)
    if check_ranks:
        _check_same_across_ranks(fn, q, k, causal, layout, scale, cu_seqlens, group)
    backend = _attn.selected_backend(q, backend)  # one backend for every block, forward and backward
    q, k, v = (t.contiguous() for t in (q, k, v))  # sent as they are
    rows = _Rows(S, layout, cu_seqlens.contiguous() if packed else None, int(max_seqlen) if packed else 0)
    out, lse = _RingAttention.apply(q, k, v, scale, causal, layout, ring, backend, rows)
    if packed:
        out, lse = out[0], lse[0]
    return (out, lse) if return_lse else out
