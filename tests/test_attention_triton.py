"""genfast.triton_kernels.attention (forward / backward / decode of the attention kernel
contract) against a float64 PyTorch implementation of the contract written here.

On CPU the kernels run through the Triton interpreter (conftest sets TRITON_INTERPRET=1), so
shapes are tiny; the tests marked gpu run larger shapes, bf16 and every head dim on a GPU."""
import math

import pytest
import torch

from genfast.testing import error_vs_reference, rounding_floor

triton = pytest.importorskip("triton")
attn = pytest.importorskip("genfast.triton_kernels.attention")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
MASK32 = 0xFFFFFFFF


# ---------------------------------------------------------------------------------------------
# The contract in float64 torch (materialised scores)
# ---------------------------------------------------------------------------------------------
def _mix32(x):
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


def keep_mask_spec(seed, b, H, Sq, Sk, p):
    """The dropout keep mask of one batch row / sequence: lowbias32 of (seed, b, h, i, j)."""
    seed &= (1 << 64) - 1
    state = int(_mix32(torch.tensor(int(_mix32(torch.tensor((seed & MASK32) ^ 0x9E3779B9))) ^ (seed >> 32))))
    x = _mix32((torch.arange(H, dtype=torch.int64) + b * H) & MASK32 ^ state)
    x = _mix32(x[:, None] ^ torch.arange(Sq)[None, :])
    x = _mix32(x[:, :, None] ^ torch.arange(Sk)[None, None, :])
    return (x >> 8) >= math.ceil(p * (1 << 24))


def dense(q, k, v, scale, wl=-1, wr=-1, br=False, softcap=0.0, slopes=None, bias=None, keep=None, p=0.0):
    """out, lse of one batch of sequences (all in q's dtype; q (B, H, Sq, D), k/v (B, Hk, Sk, D))."""
    B, H, Sq, _ = q.shape
    Sk = k.shape[2]
    k = k.repeat_interleave(H // k.shape[1], dim=1)
    v = v.repeat_interleave(H // v.shape[1], dim=1)
    s = q @ k.transpose(-1, -2) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    off = Sk - Sq if br else 0
    diag = torch.arange(Sq)[:, None] + off - torch.arange(Sk)[None, :]
    if slopes is not None:
        s = s - slopes.to(s.dtype).reshape(-1, H, 1, 1) * diag.abs().to(s.dtype)
    if bias is not None:
        s = s + bias.to(s.dtype)
    ok = torch.ones(Sq, Sk, dtype=torch.bool)
    if wl >= 0:
        ok &= diag <= wl
    if wr >= 0:
        ok &= diag >= -wr
    s = s.masked_fill(~ok, -math.inf)
    lse = torch.logsumexp(s, -1)
    fin = torch.isfinite(lse)
    # rows with no allowed key: p = 0 (and no NaN gradient through their logsumexp)
    lse_safe = torch.logsumexp(torch.where(fin[..., None], s, 0), -1)
    pr = torch.where(fin[..., None], torch.exp(s - lse_safe[..., None]), 0)
    if keep is not None:
        pr = pr * keep.to(pr.dtype) / (1 - p)
    return pr @ v, lse


def spec(q, k, v, scale, cu_q=None, cu_k=None, slopes=None, keep=None, **kw):
    """The contract on tensors in their own dtype (float64 for the reference), varlen included."""
    if cu_q is None:
        return dense(q, k, v, scale, slopes=slopes, keep=keep, **kw)
    outs, lses = [], []
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for s in range(len(cq) - 1):
        qs, ks = slice(cq[s], cq[s + 1]), slice(ck[s], ck[s + 1])
        sl = None if slopes is None else (slopes if slopes.dim() == 1 else slopes[s:s + 1])
        kp = None if keep is None else keep[:, :, qs, ks]
        o, l = dense(q[:, :, qs], k[:, :, ks], v[:, :, ks], scale, slopes=sl, keep=kp, **kw)
        outs.append(o)
        lses.append(l)
    return torch.cat(outs, 2), torch.cat(lses, 2)


def spec_grads(dout, q, k, v, scale, **kw):
    qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, _ = spec(qq, kk, vv, scale, **kw)
    return torch.autograd.grad(out, (qq, kk, vv), dout)


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------
def rand(*shape, dtype, strided=False):
    """Values ~N(0, 1) in the dtype; strided=True returns a (B, H, S, D) view of a (B, S, H, D) tensor."""
    if strided:
        B, H, S, D = shape
        return torch.randn(B, S, H, D, dtype=torch.float64).to(DEVICE, dtype).transpose(1, 2)
    return torch.randn(*shape, dtype=torch.float64).to(DEVICE, dtype)


def compare(name, fast, ref64, lowp, finite_mask=None, floor_scale=None):
    """error_vs_reference; floor_scale widens the rounding floor to the magnitude of the terms
    that cancel (dq, dk: dp - delta, where PyTorch's own error can be exactly 0)."""
    fast, ref64, lowp = fast.cpu(), ref64.cpu(), lowp.cpu()
    floor = None
    if floor_scale is not None:
        floor = max(rounding_floor(fast.dtype, ref64.abs().max().item()), 2 * torch.finfo(fast.dtype).eps * floor_scale)
    if finite_mask is not None:
        # lse: -inf exactly where the spec says so; compare the finite entries.
        assert torch.equal(torch.isinf(fast), torch.isinf(ref64)), f"{name}: -inf pattern differs"
        keep = torch.isfinite(ref64)
        fast, ref64, lowp = fast[keep], ref64[keep], lowp[keep]
    error_vs_reference(fast, ref64, lowp, name, floor=floor)


def cancellation_scale(scale, dout, out, q, k):
    """|scale| x max|q, k| x max_i sum_d |dout_i out_i|: the size of the dp - delta terms in dq, dk."""
    qk = max(q.detach().abs().max().item(), k.detach().abs().max().item())
    return abs(scale) * qk * (dout.detach().double().abs() * out.detach().double().abs()).sum(-1).max().item()


def check_problem(q, k, v, dtype, scale, check_backward=True, deterministic=False, **kw):
    """Forward (and backward) of the triton kernels vs the float64 spec, in the flash-attn criterion."""
    spec_kw = {key: kw[key] for key in ("cu_q", "cu_k", "slopes", "bias", "softcap") if key in kw}
    call_kw = dict(window_left=kw.get("wl", -1), window_right=kw.get("wr", -1),
                   align_bottom_right=kw.get("br", False), softcap=kw.get("softcap", 0.0),
                   alibi_slopes=kw.get("slopes"), bias=kw.get("bias"), dropout_p=0.0, seed=0,
                   cu_seqlens_q=kw.get("cu_q"), cu_seqlens_k=kw.get("cu_k"))
    for key in ("wl", "wr", "br"):
        if key in kw:
            spec_kw[key] = kw[key]
    out, lse = attn.forward(q, k, v, scale=scale, **call_kw)
    assert out.dtype == dtype and out.shape == q.shape and out.is_contiguous()
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]
    q64, k64, v64 = (t.detach().cpu().double() for t in (q, k, v))
    s64 = {key: (val.cpu().double() if isinstance(val, torch.Tensor) and val.is_floating_point() else
                 (val.cpu() if isinstance(val, torch.Tensor) else val)) for key, val in spec_kw.items()}
    sl = {key: (val.cpu() if isinstance(val, torch.Tensor) else val) for key, val in spec_kw.items()}
    ref_out, ref_lse = spec(q64, k64, v64, scale, **s64)
    low_out, low_lse = spec(q.cpu(), k.cpu(), v.cpu(), scale, **sl)
    compare("out", out, ref_out, low_out)
    compare("lse", lse, ref_lse, low_lse.float(), finite_mask=True)
    if not check_backward:
        return
    dout = rand(*q.shape, dtype=dtype)
    dq, dk, dv = attn.backward(dout, q, k, v, out, lse, scale=scale, deterministic=deterministic, **call_kw)
    assert dq.dtype == dtype and dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    ref = spec_grads(dout.cpu().double(), q64, k64, v64, scale, **s64)
    low = spec_grads(dout.cpu(), q.cpu(), k.cpu(), v.cpu(), scale, **sl)
    cancel = cancellation_scale(scale, dout, ref_out, q, k)
    for name, fast, r, lp in zip(("dq", "dk", "dv"), (dq, dk, dv), ref, low):
        compare(name, fast, r, lp, floor_scale=cancel if name != "dv" else None)


DTYPES = [torch.float32, torch.float16]


# ---------------------------------------------------------------------------------------------
# Interpreter-sized tests
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D, group", [(16, 1), (40, 2), (64, 2)])
def test_dense_gqa_strided(seed, dtype, D, group):
    B, Hk, Sq, Sk = 2, 2, 19, 37
    q = rand(B, Hk * group, Sq, D, dtype=dtype, strided=True)
    k = rand(B, Hk, Sk, D, dtype=dtype, strided=True)
    v = rand(B, Hk, Sk, D, dtype=dtype)
    check_problem(q, k, v, dtype, 1 / math.sqrt(D))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("br", [False, True])
@pytest.mark.parametrize("Sq, Sk", [(21, 35), (35, 21)])
def test_causal_alignments(seed, dtype, br, Sq, Sk):
    q = rand(1, 2, Sq, 16, dtype=dtype)
    k = rand(1, 1, Sk, 16, dtype=dtype)
    v = rand(1, 1, Sk, 16, dtype=dtype)
    # top-left with Sq > Sk and bottom-right with Sq > Sk leave rows with no key: out 0, lse -inf.
    check_problem(q, k, v, dtype, 0.3, wl=-1, wr=0, br=br)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("wl, wr", [(5, 3), (0, 0), (7, -1), (-1, 20)])
def test_local_window(seed, dtype, wl, wr):
    q = rand(1, 2, 33, 16, dtype=dtype)
    k = rand(1, 2, 40, 16, dtype=dtype)
    v = rand(1, 2, 40, 16, dtype=dtype)
    check_problem(q, k, v, dtype, 0.25, wl=wl, wr=wr, br=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_softcap_alibi(seed, dtype):
    q = rand(2, 4, 17, 16, dtype=dtype)
    k = rand(2, 2, 29, 16, dtype=dtype)
    v = rand(2, 2, 29, 16, dtype=dtype)
    slopes = torch.rand(2, 4, dtype=torch.float32, device=DEVICE) * 0.5
    check_problem(q, k, v, dtype, 1.0, softcap=3.0, slopes=slopes, wl=-1, wr=0, br=True)
    check_problem(q, k, v, dtype, 0.5, slopes=slopes[0], check_backward=False)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bias_broadcast(seed, dtype):
    B, H, Sq, Sk = 2, 2, 18, 23
    q = rand(B, H, Sq, 16, dtype=dtype)
    k = rand(B, H, Sk, 16, dtype=dtype)
    v = rand(B, H, Sk, 16, dtype=dtype)
    bias = torch.randn(1, H, 1, Sk, dtype=torch.float64)  # broadcast over batch and query rows
    bias[..., 3] = -math.inf
    bias = bias.expand(B, H, Sq, Sk)
    check_problem(q, k, v, dtype, 0.25, bias=bias.to(DEVICE, torch.float32))
    full = torch.randn(B, 1, Sq, Sk, dtype=torch.float64)
    full[0, 0, 4, :] = -math.inf  # a row with every key masked by the bias
    check_problem(q, k, v, dtype, 0.25, bias=full.to(DEVICE, dtype).expand(B, H, Sq, Sk), wl=-1, wr=0)


def test_bias_offsets_are_64_bit_only_where_needed():
    from genfast.triton_kernels import attention as A

    n = 46341  # a (1, 1, n, n) mask: n x stride n >= 2^31
    assert A.bias_needs_int64(n, 1, n, n) and A.bias_needs_int64(0, n * n, 1, n)
    assert not A.bias_needs_int64(4096, 1, 4096, 4096) and not A.bias_needs_int64(0, 0, 10**9, 10**9)


def test_bias_64_bit_offsets_path(seed, monkeypatch):
    """The int64 bias-offset code (taken for masks past 2^31 elements, too large to test here)
    forced on a small problem: same results as the int32 path."""
    from genfast.triton_kernels import attention as A

    calls = []

    def forced(*args):
        calls.append(args)
        return True

    monkeypatch.setattr(A, "bias_needs_int64", forced)
    test_bias_broadcast(seed, torch.float32)
    assert len(calls) >= 4  # forward and backward of both problems


@pytest.mark.parametrize("dtype", DTYPES)
def test_varlen(seed, dtype):
    lens_q = [5, 0, 1, 17, 9]
    lens_k = [7, 3, 1, 17, 0]
    cu_q = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32, device=DEVICE)
    q = rand(1, 4, sum(lens_q), 16, dtype=dtype, strided=True)
    k = rand(1, 2, sum(lens_k), 16, dtype=dtype)
    v = rand(1, 2, sum(lens_k), 16, dtype=dtype)
    slopes = torch.rand(5, 4, dtype=torch.float32, device=DEVICE)
    check_problem(q, k, v, dtype, 0.25, cu_q=cu_q, cu_k=cu_k)
    check_problem(q, k, v, dtype, 0.25, cu_q=cu_q, cu_k=cu_k, wl=-1, wr=0, br=True, slopes=slopes,
                  deterministic=True)


def test_dropout(seed):
    dtype = torch.float32
    B, H, Hk, Sq, Sk, p = 2, 2, 1, 20, 33, 0.3
    q, k, v = rand(B, H, Sq, 16, dtype=dtype), rand(B, Hk, Sk, 16, dtype=dtype), rand(B, Hk, Sk, 16, dtype=dtype)
    kw = dict(scale=0.3, window_left=-1, window_right=0, align_bottom_right=True, softcap=0.0, alibi_slopes=None,
              bias=None, dropout_p=p, seed=seed)
    out, lse, keep = attn.forward(q, k, v, return_dropout_mask=True, **kw)
    # The mask is the spec's hash of (seed, b, h, i, j).
    expect = torch.stack([keep_mask_spec(seed, b, H, Sq, Sk, p) for b in range(B)])
    assert torch.equal(keep.cpu(), expect)
    rate = keep.float().mean().item()
    assert abs(rate - (1 - p)) < 4 * math.sqrt(p * (1 - p) / keep.numel()), rate
    # out is the spec applied with that mask; lse ignores dropout.
    args64 = [t.cpu().double() for t in (q, k, v)]
    ref_out, ref_lse = dense(*args64, 0.3, wr=0, br=True, keep=keep.cpu(), p=p)
    low_out, low_lse = dense(q.cpu(), k.cpu(), v.cpu(), 0.3, wr=0, br=True, keep=keep.cpu(), p=p)
    compare("out", out, ref_out, low_out)
    compare("lse", lse, ref_lse, low_lse, finite_mask=True)
    out2, lse2 = attn.forward(q, k, v, **kw)
    assert torch.equal(out, out2) and torch.equal(lse, lse2)
    out3, _ = attn.forward(q, k, v, **{**kw, "seed": seed + 1})
    assert not torch.equal(out, out3)
    # Backward regenerates the same mask.
    dout = rand(B, H, Sq, 16, dtype=dtype)
    grads = attn.backward(dout, q, k, v, out, lse, **kw)
    ref = torch.autograd.grad(dense(*(t.requires_grad_() for t in args64), 0.3, wr=0, br=True, keep=keep.cpu(),
                                    p=p)[0], args64, dout.cpu().double())
    a32 = [t.cpu().clone().requires_grad_() for t in (q, k, v)]
    low = torch.autograd.grad(dense(*a32, 0.3, wr=0, br=True, keep=keep.cpu(), p=p)[0], a32, dout.cpu())
    cancel = cancellation_scale(0.3, dout, ref_out, q, k)
    for name, fast, r, lp in zip(("dq", "dk", "dv"), grads, ref, low):
        compare(name, fast, r, lp, floor_scale=cancel if name != "dv" else None)


def test_dropout_varlen_mask(seed):
    lens = [3, 0, 9]
    cu = torch.tensor([0, 3, 3, 12], dtype=torch.int32, device=DEVICE)
    q, k, v = (rand(1, 2, 12, 16, dtype=torch.float32) for _ in range(3))
    _, _, keep = attn.forward(q, k, v, scale=0.3, dropout_p=0.5, seed=seed, cu_seqlens_q=cu, cu_seqlens_k=cu,
                              max_seqlen_q=9, max_seqlen_k=9, return_dropout_mask=True)
    expect = torch.zeros(1, 2, 12, 12, dtype=torch.bool)
    for s, n in enumerate(lens):
        a = cu[s].item()
        expect[0, :, a:a + n, a:a + n] = keep_mask_spec(seed, s, 2, n, n, 0.5)
    assert torch.equal(keep.cpu(), expect)


def test_dropout_matches_reference_module(seed):
    ref = pytest.importorskip("genfast.reference.attention")
    if not hasattr(ref, "dropout_keep_mask"):
        pytest.skip("genfast.reference.attention has no dropout_keep_mask")
    q, k, v = (rand(1, 2, 9, 16, dtype=torch.float32) for _ in range(3))
    _, _, keep = attn.forward(q, k, v, scale=0.3, dropout_p=0.2, seed=seed, return_dropout_mask=True)
    assert torch.equal(keep[0].cpu(), ref.dropout_keep_mask(seed, 0, 2, 9, 9, 0.2).cpu())


@pytest.mark.parametrize("dtype", [torch.float16])
def test_deterministic_backward_bitwise(seed, dtype):
    q, k, v = rand(1, 4, 26, 40, dtype=dtype), rand(1, 2, 31, 40, dtype=dtype), rand(1, 2, 31, 40, dtype=dtype)
    kw = dict(scale=0.2, window_left=-1, window_right=0, align_bottom_right=True, dropout_p=0.1, seed=seed)
    out, lse = attn.forward(q, k, v, **kw)
    dout = rand(*q.shape, dtype=dtype)
    first = attn.backward(dout, q, k, v, out, lse, deterministic=True, **kw)
    second = attn.backward(dout, q, k, v, out, lse, deterministic=True, **kw)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    atomic = attn.backward(dout, q, k, v, out, lse, deterministic=False, **kw)
    for a, b in zip(first, atomic):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-2, atol=1e-2)


def decode_spec(q, kc, vc, lens, scale, **kw):
    outs, lses = [], []
    for b, n in enumerate(lens.tolist()):
        sl = kw.get("slopes")
        args = dict(kw, slopes=None if sl is None else (sl if sl.dim() == 1 else sl[b:b + 1]))
        o, l = dense(q[b:b + 1], kc[b:b + 1, :, :n], vc[b:b + 1, :, :n], scale, br=True, **args)
        outs.append(o)
        lses.append(l)
    return torch.cat(outs), torch.cat(lses)


@pytest.mark.parametrize("dtype, Sq, group", [(torch.float16, 1, 4), (torch.float32, 3, 2)])
def test_decode(seed, dtype, Sq, group):
    B, Hk, S_max, D = 3, 2, 70, 16
    q = rand(B, Hk * group, Sq, D, dtype=dtype, strided=True)
    kc = rand(B, Hk, S_max, D, dtype=dtype, strided=True)
    vc = rand(B, Hk, S_max, D, dtype=dtype)
    lens = torch.tensor([70, 1, 33], dtype=torch.int32, device=DEVICE)
    slopes = torch.rand(B, Hk * group, dtype=torch.float32, device=DEVICE)
    cases = [dict(num_splits=0), dict(num_splits=1), dict(num_splits=3),
             dict(num_splits=2, window_left=9, window_right=0, softcap=2.0, alibi_slopes=slopes)]
    for case in cases:
        kw = dict(scale=0.3, window_left=case.get("window_left", -1), window_right=case.get("window_right", -1),
                  softcap=case.get("softcap", 0.0), alibi_slopes=case.get("alibi_slopes"))
        out, lse = attn.decode(q, kc, vc, lens, num_splits=case["num_splits"], **kw)
        skw = dict(wl=kw["window_left"], wr=kw["window_right"], softcap=kw["softcap"],
                   slopes=None if kw["alibi_slopes"] is None else kw["alibi_slopes"].cpu())
        ref_out, ref_lse = decode_spec(*(t.cpu().double() for t in (q, kc, vc)), lens.cpu(), 0.3, **skw)
        low_out, low_lse = decode_spec(q.cpu(), kc.cpu(), vc.cpu(), lens.cpu(), 0.3, **skw)
        compare(f"out {case}", out, ref_out, low_out)
        compare(f"lse {case}", lse, ref_lse, low_lse.float(), finite_mask=True)


def test_bad_inputs():
    q = torch.randn(1, 2, 4, 16)
    with pytest.raises(ValueError, match="head dim"):
        attn.forward(torch.randn(1, 2, 4, 12), torch.randn(1, 2, 4, 12), torch.randn(1, 2, 4, 12), scale=1.0)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        attn.forward(torch.randn(1, 3, 4, 16), q, q, scale=1.0)
    with pytest.raises(TypeError, match="share a dtype"):
        attn.forward(q, q.half(), q, scale=1.0)
    with pytest.raises(ValueError, match="dropout_p"):
        attn.forward(q, q, q, scale=1.0, dropout_p=1.0)
    with pytest.raises(ValueError, match="cache_seqlens"):
        attn.decode(q, q, q, torch.tensor([4]), scale=1.0)


# ---------------------------------------------------------------------------------------------
# GPU tests (larger shapes, bf16, every head dim)
# ---------------------------------------------------------------------------------------------
GPU_DTYPES = [torch.float16, torch.bfloat16, torch.float32]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("D", [16, 32, 40, 64, 80, 96, 128, 160, 192, 256])
def test_gpu_head_dims(seed, dtype, D):
    q, k, v = rand(2, 8, 333, D, dtype=dtype, strided=True), rand(2, 2, 517, D, dtype=dtype), \
        rand(2, 2, 517, D, dtype=dtype)
    check_problem(q, k, v, dtype, 1 / math.sqrt(D), wl=-1, wr=0, br=True)
    check_problem(q, k, v, dtype, 1 / math.sqrt(D), deterministic=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_features(seed, dtype):
    B, H, Hk, S, D = 2, 8, 4, 700, 128
    q, k, v = rand(B, H, S, D, dtype=dtype), rand(B, Hk, S + 77, D, dtype=dtype), rand(B, Hk, S + 77, D, dtype=dtype)
    slopes = torch.rand(H, device=DEVICE)
    check_problem(q, k, v, dtype, 0.1, softcap=30.0, slopes=slopes, wl=128, wr=16, br=True)
    bias = torch.randn(B, 1, S, S + 77, device=DEVICE, dtype=dtype).expand(B, H, S, S + 77)
    check_problem(q, k, v, dtype, 0.1, bias=bias)
    lens = [300, 0, 1, 511, 129]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=DEVICE)
    qv, kv_, vv = rand(1, H, sum(lens), D, dtype=dtype), rand(1, Hk, sum(lens), D, dtype=dtype), \
        rand(1, Hk, sum(lens), D, dtype=dtype)
    check_problem(qv, kv_, vv, dtype, 0.1, cu_q=cu, cu_k=cu, wl=-1, wr=0, br=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [64, 128, 256])
def test_gpu_decode(seed, dtype, D):
    B, H, Hk, S_max = 4, 32, 8, 4099
    q, kc, vc = rand(B, H, 1, D, dtype=dtype), rand(B, Hk, S_max, D, dtype=dtype), rand(B, Hk, S_max, D, dtype=dtype)
    lens = torch.tensor([4099, 1, 2048, 77], dtype=torch.int32, device=DEVICE)
    ref_out, ref_lse = decode_spec(*(t.cpu().double() for t in (q, kc, vc)), lens.cpu(), 0.125)
    low_out, low_lse = decode_spec(q.cpu().float().to(dtype), kc.cpu(), vc.cpu(), lens.cpu(), 0.125)
    for splits in (0, 1, 7, 32):
        out, lse = attn.decode(q, kc, vc, lens, scale=0.125, num_splits=splits)
        compare("out", out, ref_out, low_out)
        compare("lse", lse, ref_lse, low_lse.float(), finite_mask=True)
    # CUDA-graph capture: no host sync inside decode.
    out_static = torch.empty_like(q)
    graph = torch.cuda.CUDAGraph()
    attn.decode(q, kc, vc, lens, scale=0.125)
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        o, _ = attn.decode(q, kc, vc, lens, scale=0.125)
        out_static.copy_(o)
    graph.replay()
    torch.cuda.synchronize()
    compare("graph out", out_static, ref_out, low_out)


# Compiling these kernels for sm_80 / sm_90 without a GPU (the interpreter accepts programs the
# compiler rejects) is tests/test_compile_check.py's job: `python -m genfast compile-check`.
