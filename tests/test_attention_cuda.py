"""The CUDA attention kernels (kernels/attention.cu: tensor-core forward, split-KV decode, backward)
against the float64 contract (genfast/reference/attention.py), in the flash-attn criterion:
error <= 2x PyTorch's own error in the same low precision + a rounding floor. The backend is
called directly (no fallback can hide it). GPU only: these tests are skipped without one."""
from __future__ import annotations

import math

import pytest
import torch

import genfast
from genfast import _ext
from genfast.ops import attention as A
from genfast.testing import error_vs_reference

from helpers import attention_rand
from op_checks.attention_cuda import (check_backward, check_forward, compare_grads, compare_lse, decode_reference,
    lowp_dense, problem)

pytestmark = pytest.mark.gpu
DTYPES = [torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _needs_cuda_kernels():
    reason = _ext.cuda_unavailable_reason()
    if reason:
        pytest.skip(f"CUDA kernels unavailable: {reason}")
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("the CUDA attention kernels need sm_80+")


def rand(*shape, dtype, strided=False):
    """~N(0, 1) on the GPU; strided=True gives a (B, H, S, D) view of a (B, S, H, D) tensor."""
    return attention_rand(*shape, dtype=dtype, device="cuda", strided=strided)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [16, 24, 32, 40, 64, 80, 96, 128, 160, 192, 256])
def test_forward_head_dims(seed, dtype, D):
    q = rand(2, 4, 133, D, dtype=dtype, strided=True)
    k, v = rand(2, 2, 257, D, dtype=dtype), rand(2, 2, 257, D, dtype=dtype)
    check_forward(q, k, v, scale=1 / math.sqrt(D))
    check_forward(q, k, v, scale=1 / math.sqrt(D), window_right=0, align_bottom_right=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sq,sk", [(1, 1), (17, 17), (1000, 1000), (300, 77), (77, 300)])
@pytest.mark.parametrize("group", [1, 2, 8])
def test_forward_lengths_gqa_causal(seed, dtype, sq, sk, group):
    q = rand(2, 8, sq, 64, dtype=dtype)
    k, v = rand(2, 8 // group, sk, 64, dtype=dtype), rand(2, 8 // group, sk, 64, dtype=dtype)
    check_forward(q, k, v, scale=0.125)
    check_forward(q, k, v, scale=0.125, window_right=0, align_bottom_right=True)  # flash-attn causal
    check_forward(q, k, v, scale=0.125, window_right=0)  # torch's top-left causal (rows may see nothing)


@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_window_softcap_alibi(seed, dtype):
    B, H, Hk, Sq, Sk, D = 2, 8, 2, 300, 377, 128
    q, k, v = rand(B, H, Sq, D, dtype=dtype), rand(B, Hk, Sk, D, dtype=dtype), rand(B, Hk, Sk, D, dtype=dtype)
    check_forward(q, k, v, scale=0.1, window_left=100, window_right=7, align_bottom_right=True)
    check_forward(q, k, v, scale=0.1, softcap=5.0)
    check_forward(q, k, v, scale=0.1, alibi_slopes=torch.rand(H, device="cuda"), window_right=0,
                  align_bottom_right=True)
    check_forward(q, k, v, scale=0.1, alibi_slopes=torch.rand(B, H, device="cuda"), softcap=30.0, window_left=64,
                  window_right=0, align_bottom_right=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [16, 40, 64, 96, 128])
def test_backward_head_dims(seed, dtype, D):
    q = rand(2, 4, 333, D, dtype=dtype, strided=True)
    k, v = rand(2, 2, 517, D, dtype=dtype), rand(2, 2, 517, D, dtype=dtype)
    check_backward(q, k, v, scale=1 / math.sqrt(D))
    check_backward(q, k, v, scale=1 / math.sqrt(D), window_right=0, align_bottom_right=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_features(seed, dtype):
    B, H, Hk, S, D = 2, 8, 2, 700, 128
    q, k, v = rand(B, H, S, D, dtype=dtype), rand(B, Hk, S + 77, D, dtype=dtype), rand(B, Hk, S + 77, D, dtype=dtype)
    check_backward(q, k, v, scale=0.1, softcap=30.0, alibi_slopes=torch.rand(H, device="cuda"), window_left=128,
                   window_right=16, align_bottom_right=True)
    check_backward(q, k, v, scale=0.1, window_right=0)  # top-left causal: rows with no key
    lens = [300, 0, 1, 511, 129]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    qv, kv, vv = (rand(1, h, sum(lens), D, dtype=dtype) for h in (H, Hk, Hk))
    check_backward(qv, kv, vv, scale=0.1, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=511, max_seqlen_k=511,
                   window_right=0, align_bottom_right=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_varlen(seed, dtype):
    lens_q, lens_k = [300, 0, 1, 129, 64], [300, 5, 0, 200, 64]
    cu_q = torch.tensor([0] + torch.tensor(lens_q).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    cu_k = torch.tensor([0] + torch.tensor(lens_k).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    H, Hk, D = 4, 2, 80
    q = rand(1, H, sum(lens_q), D, dtype=dtype)
    k, v = rand(1, Hk, sum(lens_k), D, dtype=dtype), rand(1, Hk, sum(lens_k), D, dtype=dtype)
    for causal in (False, True):
        check_forward(q, k, v, scale=0.11, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max(lens_q),
                      max_seqlen_k=max(lens_k), window_right=0 if causal else -1, align_bottom_right=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [64, 128, 256])
@pytest.mark.parametrize("H,Hk,Sq", [(32, 8, 1), (8, 8, 1), (16, 1, 3)])
def test_decode_split_kv(seed, dtype, D, H, Hk, Sq):
    B, S_max = 4, 4099
    q = rand(B, H, Sq, D, dtype=dtype)
    kc, vc = rand(B, Hk, S_max, D, dtype=dtype), rand(B, Hk, S_max, D, dtype=dtype)
    lens = torch.tensor([4099, 1, 2048, 77], dtype=torch.int32, device="cuda")
    (ref_out, ref_lse), (low_out, low_lse) = decode_reference(q, kc, vc, lens, scale=0.125, window_right=0)
    for splits in (0, 1, 7, 32):
        out, lse = A._cuda_decode(q, kc, vc, lens, scale=0.125, window_left=-1, window_right=0, softcap=0.0,
                                  alibi_slopes=None, num_splits=splits)
        error_vs_reference(out.cpu(), ref_out, low_out.cpu(), f"out (splits={splits})")
        compare_lse(f"lse (splits={splits})", lse, ref_lse, low_lse)


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_window_softcap_alibi_and_empty_rows(seed, dtype):
    B, H, Hk, D, S_max = 3, 8, 2, 96, 1500
    q = rand(B, H, 2, D, dtype=dtype)
    kc, vc = rand(B, Hk, S_max, D, dtype=dtype), rand(B, Hk, S_max, D, dtype=dtype)
    lens = torch.tensor([1500, 0, 700], dtype=torch.int32, device="cuda")
    kw = dict(scale=0.1, window_left=300, window_right=0, softcap=20.0, alibi_slopes=torch.rand(B, H, device="cuda"))
    (ref_out, ref_lse), (low_out, low_lse) = decode_reference(q, kc, vc, lens, **kw)
    for splits in (1, 5):
        out, lse = A._cuda_decode(q, kc, vc, lens, num_splits=splits, **kw)
        error_vs_reference(out.cpu(), ref_out, low_out.cpu(), f"out (splits={splits})")
        compare_lse(f"lse (splits={splits})", lse, ref_lse, low_lse)
        assert torch.all(out[1] == 0) and torch.all(torch.isneginf(lse[1]))  # an empty cache row


def test_decode_in_cuda_graph(seed):
    B, H, Hk, D, S_max = 2, 16, 4, 128, 8192
    q = rand(B, 1, H, D, dtype=torch.bfloat16)
    kc, vc = rand(B, S_max, Hk, D, dtype=torch.bfloat16), rand(B, S_max, Hk, D, dtype=torch.bfloat16)
    k_new, v_new = rand(B, 1, Hk, D, dtype=torch.bfloat16), rand(B, 1, Hk, D, dtype=torch.bfloat16)
    lens = torch.tensor([5000, 8000], dtype=torch.int32, device="cuda")
    kc2, vc2 = kc.clone(), vc.clone()
    expected = genfast.flash_attn_with_kvcache(q, kc2, vc2, k_new, v_new, cache_seqlens=lens, causal=True,
                                               backend="cuda")
    static_out = torch.empty_like(q)
    genfast.flash_attn_with_kvcache(q, kc.clone(), vc.clone(), k_new, v_new, cache_seqlens=lens, causal=True,
                                    backend="cuda")  # warm-up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out.copy_(genfast.flash_attn_with_kvcache(q, kc, vc, k_new, v_new, cache_seqlens=lens, causal=True,
                                                         backend="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(kc, kc2) and torch.equal(static_out, expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_public_api_with_gradients(seed, dtype):
    """backend="cuda" through flash_attn_func and autograd: output and gradients match the
    float64 reference."""
    B, S, H, Hk, D = 2, 257, 8, 2, 64
    q, k, v = (rand(B, S, h, D, dtype=dtype).requires_grad_() for h in (H, Hk, Hk))
    out = genfast.flash_attn_func(q, k, v, causal=True, backend="cuda")
    kw = dict(scale=1 / math.sqrt(D), window_right=0, align_bottom_right=True)
    low, _ = lowp_dense(*(t.detach().transpose(1, 2) for t in (q, k, v)), problem(**kw))
    ref = genfast.flash_attn_func(*(t.detach().cpu().double() for t in (q, k, v)), causal=True, backend="reference")
    error_vs_reference(out.detach().cpu(), ref, low.transpose(1, 2).cpu(), "out")
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    x64 = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
    ref_grads = torch.autograd.grad(genfast.flash_attn_func(*x64, causal=True, backend="reference"), x64,
                                    dout.cpu().double())
    low_x = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    low_out, _ = lowp_dense(*(t.transpose(1, 2) for t in low_x), problem(**kw))
    low_grads = torch.autograd.grad(low_out.transpose(1, 2), low_x, dout)
    compare_grads(grads, ref_grads, low_grads, kw["scale"], q.detach(), k.detach(), dout.transpose(1, 2),
                  out.detach().transpose(1, 2))


def test_unsupported_features_fall_back(seed):
    """Dropout and additive masks are not in the CUDA kernels: the call goes to the next backend."""
    q, k, v = (rand(1, 64, 4, 64, dtype=torch.float16) for _ in range(3))
    with pytest.raises(A.Unsupported):
        A._cuda_forward(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), **problem(scale=0.1, dropout_p=0.1))
    out = genfast.flash_attn_func(q, k, v, dropout_p=0.1, backend="cuda")  # warns once, runs triton
    assert out.shape == q.shape and torch.isfinite(out).all()


def test_unaligned_inputs_are_copied(seed):
    base = rand(1, 4, 130 * 64 + 1, dtype=torch.float16).reshape(-1)
    q = base[1:1 + 4 * 130 * 64].view(1, 4, 130, 64)  # a 2-byte offset: not 16-byte aligned
    assert q.data_ptr() % 16 != 0
    k, v = rand(1, 4, 130, 64, dtype=torch.float16), rand(1, 4, 130, 64, dtype=torch.float16)
    check_forward(q, k, v, scale=0.125)
