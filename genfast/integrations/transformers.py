"""genfast as a Hugging Face transformers attention implementation.

``register_transformers_attention(name="genfast")`` registers genfast in transformers'
``AttentionInterface`` (the attention itself) and ``AttentionMaskInterface`` (the mask the model
builds once per forward and hands to every layer); since transformers 4.53 a model builds no
mask at all for an implementation missing from the second, so padded batches would silently be
attended as plain causal ones. Then ``AutoModelForCausalLM.from_config(cfg,
attn_implementation="genfast")`` (or ``from_pretrained``) runs every attention through genfast.

The mask function hands each layer the cheapest description of the mask that is exact:

* ``None``: no padding and the queries are the last keys (or one query): plain causal (or full)
  attention, as for transformers' sdpa (``is_causal`` is top-left aligned when Sq > 1).
* int32 ``(B, 1, 1, 1)`` "key counts": no padding, row b attends to its first ``n_b`` keys with
  the queries being the last of those (a static cache: the rest of the cache is unwritten). Runs
  ``flash_attn_with_kvcache`` (split-KV decode) for a few queries without gradients, else varlen.
* int32 ``(B, 1, K, 2)`` "segments": each row split into K consecutive segments of (queries,
  keys), causal bottom-right inside each one; runs ``flash_attn_varlen_func`` on the flattened
  batch. A causal mask whose padding is one run of valid tokens per row (left or right padding,
  with or without a cache) becomes 5 segments per row: pad queries with no keys, pad keys with no
  queries, the valid part, and the same for the right side. Packed sequences (a block-diagonal
  causal mask) become one segment per sequence.
* otherwise transformers' own boolean ``(B, 1, Sq, Skv)`` mask (sliding windows, chunked or
  custom masks, padding with holes, and any padding mask while torch.compile traces, where
  reading it would need a sync), run densely as an additive bias.

Outputs at padding positions: in the segment forms a padding query attends to no key and gets
zeros, as with flash_attention_2 (sdpa lets a right-padding query attend to the real tokens before
it); outputs at real tokens are the same either way. So ``generate`` on a right-padded batch (which
transformers warns about) continues from a zero-attention pad position, as flash_attention_2 does.

The structured forms are found by reading the padding mask on the host (one sync per forward,
as transformers' own sdpa mask does). ``generate`` with a static cache builds the mask outside
the compiled forward, so its compiled decode steps get them too, with static shapes and no sync.
Explicit flash-attn packing kwargs (``cu_seq_lens_q/k``, ``max_length_q/k`` from
``DataCollatorWithFlattening(return_flash_attn_kwargs=True)``) go straight to
``flash_attn_varlen_func``, as they do for flash_attention_2.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from ..ops import attention as _ops
from ..ops.attention import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache

__all__ = ["register_transformers_attention", "genfast_attention_forward", "genfast_attention_mask",
           "DECODE_MAX_QUERIES"]

# Up to this many queries per row (and no gradients), key-count masks run the split-KV decode
# kernel; longer query blocks run the varlen forward, which tiles queries.
DECODE_MAX_QUERIES = 16


def register_transformers_attention(name: str = "genfast") -> str:
    """Registers genfast's attention and mask functions with transformers under ``name``, so models
    load with ``attn_implementation=name``. Returns ``name``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_transformers_attention: name must be a non-empty str, got {name!r}")
    from transformers import AttentionInterface

    AttentionInterface.register(name, genfast_attention_forward)
    try:
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:  # transformers < 4.53 builds a 4-D mask for every implementation itself
        return name
    AttentionMaskInterface.register(name, genfast_attention_mask)
    return name


# ----------------------------------------------------------------------------- mask


def _tracing(*values) -> bool:
    if _ops._compiling() or torch.jit.is_tracing():
        return True
    try:
        from torch._subclasses.fake_tensor import FakeTensor
    except ImportError:  # pragma: no cover - old torch
        return False
    return any(isinstance(v, FakeTensor) or isinstance(v, torch.fx.Proxy) for v in values)


def _is_zero(offset) -> bool:
    return isinstance(offset, int) and not isinstance(offset, bool) and offset == 0


def genfast_attention_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0,
                           mask_function=None, attention_mask: Optional[torch.Tensor] = None, local_size=None,
                           allow_is_causal_skip: bool = True, device="cpu", **kwargs):
    """transformers ``AttentionMaskInterface`` entry: see the module docstring for what it returns."""
    from transformers import masking_utils as mu

    if mask_function is None:
        mask_function = mu.causal_mask_function
    device = attention_mask.device if attention_mask is not None else torch.device(device)
    plain_layout = local_size is None and _is_zero(kv_offset)
    if mask_function is mu.causal_mask_function and plain_layout:
        if attention_mask is None:
            return _no_padding(batch_size, q_length, kv_length, q_offset, device)
        if not _tracing(attention_mask, q_offset):
            padding = mu.prepare_padding_mask(attention_mask, kv_length, kv_offset)[:, :kv_length]
            found = _padding_segments(padding.to(torch.bool), q_length, kv_length, int(q_offset))
            if found is not False:
                return found
    dense = mu.sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                         kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                         local_size=local_size, allow_is_causal_skip=allow_is_causal_skip, device=device, **kwargs)
    if (dense is not None and attention_mask is None and plain_layout and _is_zero(q_offset)
            and q_length == kv_length and not _tracing(dense)):
        packed = _block_causal_segments(dense)
        if packed is not None:
            return packed
    return dense


def _no_padding(batch_size, q_length, kv_length, q_offset, device):
    """Causal mask without padding: None when the queries are the last keys and sdpa's ``is_causal``
    (top-left) means the same, else per-row key counts (keys past the last query are unwritten)."""
    if isinstance(q_offset, int) and q_offset + q_length == kv_length and (q_length == 1 or q_offset == 0):
        return None
    count = torch.as_tensor(q_offset, device=device).to(torch.int32) + q_length
    return count.reshape(1, 1, 1, 1).expand(batch_size, 1, 1, 1).contiguous()


def _padding_segments(valid_keys: torch.Tensor, q_length: int, kv_length: int, q_offset: int):
    """Causal mask + 2-D padding -> None / key counts / 5 segments per row, or False when the valid
    keys of some row are not one contiguous run (then the caller builds the dense mask)."""
    B = valid_keys.shape[0]
    ar = torch.arange(kv_length, device=valid_keys.device)
    valid = valid_keys & (ar < q_offset + q_length)  # later keys are in every query's future
    n = valid.sum(1)
    start = valid.to(torch.int32).argmax(1)  # first valid key (0 for an empty row)
    end = start + n
    run = (ar >= start[:, None]) & (ar < end[:, None])
    one_run = (valid == run).all()
    unpadded = (start == 0).all() & (end == q_offset + q_length).all()
    one_run, unpadded = torch.stack([one_run, unpadded]).tolist()  # the one host sync
    if not one_run:
        return False
    if unpadded:
        return _no_padding(B, q_length, kv_length, q_offset, valid_keys.device)
    q_first = (start - q_offset).clamp(0, q_length)  # first / end of the valid queries
    q_end = (end - q_offset).clamp(0, q_length)
    zero = torch.zeros_like(start)
    q_lens = torch.stack([q_first, zero, q_end - q_first, q_length - q_end, zero], 1)
    k_lens = torch.stack([zero, start, end - start, zero, kv_length - end], 1)
    return torch.stack([q_lens, k_lens], -1).to(torch.int32).unsqueeze(1)  # (B, 1, 5, 2)


def _block_causal_segments(dense: torch.Tensor):
    """A (B, 1, S, S) bool mask that is exactly block-diagonal causal (packed sequences) -> one
    segment per block, (B, 1, K, 2); None for any other mask."""
    if dense.dtype != torch.bool or dense.ndim != 4 or dense.shape[1] != 1:
        return None
    m = dense[:, 0]
    S = m.shape[-1]
    ar = torch.arange(S, device=m.device)
    start = m.to(torch.int32).argmax(-1)  # (B, S): first allowed key of each query
    exact = (m == ((ar >= start[..., None]) & (ar <= ar[:, None]))).all()
    begins = start == ar
    continues = start == F.pad(start[:, :-1], (1, 0), value=-1)
    if not bool(exact & (begins | continues).all()):
        return None
    rows = []
    for b in range(m.shape[0]):
        bounds = torch.cat([begins[b].nonzero().flatten(), ar.new_tensor([S])])
        rows.append(bounds.diff())
    K = max(len(r) for r in rows)
    lens = torch.zeros(m.shape[0], K, dtype=torch.int32, device=m.device)
    for b, r in enumerate(rows):
        lens[b, :len(r)] = r
    return torch.stack([lens, lens], -1).unsqueeze(1)


# ----------------------------------------------------------------------------- attention


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def genfast_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                              is_causal=None, sliding_window=None, softcap=None, **kwargs):
    """transformers ``AttentionInterface`` entry. query (B, H, Sq, D), key/value (B, Hk, Skv, D);
    ``attention_mask`` as made by ``genfast_attention_mask`` (or any 4-D bool / additive mask).
    Returns ((B, Sq, H, D), None)."""
    fn = "genfast transformers attention"
    for unsupported in ("position_bias", "s_aux"):
        if kwargs.get(unsupported) is not None:
            raise ValueError(f"{fn}: {unsupported} is not supported; load the model with attn_implementation='sdpa'")
    if query.ndim != 4 or key.ndim != 4 or value.ndim != 4:
        raise ValueError(f"{fn}: query, key and value must be 4-D (batch, heads, seq, head_dim), got shapes "
                         f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
    B, H, Sq, D = query.shape
    if not (_ops.MIN_HEAD_DIM <= D <= _ops.MAX_HEAD_DIM and D % 8 == 0) or value.shape[-1] != D:
        raise ValueError(f"{fn}: head_dim {D} (value {value.shape[-1]}) is not supported; genfast needs equal query "
                         f"and value head dims, a multiple of 8 in [{_ops.MIN_HEAD_DIM}, {_ops.MAX_HEAD_DIM}]. Load "
                         "this model with attn_implementation='sdpa'")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    scale = float(scaling) if scaling is not None else 1.0 / math.sqrt(D)
    softcap = float(softcap) if softcap else 0.0
    dropout = float(dropout)

    packing = [kwargs.get(k) for k in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")]
    if all(x is not None for x in packing):
        out = _packed(query, key, value, *packing, causal=bool(is_causal), scale=scale, softcap=softcap,
                      dropout=dropout, sliding_window=sliding_window)
    elif attention_mask is None and bool(is_causal) and (lens := _packed_positions(kwargs.get("position_ids"), query,
                                                                                   key)) is not None:
        out = _segments(query, key, value, lens, scale=scale, softcap=softcap, dropout=dropout)
    elif attention_mask is None:
        out = _unmasked(query, key, value, causal=bool(is_causal) and Sq > 1, scale=scale, softcap=softcap,
                        dropout=dropout)
    elif attention_mask.dtype == torch.int32 and attention_mask.ndim == 4 and attention_mask.shape[1:3] == (1, 1) \
            and attention_mask.shape[-1] == 1:
        out = _key_counts(query, key, value, attention_mask.reshape(B), scale=scale, softcap=softcap, dropout=dropout)
    elif attention_mask.dtype == torch.int32 and attention_mask.ndim == 4 and attention_mask.shape[-1] == 2:
        out = _segments(query, key, value, attention_mask.reshape(-1, 2), scale=scale, softcap=softcap,
                        dropout=dropout)
    else:
        out = _dense(query, key, value, attention_mask, scale=scale, softcap=softcap, dropout=dropout)
    return out, None


def _bshd(t: torch.Tensor) -> torch.Tensor:
    """(B, H, S, D) -> the (B, S, H, D) view flash-attn functions take (no copy)."""
    return t.transpose(1, 2)


def _packed_positions(position_ids, query, key):
    """Sequences packed into one row, told only by position_ids restarting (no mask was built: the
    model had a cache, so transformers did not look for packing): one segment per sequence, as
    flash_attention_2 infers them. None when not packed, or while tracing (it reads the values)."""
    B, Sq, Skv = query.shape[0], query.shape[2], key.shape[2]
    if position_ids is None or B != 1 or Sq != Skv or Sq == 1 or position_ids.numel() != Sq or _tracing(position_ids):
        return None
    pos = position_ids.reshape(-1)
    begins = torch.ones_like(pos, dtype=torch.bool)
    begins[1:] = pos[1:] - pos[:-1] != 1  # a sequence starts where positions do not step by one
    bounds = begins.nonzero().flatten().tolist() + [Sq]
    if len(bounds) == 2:
        return None
    lengths = torch.tensor([b - a for a, b in zip(bounds, bounds[1:])], dtype=torch.int32, device=pos.device)
    return torch.stack([lengths, lengths], -1)


def _unmasked(query, key, value, *, causal, scale, softcap, dropout):
    Sq, Skv = query.shape[2], key.shape[2]
    if causal and Sq != Skv:  # sdpa's is_causal is top-left aligned; flash-attn's bottom-right
        return _dense(query, key, value, None, scale=scale, softcap=softcap, dropout=dropout, top_left_causal=True)
    if Sq <= DECODE_MAX_QUERIES and dropout == 0 and not _needs_grad(query, key, value):
        return flash_attn_with_kvcache(_bshd(query), _bshd(key), _bshd(value), softmax_scale=scale, causal=causal,
                                       softcap=softcap)
    return flash_attn_func(_bshd(query), _bshd(key), _bshd(value), dropout_p=dropout, softmax_scale=scale,
                           causal=causal, softcap=softcap)


def _key_counts(query, key, value, counts, *, scale, softcap, dropout):
    Sq, Skv = query.shape[2], key.shape[2]
    if Sq <= DECODE_MAX_QUERIES and dropout == 0 and not _needs_grad(query, key, value):
        return flash_attn_with_kvcache(_bshd(query), _bshd(key), _bshd(value), cache_seqlens=counts,
                                       softmax_scale=scale, causal=True, softcap=softcap)
    q_lens = torch.stack([torch.full_like(counts, Sq), torch.zeros_like(counts)], 1)
    k_lens = torch.stack([counts, Skv - counts], 1)
    lens = torch.stack([q_lens, k_lens], -1).reshape(-1, 2)
    return _segments(query, key, value, lens, scale=scale, softcap=softcap, dropout=dropout)


def _cumulative(lengths: torch.Tensor) -> torch.Tensor:
    return F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))


def _left_padded_decode(query, key, value, lens, *, scale, softcap):
    """A few queries per row, every one of them real, against left-padded keys (decode steps of a
    left-padded batch): the split-KV decode with ``cache_leftpad`` reads the keys where they are,
    where the varlen path copies the whole cache into the packed layout. lens (B * 5, 2) in
    ``_padding_segments``' form; None when the segments are not that shape (one host read)."""
    B, Sq = query.shape[0], query.shape[2]
    seg = lens.reshape(B, 5, 2)
    q_lens, k_lens = seg[..., 0], seg[..., 1]
    only_real_queries = ((q_lens[:, [0, 1, 3, 4]] == 0).all() & (q_lens[:, 2] == Sq).all()).item()
    if not only_real_queries:
        return None
    start = k_lens[:, 1].to(torch.int32)  # segments 0 and 1: pad queries (none here), pad keys
    end = (start + k_lens[:, 2]).to(torch.int32)  # the valid keys end at the last query
    return flash_attn_with_kvcache(_bshd(query), _bshd(key), _bshd(value), cache_seqlens=end, cache_leftpad=start,
                                   softmax_scale=scale, causal=True, softcap=softcap)


def _segments(query, key, value, lens, *, scale, softcap, dropout):
    """Causal attention inside each (queries, keys) segment of the flattened batch; lens (N, 2) int32."""
    B, H, Sq, D = query.shape
    Hk, Skv = key.shape[1], key.shape[2]
    if (lens.shape[0] == 5 * B and Sq <= DECODE_MAX_QUERIES and dropout == 0
            and not _needs_grad(query, key, value) and not _tracing(lens)):
        out = _left_padded_decode(query, key, value, lens, scale=scale, softcap=softcap)
        if out is not None:
            return out
    if _tracing(lens):  # bounds that need no sync; the kernels stop at each segment's length
        max_q, max_k = Sq, Skv
    else:
        max_q, max_k = lens.max(0).values.tolist()
    q = _bshd(query).reshape(B * Sq, H, D)
    k = _bshd(key).reshape(B * Skv, Hk, D)  # a copy when the keys come from a cache
    v = _bshd(value).reshape(B * Skv, Hk, D)
    out = flash_attn_varlen_func(q, k, v, _cumulative(lens[:, 0]), _cumulative(lens[:, 1]), max_q, max_k,
                                 dropout_p=dropout, softmax_scale=scale, causal=True, softcap=softcap)
    return out.view(B, Sq, H, D)


def _packed(query, key, value, cu_q, cu_k, max_q, max_k, *, causal, scale, softcap, dropout, sliding_window):
    """flash_attention_2's padding-free path: sequences given by cu_seq_lens over the flattened batch."""
    B, H, Sq, D = query.shape
    Hk = key.shape[1]
    q = _bshd(query).reshape(-1, H, D)
    k, v = _bshd(key).reshape(-1, Hk, D), _bshd(value).reshape(-1, Hk, D)
    tracing = _tracing(cu_q)
    max_q = q.shape[0] if tracing and isinstance(max_q, torch.Tensor) else int(max_q)
    max_k = k.shape[0] if tracing and isinstance(max_k, torch.Tensor) else int(max_k)
    window = (-1, -1)
    if sliding_window is not None and k.shape[0] > sliding_window:  # as flash_attention_2 does
        window = (sliding_window - 1, sliding_window - 1)
    out = flash_attn_varlen_func(q, k, v, cu_q.to(torch.int32), cu_k.to(torch.int32), max_q, max_k,
                                 dropout_p=dropout, softmax_scale=scale, causal=causal, window_size=window,
                                 softcap=softcap)
    return out.view(B, -1, H, D)


def _dense(query, key, value, mask, *, scale, softcap, dropout, top_left_causal=False):
    """Any other mask: a (B, 1|H, Sq, >=Skv) bool (True = attend) or additive mask, as a bias."""
    fn = "genfast transformers attention"
    B, H, Sq, D = query.shape
    Skv = key.shape[2]
    bias = None
    if mask is not None:
        if mask.ndim != 4:
            raise ValueError(f"{fn}: attention_mask must be a 4-D (batch, 1 or heads, query, key) mask here, got "
                             f"shape {tuple(mask.shape)}; genfast's mask function "
                             "(register_transformers_attention) builds the masks it takes")
        bias = _ops._sdpa_mask_to_bias(fn, mask[..., :Skv], query, (B, H, Sq, Skv))
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (query, key, value))
    out, _, _ = _ops._attention(q, k, v, bias=bias, scale=scale, window_right=0 if top_left_causal else -1,
                                softcap=softcap, dropout_p=dropout)
    return out.transpose(1, 2).contiguous()
