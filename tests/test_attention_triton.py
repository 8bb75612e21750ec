"""genfast.triton_kernels.attention (forward / backward / decode of the attention kernel
contract) against a float64 PyTorch implementation of the contract written here.

On CPU the kernels run through the Triton interpreter (conftest sets TRITON_INTERPRET=1), so
shapes are tiny; the tests marked gpu run larger shapes, bf16 and every head dim on a GPU."""
import math

import pytest
import torch

from genfast import _dispatch
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
        # fp32: P recomputed as exp2 of a rounded log2-scaled score adds a few ulp times the score
        # size, which PyTorch's softmax does not have (tests/test_attention.py check does the same).
        ulps = 4 if fast.dtype == torch.float32 else 2
        floor = max(rounding_floor(fast.dtype, ref64.abs().max().item()),
                    ulps * torch.finfo(fast.dtype).eps * floor_scale)
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
        # dv: the same P error in fp32 (a fresh-clone run failed a D64 GQA dv at 1.004x the bound)
        compare(name, fast, r, lp, floor_scale=cancel if name != "dv" or dtype == torch.float32 else None)


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


@pytest.fixture
def descriptor_kernels(monkeypatch):
    """The Hopper form of the kernels (forward: tensor descriptors for Q, K, V and the output,
    the warp-specialized loop; backward: descriptor loads of the loop tiles), which only sm_90
    selects, forced here: in the interpreter it checks the semantics (zeros past a sequence's
    end, clipped stores, per-sequence descriptors for varlen, 3-D head descriptors, the
    descriptors' alignment rules). Yields the launchers' alignment verdicts."""
    if not attn.HAS_TMA:
        pytest.skip("this Triton has no tensor descriptors")
    if torch.cuda.is_available():
        pytest.skip("the interpreter's form; on a GPU test_gpu_hopper_configs runs the real configs")
    monkeypatch.setattr(attn._fwd, "configs", [attn._fwd_config(16, 16, 4, 1, tma=True,
                                                                ws=attn.HAS_WARP_SPECIALIZE)])
    monkeypatch.setattr(attn, "TMA_UNDER_INTERPRETER", True)
    verdicts = []
    aligned = attn.tma_aligned_all
    monkeypatch.setattr(attn, "tma_aligned_all", lambda *ts: verdicts.append(aligned(*ts)) or verdicts[-1])
    yield verdicts
    assert verdicts and all(verdicts), verdicts  # every launch was one descriptors may address


def test_kernels_through_tensor_descriptors(seed, descriptor_kernels):
    test_dense_gqa_strided(seed, torch.float16, 40, 2)  # head dim 40 in a 64-wide tile, strided q / k
    test_causal_alignments(seed, torch.float32, True, 35, 21)  # rows without keys
    test_varlen(seed, torch.float16)  # empty sequences, ALiBi, a window
    test_bias_broadcast(seed, torch.float32)
    test_dropout(seed)


def test_hopper_configs_only_where_they_apply(monkeypatch):
    """The Hopper configs (descriptors, warp-specialized, persistent) survive pruning only on
    sm_90+, in half precision, the descriptor ones for aligned tensors, the persistent pointer
    tile up to head dim 64; sm_80 and fp32 keep the plain pointer-load configs. With
    GENFAST_AUTOTUNE=quick one config of each kind is left."""
    configs = attn._fwd_configs(interpret=False)
    q16 = torch.empty(1, 1, 1, 64, dtype=torch.float16, device="meta")
    q32 = torch.empty(1, 1, 1, 64, dtype=torch.float32, device="meta")

    def pruned(arch, q, aligned, block_d=64):
        monkeypatch.setattr(attn, "target_arch", lambda: arch)
        return attn._prune_fwd_configs(configs, {"Q": q, "Bias": q}, BLOCK_D=block_d, HEAD_DIM=block_d,
                                       HAS_BIAS=False, DOT_PREC="tf32", TMA_ALIGNED=aligned)

    def kinds(kept):  # (descriptors, warp-specialized, persistent)
        return {(c.kwargs["USE_TMA"], c.kwargs["WARP_SPECIALIZE"], c.kwargs["PERSISTENT"]) for c in kept}

    plain, persistent = (False, False, False), (False, False, True)
    hopper = {(True, False, False), (True, False, True)} if attn.HAS_TMA else set()
    hopper |= {(True, True, False)} if attn.HAS_WARP_SPECIALIZE else set()
    assert kinds(pruned(90, q16, True)) == {plain, persistent} | hopper
    assert kinds(pruned(90, q16, True, 128)) == {plain} | hopper
    assert kinds(pruned(90, q16, False)) == {plain, persistent}
    assert kinds(pruned(80, q16, True)) == {plain}
    assert kinds(pruned(90, q32, True)) == {plain}
    full = pruned(90, q16, True)
    monkeypatch.setenv("GENFAST_AUTOTUNE", "quick")
    _dispatch.refresh_environment()
    try:
        quick = pruned(90, q16, True)
    finally:
        monkeypatch.delenv("GENFAST_AUTOTUNE")
        _dispatch.refresh_environment()
    assert len(full) > len(quick) == len(kinds(quick)) == len(kinds(full))
    t = torch.empty(2, 3, 5, 64, dtype=torch.float16)
    assert attn.tma_aligned_all(t, t.transpose(1, 2))
    assert not attn.tma_aligned_all(torch.empty(1, 1, 10, 60, dtype=torch.float16))  # rows 120 bytes apart
    assert not attn.tma_aligned_all(t.view(-1)[1:641].view(1, 1, 10, 64))  # data 2 bytes past alignment


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


# Paged KV cache (block_table), cache_batch_idx and cache_leftpad, against the contract's
# reference decode (genfast.reference.attention.decode / cache_rows). Keys a row must not read
# (padding, positions past its length or before its left pad, unused pool blocks) hold NaN.
def _decode_cache(B, Hk, cap, D, lens, leftpad, dtype):
    """(k, v): (B, Hk, cap, D) fp64 caches, NaN outside each row's [leftpad[b], lens[b])."""
    k, v = torch.randn(B, Hk, cap, D, dtype=torch.float64), torch.randn(B, Hk, cap, D, dtype=torch.float64)
    pos = torch.arange(cap)
    for b in range(B):
        bad = (pos < leftpad[b]) | (pos >= lens[b])
        k[b, :, bad] = float("nan")
        v[b, :, bad] = float("nan")
    return k, v


def _paged(cache, page, max_blocks, spare, gen):
    """A pool (num_blocks, Hk, page, D) holding ``cache`` (B, Hk, max_blocks * page, D) in
    shuffled blocks, ``spare`` extra NaN blocks; the table (B, max_blocks) int32."""
    B, Hk, _, D = cache.shape
    num_blocks = B * max_blocks + spare
    pool = torch.full((num_blocks, Hk, page, D), float("nan"), dtype=cache.dtype)
    order = torch.randperm(num_blocks, generator=gen)
    table = order[:B * max_blocks].reshape(B, max_blocks).to(torch.int32)
    for b in range(B):
        for j in range(max_blocks):
            pool[int(table[b, j])] = cache[b, :, j * page:(j + 1) * page]
    return pool, table


def _pooled(cache, rows, gen):
    """A pool (rows, Hk, S, D) with batch row b at a shuffled row (the rest NaN), the index int32 (B,)."""
    B = cache.shape[0]
    pool = torch.full((rows,) + tuple(cache.shape[1:]), float("nan"), dtype=cache.dtype)
    idx = torch.randperm(rows, generator=gen)[:B].to(torch.int32)
    pool[idx.long()] = cache
    return pool, idx


def check_decode_indexed(dtype, Sq, lens, leftpad=None, page=None, pool_rows=None, num_splits=1, H=4, Hk=2, D=16,
                         spare=3, seed=0, **kw):
    """attn.decode with block_table (page) or cache_batch_idx (pool_rows) and/or cache_leftpad
    vs the reference decode, in the flash-attn criterion."""
    ref = pytest.importorskip("genfast.reference.attention")
    gen = torch.Generator().manual_seed(seed)
    B = len(lens)
    pad = [0] * B if leftpad is None else leftpad
    cap = max(lens) if page is None else page * max(1, -(-max(lens) // page))
    k, v = _decode_cache(B, Hk, cap, D, lens, pad, dtype)
    q = torch.randn(B, H, Sq, D, dtype=torch.float64)
    index = {}
    if page is not None:
        k, table = _paged(k, page, cap // page, spare, gen)
        v = _paged(v, page, cap // page, spare, gen.manual_seed(seed))[0]  # same table
        index["block_table"] = table
    if pool_rows is not None:
        k, idx = _pooled(k, pool_rows, gen)
        v = _pooled(v, pool_rows, gen.manual_seed(seed))[0]
        index["cache_batch_idx"] = idx
    if leftpad is not None:
        index["cache_leftpad"] = torch.tensor(leftpad, dtype=torch.int32)
    seqlens = torch.tensor(lens, dtype=torch.int32)
    qd, kd, vd = (t.to(dtype) for t in (q, k, v))
    dev = {name: t.to(DEVICE) for name, t in index.items()}
    out, lse = attn.decode(qd.to(DEVICE), kd.to(DEVICE), vd.to(DEVICE), seqlens.to(DEVICE), num_splits=num_splits,
                           **dev, **kw)
    ref_out, ref_lse = ref.decode(qd.double(), kd.double(), vd.double(), seqlens, **index, **kw)
    low_out, low_lse = ref.decode(qd, kd, vd, seqlens, **index, **kw)
    name = f"decode {dtype} Sq{Sq} page {page} pool {pool_rows} leftpad {leftpad} splits {num_splits}"
    compare(f"out {name}", out, ref_out, low_out)
    compare(f"lse {name}", lse, ref_lse, low_lse.float(), finite_mask=True)


@pytest.mark.parametrize("dtype, page, Sq, num_splits, leftpad", [
    (torch.float32, 16, 1, 1, False),
    (torch.float16, 16, 3, 3, True),
    (torch.float16, 48, 1, 3, False),
    (torch.float32, 48, 3, 1, True),
])
def test_decode_paged(dtype, page, Sq, num_splits, leftpad):
    """Ragged lengths (0 and the full capacity included), out-of-order pages of a pool larger than
    needed, GQA (H 4, Hk 2); Sq 3 causal; tiles spanning pages (48 is no multiple of a tile)."""
    lens = [96, 0, 37, 65] if page == 16 else [96, 0, 49, 5]
    pad = [5, 0, 37, 17] if leftpad else None  # unaligned, empty row, leftpad == length
    causal = dict(window_right=0) if Sq > 1 else {}
    check_decode_indexed(dtype, Sq, lens, leftpad=pad, page=page, num_splits=num_splits, scale=0.3, **causal)


def test_decode_paged_features():
    """A 256-row page (capacity 256, one full row) split 3 ways, ALiBi, softcap and a local window."""
    slopes = torch.rand(4, dtype=torch.float32)
    check_decode_indexed(torch.float32, 3, [256, 70, 1], leftpad=[3, 0, 0], page=256, num_splits=3, spare=1,
                         scale=0.3, window_left=40, window_right=0, softcap=2.0, alibi_slopes=slopes.to(DEVICE))


@pytest.mark.parametrize("dtype, Sq, num_splits, pool_rows, leftpad", [
    (torch.float16, 1, 3, 6, [0, 9, 40, 2]),
    (torch.float32, 3, 1, 7, None),
    (torch.float32, 3, 3, None, [60, 9, 0, 20]),
])
def test_decode_batch_idx_leftpad(dtype, Sq, num_splits, pool_rows, leftpad):
    """cache_batch_idx into a pool of more rows than the batch, and left pads (unaligned, empty
    rows included) with and without it."""
    lens = [70, 0, 41, 20] if leftpad is None else [70, 9, 41, 20]
    causal = dict(window_right=0) if Sq > 1 else {}
    check_decode_indexed(dtype, Sq, lens, leftpad=leftpad, pool_rows=pool_rows, num_splits=num_splits, scale=0.3,
                         **causal)


def test_decode_index_bad_inputs():
    q, kc = torch.randn(2, 4, 1, 16), torch.randn(6, 2, 16, 16)
    lens = torch.tensor([3, 4], dtype=torch.int32)
    table = torch.zeros(2, 3, dtype=torch.int32)
    with pytest.raises(ValueError, match="cache_leftpad"):
        attn.decode(q, kc[:2], kc[:2], lens, scale=1.0, cache_leftpad=torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="batch as q"):
        attn.decode(q, kc, kc, lens, scale=1.0)
    with pytest.raises(ValueError, match="cache_batch_idx"):
        attn.decode(q, kc, kc, lens, scale=1.0, cache_batch_idx=torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="block_table"):
        attn.decode(q, kc, kc, lens, scale=1.0, block_table=table.long())
    with pytest.raises(ValueError, match="block_table"):
        attn.decode(q, kc, kc, lens, scale=1.0, block_table=table[:1])
    with pytest.raises(ValueError, match="cache_batch_idx"):
        attn.decode(q, kc, kc, lens, scale=1.0, block_table=table, cache_batch_idx=torch.zeros(2, dtype=torch.int32))


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
# rotary_append: rotary of q / the new k fused with the KV-cache append (flash_attn_with_kvcache
# layout (batch, seq, heads, dim)), against a float64 oracle written here
# ---------------------------------------------------------------------------------------------
def _rope_tables(seqlen_ro, rot, dtype):
    """cos / sin (seqlen_ro, rot / 2) of RoPE's frequencies (base 10000), in ``dtype``."""
    inv_freq = 1.0 / 10000 ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot)
    theta = torch.arange(seqlen_ro, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return theta.cos().to(dtype), theta.sin().to(dtype)


def _rope64(x, cos, sin, pos, interleaved):
    """(rotated first rotary_dim dims of x (B, S, H, D) in float64, magnitude |x1 c| + |x2 s|
    per element): the rotation at integer positions pos (B, S) done by hand."""
    half = cos.shape[1]
    c = cos.double()[pos][:, :, None, :]  # gather the rows: (B, S, 1, half)
    s = sin.double()[pos][:, :, None, :]
    xr = x[..., :2 * half].double()
    x1, x2 = (xr[..., 0::2], xr[..., 1::2]) if interleaved else (xr[..., :half], xr[..., half:])
    o1, o2 = x1 * c - x2 * s, x1 * s + x2 * c
    m1 = (x1 * c).abs() + (x2 * s).abs()
    m2 = (x1 * s).abs() + (x2 * c).abs()
    if interleaved:
        return torch.stack([o1, o2], -1).flatten(-2), torch.stack([m1, m2], -1).flatten(-2)
    return torch.cat([o1, o2], -1), torch.cat([m1, m2], -1)


def _check_rotated(name, got, exact, mag):
    """fp32: within 1e-6 of the terms' magnitude |x1 c| + |x2 s| (a few ulp); fp16 / bf16:
    within one unit of the low-precision rounding of the exact result (plus that fp32 error)."""
    tol = 1e-6 * mag
    if got.dtype != torch.float32:
        low = exact.to(got.dtype)
        mant, emin = {torch.float16: (10, -14), torch.bfloat16: (7, -126)}[got.dtype]
        _, e = torch.frexp(low.double())
        e = torch.where(low == 0, torch.full_like(e, emin), (e - 1).clamp(min=emin))
        tol = tol + torch.ldexp(torch.ones_like(exact), e - mant)
    err = (got.double() - exact).abs()
    bad = ~(err <= tol)
    assert not bad.any(), (f"{name}: {int(bad.sum())} of {bad.numel()} off, worst err {float(err.max()):.3g} "
                           f"(tol there {float(tol.flatten()[int(err.argmax())]):.3g})")


def _bits(t):
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def _cache_slot(b, p, lens_idx, page, table):
    """(cache row or block, row inside it) of position p of batch row b."""
    if table is not None:
        return int(table[b, p // page]), p % page
    return (b if lens_idx is None else int(lens_idx[b])), p


def check_rotary_append(dtype, layout, S_new, D, rot, interleaved, q_same_position, Sq=2, B=3, H=4, Hk=2,
                        strided=False, seed=0):
    """rotary_append on a (contiguous | cache_batch_idx pool | paged) cache vs the oracle: q_rot
    and the written k within rounding (dims past rotary_dim and v bitwise), every cache slot
    not written bitwise unchanged, the inputs untouched."""
    gen = torch.Generator().manual_seed(seed)
    tag = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    page = {"paged16": 16, "paged48": 48}.get(layout)
    # rows whose new tokens cross a page boundary (16: 14..16 and 31..33; 48: 46..48 and 47..49)
    lens_list = {16: [14, 0, 31], 48: [46, 3, 47]}.get(page, [5, 0, 40])[:B]
    lens = torch.tensor(lens_list, dtype=torch.int32)
    S_max = 64
    randn = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).to(dtype)  # noqa: E731
    if strided:  # q from a (B, H, Sq, D) tensor, k / v halves of one packed tensor, caches likewise
        q = randn(B, H, Sq, D).transpose(1, 2)
        kv = randn(B, S_new, 2, Hk, D)
        k, v = kv[:, :, 0], kv[:, :, 1]
    else:
        q, k, v = randn(B, Sq, H, D), randn(B, S_new, Hk, D), randn(B, S_new, Hk, D)
    index, table, batch_idx = {}, None, None
    if page is not None:
        max_blocks = -(-S_max // page)
        num_blocks = B * max_blocks + 3  # spare blocks, never written
        table = torch.randperm(num_blocks, generator=gen)[:B * max_blocks].reshape(B, max_blocks).to(torch.int32)
        index["block_table"] = table
        shape = (num_blocks, page, Hk, D)
    elif layout == "batch_idx":
        batch_idx = torch.randperm(B + 2, generator=gen)[:B].to(torch.int32)  # a pool of B + 2 rows
        index["cache_batch_idx"] = batch_idx
        shape = (B + 2, S_max, Hk, D)
    else:
        shape = (B, S_max, Hk, D)
    if strided:
        kvc = randn(shape[0], shape[1], 2, Hk, D)
        k_cache, v_cache = kvc[:, :, 0], kvc[:, :, 1]
    else:
        k_cache, v_cache = randn(*shape), randn(*shape)
    cos, sin = _rope_tables(S_max + Sq, rot, dtype)
    inputs = [t.clone() for t in (q, k, v, cos, sin, lens)]
    k0, v0 = k_cache.clone(), v_cache.clone()

    dev = lambda t: t.to(DEVICE)  # noqa: E731  (views stay views on CPU)
    kc_dev, vc_dev = dev(k_cache), dev(v_cache)
    q_rot = attn.rotary_append(dev(q), kc_dev, vc_dev, dev(k), dev(v), dev(lens), dev(cos), dev(sin),
                               interleaved=interleaved, q_same_position=q_same_position,
                               **{n: dev(t) for n, t in index.items()})
    q_rot, k_got, v_got = q_rot.cpu(), kc_dev.cpu(), vc_dev.cpu()
    name = f"{layout} S_new {S_new} D {D} rot {rot} interleaved {interleaved} same {q_same_position} {tag}"
    for before, after in zip(inputs, (q, k, v, cos, sin, lens)):
        assert torch.equal(_bits(before) if before.is_floating_point() else before,
                           _bits(after) if after.is_floating_point() else after), f"{name}: an input changed"

    # q
    assert q_rot.shape == (B, Sq, H, D) and q_rot.dtype == dtype and q_rot.is_contiguous()
    qpos = lens.long()[:, None] + (torch.zeros(Sq, dtype=torch.long) if q_same_position else torch.arange(Sq))
    exact, mag = _rope64(q, cos, sin, qpos, interleaved)
    _check_rotated(f"q {name}", q_rot[..., :rot], exact, mag)
    assert torch.equal(_bits(q_rot[..., rot:]), _bits(q[..., rot:].contiguous())), f"q pass-through dims {name}"

    # caches: the expected v cache and the written k slots by hand
    kpos = lens.long()[:, None] + torch.arange(S_new)
    k_exact, k_mag = _rope64(k, cos, sin, kpos, interleaved)
    v_want = v0.clone()
    written = torch.zeros(shape[:2], dtype=torch.bool)
    for b in range(B):
        for t in range(S_new):
            blk, row = _cache_slot(b, int(lens[b]) + t, batch_idx, page, table)
            assert not written[blk, row]
            written[blk, row] = True
            v_want[blk, row] = v[b, t]
            _check_rotated(f"k b{b} t{t} {name}", k_got[blk, row, :, :rot], k_exact[b, t], k_mag[b, t])
            assert torch.equal(_bits(k_got[blk, row, :, rot:]), _bits(k[b, t, :, rot:].contiguous())), \
                f"k pass-through dims {name}"
    assert int(written.sum()) == B * S_new
    assert torch.equal(_bits(v_got), _bits(v_want)), f"v cache {name}"
    assert torch.equal(_bits(k_got[~written]), _bits(k0[~written])), f"k cache slots not written changed: {name}"


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("dtype, layout, S_new, D, rot, q_same_position, strided", [
    (torch.float32, "contiguous", 3, 32, 32, False, False),
    (torch.float16, "contiguous", 1, 64, 16, True, True),
    (torch.float16, "contiguous", 3, 64, 64, False, False),
    (torch.float32, "contiguous", 0, 32, 16, False, False),
    (torch.float16, "batch_idx", 1, 32, 16, True, False),
    (torch.float32, "batch_idx", 3, 64, 64, False, True),
    (torch.float16, "paged16", 3, 32, 32, False, False),
    (torch.float32, "paged16", 3, 64, 16, True, True),
    (torch.float16, "paged16", 1, 64, 64, False, False),
    (torch.float32, "paged48", 3, 32, 16, False, False),
    (torch.float16, "paged48", 3, 64, 64, True, True),
    (torch.float16, "paged48", 0, 64, 16, False, False),
])
def test_rotary_append(dtype, layout, S_new, D, rot, q_same_position, strided, interleaved):
    """fp32 / fp16, GPT-NeoX and GPT-J pairing, rotary_dim 16 (pass-through dims) and D; a plain
    cache, cache_batch_idx into a pool of B + 2 rows, out-of-order pages of 16 and 48 rows (new
    tokens crossing a page boundary); S_new 0, 1, 3; strided q / packed k, v and caches."""
    check_rotary_append(dtype, layout, S_new, D, rot, interleaved, q_same_position, strided=strided)


def test_rotary_append_head_blocks(monkeypatch):
    """Several partial head blocks per token (2 heads per program: H 5, Hk 3), Sq 1 and Sq 3."""
    monkeypatch.setattr(attn, "_rotary_heads_block", lambda heads, block_d: 2)
    check_rotary_append(torch.float32, "paged16", 3, 32, 16, True, False, Sq=3, H=5, Hk=3)
    check_rotary_append(torch.float16, "batch_idx", 2, 64, 64, False, True, Sq=1, H=5, Hk=3, B=2)


def test_rotary_append_cos_dtype():
    """cos / sin in another float dtype than q (bf16 tables, fp32 q): converted as the reference
    does (fp32 math); matches genfast.reference.attention.rotary_embedding."""
    ref = pytest.importorskip("genfast.reference.attention")
    gen = torch.Generator().manual_seed(1)
    B, Sq, H, D = 2, 3, 2, 32
    q = torch.randn(B, Sq, H, D, generator=gen)
    kc = torch.zeros(B, 16, 1, D)
    k = torch.randn(B, 1, 1, D, generator=gen)
    lens = torch.tensor([4, 9], dtype=torch.int32)
    cos, sin = _rope_tables(16, 24, torch.bfloat16)
    for interleaved in (False, True):
        out = attn.rotary_append(q.to(DEVICE), kc.to(DEVICE), kc.clone().to(DEVICE), k.to(DEVICE), k.to(DEVICE),
                                 lens.to(DEVICE), cos.to(DEVICE), sin.to(DEVICE), interleaved=interleaved,
                                 q_same_position=False).cpu()
        pos = lens.long()[:, None] + torch.arange(Sq)
        want = ref.rotary_embedding(q, cos, sin, pos, interleaved)
        torch.testing.assert_close(out, want, rtol=0, atol=1e-6)


def test_rotary_append_bad_inputs():
    q, k = torch.randn(2, 1, 4, 16), torch.randn(2, 1, 2, 16)
    kc = torch.zeros(2, 8, 2, 16)
    lens = torch.tensor([1, 2], dtype=torch.int32)
    cos = torch.ones(8, 8)
    call = lambda **kw: attn.rotary_append(**dict(dict(q=q, k_cache=kc, v_cache=kc, k=k, v=k,  # noqa: E731
                                                       cache_seqlens=lens, cos=cos, sin=cos, interleaved=False,
                                                       q_same_position=False), **kw))
    with pytest.raises(ValueError, match="one dtype"):
        call(k=k.half())
    with pytest.raises(ValueError, match="cache_seqlens"):
        call(cache_seqlens=lens.long())
    with pytest.raises(ValueError, match="rotary_dim"):
        call(cos=torch.ones(8, 9), sin=torch.ones(8, 9))
    with pytest.raises(ValueError, match="k_cache, v_cache"):
        call(k_cache=torch.zeros(2, 8, 1, 16))
    with pytest.raises(ValueError, match="unit last stride"):
        call(k_cache=torch.zeros(2, 8, 2, 32)[..., ::2])
    with pytest.raises(ValueError, match="cache_batch_idx"):
        call(cache_batch_idx=torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="block_table"):
        call(block_table=torch.zeros(2, 2))
    with pytest.raises(ValueError, match="no cache_batch_idx"):
        call(block_table=torch.zeros(2, 2, dtype=torch.int32), cache_batch_idx=torch.zeros(2, dtype=torch.int32))


# ---------------------------------------------------------------------------------------------
# GPU tests (larger shapes, bf16, every head dim)
# ---------------------------------------------------------------------------------------------
GPU_DTYPES = [torch.float16, torch.bfloat16, torch.float32]


@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "descriptors"])
def test_persistent_forward(seed, tma, monkeypatch):
    """The persistent forward (sm_90 configs) forced in the interpreter on 3 "SMs", so each
    program takes several tiles, a head's last block first: dense GQA on strided inputs, causal
    with rows that have no key, varlen with empty sequences (tiles past a sequence's end)."""
    if tma and not attn.HAS_TMA:
        pytest.skip("this Triton has no tensor descriptors")
    if torch.cuda.is_available():
        pytest.skip("the interpreter's form; on a GPU test_gpu_hopper_configs runs the real configs")
    monkeypatch.setattr(attn._fwd, "configs", [attn._fwd_config(16, 16, 4, 1, tma=tma, persistent=True)])
    grids = []
    monkeypatch.setattr(attn, "_num_sms", lambda device: grids.append(device) or 3)
    test_dense_gqa_strided(seed, torch.float16, 40, 2)  # 2 blocks x 8 heads: 16 tiles on 3 programs
    test_causal_alignments(seed, torch.float32, True, 35, 21)
    test_varlen(seed, torch.float16)
    assert len(grids) >= 3  # every forward launch was persistent


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
@pytest.mark.parametrize("tile", [(128, 64, 8, 3, True, False, False), (128, 64, 4, 3, True, True, False),
                                  (64, 64, 4, 2, True, True, False), (128, 64, 8, 3, True, False, True),
                                  (128, 64, 8, 3, False, False, True)],
                         ids=["tma", "tma+ws128", "tma+ws64", "tma+persistent", "persistent"])
def test_gpu_hopper_configs(seed, dtype, tile, monkeypatch):
    """Each kind of sm_90 forward config forced (the autotuner would only pick it where it is
    fastest), with the backward's descriptor loads: GQA on strided q, causal, a window, varlen."""
    bm, bn, warps, stages, tma, ws, persistent = tile
    if not attn.HAS_TMA or torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("needs sm_90+ and a Triton with tensor descriptors")
    if ws and not attn.HAS_WARP_SPECIALIZE:
        pytest.skip("this Triton has no warp specialization")
    monkeypatch.setattr(attn._fwd, "configs", [attn._fwd_config(bm, bn, warps, stages, tma=tma, ws=ws,
                                                                persistent=persistent)])
    for D in (64, 128):
        q, k, v = rand(2, 8, 333, D, dtype=dtype, strided=True), rand(2, 2, 517, D, dtype=dtype), \
            rand(2, 2, 517, D, dtype=dtype)
        check_problem(q, k, v, dtype, 1 / math.sqrt(D), wl=-1, wr=0, br=True)
        check_problem(q, k, v, dtype, 1 / math.sqrt(D), wl=100, wr=7, deterministic=True)
    lens = [300, 0, 1, 511, 129]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=DEVICE)
    qv, kv_, vv = (rand(1, n, sum(lens), 128, dtype=dtype) for n in (8, 4, 4))
    check_problem(qv, kv_, vv, dtype, 0.1, cu_q=cu, cu_k=cu, wl=-1, wr=0, br=True)


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


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("layout", ["contiguous", "batch_idx", "paged16", "paged48"])
def test_gpu_rotary_append(dtype, layout):
    """The compiled kernel (FMA contraction, bf16) on every cache layout, D 128, both pairings."""
    for interleaved in (False, True):
        for rot in (64, 128):
            check_rotary_append(dtype, layout, 3, 128, rot, interleaved, False)
            check_rotary_append(dtype, layout, 1, 128, rot, interleaved, True, Sq=1, H=32, Hk=8)


@pytest.mark.gpu
def test_gpu_rotary_append_cuda_graph():
    """Captured once, replayed with new cache_seqlens: no host sync, positions read on the device."""
    dev, dt = torch.device("cuda"), torch.bfloat16
    B, H, Hk, D, page, blocks = 4, 32, 8, 128, 256, 8
    q, k, v = (torch.randn(B, 1, n, D, device=dev, dtype=dt) for n in (H, Hk, Hk))
    kc = torch.zeros(B * blocks + 3, page, Hk, D, device=dev, dtype=dt)
    vc = torch.zeros_like(kc)
    table = torch.randperm(B * blocks + 3, device=dev)[:B * blocks].reshape(B, blocks).to(torch.int32)
    lens = torch.tensor([0, 1, 2, 3], dtype=torch.int32, device=dev)
    cos, sin = (t.to(dev) for t in _rope_tables(page * blocks, D, torch.float32))
    call = lambda: attn.rotary_append(q, kc, vc, k, v, lens, cos, sin, interleaved=False,  # noqa: E731
                                      q_same_position=True, block_table=table)
    call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call()
    kc.zero_()
    vc.zero_()
    new_lens = [255, 256, 1000, 2047]
    lens.copy_(torch.tensor(new_lens, dtype=torch.int32))
    graph.replay()
    torch.cuda.synchronize()
    pos = torch.tensor(new_lens)[:, None]
    exact, mag = _rope64(q.cpu(), cos.cpu(), sin.cpu(), pos, False)
    _check_rotated("graph q", out.cpu(), exact, mag)
    k_exact, k_mag = _rope64(k.cpu(), cos.cpu(), sin.cpu(), pos, False)
    for b, p in enumerate(new_lens):
        blk, row = int(table[b, p // page]), p % page
        _check_rotated(f"graph k b{b}", kc[blk, row].cpu(), k_exact[b, 0], k_mag[b, 0])
        assert torch.equal(vc[blk, row], v[b, 0])
    assert int((kc != 0).any(-1).any(-1).sum()) <= B and int((vc != 0).any(-1).any(-1).sum()) <= B

# Compiling these kernels for sm_80 / sm_90 without a GPU (the interpreter accepts programs the
# compiler rejects) is tests/test_compile_check.py's job: `python -m genfast compile-check`.
