"""The CUDA attention kernels' exact source (kernels/attention.cu), run on the CPU.

CI has nvcc but no GPU, so the kernels and their real bindings are compiled as host C++ over
a SIMT emulator (tests/cuda_emulation: one fiber per thread, __syncthreads / shuffles / mma.sync
as warp and block barriers exchanging registers in the PTX ISA's fragment layouts) and called
through genfast's own CUDA launcher code (genfast/ops/attention.py _cuda_forward/_cuda_decode).
This checks the indexing, masking, online softmax, split-KV and combine logic numerically; it
cannot check what only hardware shows (timing, races between real warps, the asm itself).
The same checks run on a real GPU in tests/test_attention_cuda.py.
"""
from __future__ import annotations

import math
import types

import pytest
import torch

from cuda_emulation import build
from genfast.ops import attention as A
from genfast.testing import error_vs_reference
from op_checks import attention_cuda as cuda_checks


@pytest.fixture(scope="module")
def emulated():
    return build.build("attention")


@pytest.fixture(autouse=True)
def _launch_on_the_emulator(emulated, monkeypatch):
    """genfast's CUDA launcher code, unchanged, pointed at the emulated kernels and CPU memory."""
    monkeypatch.setattr(A._ext, "_C", types.SimpleNamespace(attention_forward_cuda=emulated.attention_forward_cuda,
                                                            attention_backward_cuda=emulated.attention_backward_cuda,
                                                            AttentionOptions=emulated.AttentionOptions,
                                                            AttentionCudaLaunch=emulated.AttentionCudaLaunch))
    monkeypatch.setattr(A._ext, "stream_of", lambda t: 0)
    monkeypatch.setattr(A, "_device_index", lambda t: 0)
    monkeypatch.setattr(A, "_cuda_device_info", lambda index: ((9, 0), 132))


def rand(*shape, dtype=torch.float16, strided=False):
    if strided:
        B, H, S, D = shape
        return torch.randn(B, S, H, D, dtype=torch.float64).to(dtype).transpose(1, 2)
    return torch.randn(*shape, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("D", [16, 24, 40, 64, 80, 96, 128, 160, 192, 256])
def test_forward_head_dims(seed, D):
    q = rand(1, 2, 70, D, strided=True)
    k, v = rand(1, 1, 93, D), rand(1, 1, 93, D)
    cuda_checks.check_forward(q, k, v, scale=1 / math.sqrt(D))
    cuda_checks.check_forward(q, k, v, scale=1 / math.sqrt(D), window_right=0, align_bottom_right=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sq,sk", [(1, 1), (17, 17), (130, 70), (70, 130)])
def test_forward_lengths_gqa_causal(seed, dtype, sq, sk):
    q = rand(1, 4, sq, 32, dtype=dtype)
    k, v = rand(1, 2, sk, 32, dtype=dtype), rand(1, 2, sk, 32, dtype=dtype)
    cuda_checks.check_forward(q, k, v, scale=0.2)
    cuda_checks.check_forward(q, k, v, scale=0.2, window_right=0, align_bottom_right=True)
    cuda_checks.check_forward(q, k, v, scale=0.2, window_right=0)  # top-left: some rows see no key


def test_forward_window_softcap_alibi(seed):
    B, H, Hk, Sq, Sk, D = 2, 2, 1, 100, 150, 32
    q, k, v = rand(B, H, Sq, D), rand(B, Hk, Sk, D), rand(B, Hk, Sk, D)
    cuda_checks.check_forward(q, k, v, scale=0.1, window_left=40, window_right=7, align_bottom_right=True)
    cuda_checks.check_forward(q, k, v, scale=0.3, softcap=2.0)
    cuda_checks.check_forward(q, k, v, scale=0.1, alibi_slopes=torch.rand(B, H), softcap=30.0, window_left=64,
                            window_right=0, align_bottom_right=True)


def test_forward_varlen(seed):
    lens_q, lens_k = [70, 0, 1, 33], [70, 5, 0, 80]
    cu_q = torch.tensor([0] + torch.tensor(lens_q).cumsum(0).tolist(), dtype=torch.int32)
    cu_k = torch.tensor([0] + torch.tensor(lens_k).cumsum(0).tolist(), dtype=torch.int32)
    q = rand(1, 2, sum(lens_q), 40)
    k, v = rand(1, 1, sum(lens_k), 40), rand(1, 1, sum(lens_k), 40)
    for causal in (False, True):
        cuda_checks.check_forward(q, k, v, scale=0.15, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max(lens_q),
                                max_seqlen_k=max(lens_k), window_right=0 if causal else -1, align_bottom_right=True,
                                alibi_slopes=torch.rand(4, 2))


@pytest.mark.parametrize("H,Hk,Sq", [(4, 1, 1), (2, 2, 1), (4, 2, 3)])
def test_decode_split_kv(seed, H, Hk, Sq):
    B, S_max, D = 3, 300, 64
    q = rand(B, H, Sq, D)
    kc, vc = rand(B, Hk, S_max, D), rand(B, Hk, S_max, D)
    lens = torch.tensor([300, 0, 129], dtype=torch.int32)
    kw = dict(scale=0.125, window_left=-1, window_right=0, softcap=0.0, alibi_slopes=None)
    (ref_out, ref_lse), (low_out, low_lse) = cuda_checks.decode_reference(q, kc, vc, lens, **kw)
    for splits in (1, 3, 7):
        out, lse = A._cuda_decode(q, kc, vc, lens, num_splits=splits, **kw)
        error_vs_reference(out, ref_out, low_out, f"out (splits={splits})")
        cuda_checks.compare_lse(f"lse (splits={splits})", lse, ref_lse, low_lse)
        assert torch.all(out[1] == 0) and torch.all(torch.isneginf(lse[1]))  # an empty cache row


def test_decode_window_softcap_alibi(seed):
    B, H, Hk, D, S_max = 2, 4, 2, 48, 200
    q = rand(B, H, 2, D, dtype=torch.bfloat16)
    kc, vc = rand(B, Hk, S_max, D, dtype=torch.bfloat16), rand(B, Hk, S_max, D, dtype=torch.bfloat16)
    lens = torch.tensor([200, 77], dtype=torch.int32)
    kw = dict(scale=0.1, window_left=50, window_right=0, softcap=20.0, alibi_slopes=torch.rand(B, H))
    (ref_out, ref_lse), (low_out, low_lse) = cuda_checks.decode_reference(q, kc, vc, lens, **kw)
    for splits in (1, 4):
        out, lse = A._cuda_decode(q, kc, vc, lens, num_splits=splits, **kw)
        error_vs_reference(out, ref_out, low_out, f"out (splits={splits})")
        cuda_checks.compare_lse(f"lse (splits={splits})", lse, ref_lse, low_lse)


def paged_cache(B, Hk, page, D, lens, leftpad, pool, max_blocks, dtype):
    """A paged K and V pool (pool, Hk, page, D) and a block table (B, max_blocks) of distinct
    blocks in random order, a column slice of a wider table (rows max_blocks + 3 apart); entries
    of pages a row never reads (past its end, wholly before its left pad) are -1, which the
    kernel must not follow."""
    kc, vc = rand(pool, Hk, page, D, dtype=dtype), rand(pool, Hk, page, D, dtype=dtype)
    wide = torch.full((B, max_blocks + 3), -1, dtype=torch.int32)
    wide[:, :max_blocks] = torch.randperm(pool)[:B * max_blocks].view(B, max_blocks)
    table = wide[:, :max_blocks]
    for b, n in enumerate(lens.tolist()):
        start = 0 if leftpad is None else int(leftpad[b])
        for i in range(max_blocks):
            if i * page >= n or (i + 1) * page <= start:
                table[b, i] = -1
    return kc, vc, table


def check_decode(q, kc, vc, lens, splits, empty_rows=(), **kw):
    (ref_out, ref_lse), (low_out, low_lse) = cuda_checks.decode_reference(q, kc, vc, lens, **kw)
    for n in splits:
        out, lse = A._cuda_decode(q, kc, vc, lens, num_splits=n, **kw)
        error_vs_reference(out, ref_out, low_out, f"out (splits={n})")
        cuda_checks.compare_lse(f"lse (splits={n})", lse, ref_lse, low_lse)
        for b in empty_rows:  # no key to see: out = 0, lse = -inf
            assert torch.all(out[b] == 0) and torch.all(torch.isneginf(lse[b]))


# (page size, dtype, H, Hk, Sq, D, max blocks, pool, lengths, left pads): pages smaller than a
# K/V tile (16, 48: tiles of 64 keys span several pages, 48 straddles), pages of several tiles
# (256 with 64-key tiles, 48 with the 32-key tiles of D = 160).
PAGED_CASES = [
    (16, torch.float16, 4, 2, 1, 64, 12, 40, [192, 0, 77], None),
    (48, torch.bfloat16, 4, 1, 3, 40, 5, 23, [240, 100, 50, 97], [0, 70, 50, 49]),
    (256, torch.float16, 4, 2, 2, 128, 2, 6, [300, 512], [10, 300]),
    (48, torch.bfloat16, 2, 2, 2, 160, 4, 9, [150, 192], [33, 0]),
]


@pytest.mark.parametrize("case", PAGED_CASES,
                         ids=lambda c: f"page{c[0]}-{str(c[1])[6:]}-H{c[2]}Hk{c[3]}Sq{c[4]}D{c[5]}")
def test_decode_paged(seed, case):
    page, dtype, H, Hk, Sq, D, max_blocks, pool, lens, leftpad = case
    B = len(lens)
    lens = torch.tensor(lens, dtype=torch.int32)
    leftpad = None if leftpad is None else torch.tensor(leftpad, dtype=torch.int32)
    kc, vc, table = paged_cache(B, Hk, page, D, lens, leftpad, pool, max_blocks, dtype)
    q = rand(B, H, Sq, D, dtype=dtype)
    empty = [b for b in range(B) if lens[b] == (0 if leftpad is None else leftpad[b])]
    check_decode(q, kc, vc, lens, (1, 3, 7), empty, scale=D ** -0.5, window_left=-1, window_right=0, softcap=0.0,
                 alibi_slopes=None, cache_leftpad=leftpad, block_table=table)
    if page == 48 and Hk == 1:  # the window's lower bound, softcap and ALiBi over pages and a left pad
        check_decode(q, kc, vc, lens, (1, 4), empty, scale=0.1, window_left=60, window_right=0, softcap=20.0,
                     alibi_slopes=torch.rand(B, H), cache_leftpad=leftpad, block_table=table)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_leftpad_cache_batch_idx(seed, dtype):
    B, pool, H, Hk, Sq, D, S_max = 3, 5, 4, 2, 2, 64, 200
    kc, vc = rand(pool, Hk, S_max, D, dtype=dtype), rand(pool, Hk, S_max, D, dtype=dtype)
    lens = torch.tensor([200, 130, 0], dtype=torch.int32)
    leftpad = torch.tensor([37, 130, 0], dtype=torch.int32)  # row 1: nothing left after the pad
    batch_idx = torch.tensor([4, 0, 2], dtype=torch.int32)
    q = rand(B, H, Sq, D, dtype=dtype)
    kw = dict(scale=0.125, window_left=-1, window_right=0, softcap=0.0, alibi_slopes=None)
    check_decode(q, kc[:B], vc[:B], lens, (1, 3), [1, 2], cache_leftpad=leftpad, **kw)
    check_decode(q, kc, vc, lens, (1, 3), [2], cache_batch_idx=batch_idx, **kw)
    leftpad[1] = 65  # past one 64-key tile
    check_decode(q, kc, vc, lens, (1, 3), [2], cache_leftpad=leftpad, cache_batch_idx=batch_idx, **kw)
    # No GQA packing (H == Hk), a window reaching below the pad on some rows only.
    check_decode(q[:, :2], kc, vc, lens, (1, 2), [2], cache_leftpad=leftpad, cache_batch_idx=batch_idx,
                 **dict(kw, window_left=40, softcap=5.0))


@pytest.mark.parametrize("D", [16, 40, 64, 128])
def test_backward_head_dims(seed, D):
    q = rand(1, 2, 70, D, strided=True)
    k, v = rand(1, 1, 93, D), rand(1, 1, 93, D)
    cuda_checks.check_backward(q, k, v, scale=1 / math.sqrt(D))
    cuda_checks.check_backward(q, k, v, scale=1 / math.sqrt(D), window_right=0, align_bottom_right=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_backward_features(seed, dtype):
    B, H, Hk, Sq, Sk, D = 1, 4, 2, 75, 110, 32
    q, k, v = rand(B, H, Sq, D, dtype=dtype), rand(B, Hk, Sk, D, dtype=dtype), rand(B, Hk, Sk, D, dtype=dtype)
    cuda_checks.check_backward(q, k, v, scale=0.2, softcap=3.0, alibi_slopes=torch.rand(H), window_left=40,
                             window_right=5, align_bottom_right=True)
    cuda_checks.check_backward(q, k, v, scale=0.2, window_right=0)  # top-left causal: rows with no key
    cuda_checks.check_backward(k[:, :, :Sq].repeat_interleave(2, 1), k, v, scale=0.2)  # dq/dk sums over query heads


def test_backward_varlen(seed):
    lens_q, lens_k = [40, 0, 1, 33], [40, 5, 0, 70]
    cu_q = torch.tensor([0] + torch.tensor(lens_q).cumsum(0).tolist(), dtype=torch.int32)
    cu_k = torch.tensor([0] + torch.tensor(lens_k).cumsum(0).tolist(), dtype=torch.int32)
    q = rand(1, 2, sum(lens_q), 24)
    k, v = rand(1, 1, sum(lens_k), 24), rand(1, 1, sum(lens_k), 24)
    cuda_checks.check_backward(q, k, v, scale=0.2, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max(lens_q),
                             max_seqlen_k=max(lens_k), window_right=0, align_bottom_right=True)


def test_unaligned_inputs_are_copied(seed):
    base = rand(2 * 40 * 32 + 1)
    q = base[1:].view(1, 2, 40, 32)  # a 2-byte offset: not 16-byte aligned
    assert q.data_ptr() % 16 != 0
    k, v = rand(1, 2, 40, 32), rand(1, 2, 40, 32)
    cuda_checks.check_forward(q, k, v, scale=0.125)


def test_kernel_rejects_what_python_should_have_caught(emulated):
    """The C++ entry point checks its own preconditions (never an out-of-bounds access)."""
    q = rand(1, 1, 8, 32)
    out, lse = torch.empty_like(q), torch.empty(1, 1, 8)
    options = emulated.AttentionOptions(scale=1.0, softcap=0.0, window_left=-1, window_right=-1,
                                        align_bottom_right=False, dropout_p=0.0, seq_first=False)

    def forward(q, k, v, out, splits=1):
        launch = emulated.AttentionCudaLaunch(max_seqlen_q=0, max_seqlen_k=0, pack_gqa=False, num_splits=splits)
        emulated.attention_forward_cuda(q, k, v, out, lse, alibi_slopes=None, cu_seqlens_q=None, cu_seqlens_k=None,
                                        seqused_k=None, out_partial=None, lse_partial=None, options=options,
                                        launch=launch, stream=0)

    q32 = q.float()
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        forward(q32, q32, q32, torch.empty_like(q32))
    padded = rand(1, 1, 8, 36)[..., :32]  # row stride 36 elements: not a multiple of 8
    with pytest.raises(ValueError, match="strides must be multiples of 8"):
        forward(padded, q, q, out)
    with pytest.raises(ValueError, match="out_partial is required"):
        forward(q, q, q, out, splits=2)
