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

__all__ = ["ring_attention", "shard_sequence", "unshard_sequence", "gather_sequence", "LAYOUTS"]

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


def shard_sequence(x: torch.Tensor, dim: int, rank: int, world_size: int, layout: str = "contiguous") -> torch.Tensor:
    """Rank ``rank``'s part of the full sequence ``x`` (sequence along ``dim``), as
    ``ring_attention`` expects it. The length must divide into ``world_size`` chunks
    (``2 * world_size`` for ``"zigzag"``). Differentiable (a view for "contiguous")."""
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
    length = x.shape[dim]
    if length % n:
        raise ValueError(f"{fn}: sequence length {length} (dim {dim}) is not divisible into {n} equal chunks "
                         f"(layout {layout!r}, world_size {world_size})")
    chunks = x.chunk(n, dim=dim)
    parts = [chunks[i] for i in _rank_chunks(layout, rank, world_size)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def unshard_sequence(shards: Sequence[torch.Tensor], dim: int, layout: str = "contiguous") -> torch.Tensor:
    """The full sequence from every rank's part (``shards[r]`` from rank r): the inverse of
    ``shard_sequence``. Differentiable."""
    fn = "unshard_sequence"
    _check_layout(fn, layout)
    if not isinstance(shards, (list, tuple)) or not shards:
        raise ValueError(f"{fn}: shards must be a non-empty list of tensors (one per rank), got {type_name(shards)}")
    for r, s in enumerate(shards):
        if not isinstance(s, torch.Tensor):
            raise TypeError(f"{fn}: shards[{r}] must be a torch.Tensor, got {type_name(s)}")
        if s.shape != shards[0].shape:
            raise ValueError(f"{fn}: shards[{r}] has shape {tuple(s.shape)} but shards[0] has {tuple(shards[0].shape)}")
    if layout == "contiguous":
        return torch.cat(list(shards), dim=dim)
    world_size = len(shards)
    local = shards[0].shape[dim]
    if local % 2:
        raise ValueError(f"{fn}: zigzag shards hold two equal chunks, but their length along dim {dim} is odd "
                         f"({local})")
    chunks = [None] * (2 * world_size)
    for r, s in enumerate(shards):
        first, second = s.chunk(2, dim=dim)
        chunks[r], chunks[2 * world_size - 1 - r] = first, second
    return torch.cat(chunks, dim=dim)


def gather_sequence(x: torch.Tensor, dim: int, group=None, layout: str = "contiguous") -> torch.Tensor:
    """The full sequence on every rank from each rank's part (an all_gather, then
    ``unshard_sequence``). Not differentiable."""
    _check_layout("gather_sequence", layout)
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return unshard_sequence(parts, dim, layout)


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


_ALL = slice(None)


def _block_plan(src: int, rank: int, causal: bool, layout: str, local: int):
    """What rank ``rank``'s queries do with rank ``src``'s keys: (query rows, key rows, causal
    within the block), or None when no query sees any of those keys. Positions are global."""
    if not causal:
        return _ALL, _ALL, False
    if src == rank:  # the diagonal: local causal (zigzag's two chunks are in order, so also causal)
        return _ALL, _ALL, True
    if layout == "contiguous":
        return (_ALL, _ALL, False) if src < rank else None
    half = local // 2
    if src < rank:  # both query chunks come after src's first chunk and before its second
        return _ALL, slice(0, half), False
    return slice(half, None), _ALL, False  # only the second query chunk, after both of src's chunks


def _problem(scale: float, causal: bool) -> tuple:
    # (scale, window_left, window_right, align_bottom_right, softcap, dropout_p, max_seqlen_q, max_seqlen_k)
    return (scale, -1, 0 if causal else -1, False, 0.0, 0.0, 0, 0)


def _block_forward(q, k, v, scale, causal, backend):
    """Attention of one block in the contract layout: (out (B, H, S, D), lse (B, H, S))."""
    out, lse, _ = _attn.attention_forward(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, None, None,
                                          None, None, *_problem(scale, causal), False, backend)
    return out, lse


def _reference_block_backward(dout, q, k, v, out, lse, scale, causal):
    """The block gradients from the global out and lse (contract layout), in plain PyTorch:
    genfast's reference backend recomputes the block's own softmax instead, which is wrong for
    a block that is only part of the keys."""
    cd = torch.float64 if q.dtype == torch.float64 else torch.float32
    dout, q, k, v, out, lse = (t.to(cd) for t in (dout, q, k, v, out, lse))
    H, Hk = q.shape[1], k.shape[1]
    kr, vr = k.repeat_interleave(H // Hk, dim=1), v.repeat_interleave(H // Hk, dim=1)
    s = torch.matmul(q, kr.transpose(-1, -2)) * scale
    p = torch.exp(s - lse[..., None])
    if causal:
        p = p.tril()
    dv = torch.matmul(p.transpose(-1, -2), dout)
    ds = p * (torch.matmul(dout, vr.transpose(-1, -2)) - (dout * out).sum(-1, keepdim=True))
    dq = torch.matmul(ds, kr) * scale
    dk = torch.matmul(ds.transpose(-1, -2), q) * scale
    B, Sk, D = k.shape[0], k.shape[2], k.shape[3]
    dk = dk.reshape(B, Hk, H // Hk, Sk, D).sum(2)
    dv = dv.reshape(B, Hk, H // Hk, Sk, D).sum(2)
    return dq, dk, dv


def _block_backward(dout, q, k, v, out, lse, scale, causal, backend):
    """Gradients of one block (flash layout in and out) given the GLOBAL out and lse: then
    each block's softmax weights are its share of the full row, and the block gradients sum
    to the full ones."""
    args = [t.transpose(1, 2) for t in (dout, q, k, v, out)] + [lse.contiguous()]
    if backend == "reference":
        dq, dk, dv = _reference_block_backward(*args, scale, causal)
    else:
        dq, dk, dv = _attn.attention_backward(*args, None, None, None, None, None, *_problem(scale, causal), False,
                                              backend)
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _ring_forward(q, k, v, scale, causal, layout, ring, backend):
    local = q.shape[1]
    out_acc = lse_acc = None  # (B, H, S, D) and (B, H, S), in the compute dtype
    k_cur, v_cur = k, v
    for step in range(ring.world):
        last = step == ring.world - 1
        if not last:  # the next block travels while this one is computed
            requests, (k_next, v_next) = ring.exchange([k_cur, v_cur])
        src = (ring.rank - step) % ring.world
        plan = _block_plan(src, ring.rank, causal, layout, local)
        if plan is not None:
            rows, cols, block_causal = plan
            out, lse = _block_forward(q[:, rows], k_cur[:, cols], v_cur[:, cols], scale, block_causal, backend)
            if out_acc is None:  # step 0, the own block, always has work
                cd = _compute_dtype(q.dtype)
                out_acc, lse_acc = out.to(cd), lse.to(cd)
            else:
                out_acc[:, :, rows], lse_acc[:, :, rows] = merge_states(out_acc[:, :, rows], lse_acc[:, :, rows],
                                                                        out, lse)
        if not last:
            ring.wait(requests)
            k_cur, v_cur = k_next, v_next
    return out_acc.transpose(1, 2).to(q.dtype).contiguous(), lse_acc.to(_attn.lse_dtype(q.dtype)).contiguous()


def _ring_backward(dout, q, k, v, out, lse, scale, causal, layout, ring, backend):
    local = q.shape[1]
    cd = _compute_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=cd, device=q.device)
    k_cur, v_cur = k, v
    grad_requests = None
    for step in range(ring.world):
        last = step == ring.world - 1
        if not last:
            kv_requests, (k_next, v_next) = ring.exchange([k_cur, v_cur])
        src = (ring.rank - step) % ring.world
        # This step's share of the gradients of src's keys and values, added to what the
        # ranks before this one computed for them; then passed on (in the compute dtype).
        dk = torch.zeros(k.shape, dtype=cd, device=k.device)
        dv = torch.zeros(v.shape, dtype=cd, device=v.device)
        plan = _block_plan(src, ring.rank, causal, layout, local)
        if plan is not None:
            rows, cols, block_causal = plan
            dq_b, dk_b, dv_b = _block_backward(dout[:, rows], q[:, rows], k_cur[:, cols], v_cur[:, cols],
                                               out[:, rows], lse[:, :, rows], scale, block_causal, backend)
            dq[:, rows] += dq_b
            dk[:, cols] += dk_b
            dv[:, cols] += dv_b
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
    def forward(ctx, q, k, v, scale, causal, layout, ring, backend):
        out, lse = _ring_forward(q, k, v, scale, causal, layout, ring, backend)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.options = (scale, causal, layout, ring, backend)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _ring_backward(dout.contiguous(), q, k, v, out, lse, *ctx.options)
        return dq, dk, dv, None, None, None, None, None


def _check_same_across_ranks(fn: str, q, k, causal: bool, layout: str, scale: float, group) -> None:
    """Every rank must call with the same shapes and options, or the ring exchanges would fail
    (or wait) deep inside the backend: one small all_gather, and every rank raises the same error."""
    mine = torch.tensor([*q.shape, *k.shape, int(causal), LAYOUTS.index(layout), scale],
                        dtype=torch.float64, device=q.device)
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(everyone, mine, group=group)
    rows = [tuple(t.tolist()) for t in everyone]
    if any(row != rows[0] for row in rows):
        names = "q shape (B, S, H, D), k shape (B, S, Hk, D), causal, layout, softmax_scale"
        detail = "; ".join(f"rank {r}: {row}" for r, row in enumerate(rows))
        raise ValueError(f"{fn}: the ranks' calls differ ({names}): {detail}")


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                   softmax_scale: Optional[float] = None, group=None, layout: str = "contiguous",
                   return_lse: bool = False, check_ranks: bool = True, backend: Optional[str] = None):
    """Attention over a sequence split across the ranks of ``group`` (default: the world).

    q (B, S, H, D), k/v (B, S, Hk, D): this rank's part of the sequence in flash-attn layout
    (same S on every rank, H a multiple of Hk). With ``layout="contiguous"`` rank r holds the
    r-th of W equal chunks, so the ranks' outputs concatenated along the sequence are the
    single-process ``flash_attn_func`` result; ``layout="zigzag"`` (load-balanced causal) rank
    r holds chunks r and 2W-1-r of 2W, S even: shard and unshard with ``shard_sequence`` /
    ``unshard_sequence`` / ``gather_sequence``. ``causal`` masks by global position.
    Returns out (B, S, H, D) (and lse (B, H, S) fp32 with ``return_lse``, not differentiable);
    gradients for q, k and v. ``check_ranks`` compares every rank's shapes and options first
    (one small all_gather); turn it off once a setup is known to be right. Every rank of the
    group must make the same calls in the same order.
    """
    fn = "ring_attention"
    _attn._flash_qkv(fn, q, k, v, 4)
    _attn._check_backend(fn, backend)
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
    if layout == "zigzag" and S % 2:
        raise ValueError(f"{fn}: layout 'zigzag' holds two equal chunks per rank, so the local sequence length "
                         f"must be even, got {S}")
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else _attn._check_scalar(fn, "softmax_scale", softmax_scale)
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{fn}: torch.distributed is not initialized (call torch.distributed.init_process_group)")
    ring = _Ring(group)
    if check_ranks:
        _check_same_across_ranks(fn, q, k, causal, layout, scale, group)
    backend = _attn.selected_backend(q, backend)  # one backend for every block, forward and backward
    q, k, v = (t.contiguous() for t in (q, k, v))  # sent as they are
    out, lse = _RingAttention.apply(q, k, v, scale, causal, layout, ring, backend)
    return (out, lse) if return_lse else out
