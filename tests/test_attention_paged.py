"""flash_attn_with_kvcache at flash-attn 2.6 parity: paged caches (block_table), cache_batch_idx,
cache_leftpad and rotary embedding of q / the new k, on every decode backend, against an oracle
written here: each batch row's logical cache is gathered from the pool by hand, the append and
the rotary embedding are done by hand, and attention runs densely in float64 (criterion of
tests/test_attention.py: |fast - ref64| <= 2 |same math in low precision - ref64| + floor)."""
import math

import pytest
import torch

import genfast
from genfast.ops import attention as A
from genfast.testing import error_vs_reference
from test_attention import DEVICE, backend_params, flash_ref, rand

# On a GPU every case here is a GPU check (bench/gpu_check.sh runs the gpu-marked tests).
pytestmark = [pytest.mark.gpu] if DEVICE.type == "cuda" else []


def paged_pool(B, capacity, page, Hk, D, dtype, spare=3):
    """A pool of out-of-order pages (more than the rows use) and a block table: row b's i-th page
    is block table[b, i]."""
    per_row = -(-capacity // page)
    num_blocks = B * per_row + spare
    k_pool, v_pool = rand(num_blocks, page, Hk, D, dtype=dtype), rand(num_blocks, page, Hk, D, dtype=dtype)
    table = torch.randperm(num_blocks, device=DEVICE)[:B * per_row].reshape(B, per_row).to(torch.int32)
    return k_pool, v_pool, table


def logical_rows(pool, b, table=None, batch_idx=None):
    """Row b's cache as (S, Hk, D): its pages concatenated, or its cache row."""
    if table is not None:
        return torch.cat([pool[int(i)] for i in table[b]])
    return pool[b if batch_idx is None else int(batch_idx[b])]


def rotate(x, cos, sin, positions, interleaved):
    """Rotary embedding by complex multiplication, x (B, S, H, D), positions (B, S), in float64."""
    rd = 2 * cos.shape[1]
    xr = x[..., :rd].double()
    if interleaved:
        pairs = xr.reshape(*xr.shape[:-1], rd // 2, 2)
    else:
        pairs = torch.stack([xr[..., :rd // 2], xr[..., rd // 2:]], dim=-1)
    z = torch.view_as_complex(pairs.contiguous())
    angle = torch.complex(cos.double()[positions], sin.double()[positions])[:, :, None, :]
    w = torch.view_as_real(z * angle)
    out = w.flatten(-2) if interleaved else torch.cat([w[..., 0], w[..., 1]], dim=-1)
    return torch.cat([out.to(x.dtype), x[..., rd:]], dim=-1)


def oracle(q, rows, starts, ends, **kw):
    """Row b attends keys rows[b][starts[b]:ends[b]] (bottom-right aligned); out in q's dtype's math."""
    outs = []
    slopes = kw.pop("alibi_slopes", None)
    for b, (k, v) in enumerate(rows):
        s, e = starts[b], ends[b]
        row_slopes = None if slopes is None else slopes[b:b + 1]
        outs.append(flash_ref(q[b:b + 1], k[None, s:e].to(q.dtype), v[None, s:e].to(q.dtype),
                              alibi_slopes=row_slopes, **kw))
    return torch.cat(outs)


def check_against_oracle(out, q, rows, starts, ends, causal=True, **kw):
    ref = oracle(q.double(), [(k.double(), v.double()) for k, v in rows], starts, ends, causal=causal, **kw)
    lowp = oracle(q, rows, starts, ends, causal=causal, **kw)
    error_vs_reference(out, ref, lowp, name="decode out")


@pytest.mark.parametrize("backend,dtype", backend_params(table=A.DECODE))
@pytest.mark.parametrize("page", [16, 48, 256])
@pytest.mark.parametrize("s_new,sq,num_splits", [(1, 1, 0), (3, 3, 3), (0, 2, 1)])
def test_paged_append_and_decode(backend, dtype, page, s_new, sq, num_splits, seed):
    B, H, Hk, D = 3, 4, 2, 32
    capacity = 100 if page < 256 else 300
    k_pool, v_pool, table = paged_pool(B, capacity, page, Hk, D, dtype)
    per_row = table.shape[1]
    lengths = [37, 0, per_row * page - s_new]  # ragged: a short row, an empty one, a full one
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    q = rand(B, sq, H, D, dtype=dtype)
    k_new, v_new = rand(B, s_new, Hk, D, dtype=dtype), rand(B, s_new, Hk, D, dtype=dtype)
    expected_k, expected_v = k_pool.clone(), v_pool.clone()
    for b, n in enumerate(lengths):
        for t in range(s_new):
            block, row = table[b, (n + t) // page], (n + t) % page
            expected_k[block, row], expected_v[block, row] = k_new[b, t], v_new[b, t]
    kp, vp = k_pool.clone(), v_pool.clone()
    out = genfast.flash_attn_with_kvcache(q, kp, vp, k_new if s_new else None, v_new if s_new else None,
                                         cache_seqlens=seqlens, block_table=table, causal=True,
                                         num_splits=num_splits, backend=backend)
    assert torch.equal(kp, expected_k) and torch.equal(vp, expected_v)  # the append, and nothing else written
    rows = [(logical_rows(kp, b, table), logical_rows(vp, b, table)) for b in range(B)]
    check_against_oracle(out, q, rows, [0] * B, [n + s_new for n in lengths])
    if s_new == 0:
        assert torch.all(out[1] == 0)  # an empty row


@pytest.mark.parametrize("backend,dtype", backend_params(table=A.DECODE))
@pytest.mark.parametrize("paged", [False, True])
def test_leftpad_window_alibi(backend, dtype, paged, seed):
    """cache_leftpad hides the keys before it and moves no diagonal: the window and ALiBi see
    absolute positions."""
    B, H, Hk, D, S = 3, 4, 1, 32, 64
    if paged:
        k_pool, v_pool, table = paged_pool(B, S, 16, Hk, D, dtype)
    else:
        k_pool, v_pool, table = rand(B, S, Hk, D, dtype=dtype), rand(B, S, Hk, D, dtype=dtype), None
    lengths, pads = [64, 40, 9], [5, 17, 9]  # the last row is all padding
    q = rand(B, 2, H, D, dtype=dtype)
    slopes = torch.rand(B, H, device=DEVICE)
    kw = dict(window_size=(20, 0), alibi_slopes=slopes)
    out = genfast.flash_attn_with_kvcache(q, k_pool, v_pool, cache_seqlens=torch.tensor(lengths, dtype=torch.int32),
                                         cache_leftpad=torch.tensor(pads, dtype=torch.int32), block_table=table,
                                         backend=backend, **kw)
    rows = [(logical_rows(k_pool, b, table), logical_rows(v_pool, b, table)) for b in range(B)]
    # The padded keys are excluded by giving the oracle only keys [pad, end): a bottom-right
    # aligned window over those is the same as over absolute positions.
    expected = [(k, v) for k, v in rows]
    ref = oracle(q.double(), [(k.double(), v.double()) for k, v in expected], pads, lengths,
                 window_size=(20, 0), alibi_slopes=slopes)
    lowp = oracle(q, expected, pads, lengths, window_size=(20, 0), alibi_slopes=slopes)
    error_vs_reference(out, ref, lowp, name="leftpad out")
    assert torch.all(out[2] == 0)


@pytest.mark.parametrize("backend,dtype", backend_params(table=A.DECODE))
def test_cache_batch_idx(backend, dtype, seed):
    B, H, Hk, D, S, pool = 3, 2, 2, 32, 40, 5
    k_cache, v_cache = rand(pool, S, Hk, D, dtype=dtype), rand(pool, S, Hk, D, dtype=dtype)
    idx = torch.tensor([4, 0, 2], dtype=torch.int32)
    lengths = [12, 33, 1]
    q = rand(B, 2, H, D, dtype=dtype)
    k_new, v_new = rand(B, 2, Hk, D, dtype=dtype), rand(B, 2, Hk, D, dtype=dtype)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    for b, n in enumerate(lengths):
        expected_k[idx[b], n:n + 2], expected_v[idx[b], n:n + 2] = k_new[b], v_new[b]
    out = genfast.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new,
                                         cache_seqlens=torch.tensor(lengths, dtype=torch.int32),
                                         cache_batch_idx=idx, causal=True, backend=backend)
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)  # rows 1 and 3 untouched
    rows = [(logical_rows(k_cache, b, batch_idx=idx), logical_rows(v_cache, b, batch_idx=idx)) for b in range(B)]
    check_against_oracle(out, q, rows, [0] * B, [n + 2 for n in lengths])


ROTARY_CASES = [(interleaved, causal, paged, dtype, cos_dtype)
                for interleaved in (False, True) for causal in (False, True) for paged in (False, True)
                for dtype, cos_dtype in ((torch.float32, torch.float32), (torch.float16, None))]


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "composed"])
@pytest.mark.parametrize("interleaved,causal,paged,dtype,cos_dtype", ROTARY_CASES)
def test_rotary(interleaved, causal, paged, dtype, cos_dtype, fused, monkeypatch, seed):
    """rotary_cos/sin rotate the new k at cache_seqlens[b] + t and q at cache_seqlens[b] + i
    (causal or local) or at cache_seqlens[b] (otherwise), GPT-J or GPT-NeoX pairs, first
    rotary_dim dims only; the fused step (C++ on the CPU, Triton on GPUs) and the composed one
    (reference rotation + append) both. cos_dtype None: cos/sin in fp32 beside fp16 q/k."""
    if not fused:
        monkeypatch.setattr(A._ext, "_C", type("NoRotary", (), {
            name: getattr(A._ext._C, name) for name in dir(A._ext._C)
            if not name.startswith("__") and name != "attention_rotary_append_cpu"}))
        monkeypatch.setattr(A, "_triton_rotary_append", lambda: None)
    B, H, Hk, D, rd, S, s_new = 2, 4, 2, 32, 16, 48, 3
    if paged:
        k_pool, v_pool, table = paged_pool(B, S, 16, Hk, D, dtype)
        capacity = table.shape[1] * 16
    else:
        k_pool, v_pool, table = rand(B, S, Hk, D, dtype=dtype), rand(B, S, Hk, D, dtype=dtype), None
        capacity = S
    angle = torch.rand(capacity, rd // 2, device=DEVICE) * 2 * math.pi
    cos, sin = angle.cos().to(cos_dtype or dtype), angle.sin().to(cos_dtype or dtype)
    lengths = torch.tensor([5, 30], dtype=torch.int32, device=DEVICE)
    q = rand(B, s_new, H, D, dtype=dtype)
    k_new, v_new = rand(B, s_new, Hk, D, dtype=dtype), rand(B, s_new, Hk, D, dtype=dtype)
    kp, vp = k_pool.clone(), v_pool.clone()
    out = genfast.flash_attn_with_kvcache(q, kp, vp, k_new, v_new, rotary_cos=cos, rotary_sin=sin,
                                         cache_seqlens=lengths, block_table=table, causal=causal,
                                         rotary_interleaved=interleaved)
    steps = torch.arange(s_new, device=DEVICE)[None, :]
    k_rot = rotate(k_new, cos, sin, lengths[:, None].long() + steps, interleaved)
    q_pos = lengths[:, None].long() + (steps if causal else 0 * steps)
    q_rot = rotate(q, cos, sin, q_pos, interleaved)
    assert torch.equal(k_rot[..., rd:], k_new[..., rd:])
    ulp = 1e-6 if dtype == torch.float32 else 2e-3  # fp32 math, then one rounding to the storage dtype
    rows = []
    for b, n in enumerate(lengths.tolist()):
        k_row, v_row = logical_rows(kp, b, table), logical_rows(vp, b, table)
        torch.testing.assert_close(k_row[n:n + s_new].float(), k_rot[b].float(), rtol=ulp, atol=ulp)
        assert torch.equal(v_row[n:n + s_new], v_new[b])  # v is not rotated
        rows.append((k_row, v_row))
        untouched = torch.ones(k_row.shape[0], dtype=torch.bool, device=DEVICE)
        untouched[n:n + s_new] = False
        assert torch.equal(k_row[untouched], logical_rows(k_pool, b, table)[untouched])
    check_against_oracle(out, q_rot, rows, [0] * B, [n + s_new for n in lengths.tolist()], causal=causal)


def kernel_runs(monkeypatch) -> list:
    """Records every call into a decode backend's implementation and into the CPU extension's
    attention forward and cache append (prepared eager calls reach the extension directly), as
    (name, whether a block_table was passed); a forward that appends new tokens (k_new) is
    recorded as "attention_forward_cpu+append". An extension call is recorded when it returns
    (one that raised in its checks ran no kernel)."""
    runs = []
    for name, entry in list(A.DECODE.backends.items()):
        def counted(args, kw, _fn=entry.fn, _name=name):
            runs.append((_name, kw.get("block_table") is not None))
            return _fn(args, kw)
        monkeypatch.setitem(A.DECODE.backends, name, type(entry)(name, counted, entry.dtypes))
    for name in ("attention_forward_cpu", "attention_kvcache_append_cpu"):
        def wrapped(*args, _real=getattr(A._ext._C, name), _name=name, **kwargs):
            result = _real(*args, **kwargs)
            appends = kwargs.get("k_new") is not None
            runs.append((_name + ("+append" if appends else ""), kwargs.get("block_table") is not None))
            return result
        monkeypatch.setattr(A._ext._C, name, wrapped)
    A.DECODE.plans.clear()
    return runs


def test_decode_backend_really_runs_with_pages(monkeypatch, seed):
    """The paged call reaches the CPU kernel with the table, the append too (no silent fallback,
    no gathered copy of the cache), eager calls after the first included (prepared calls): on
    the CPU the append and the attention are one call."""
    k_pool, v_pool, table = paged_pool(2, 64, 16, 2, 32, torch.float32)
    runs = kernel_runs(monkeypatch)
    for _ in range(3):
        genfast.flash_attn_with_kvcache(rand(2, 1, 2, 32), k_pool, v_pool, rand(2, 1, 2, 32), rand(2, 1, 2, 32),
                                         cache_seqlens=torch.tensor([20, 60], dtype=torch.int32),
                                         block_table=table, backend="cpu")
    assert runs and all(paged for _, paged in runs)
    native = [name for name, _ in runs if name.startswith("attention_")]
    assert native == ["attention_forward_cpu+append"] * 3


@pytest.mark.parametrize("rotary", [False, True])
def test_paged_decode_compiles_without_graph_breaks(rotary, seed):
    k_pool, v_pool, table = paged_pool(2, 64, 16, 2, 32, torch.float32)
    lengths = torch.tensor([20, 50], dtype=torch.int32)
    left = torch.tensor([3, 0], dtype=torch.int32)
    angle = torch.rand(table.shape[1] * 16, 8) * 6.28
    cos, sin = (angle.cos(), angle.sin()) if rotary else (None, None)

    def step(q, kp, vp, k, v):
        return genfast.flash_attn_with_kvcache(q, kp, vp, k, v, rotary_cos=cos, rotary_sin=sin, cache_seqlens=lengths,
                                               cache_leftpad=left, block_table=table, causal=True)

    q, k, v = rand(2, 1, 2, 32), rand(2, 1, 2, 32), rand(2, 1, 2, 32)
    kp1, vp1, kp2, vp2 = k_pool.clone(), v_pool.clone(), k_pool.clone(), v_pool.clone()
    eager = step(q, kp1, vp1, k, v)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(q, kp2, vp2, k, v)
    torch.testing.assert_close(eager, compiled)
    assert torch.equal(kp1, kp2) and torch.equal(vp1, vp2)


# ----------------------------------------------------------------------------- bad input


def _paged_call(**overrides):
    k_pool, v_pool, table = paged_pool(2, 64, 16, 2, 32, torch.float32)
    args = dict(q=rand(2, 1, 2, 32), k_cache=k_pool, v_cache=v_pool, k=rand(2, 1, 2, 32), v=rand(2, 1, 2, 32),
                cache_seqlens=torch.tensor([20, 40], dtype=torch.int32), block_table=table)
    args.update(overrides)
    return args


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("case,message", [
    ("block out of range", r"block_table\[1, 1\] = 99 is not a block of the 11-block cache"),
    ("negative block", r"block_table\[0, 0\] = -1 is not a block"),
    ("table too short", r"the block_table's pages hold 32 positions per row .* needs 41"),
    ("page size", r"page_size a multiple of 16"),
    ("table dtype", r"block_table must be int32"),
    ("table rows", r"block_table must have shape \(2, n\)"),
    ("with batch idx", r"takes no cache_batch_idx"),
    ("leftpad past seqlens", r"cache_leftpad\[1\] = 41 must be in \[0, cache_seqlens\[1\] = 40\]"),
    ("batch idx out of range", r"cache_batch_idx\[0\] = 7 is not a row of the 2-row cache"),
    ("rotary without k", r"rotary_cos/rotary_sin rotate q and the new k: they need k and v"),
    ("rotary too short", r"rotary_cos/rotary_sin have 10 positions but the cache holds 64"),
    ("rotary one of two", r"pass both rotary_cos and rotary_sin"),
])
def test_bad_input_raises_before_anything_runs(monkeypatch, backend, case, message):
    runs = kernel_runs(monkeypatch)
    args = _paged_call()
    table = args["block_table"]
    if case == "block out of range":
        table[1, 1] = 99  # row 1 uses blocks 0..2 (41 positions)
    elif case == "negative block":
        table[0, 0] = -1
    elif case == "table too short":
        args["block_table"] = table[:, :2].contiguous()
    elif case == "page size":
        args["k_cache"], args["v_cache"] = rand(11, 8, 2, 32), rand(11, 8, 2, 32)
    elif case == "table dtype":
        args["block_table"] = table.long()
    elif case == "table rows":
        args["block_table"] = table[:1]
    elif case == "with batch idx":
        args["cache_batch_idx"] = torch.tensor([0, 1], dtype=torch.int32)
    elif case == "leftpad past seqlens":
        args["cache_leftpad"] = torch.tensor([0, 41], dtype=torch.int32)
    elif case == "batch idx out of range":
        args.update(block_table=None, k_cache=rand(2, 64, 2, 32), v_cache=rand(2, 64, 2, 32),
                    cache_batch_idx=torch.tensor([7, 0], dtype=torch.int32))
    elif case == "rotary without k":
        args.update(k=None, v=None, rotary_cos=torch.rand(64, 8), rotary_sin=torch.rand(64, 8))
    elif case == "rotary too short":
        args.update(rotary_cos=torch.rand(10, 8), rotary_sin=torch.rand(10, 8))
    elif case == "rotary one of two":
        args.update(rotary_cos=torch.rand(64, 8))
    k_before, v_before = args["k_cache"].clone(), args["v_cache"].clone()
    with pytest.raises((ValueError, TypeError), match=message):
        genfast.flash_attn_with_kvcache(**args, causal=True, backend=backend)
    assert not runs  # no kernel ran
    assert torch.equal(args["k_cache"], k_before) and torch.equal(args["v_cache"], v_before)  # nothing written


def test_cpu_kernel_checks_the_table_itself(seed):
    """The CPU entry point checks index values too (it reads host memory): a call that skipped
    the Python checks still cannot read outside the pool."""
    k_pool, v_pool, table = paged_pool(1, 32, 16, 1, 16, torch.float32)
    table[0, 1] = 1000
    q = rand(1, 1, 1, 16).transpose(1, 2)
    with pytest.raises(ValueError, match=r"block_table\[0, 1\] = 1000 is not a block"):
        A._cpu_decode(q, k_pool.transpose(1, 2), v_pool.transpose(1, 2), torch.tensor([20], dtype=torch.int32),
                      scale=0.25, window_left=-1, window_right=0, softcap=0.0, alibi_slopes=None, block_table=table)
