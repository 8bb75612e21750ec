"""Fused attention: every backend the dispatch tables list, against a float64 reference.

Criterion (flash-attn's tests): |fast - ref64| <= 2 |torch_lowp - ref64| + rounding floor, for
the output and every gradient, where torch_lowp is the same plain-PyTorch math
(genfast.reference.attention.attention_dense) run in the low precision.
"""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import genfast
from genfast.ops import attention as A
from genfast.reference import attention as R
from genfast.testing import error_vs_reference, rounding_floor

DEVICE = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
LOWP = (torch.float32, torch.float16) if DEVICE.type == "cpu" else (torch.float32, torch.float16, torch.bfloat16)
INTERPRETED = DEVICE.type == "cpu"  # the triton backend runs in the (slow) interpreter here


def backends(dtype, table=A.FORWARD):
    return A.available_backends(DEVICE, dtype, table)


def backend_params(dtypes=LOWP, table=A.FORWARD):
    # Under the interpreter, triton's fp16 paths are covered by tests/test_attention_triton.py.
    return [pytest.param(b, d, id=f"{b}-{str(d)[6:]}") for d in dtypes for b in backends(d, table)
            if not (b == "triton" and INTERPRETED and d != torch.float32)]


def skip_big_for_interpreter(backend, *sizes):
    # The kernels themselves are tested at tiny sizes in tests/test_attention_triton.py; here the
    # interpreter only covers the API paths, at sizes that keep CI short.
    if backend == "triton" and INTERPRETED and math.prod(sizes) > 2 * 17 * 128:
        pytest.skip("too large for the Triton interpreter")


def rand(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE, dtype=torch.float32).to(dtype)


# ----------------------------------------------------------------------------- the check


def check(fast_fn, ref_fn, inputs, dtype, grads=True, name="", out_index=0):
    """fast_fn / ref_fn map the inputs (API layout) to the output. ``inputs`` are low-precision
    leaves; the fp64 reference runs on exactly those values (their rounding is not error)."""
    xs = [t.detach().clone().requires_grad_(grads) for t in inputs]
    out = fast_fn(*xs)
    x64 = [t.detach().double().requires_grad_(grads) for t in inputs]
    ref = ref_fn(*x64)
    xl = [t.detach().clone().requires_grad_(grads) for t in inputs]
    lowp = ref_fn(*xl)
    assert out.dtype == dtype and out.shape == ref.shape
    error_vs_reference(out, ref, lowp, name=f"{name} out")
    if not grads:
        return
    g = torch.randn(ref.shape, device=DEVICE, dtype=torch.float32).to(dtype)
    gf = torch.autograd.grad(out, xs, g)
    g64 = torch.autograd.grad(ref, x64, g.double())
    gl = torch.autograd.grad(lowp, xl, g)
    # dq and dk come from P * (dP - delta), a difference of terms of size ~|dout| |v| |q or k|:
    # when it cancels to ~0 (e.g. one allowed key, where PyTorch's own error is exactly 0), a
    # correct kernel is left with rounding of those terms, so the floor is sized to them. dv
    # uses P recomputed from the saved LSE (exp2 of a rounded score), whose relative error
    # grows with the score size; in fp32 that, not PyTorch's error, sets the floor.
    # In fp32 the kernels' P (exp2 of a rounded log2-scaled score minus the LSE) carries a few ulp
    # times the score size on top, where PyTorch's softmax has none: twice the floor there
    # (a fresh-clone run failed one Triton dk at 1.04x the bound with 2; seed 1992352604).
    q, k, v = (t.detach().float() for t in inputs[:3])
    cancel = g.float().abs().max().item() * v.abs().max().item() * max(q.abs().max().item(), k.abs().max().item())
    cancel_ulps = 4 if dtype == torch.float32 else 2
    for which, a, b, c in zip("qkv", gf, g64, gl):
        assert a.dtype == dtype and a.shape == b.shape
        floor = None
        if which in "qk" or a.dtype == torch.float32:
            floor = max(rounding_floor(a.dtype, b.abs().max().item()), cancel_ulps * torch.finfo(a.dtype).eps * cancel)
        error_vs_reference(a, b, c, name=f"{name} d{which}", floor=floor)


def flash_ref(q, k, v, *, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, softmax_scale=None,
              dropout_p=0.0, keep_mask=None):
    """flash_attn_func semantics in plain PyTorch, (B, S, H, D) layout, in the inputs' dtype."""
    left, right = window_size
    if causal:
        right = 0
    scale = softmax_scale if softmax_scale is not None else 1 / math.sqrt(q.shape[-1])
    out, _, _ = R.attention_dense(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale,
                                  window_left=left, window_right=right, align_bottom_right=True, softcap=softcap,
                                  alibi_slopes=alibi_slopes, dropout_p=dropout_p, keep_mask=keep_mask)
    return out.transpose(1, 2)


def noncontiguous(t):
    """The same values in a (B, S, H, D) view whose rows are strided (stride(-1) == 1)."""
    big = torch.zeros(*t.shape[:-1], t.shape[-1] + 8, device=t.device, dtype=t.dtype)
    big[..., : t.shape[-1]] = t
    return big[..., : t.shape[-1]]


# ----------------------------------------------------------------------------- flash_attn_func matrix

SEQS = [(1, 1), (17, 17), (128, 128), (17, 128), (128, 17)]
HEAD_DIMS = [40, 64, 80]
GQA = [(2, 2), (4, 2), (8, 1)]
MATRIX = [(sq, sk, d, GQA[i % 3], i % 2 == 1) for i, ((sq, sk), d) in enumerate(itertools.product(SEQS, HEAD_DIMS))]


@pytest.mark.parametrize("backend,dtype", backend_params())
@pytest.mark.parametrize("sq,sk,d,heads,causal", MATRIX,
                         ids=[f"{a}x{b}-d{d}-h{h[0]}k{h[1]}-{'causal' if c else 'full'}" for a, b, d, h, c in MATRIX])
def test_flash_attn_func_matrix(backend, dtype, sq, sk, d, heads, causal, seed):
    skip_big_for_interpreter(backend, sq, sk)
    H, Hk = heads
    q, k, v = rand(2, sq, H, d, dtype=dtype), rand(2, sk, Hk, d, dtype=dtype), rand(2, sk, Hk, d, dtype=dtype)
    check(lambda q, k, v: genfast.flash_attn_func(noncontiguous(q), k, v, causal=causal, backend=backend),
          lambda q, k, v: flash_ref(q, k, v, causal=causal), [q, k, v], dtype, name=f"seed {seed}")


FEATURES = {
    "causal-top-rows": dict(causal=True),  # Sq > Sk: the first rows see no key (bottom-right)
    "window-8-3": dict(window_size=(8, 3)),
    "window-left-only": dict(window_size=(5, -1)),
    "window-causal-local": dict(window_size=(4, 0)),
    "softcap": dict(softcap=1.5, softmax_scale=0.5),
    "alibi-heads": dict(alibi=(4,)),
    "alibi-batch-heads": dict(alibi=(2, 4), causal=True),
    "scale": dict(softmax_scale=0.37),
}


@pytest.mark.parametrize("backend,dtype", backend_params())
@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("sq,sk", [(33, 70), (70, 33)])
def test_flash_attn_func_features(backend, dtype, feature, sq, sk, seed):
    kw = dict(FEATURES[feature])
    if "alibi" in kw:
        kw["alibi_slopes"] = torch.rand(*kw.pop("alibi"), device=DEVICE)
    q, k, v = rand(2, sq, 4, 64, dtype=dtype), rand(2, sk, 2, 64, dtype=dtype), rand(2, sk, 2, 64, dtype=dtype)
    check(lambda q, k, v: genfast.flash_attn_func(q, k, v, backend=backend, **kw),
          lambda q, k, v: flash_ref(q, k, v, **kw), [q, k, v], dtype, name=f"{feature} seed {seed}")


@pytest.mark.parametrize("backend", backends(torch.float32))
def test_forward_long_sequence(backend, seed):
    skip_big_for_interpreter(backend, 1000, 1000)
    q, k, v = rand(1, 1000, 2, 64), rand(1, 1000, 2, 64), rand(1, 1000, 2, 64)
    for causal in (False, True):
        check(lambda q, k, v: genfast.flash_attn_func(q, k, v, causal=causal, backend=backend),
              lambda q, k, v: flash_ref(q, k, v, causal=causal), [q, k, v], torch.float32, grads=False)


@pytest.mark.parametrize("backend", [b for b in backends(torch.float64) if b != "triton"])
def test_float64(backend, seed):
    q = rand(2, 19, 4, 32, dtype=torch.float64)
    k, v = rand(2, 23, 2, 32, dtype=torch.float64), rand(2, 23, 2, 32, dtype=torch.float64)
    check(lambda q, k, v: genfast.flash_attn_func(q, k, v, causal=True, softcap=3.0, backend=backend),
          lambda q, k, v: flash_ref(q, k, v, causal=True, softcap=3.0), [q, k, v], torch.float64)


def test_lse_and_fully_masked_rows(seed):
    q, k, v = rand(1, 6, 2, 16), rand(1, 3, 2, 16), rand(1, 3, 2, 16)
    for backend in backends(torch.float32):
        out, lse, probs = genfast.flash_attn_func(q, k, v, causal=True, return_attn_probs=True, backend=backend)
        assert probs is None and lse.shape == (1, 2, 6) and lse.dtype == torch.float32
        # bottom-right causal with Sq = 6 > Sk = 3: rows 0..2 see no key -> out 0, lse -inf
        assert torch.all(out[:, :3] == 0) and torch.all(torch.isneginf(lse[:, :, :3]))
        s = torch.einsum("bqhd,bkhd->bhqk", q, k) / 4.0
        allowed = torch.arange(3)[None, :] <= torch.arange(6)[:, None] - 3
        expected = torch.logsumexp(s.masked_fill(~allowed, -math.inf), -1)
        torch.testing.assert_close(lse[:, :, 3:], expected[:, :, 3:], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- varlen


def varlen_inputs(lens_q, lens_k, H, Hk, D, dtype):
    cu_q = torch.tensor([0] + list(itertools.accumulate(lens_q)), dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0] + list(itertools.accumulate(lens_k)), dtype=torch.int32, device=DEVICE)
    q = rand(sum(lens_q), H, D, dtype=dtype)
    k, v = rand(sum(lens_k), Hk, D, dtype=dtype), rand(sum(lens_k), Hk, D, dtype=dtype)
    return q, k, v, cu_q, cu_k


def varlen_ref(q, k, v, cu_q, cu_k, **kw):
    outs = []
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for s in range(len(cq) - 1):
        kws = dict(kw)
        if kws.get("alibi_slopes") is not None and kws["alibi_slopes"].ndim == 2:
            kws["alibi_slopes"] = kws["alibi_slopes"][s:s + 1]
        outs.append(flash_ref(q[None, cq[s]:cq[s + 1]], k[None, ck[s]:ck[s + 1]], v[None, ck[s]:ck[s + 1]], **kws)[0])
    return torch.cat(outs)


@pytest.mark.parametrize("backend,dtype", backend_params())
@pytest.mark.parametrize("variant", ["full", "causal", "window", "alibi"])
def test_varlen(backend, dtype, variant, seed):
    lens_q, lens_k = [5, 0, 1, 40, 17, 3], [9, 4, 1, 33, 0, 3]
    q, k, v, cu_q, cu_k = varlen_inputs(lens_q, lens_k, 4, 2, 40, dtype)
    kw = {"full": {}, "causal": dict(causal=True), "window": dict(window_size=(6, 2)),
          "alibi": dict(alibi_slopes=torch.rand(6, 4, device=DEVICE), causal=True)}[variant]
    check(lambda q, k, v: genfast.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 40, 33, backend=backend, **kw),
          lambda q, k, v: varlen_ref(q, k, v, cu_q, cu_k, **kw), [q, k, v], dtype, name=f"varlen {variant}")


def test_varlen_lse_layout(seed):
    q, k, v, cu_q, cu_k = varlen_inputs([3, 4], [5, 2], 2, 2, 16, torch.float32)
    out, lse, _ = genfast.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 4, 5, return_attn_probs=True)
    assert out.shape == (7, 2, 16) and lse.shape == (2, 7)


# ----------------------------------------------------------------------------- SDPA front end


SDPA_CASES = {
    "plain": dict(),
    "causal-top-left-long-k": dict(is_causal=True, L=20, S=45),
    "causal-top-left-long-q": dict(is_causal=True, L=45, S=20),
    "bool-mask": dict(mask="bool"),
    "additive-mask": dict(mask="float"),
    "mask-broadcast-heads": dict(mask="bool-b1"),
    "scale": dict(scale=0.2),
    "gqa": dict(enable_gqa=True, Hk=2),
    "3d": dict(three_d=True),
}


@pytest.mark.parametrize("backend,dtype", backend_params())
@pytest.mark.parametrize("case", list(SDPA_CASES))
def test_sdpa_matches_torch(backend, dtype, case, seed):
    c = dict(SDPA_CASES[case])
    L, S, H, Hk, D = c.pop("L", 30), c.pop("S", 37), 4, c.pop("Hk", 4), 64
    three_d = c.pop("three_d", False)
    mask_kind = c.pop("mask", None)
    if three_d:
        q, k, v = rand(3, L, D, dtype=dtype), rand(3, S, D, dtype=dtype), rand(3, S, D, dtype=dtype)
    else:
        q, k, v = rand(2, H, L, D, dtype=dtype), rand(2, Hk, S, D, dtype=dtype), rand(2, Hk, S, D, dtype=dtype)
    mask = None
    if mask_kind is not None:
        keep = torch.rand(2, H, L, S, device=DEVICE) > 0.3
        keep[0, 1, 3] = False  # a fully masked row: torch and genfast give 0
        if mask_kind == "bool-b1":
            keep = keep[:, :1]
        if mask_kind.startswith("bool"):
            mask = keep
        else:
            mask = (torch.zeros(keep.shape, device=DEVICE, dtype=dtype).masked_fill(~keep, -math.inf)
                    + rand(*keep.shape, dtype=dtype) * 0.5)
        c["attn_mask"] = mask

    def torch_sdpa(q, k, v):
        kw = dict(c)
        if mask is not None and mask.is_floating_point():
            kw["attn_mask"] = mask.to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, **kw)

    check(lambda q, k, v: genfast.scaled_dot_product_attention(q, k, v, backend=backend, **c),
          torch_sdpa, [q, k, v], dtype, name=f"sdpa {case}")


def test_sdpa_return_lse(seed):
    q, k, v = rand(2, 3, 10, 32), rand(2, 3, 12, 32), rand(2, 3, 12, 32)
    out, lse = genfast.scaled_dot_product_attention(q, k, v, return_lse=True)
    expected = torch.logsumexp(q @ k.transpose(-1, -2) / math.sqrt(32), dim=-1)
    torch.testing.assert_close(lse, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), rtol=1e-5, atol=1e-5)


def test_sdpa_dropout_statistics_and_seed(seed):
    q, k, v = rand(1, 2, 64, 32), rand(1, 2, 64, 32), rand(1, 2, 64, 32)
    torch.manual_seed(seed)
    a = genfast.scaled_dot_product_attention(q, k, v, dropout_p=0.25)
    torch.manual_seed(seed)
    b = genfast.scaled_dot_product_attention(q, k, v, dropout_p=0.25)
    c = genfast.scaled_dot_product_attention(q, k, v, dropout_p=0.25)
    assert torch.equal(a, b) and not torch.equal(a, c)


# ----------------------------------------------------------------------------- dropout


@pytest.mark.parametrize("backend,dtype", backend_params())
def test_dropout_exact_against_reference_with_returned_mask(backend, dtype, seed):
    p = 0.3
    q, k, v = rand(2, 40, 4, 32, dtype=dtype), rand(2, 50, 2, 32, dtype=dtype), rand(2, 50, 2, 32, dtype=dtype)
    torch.manual_seed(seed)
    _, _, keep = genfast.flash_attn_func(q, k, v, dropout_p=p, causal=True, return_attn_probs=True, backend=backend)
    assert keep.dtype == torch.bool and keep.shape == (2, 4, 40, 50)

    def fast(q, k, v):
        torch.manual_seed(seed)  # the same seed draws the same mask
        return genfast.flash_attn_func(q, k, v, dropout_p=p, causal=True, backend=backend)

    check(fast, lambda q, k, v: flash_ref(q, k, v, causal=True, dropout_p=p, keep_mask=keep), [q, k, v], dtype,
          name="dropout")


@pytest.mark.parametrize("backend", backends(torch.float32))
def test_dropout_keep_rate_and_determinism(backend, seed):
    p = 0.2
    q, k, v = rand(2, 64, 4, 16), rand(2, 64, 4, 16), rand(2, 64, 4, 16)
    torch.manual_seed(seed)
    o1, _, keep1 = genfast.flash_attn_func(q, k, v, dropout_p=p, return_attn_probs=True, backend=backend)
    torch.manual_seed(seed)
    o2, _, keep2 = genfast.flash_attn_func(q, k, v, dropout_p=p, return_attn_probs=True, backend=backend)
    _, _, keep3 = genfast.flash_attn_func(q, k, v, dropout_p=p, return_attn_probs=True, backend=backend)
    assert torch.equal(o1, o2) and torch.equal(keep1, keep2) and not torch.equal(keep1, keep3)
    n = keep1.numel()
    rate = keep1.float().mean().item()
    assert abs(rate - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n), rate
    # no structure: rows and columns keep at the same rate
    assert keep1.float().mean(dim=(0, 1, 2)).std().item() < 0.1


def test_dropout_mask_matches_reference_hash(seed):
    # The cpu backend and the reference draw the same bits for the same seed.
    if "cpu" not in backends(torch.float32):
        pytest.skip("no cpu backend")
    q, k, v = rand(2, 9, 4, 16), rand(2, 13, 2, 16), rand(2, 13, 2, 16)
    kw = dict(scale=0.25, window_left=-1, window_right=-1, align_bottom_right=True, softcap=0.0, alibi_slopes=None,
              bias=None, dropout_p=0.4, seed=seed, return_dropout_mask=True)
    _, _, keep_cpu = A._cpu_forward(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), **kw)
    _, _, keep_ref = R.forward(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), **kw)
    assert torch.equal(keep_cpu, keep_ref)


# ----------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("backend", backends(torch.float32, A.BACKWARD))
def test_deterministic_backward_is_bitwise_reproducible(backend, seed):
    skip_big_for_interpreter(backend, 70 * 8, 90)
    q, k, v = rand(2, 70, 8, 32), rand(2, 90, 2, 32), rand(2, 90, 2, 32)
    g = rand(2, 70, 8, 32)
    grads = []
    for _ in range(2):
        xs = [t.clone().requires_grad_() for t in (q, k, v)]
        out = genfast.flash_attn_func(*xs, causal=True, deterministic=True, backend=backend)
        grads.append(torch.autograd.grad(out, xs, g))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- kv cache


def cache_ref(q, k_cache, v_cache, lengths, **kw):
    outs = [flash_ref(q[b:b + 1], k_cache[b:b + 1, :n], v_cache[b:b + 1, :n], **kw) for b, n in enumerate(lengths)]
    return torch.cat(outs)


@pytest.mark.parametrize("backend,dtype", backend_params(table=A.DECODE))
@pytest.mark.parametrize("num_splits", [0, 1, 3])
@pytest.mark.parametrize("s_new,sq", [(1, 1), (5, 5), (0, 2)])
def test_kvcache_append_and_decode(backend, dtype, num_splits, s_new, sq, seed):
    B, H, Hk, D, S_max = 3, 4, 2, 64, 80
    k_cache, v_cache = rand(B, S_max, Hk, D, dtype=dtype), rand(B, S_max, Hk, D, dtype=dtype)
    cache_seqlens = torch.tensor([7, 0, 60], dtype=torch.int32, device=DEVICE)
    q = rand(B, sq, H, D, dtype=dtype)
    k_new, v_new = rand(B, s_new, Hk, D, dtype=dtype), rand(B, s_new, Hk, D, dtype=dtype)
    k_expected, v_expected = k_cache.clone(), v_cache.clone()
    for b, n in enumerate(cache_seqlens.tolist()):
        k_expected[b, n:n + s_new] = k_new[b]
        v_expected[b, n:n + s_new] = v_new[b]
    kc, vc = k_cache.clone(), v_cache.clone()
    out, lse = genfast.flash_attn_with_kvcache(q, kc, vc, k_new if s_new else None, v_new if s_new else None,
                                               cache_seqlens=cache_seqlens, causal=True, num_splits=num_splits,
                                               return_softmax_lse=True, backend=backend)
    assert torch.equal(kc, k_expected) and torch.equal(vc, v_expected)
    lengths = [n + s_new for n in cache_seqlens.tolist()]
    ref = cache_ref(q.double(), k_expected.double(), v_expected.double(), lengths, causal=True)
    lowp = cache_ref(q, k_expected, v_expected, lengths, causal=True)
    error_vs_reference(out, ref, lowp, name="decode out")
    assert lse.shape == (B, H, sq)
    assert torch.all(torch.isneginf(lse[1])) == (s_new == 0)


def test_cuda_decode_split_heuristic():
    """Flash-decoding splits (CUDA backend): from shapes only (no host sync), enough blocks for
    two per SM, at least 256 keys per split, at most 128, the caller's choice when given."""
    assert A.cuda_decode_splits(1, 8, 4, 16384, 132) == 33  # 8 blocks -> 33 splits fill 132 SMs twice
    assert A.cuda_decode_splits(64, 8, 4, 16384, 132) == 1  # the batch already fills the GPU
    assert A.cuda_decode_splits(1, 1, 1, 100, 132) == 1  # a short cache is not split
    assert A.cuda_decode_splits(1, 1, 1, 1 << 20, 132) == 128
    assert A.cuda_decode_splits(1, 8, 4, 16384, 132, num_splits=5) == 5
    assert A.cuda_decode_splits(1, 8, 4, 16384, 132, num_splits=500) == 128


@pytest.mark.parametrize("backend", backends(torch.float32, A.DECODE))
def test_kvcache_window_softcap_alibi(backend, seed):
    B, H, D = 2, 4, 32
    k_cache, v_cache = rand(B, 50, 4, D), rand(B, 50, 4, D)
    q = rand(B, 3, H, D)
    slopes = torch.rand(B, H, device=DEVICE)
    out = genfast.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=torch.tensor([50, 21], dtype=torch.int32),
                                         window_size=(6, 1), softcap=2.0, alibi_slopes=slopes, backend=backend)
    kw = dict(window_size=(6, 1), softcap=2.0)
    ref = torch.cat([flash_ref(q[b:b + 1].double(), k_cache[b:b + 1, :n].double(), v_cache[b:b + 1, :n].double(),
                               alibi_slopes=slopes[b:b + 1], **kw) for b, n in enumerate([50, 21])])
    lowp = torch.cat([flash_ref(q[b:b + 1], k_cache[b:b + 1, :n], v_cache[b:b + 1, :n], alibi_slopes=slopes[b:b + 1],
                                **kw) for b, n in enumerate([50, 21])])
    error_vs_reference(out, ref, lowp)


# ----------------------------------------------------------------------------- torch.compile


def test_torch_compile_fullgraph(seed):
    q, k, v = rand(1, 20, 2, 32), rand(1, 24, 2, 32), rand(1, 24, 2, 32)

    def f(q, k, v):
        a = genfast.flash_attn_func(q, k, v, causal=True)
        b = genfast.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return a.sum() + b.sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    xs = [t.clone().requires_grad_() for t in (q, k, v)]
    ys = [t.clone().requires_grad_() for t in (q, k, v)]
    f(*xs).backward()
    compiled(*ys).backward()
    for a, b in zip(xs, ys):
        torch.testing.assert_close(a.grad, b.grad)

    k_cache, v_cache = rand(1, 30, 2, 32), rand(1, 30, 2, 32)
    lens = torch.tensor([10], dtype=torch.int32)

    def decode(q, k_cache, v_cache, k, v):
        return genfast.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=lens, causal=True)

    kc1, vc1, kc2, vc2 = k_cache.clone(), v_cache.clone(), k_cache.clone(), v_cache.clone()
    qn, kn, vn = rand(1, 1, 2, 32), rand(1, 1, 2, 32), rand(1, 1, 2, 32)
    eager = decode(qn, kc1, vc1, kn, vn)
    compiled_out = torch.compile(decode, fullgraph=True, backend="aot_eager")(qn, kc2, vc2, kn, vn)
    torch.testing.assert_close(eager, compiled_out)
    assert torch.equal(kc1, kc2) and torch.equal(vc1, vc2)


@pytest.mark.parametrize("backend", backends(torch.float32, A.BACKWARD))
def test_backward_op_returns_the_fake_kernels_layout(backend, seed):
    """torch.compile trusts the fake kernels: the real op must return contiguous gradients even
    for strided inputs (the reference backend used to return q's strides)."""
    skip_big_for_interpreter(backend, 1)
    q, k, v = (rand(1, 16, 2, 16).transpose(1, 2) for _ in range(3))  # (B, H, S, D) views, not contiguous
    out, lse, _ = torch.ops.genfast.attention_forward(q, k, v, None, None, None, None, None, 0.25, -1, -1, False, 0.0,
                                                      0.0, 0, 0, False, backend)
    grads = torch.ops.genfast.attention_backward(torch.randn_like(out), q, k, v, out, lse, None, None, None, None, None,
                                                 0.25, -1, -1, False, 0.0, 0.0, 0, 0, False, backend)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fq, fk, fv = (mode.from_tensor(t) for t in (q, k, v))
        fakes = torch.ops.genfast.attention_backward(mode.from_tensor(out), fq, fk, fv, mode.from_tensor(out),
                                                     mode.from_tensor(lse), None, None, None, None, None, 0.25, -1, -1,
                                                     False, 0.0, 0.0, 0, 0, False, backend)
    for real, fake in zip(grads, fakes):
        assert real.shape == fake.shape and real.stride() == fake.stride()


# ----------------------------------------------------------------------------- bad inputs


def _qkv(B=1, Sq=8, Sk=8, H=2, Hk=2, D=32, dtype=torch.float32):
    return rand(B, Sq, H, D, dtype=dtype), rand(B, Sk, Hk, D, dtype=dtype), rand(B, Sk, Hk, D, dtype=dtype)


def test_bad_inputs_flash():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="head dim"):
        genfast.flash_attn_func(q, k[..., :24], v)
    with pytest.raises(ValueError, match="value head dim"):
        genfast.flash_attn_func(q, k, v[..., :24])
    with pytest.raises(ValueError, match="multiple of the number of key/value heads"):
        genfast.flash_attn_func(rand(1, 8, 3, 32), k, v)
    with pytest.raises(ValueError, match="unsupported head dim"):
        genfast.flash_attn_func(*_qkv(D=12))
    with pytest.raises(ValueError, match="unsupported head dim"):
        genfast.flash_attn_func(*_qkv(D=36))
    with pytest.raises(ValueError, match="unsupported head dim"):
        genfast.flash_attn_func(*_qkv(D=264))
    with pytest.raises(TypeError, match="dtype"):
        genfast.flash_attn_func(q, k.half(), v)
    with pytest.raises(TypeError, match="float16, bfloat16, float32 or float64"):
        genfast.flash_attn_func(q.int(), k.int(), v.int())
    with pytest.raises(ValueError, match="4-D"):
        genfast.flash_attn_func(q[0], k, v)
    with pytest.raises(ValueError, match="window_size"):
        genfast.flash_attn_func(q, k, v, window_size=(-2, 0))
    with pytest.raises(ValueError, match="window_size"):
        genfast.flash_attn_func(q, k, v, window_size=(3,))
    with pytest.raises(ValueError, match="softcap"):
        genfast.flash_attn_func(q, k, v, softcap=-1.0)
    with pytest.raises(ValueError, match="dropout_p"):
        genfast.flash_attn_func(q, k, v, dropout_p=1.0)
    with pytest.raises(ValueError, match="alibi_slopes must have shape"):
        genfast.flash_attn_func(q, k, v, alibi_slopes=torch.rand(3))
    with pytest.raises(ValueError, match="alibi_slopes must have shape"):
        genfast.flash_attn_func(q, k, v, alibi_slopes=torch.rand(2, 2))
    with pytest.raises(TypeError, match="alibi_slopes must be float32"):
        genfast.flash_attn_func(q, k, v, alibi_slopes=torch.rand(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="unknown backend"):
        genfast.flash_attn_func(q, k, v, backend="nope")
    with pytest.raises(ValueError, match="batch sizes differ"):
        genfast.flash_attn_func(q, torch.cat([k, k]), torch.cat([v, v]))
    if torch.device("meta") != q.device:
        with pytest.raises(ValueError, match="one device"):
            genfast.flash_attn_func(q, k.to("meta"), v)


def test_bad_inputs_varlen():
    q, k, v, cu_q, cu_k = varlen_inputs([3, 4], [5, 2], 2, 2, 16, torch.float32)
    f = genfast.flash_attn_varlen_func
    with pytest.raises(TypeError, match="int32"):
        f(q, k, v, cu_q.long(), cu_k, 4, 5)
    with pytest.raises(ValueError, match="non-decreasing"):
        f(q, k, v, torch.tensor([0, 5, 3, 7], dtype=torch.int32), torch.tensor([0, 2, 4, 7], dtype=torch.int32), 5, 5)
    with pytest.raises(ValueError, match=r"\[-1\]"):
        f(q, k, v, torch.tensor([0, 3, 6], dtype=torch.int32), cu_k, 4, 5)
    with pytest.raises(ValueError, match=r"\[0\] must be 0"):
        f(q, k, v, torch.tensor([1, 3, 7], dtype=torch.int32), cu_k, 4, 5)
    with pytest.raises(ValueError, match="max_seqlen_q"):
        f(q, k, v, cu_q, cu_k, 3, 5)
    with pytest.raises(ValueError, match="max_seqlen_k"):
        f(q, k, v, cu_q, cu_k, 4, 4)
    with pytest.raises(ValueError, match="entries"):
        f(q, k, v, cu_q, torch.tensor([0, 7], dtype=torch.int32), 4, 7)
    with pytest.raises(ValueError, match="3-D"):
        f(q[None], k, v, cu_q, cu_k, 4, 5)
    with pytest.raises(ValueError, match="alibi_slopes"):
        f(q, k, v, cu_q, cu_k, 4, 5, alibi_slopes=torch.rand(3, 2))


def test_bad_inputs_kvcache():
    q = rand(2, 1, 4, 32)
    kc, vc = rand(2, 10, 2, 32), rand(2, 10, 2, 32)
    kn, vn = rand(2, 3, 2, 32), rand(2, 3, 2, 32)
    f = genfast.flash_attn_with_kvcache
    with pytest.raises(ValueError, match="too small"):
        f(q, kc, vc, kn, vn, cache_seqlens=torch.tensor([2, 8], dtype=torch.int32))
    with pytest.raises(ValueError, match="must be in"):
        f(q, kc, vc, cache_seqlens=11)
    with pytest.raises(TypeError, match="int32"):
        f(q, kc, vc, kn, vn, cache_seqlens=torch.tensor([2, 3]))
    with pytest.raises(ValueError, match="both k and v"):
        f(q, kc, vc, kn, None, cache_seqlens=1)
    with pytest.raises(ValueError, match="cache_seqlens is required"):
        f(q, kc, vc, kn, vn)
    with pytest.raises(ValueError, match="shape"):
        f(q, kc, vc, kn[:, :, :1], vn[:, :, :1], cache_seqlens=1)
    with pytest.raises(ValueError, match="one shape"):
        f(q, kc, vc[:, :5], cache_seqlens=1)
    with pytest.raises(ValueError, match="multiple of the number of key/value heads"):
        f(rand(2, 1, 3, 32), kc, vc, cache_seqlens=1)
    with pytest.raises(ValueError, match="num_splits"):
        f(q, kc, vc, cache_seqlens=1, num_splits=-1)
    with pytest.raises(ValueError, match="entries"):
        f(q, kc, vc, cache_seqlens=torch.tensor([1], dtype=torch.int32))


def test_bad_inputs_sdpa():
    q, k, v = rand(1, 2, 8, 32), rand(1, 2, 9, 32), rand(1, 2, 9, 32)
    f = genfast.scaled_dot_product_attention
    with pytest.raises(ValueError, match="enable_gqa"):
        f(q, k[:, :1], v[:, :1])
    with pytest.raises(ValueError, match="not both"):
        f(q, k, v, attn_mask=torch.ones(8, 9, dtype=torch.bool), is_causal=True)
    with pytest.raises(ValueError, match="broadcastable"):
        f(q, k, v, attn_mask=torch.ones(8, 8, dtype=torch.bool))
    with pytest.raises(TypeError, match="attn_mask must be bool"):
        f(q, k, v, attn_mask=torch.ones(8, 9, dtype=torch.float64))
    with pytest.raises(TypeError, match="attn_mask must be bool"):
        f(q, k, v, attn_mask=torch.ones(8, 9, dtype=torch.int32))
    with pytest.raises(ValueError, match="head dim"):
        f(q, k, v[..., :16])
    with pytest.raises(ValueError, match="at least 3"):
        f(q[0, 0], k[0, 0], v[0, 0])
    with pytest.raises(ValueError, match="dropout_p"):
        f(q, k, v, dropout_p=-0.1)
    with pytest.raises(ValueError, match="attn_mask"):
        f(q, k, v, attn_mask=torch.zeros(8, 9, requires_grad=True))


def test_dispatch_tables_register_all_three_functions():
    for table in (A.FORWARD, A.BACKWARD, A.DECODE):
        assert {"cpu", "reference"} <= set(table.backends)


# ----------------------------------------------------------------------------- modules


MHA_CASES = {
    "self-batch-first": dict(batch_first=True),
    "seq-first-kpm-bool": dict(batch_first=False, kpm="bool"),
    "cross-kdim-vdim": dict(batch_first=True, kdim=24, vdim=40, cross=True),
    "attn-mask-float": dict(batch_first=True, mask="float"),
    "attn-mask-3d-bool-and-kpm": dict(batch_first=True, mask="bool3", kpm="float"),
    "causal-hint": dict(batch_first=True, causal=True),
    "no-bias-unbatched": dict(batch_first=True, bias=False, unbatched=True),
}


@pytest.mark.parametrize("case", list(MHA_CASES))
def test_multihead_attention_matches_torch(case, seed):
    c = MHA_CASES[case]
    E, H, N, L = 64, 4, 3, 11
    S = 13 if c.get("cross") else L
    ref = torch.nn.MultiheadAttention(E, H, bias=c.get("bias", True), kdim=c.get("kdim"), vdim=c.get("vdim"),
                                      batch_first=c["batch_first"], device=DEVICE)
    mod = genfast.nn.MultiheadAttention.from_torch(ref)
    assert list(mod.state_dict()) == list(ref.state_dict())
    shape = lambda n, l, e: (n, l, e) if c["batch_first"] else (l, n, e)  # noqa: E731
    x = rand(*shape(N, L, E))
    if c.get("cross"):
        key, value = rand(*shape(N, S, c["kdim"])), rand(*shape(N, S, c["vdim"]))
    else:
        key = value = x
    kw = {}
    if c.get("kpm") == "bool":
        kpm = torch.rand(N, S, device=DEVICE) < 0.3
        kpm[:, 0] = False
        kw["key_padding_mask"] = kpm
    elif c.get("kpm") == "float":
        kw["key_padding_mask"] = rand(N, S) * 0.3
    if c.get("mask") == "float":
        kw["attn_mask"] = rand(L, S) * 0.5
    elif c.get("mask") == "bool3":
        m = torch.rand(N * H, L, S, device=DEVICE) < 0.3
        m[..., 0] = False
        kw["attn_mask"] = m
    if c.get("causal"):
        kw["attn_mask"] = torch.nn.Transformer.generate_square_subsequent_mask(L, device=DEVICE)
        kw["is_causal"] = True
    if c.get("unbatched"):
        x = key = value = x[:, 0] if not c["batch_first"] else x[0]
    inputs = [x] if key is x else [x, key, value]

    def run(module, *xs):
        q = xs[0]
        k, v = (q, q) if len(xs) == 1 else xs[1:]
        return module(q, k, v, need_weights=False, **kw)[0]

    check(lambda *xs: run(mod, *xs),
          lambda *xs: run(ref.double() if xs[0].dtype == torch.float64 else ref.float(), *xs),
          inputs, torch.float32, grads=False, name=case)
    ref.float()
    # gradients of the parameters match torch's
    xs = [t.clone() for t in inputs]
    run(mod, *xs).square().sum().backward()
    run(ref, *xs).square().sum().backward()
    for (name, p), (_, p_ref) in zip(mod.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_multihead_attention_need_weights_and_state_dict_round_trip(seed):
    ref = torch.nn.MultiheadAttention(32, 2, batch_first=True)
    mod = genfast.nn.MultiheadAttention(32, 2, batch_first=True)
    mod.load_state_dict(ref.state_dict())
    ref2 = torch.nn.MultiheadAttention(32, 2, batch_first=True)
    ref2.load_state_dict(mod.state_dict())
    x = rand(2, 5, 32)
    out, w = mod(x, x, x)  # need_weights=True: torch's math, weights returned
    out_ref, w_ref = ref2(x, x, x)
    torch.testing.assert_close(out, out_ref)
    torch.testing.assert_close(w, w_ref)


def test_causal_self_attention_cache_matches_full_forward(seed):
    torch.manual_seed(seed)
    m = genfast.nn.CausalSelfAttention(64, 4, num_kv_heads=2, rotary=True, device=DEVICE)
    x = rand(2, 9, 64)
    full = m(x)
    cache = m.init_cache(2, 16)
    prefill = m(x[:, :6], cache)
    steps = [m(x[:, t:t + 1], cache) for t in range(6, 9)]
    torch.testing.assert_close(torch.cat([prefill] + steps, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.seqlens.tolist() == [9, 9]
    # and the full forward matches plain PyTorch math
    q, k, v = m.qkv(x).split([64, 32, 32], dim=-1)
    pos = torch.arange(9)
    q = genfast.nn.attention.apply_rotary(q.reshape(2, 9, 4, 16), pos)
    k = genfast.nn.attention.apply_rotary(k.reshape(2, 9, 2, 16), pos)
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.reshape(2, 9, 2, 16).transpose(1, 2),
                                         is_causal=True, enable_gqa=True)
    torch.testing.assert_close(full, m.proj(ref.transpose(1, 2).reshape(2, 9, 64)), rtol=1e-5, atol=1e-5)


def test_causal_self_attention_sdpa_baseline_matches_genfast(seed):
    """attention="sdpa" (torch's SDPA, GPT's benchmark baseline): same outputs, with GQA and a cache."""
    torch.manual_seed(seed)
    m = genfast.nn.CausalSelfAttention(64, 4, num_kv_heads=2, rotary=True, device=DEVICE)
    sdpa = genfast.nn.CausalSelfAttention(64, 4, num_kv_heads=2, rotary=True, device=DEVICE, attention="sdpa")
    sdpa.load_state_dict(m.state_dict())
    x = rand(2, 9, 64)
    torch.testing.assert_close(sdpa(x), m(x), rtol=1e-5, atol=1e-5)
    cache, cache_sdpa = m.init_cache(2, 16), sdpa.init_cache(2, 16)
    out = torch.cat([m(x[:, :4], cache), m(x[:, 4:7], cache), m(x[:, 7:], cache)], dim=1)
    out_sdpa = torch.cat([sdpa(x[:, :4], cache_sdpa), sdpa(x[:, 4:7], cache_sdpa), sdpa(x[:, 7:], cache_sdpa)], dim=1)
    torch.testing.assert_close(out_sdpa, out, rtol=1e-5, atol=1e-5)
    assert cache_sdpa.length == 9 and cache_sdpa.seqlens.tolist() == [9, 9]
    cache_sdpa.length = None  # unknown host length: read from seqlens, which must agree across rows
    cache_sdpa.seqlens[0] = 3
    with pytest.raises(ValueError, match="same length"):
        sdpa(x[:, :1], cache_sdpa)
    with pytest.raises(ValueError, match="attention must be"):
        genfast.nn.CausalSelfAttention(64, 4, attention="flash")


def test_register_transformers_attention(seed):
    transformers = pytest.importorskip("transformers")
    name = genfast.nn.register_transformers_attention()
    fn = transformers.AttentionInterface._global_mapping[name]
    q, k, v = rand(2, 4, 7, 32), rand(2, 2, 7, 32), rand(2, 2, 7, 32)
    module = torch.nn.Module()
    module.is_causal = True
    out, _ = fn(module, q, k, v, None, scaling=0.3)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3, enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(genfast._ext._C is None, reason="the genfast._C extension is not built")
def test_cpu_workspace_keeps_nothing_between_calls(seed):
    """The CPU forward and backward keep their work buffers from call to call (per thread): a
    call after one on NaN inputs, a larger head dim and partial tiles gives exactly what it gives
    after an unrelated call, without NaN, and matches the reference (outputs and gradients)."""
    def run(q, k, v, causal):
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out = genfast.scaled_dot_product_attention(*leaves, is_causal=causal, backend="cpu")
        out.backward(torch.ones_like(out) if torch.isnan(out).all() else out.detach().cos())
        return torch.cat([out.detach().flatten()] + [t.grad.flatten() for t in leaves])

    q, k, v = (torch.randn(2, 3, n, 32) for n in (37, 70, 70))  # partial query and key tiles, one decode-size
    small = [torch.randn(1, 3, 2, 32) for _ in range(3)]  # the grouped (few rows) path
    nan = [torch.full((1, 2, 70, 128), float("nan")) for _ in range(3)]
    for causal in (False, True):
        run(*[torch.randn(1, 1, 5, 16) for _ in range(3)], causal)
        clean, clean_small = run(q, k, v, causal), run(*small, causal)
        run(*nan, causal)
        run(*[t[..., :2, :] for t in nan], causal)
        after, after_small = run(q, k, v, causal), run(*small, causal)
        for got, want, args in ((after, clean, (q, k, v)), (after_small, clean_small, small)):
            assert not torch.isnan(got).any()
            assert torch.equal(got, want)
            leaves = [t.double().requires_grad_() for t in args]
            ref = genfast.scaled_dot_product_attention(*leaves, is_causal=causal, backend="reference")
            ref.backward(ref.detach().cos())
            ref = torch.cat([ref.detach().flatten()] + [t.grad.flatten() for t in leaves])
            torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4)
