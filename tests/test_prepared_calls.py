"""Prepared eager calls (OpDispatcher.call_prepared): an eager call without autograd whose signature
validated before runs a call prepared once per signature (attention without mask, ALiBi or
dropout; bias_act; sampler_step). It must give exactly what the general path gives (the same
kernel), really run (no trip through the dispatch tables), follow use_backend and
refresh_environment, and hand failures to the general path (fallbacks, warnings)."""
import importlib
import warnings

import pytest
import torch

import genfast
from genfast import _dispatch, _ext
from genfast.ops import attention as A

pytestmark = pytest.mark.skipif(_ext._C is None, reason="the genfast._C extension is not built")


@pytest.fixture
def table_runs(monkeypatch):
    """Counts the general path's runs of the FORWARD and DECODE tables."""
    counts = {"FORWARD": 0, "DECODE": 0}
    for name in counts:
        table = getattr(A, name)

        def run(*args, _inner=table.run, _name=name, **kwargs):
            counts[_name] += 1
            return _inner(*args, **kwargs)

        monkeypatch.setattr(table, "run", run)
    return counts


def _general(fn, *tensors, **kwargs):
    """The same call through the general path: no signature (so no prepared call), inputs that
    require grad (the general autograd function, same forward kernel)."""
    from unittest import mock

    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    with mock.patch.object(A, "_sdpa_signature", lambda *a: None), \
            mock.patch.object(A, "_flash_signature", lambda *a: None):
        out = fn(*leaves, **kwargs)
    return out.detach() if isinstance(out, torch.Tensor) else tuple(o if o is None else o.detach() for o in out)


def _strided(*shape, dtype=torch.float32):
    """A non-contiguous tensor of ``shape`` with unit last stride (every other batch row of a
    bigger one)."""
    return torch.randn(shape[0] * 2, *shape[1:], dtype=dtype)[::2]


SDPA_CASES = [
    dict(shape=(2, 3, 5, 16), causal=False),
    dict(shape=(1, 4, 7, 32), causal=True),
    dict(shape=(3, 9, 16), causal=True),  # 3-D: one head
    dict(shape=(2, 2, 2, 6, 16), causal=False),  # extra batch dims
]


@pytest.mark.parametrize("case", SDPA_CASES, ids=lambda c: "x".join(map(str, c["shape"])))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sdpa_prepared_equals_general_path(case, dtype, seed, table_runs):
    shape = case["shape"]
    q, k, v = (_strided(*shape, dtype=dtype) for _ in range(3))
    expected = _general(genfast.scaled_dot_product_attention, q, k, v, is_causal=case["causal"], return_lse=True)
    runs = table_runs["FORWARD"]
    for _ in range(3):  # the first call prepares, the others reuse
        out, lse = genfast.scaled_dot_product_attention(q, k, v, is_causal=case["causal"], return_lse=True)
        torch.testing.assert_close(out, expected[0], rtol=0, atol=0)
        torch.testing.assert_close(lse, expected[1], rtol=0, atol=0)
    assert table_runs["FORWARD"] == runs, "the prepared call went through the dispatch table"


FLASH_CASES = [
    dict(q=(2, 5, 4, 16), k=(2, 7, 2, 16), causal=True, window=(-1, -1), softcap=0.0),  # GQA
    dict(q=(1, 9, 3, 32), k=(1, 9, 3, 32), causal=False, window=(3, 2), softcap=0.0),
    dict(q=(2, 1, 6, 16), k=(2, 11, 1, 16), causal=False, window=(-1, -1), softcap=5.0),  # MQA
    dict(q=(1, 40, 2, 64), k=(1, 40, 2, 64), causal=True, window=(-1, -1), softcap=0.0),  # several query tiles
]


@pytest.mark.parametrize("case", FLASH_CASES, ids=lambda c: f"q{'x'.join(map(str, c['q']))}")
@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "strided"])
def test_flash_attn_func_prepared_equals_general_path(case, contiguous, seed, table_runs):
    make = (lambda *s: torch.randn(*s)) if contiguous else _strided
    q, k, v = make(*case["q"]), make(*case["k"]), make(*case["k"])
    kwargs = dict(causal=case["causal"], window_size=case["window"], softcap=case["softcap"], return_attn_probs=True)
    expected = _general(genfast.flash_attn_func, q, k, v, **kwargs)
    runs = table_runs["FORWARD"]
    for _ in range(2):
        out, lse, _ = genfast.flash_attn_func(q, k, v, **kwargs)
        assert out.shape == q.shape and out.is_contiguous()
        torch.testing.assert_close(out, expected[0], rtol=0, atol=0)
        torch.testing.assert_close(lse, expected[1], rtol=0, atol=0)
    assert table_runs["FORWARD"] == runs
    # And against the specification.
    ref = genfast.flash_attn_func(q.double(), k.double(), v.double(), causal=case["causal"],
                                  window_size=case["window"], softcap=case["softcap"], backend="reference")
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.fixture
def backward_runs(monkeypatch):
    """Counts the general path's runs of the BACKWARD table."""
    counts = {"BACKWARD": 0}
    inner = A.BACKWARD.run

    def run(*args, **kwargs):
        counts["BACKWARD"] += 1
        return inner(*args, **kwargs)

    monkeypatch.setattr(A.BACKWARD, "run", run)
    return counts


GRAD_CASES = [
    ("sdpa", dict(shape=(2, 3, 7, 16), causal=True)),
    ("sdpa", dict(shape=(3, 9, 32), causal=False)),  # 3-D
    ("flash", dict(q=(2, 5, 4, 16), k=(2, 7, 2, 16), causal=True, window=(-1, -1), softcap=0.0)),  # GQA
    ("flash", dict(q=(1, 9, 3, 32), k=(1, 9, 3, 32), causal=False, window=(3, 2), softcap=5.0)),
]


@pytest.mark.parametrize("api,case", GRAD_CASES, ids=lambda c: c if isinstance(c, str) else "")
def test_gradients_through_prepared_calls_equal_general_path(api, case, seed, table_runs, backward_runs):
    """Inputs that require grad: a validated signature runs forward and backward through prepared
    calls (no dispatch table either way), with exactly the general path's outputs and gradients,
    also for a non-contiguous (expanded) output gradient."""
    if api == "sdpa":
        q, k, v = (_strided(*case["shape"]) for _ in range(3))
        fn, kwargs = genfast.scaled_dot_product_attention, dict(is_causal=case["causal"])
    else:
        q, k, v = _strided(*case["q"]), _strided(*case["k"]), _strided(*case["k"])
        fn = genfast.flash_attn_func
        kwargs = dict(causal=case["causal"], window_size=case["window"], softcap=case["softcap"])

    def grads(general: bool, dout):
        from unittest import mock

        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        with mock.patch.object(A, "_sdpa_signature", lambda *a: None) if general else mock.MagicMock(), \
                mock.patch.object(A, "_flash_signature", lambda *a: None) if general else mock.MagicMock():
            out = fn(*leaves, **kwargs)
            out.backward(dout)
        return [out.detach()] + [t.grad for t in leaves]

    for dout in (torch.randn(q.shape), torch.randn(q.shape[-1]).expand(q.shape)):
        expected = grads(True, dout)
        grads(False, dout)  # validates the signature, prepares
        runs, back = table_runs["FORWARD"], backward_runs["BACKWARD"]
        got = grads(False, dout)
        assert (table_runs["FORWARD"], backward_runs["BACKWARD"]) == (runs, back), "a table ran"
        for name, a, b in zip(("out", "dq", "dk", "dv"), got, expected):
            assert a.shape == b.shape, name
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    ref = fn(*(t.double().requires_grad_() for t in (q, k, v)), **kwargs, backend="reference")
    torch.testing.assert_close(got[0].double(), ref.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seqlens_kind", ["int", "tensor", "append"])
def test_kvcache_prepared_equals_general_path(seqlens_kind, seed, table_runs):
    B, S_max, H, Hk, D = 3, 12, 4, 2, 16
    q = torch.randn(B, 1, H, D)
    k_cache, v_cache = torch.randn(B, S_max, Hk, D), torch.randn(B, S_max, Hk, D)
    if seqlens_kind == "int":
        cache_seqlens, k, v = 9, None, None
        lengths = torch.full((B,), 9, dtype=torch.int32)
    else:
        cache_seqlens = torch.tensor([3, 11, 6], dtype=torch.int32)
        k = v = None
        if seqlens_kind == "append":
            cache_seqlens = cache_seqlens - 1
            k, v = torch.randn(B, 1, Hk, D), torch.randn(B, 1, Hk, D)
        lengths = cache_seqlens + (0 if k is None else 1)
    # The general path: the registered decode op on the contract's views.
    kc0, vc0 = k_cache.clone(), v_cache.clone()
    if k is not None:
        rows = cache_seqlens.long()
        kc0[torch.arange(B), rows], vc0[torch.arange(B), rows] = k[:, 0], v[:, 0]
    expected, expected_lse = A.attention_decode(q.transpose(1, 2), kc0.transpose(1, 2), vc0.transpose(1, 2), lengths,
                                                None, A.SCALE_FROM_HEAD_DIM, -1, 0, 0.0, 0, "")
    for i in range(2):
        kc, vc = k_cache.clone(), v_cache.clone()
        out, lse = genfast.flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=cache_seqlens, causal=True,
                                                   return_softmax_lse=True)
        if i == 0:
            runs = table_runs["DECODE"]
        torch.testing.assert_close(out, expected.transpose(1, 2), rtol=0, atol=0)
        torch.testing.assert_close(lse, expected_lse, rtol=0, atol=0)
        torch.testing.assert_close(kc, kc0, rtol=0, atol=0)
    assert table_runs["DECODE"] == runs


class _CountingExtension:
    """The extension with its entry points' calls counted by name."""

    def __init__(self, real):
        self.real, self.calls = real, {}

    def __getattr__(self, name):
        fn = getattr(self.real, name)
        if not callable(fn) or isinstance(fn, type):
            return fn

        def counted(*args, **kwargs):
            self.calls[name] = self.calls.get(name, 0) + 1
            return fn(*args, **kwargs)
        return counted


@pytest.mark.parametrize("layout", ["rows", "paged", "batch_idx"])
def test_cpu_decode_step_is_one_native_call(layout, seed, monkeypatch):
    """A CPU decode step that appends k, v: the index checks, the append and the attention in one
    call of the extension (no separate check, append or add), same cache and output as the
    reference backend."""
    B, H, Hk, D, page = 3, 4, 2, 16, 16
    q, k, v = torch.randn(B, 1, H, D), torch.randn(B, 1, Hk, D), torch.randn(B, 1, Hk, D)
    lengths = torch.tensor([5, 16, 0], dtype=torch.int32)  # 16: the new token opens a page
    index = {}
    if layout == "paged":
        k_cache, v_cache = torch.randn(7, page, Hk, D), torch.randn(7, page, Hk, D)
        index["block_table"] = torch.tensor([[6, 2], [0, 4], [3, 1]], dtype=torch.int32)
    elif layout == "batch_idx":
        k_cache, v_cache = torch.randn(5, 20, Hk, D), torch.randn(5, 20, Hk, D)
        index["cache_batch_idx"] = torch.tensor([4, 0, 2], dtype=torch.int32)
        index["cache_leftpad"] = torch.tensor([2, 3, 0], dtype=torch.int32)
    else:
        k_cache, v_cache = torch.randn(B, 20, Hk, D), torch.randn(B, 20, Hk, D)
    kc_ref, vc_ref = k_cache.clone(), v_cache.clone()
    expected = genfast.flash_attn_with_kvcache(q, kc_ref, vc_ref, k, v, cache_seqlens=lengths, causal=True,
                                               backend="reference", **index)
    counting = _CountingExtension(_ext._C)
    monkeypatch.setattr(_ext, "_C", counting)
    for _ in range(2):  # the first call of the signature and a prepared one
        kc, vc = k_cache.clone(), v_cache.clone()
        out = genfast.flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=lengths, causal=True, **index)
        torch.testing.assert_close(kc, kc_ref, rtol=0, atol=0)
        torch.testing.assert_close(vc, vc_ref, rtol=0, atol=0)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert counting.calls == {"attention_forward_cpu": 2}, counting.calls


@pytest.mark.parametrize("bad", ["too_long", "negative", "k_shape"])
def test_cpu_decode_step_checks_before_writing(bad, seed):
    """Bad index values or new-token shapes in a CPU decode step of a plain cache: a clear error,
    the cache untouched (every check runs before the append; the paged and indexed cases are in
    test_attention_paged.py)."""
    B, H, Hk, D, S_max = 2, 2, 1, 16, 16
    q, k, v = torch.randn(B, 1, H, D), torch.randn(B, 1, Hk, D), torch.randn(B, 1, Hk, D)
    lengths = torch.tensor([3, 7], dtype=torch.int32)
    k_cache, v_cache = torch.randn(B, S_max, Hk, D), torch.randn(B, S_max, Hk, D)
    if bad == "too_long":
        lengths[1], match = S_max, r"cache_seqlens\[1\] = 16 \+ 1 new tokens needs 17; the cache is too small"
    elif bad == "negative":
        lengths[0], match = -1, r"cache_seqlens\[0\] = -1 must be >= 0"
    else:
        k, match = torch.randn(B, 1, Hk + 1, D), r"k must have shape"
    kc, vc = k_cache.clone(), v_cache.clone()
    for _ in range(2):
        with pytest.raises(ValueError, match=match):
            genfast.flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=lengths)
        torch.testing.assert_close(kc, k_cache, rtol=0, atol=0)
        torch.testing.assert_close(vc, v_cache, rtol=0, atol=0)


def test_prepared_calls_follow_use_backend_and_refresh(seed, monkeypatch):
    q, k, v = (torch.randn(1, 2, 5, 16) for _ in range(3))
    reference_calls = []
    inner = A.FORWARD.backends["reference"].fn
    monkeypatch.setattr(A.FORWARD.backends["reference"], "fn",
                        lambda *a, **kw: reference_calls.append(1) or inner(*a, **kw))
    A.FORWARD.plans.clear()
    genfast.scaled_dot_product_attention(q, k, v)  # prepared for the automatic choice (cpu)
    with genfast.use_backend("reference"):
        ref = genfast.scaled_dot_product_attention(q, k, v)
        genfast.scaled_dot_product_attention(q, k, v)
    assert len(reference_calls) == 2
    genfast.scaled_dot_product_attention(q, k, v)
    assert len(reference_calls) == 2  # the context's plan did not leak out of it
    monkeypatch.setenv("GENFAST_BACKEND", "attention=reference")
    _dispatch.refresh_environment()
    torch.testing.assert_close(genfast.scaled_dot_product_attention(q, k, v), ref, rtol=0, atol=0)
    assert len(reference_calls) == 3


def test_failing_prepared_call_falls_back_with_one_warning(seed, monkeypatch):
    """A native kernel that fails: the general path marks it broken and falls back (not strict)."""
    monkeypatch.setenv("GENFAST_STRICT", "0")
    _dispatch.refresh_environment()
    monkeypatch.setattr(A.FORWARD, "broken", {})
    q, k, v = (torch.randn(1, 2, 3, 16) for _ in range(3))
    genfast.scaled_dot_product_attention(q, k, v)  # prepared with the real kernel

    class Failing:
        def __getattr__(self, name):
            if name == "attention_forward_cpu":
                def fail(*args, **kwargs):
                    raise RuntimeError("kernel failed")
                return fail
            return getattr(real, name)

    real = _ext._C
    monkeypatch.setattr(_ext, "_C", Failing())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        A.FORWARD.plans.clear()  # as if first seen with the failing kernel
        out = genfast.scaled_dot_product_attention(q, k, v)
        genfast.scaled_dot_product_attention(q, k, v)
    ref = genfast.scaled_dot_product_attention(q, k, v, backend="reference")
    torch.testing.assert_close(out, ref)
    messages = [str(w.message) for w in caught if issubclass(w.category, genfast.BackendWarning)]
    assert len(messages) == 1 and "kernel failed" in messages[0], messages


def test_native_forward_takes_flash_layout_and_strided_out(seed):
    B, S, H, Hk, D = 2, 6, 4, 2, 16
    q, k, v = torch.randn(B, S, H, D), torch.randn(B, S, Hk, D), torch.randn(B, S, Hk, D)

    def forward(q, k, v, out, seq_first):
        lse = torch.empty(B, H, S)
        _ext._C.attention_forward_cpu(q, k, v, out, lse, bias=None, alibi_slopes=None, cu_seqlens_q=None,
                                      cu_seqlens_k=None, seqused_k=None, keep_mask=None, seed=0,
                                      options=A._options(0.3, 0.0, -1, 0, True, 0.0, seq_first), num_threads=1)
        return out, lse

    heads = [t.transpose(1, 2).contiguous() for t in (q, k, v)]
    expected, expected_lse = forward(*heads, torch.empty(B, H, S, D), False)
    out, lse = forward(q, k, v, torch.empty(B, S, H, D), True)
    torch.testing.assert_close(out.transpose(1, 2), expected, rtol=0, atol=0)
    torch.testing.assert_close(lse, expected_lse, rtol=0, atol=0)
    strided_out = torch.empty(B, S, H, D).transpose(1, 2)  # (B, H, S, D) view of a flash-layout buffer
    forward(*heads, strided_out, False)
    torch.testing.assert_close(strided_out, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="out must have unit stride"):
        forward(*heads, torch.empty(B, H, S, 2 * D)[..., ::2], False)
    with pytest.raises(ValueError, match="out must have the shape of q"):
        forward(q, k, v, torch.empty(B, H, S, D), True)  # seq_first: out in q's (B, S, H, D) layout


def test_native_forward_appends_only_in_a_decode():
    """k_new / v_new of the CPU forward: both or neither, and only with the decode's seq_first
    layout and seqused_k."""
    q, cache, new = torch.randn(1, 1, 2, 16), torch.randn(1, 8, 2, 16), torch.randn(1, 1, 2, 16)
    lengths = torch.tensor([3], dtype=torch.int32)

    def forward(seq_first, seqused_k, **new_tokens):
        _ext._C.attention_forward_cpu(q, cache, cache.clone(), torch.empty_like(q), torch.empty(1, 2, 1), bias=None,
                                      alibi_slopes=None, cu_seqlens_q=None, cu_seqlens_k=None, seqused_k=seqused_k,
                                      keep_mask=None, seed=0, options=A._options(0.25, 0.0, -1, -1, True, 0.0,
                                                                                 seq_first), num_threads=1,
                                      **new_tokens)

    with pytest.raises(ValueError, match="k_new and v_new go together"):
        forward(True, lengths, k_new=new)
    with pytest.raises(ValueError, match="they need seq_first, seqused_k and no cu_seqlens"):
        forward(True, None, k_new=new, v_new=new)
    with pytest.raises(ValueError, match="they need seq_first, seqused_k and no cu_seqlens"):
        forward(False, lengths, k_new=new, v_new=new)
    forward(True, lengths, k_new=new, v_new=new)


def test_native_backward_rejects_seq_first():
    q = torch.randn(1, 2, 3, 16)
    with pytest.raises(ValueError, match="seq_first is an option of the CPU forward only"):
        _ext._C.attention_backward_cpu(q, q, q, q, q, torch.empty(1, 2, 3), torch.empty_like(q),
                                       torch.empty_like(q), torch.empty_like(q), bias=None, alibi_slopes=None,
                                       cu_seqlens_q=None, cu_seqlens_k=None, seed=0,
                                       options=A._options(0.25, 0.0, -1, -1, False, 0.0, True), num_threads=1)


def test_bias_act_prepared_equals_general_path(seed, monkeypatch):
    B = importlib.import_module("genfast.ops.bias_act")  # the attribute genfast.ops.bias_act is the function

    runs = []
    inner = B.DISPATCH.run
    monkeypatch.setattr(B.DISPATCH, "run", lambda *a, **kw: runs.append(1) or inner(*a, **kw))
    for shape, dim in (((3, 5, 4, 2), 1), ((6, 7), 1), ((2, 9), 0)):
        x, b = torch.randn(*shape), torch.randn(shape[dim])
        kwargs = dict(dim=dim, act="lrelu", clamp=0.7)
        expected = _general(genfast.ops.bias_act, x, b, **kwargs)
        genfast.ops.bias_act(x, b, **kwargs)  # prepares
        count = len(runs)
        torch.testing.assert_close(genfast.ops.bias_act(x, b, **kwargs), expected, rtol=0, atol=0)
        assert len(runs) == count, "the prepared call went through the dispatch table"
    xt, b = torch.randn(5, 3).t(), torch.randn(3)  # not contiguous: the general path keeps its layout
    count = len(runs)
    out = genfast.ops.bias_act(xt, b, dim=0, act="relu")
    assert len(runs) == count + 1 and out.stride() == xt.stride()
    torch.testing.assert_close(out, genfast.ops.bias_act(xt.contiguous(), b, dim=0, act="relu"), rtol=0, atol=0)


def test_sampler_step_prepared_equals_general_path(seed, monkeypatch):
    D = importlib.import_module("genfast.ops.diffusion")

    runs = []
    table = D.DISPATCH["sampler_step"]
    inner = table.run
    monkeypatch.setattr(table, "run", lambda *a, **kw: runs.append(1) or inner(*a, **kw))
    x, m, h = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4)
    coefs = torch.randn(16, dtype=torch.float64).float()
    for kwargs in (dict(history=h, x0_clamp=1.5), dict(noise_seed=1234), dict(x0_clamp=torch.tensor([0.5, 2.0]),
                                                                               x0_rescale=True)):
        with monkeypatch.context() as off:  # the general path: the same kernel through the table
            off.setattr(D, "_eager_step", lambda *args: None)
            expected = genfast.ops.sampler_step(x, m, coefs, **kwargs)
        genfast.ops.sampler_step(x, m, coefs, **kwargs)  # prepares
        count = len(runs)
        prev, aux = genfast.ops.sampler_step(x, m, coefs, **kwargs)
        assert len(runs) == count, f"the prepared call went through the dispatch table ({kwargs})"
        torch.testing.assert_close(prev, expected[0], rtol=0, atol=0)
        torch.testing.assert_close(aux, expected[1], rtol=0, atol=0)
        prev_only, none = genfast.ops.sampler_step(x, m, coefs, return_aux=False, **kwargs)
        assert none is None
        torch.testing.assert_close(prev_only, expected[0], rtol=0, atol=0)
    count = len(runs)  # a channels-last sample: the general path
    xc = x.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(genfast.ops.sampler_step(xc, m, coefs)[0], genfast.ops.sampler_step(x, m, coefs)[0],
                               rtol=0, atol=0)
    assert len(runs) == count + 1


def test_sampler_step_in_loop_equals_sampler_step(seed, monkeypatch):
    """The schedulers' fast path: bitwise what sampler_step gives, without the dispatch table;
    None (the caller's cue for sampler_step) for non-contiguous tensors, autograd, a subclass
    and inside a dispatch mode; sampler_step's errors at the first call of a bad signature;
    and a scheduler loop really takes it (with its results unchanged)."""
    D = importlib.import_module("genfast.ops.diffusion")
    runs = []
    table = D.DISPATCH["sampler_step"]
    inner = table.run
    monkeypatch.setattr(table, "run", lambda *a, **kw: runs.append(1) or inner(*a, **kw))
    x, m, h, h2, z = (torch.randn(2, 3, 5, 4) for _ in range(5))
    coefs = torch.randn(16, dtype=torch.float64).float()
    for kwargs in (dict(), dict(history=h), dict(history=h, history2=h2, noise=z), dict(out_dtype=torch.float64)):
        expected = genfast.ops.sampler_step(x, m, coefs, **kwargs)
        count = len(runs)
        got = D.sampler_step_in_loop(x, m, coefs, kwargs.get("history"), kwargs.get("history2"),
                                     kwargs.get("noise"), kwargs.get("out_dtype"))
        assert len(runs) == count, f"the loop's fast path went through the dispatch table ({kwargs})"
        for a, b in zip(got, expected):
            assert a.dtype == b.dtype and torch.equal(a, b), kwargs
    assert D.sampler_step_in_loop(x.transpose(2, 3), m.transpose(2, 3), coefs) is None
    assert D.sampler_step_in_loop(x, m.clone().requires_grad_(), coefs) is None
    with torch.no_grad():
        assert D.sampler_step_in_loop(x, m.clone().requires_grad_(), coefs) is not None
    assert D.sampler_step_in_loop(torch.nn.Parameter(x), m, coefs) is None
    from torch.utils._python_dispatch import TorchDispatchMode

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Passthrough():
        assert D.sampler_step_in_loop(x, m, coefs) is None
    with pytest.raises(ValueError, match="model_output"):
        D.sampler_step_in_loop(x, torch.randn(2, 3, 5, 5), coefs)
    with pytest.raises(TypeError, match="coefs"):
        D.sampler_step_in_loop(x, m, coefs.to(torch.float16))

    taken = []
    real = D.sampler_step_in_loop
    monkeypatch.setattr(genfast.schedulers._ops, "sampler_step_in_loop",
                        lambda *a: taken.append(1) or real(*a))
    outs = []
    for _ in range(2):
        s = genfast.schedulers.DPMSolverMultistepScheduler()
        s.set_timesteps(6)
        y = x
        for t in s.timesteps:
            y = s.step(torch.tanh(y), t, y).prev_sample
        outs.append(y)
        monkeypatch.setattr(genfast.schedulers._ops, "sampler_step_in_loop", lambda *a: None)
    assert len(taken) == 6 and torch.equal(outs[0], outs[1])


def test_group_norm_prepared_equals_general_path(seed, monkeypatch):
    G = importlib.import_module("genfast.ops.group_norm")  # the attribute genfast.ops.group_norm is the function
    runs = []
    inner = G.DISPATCH.run
    monkeypatch.setattr(G.DISPATCH, "run", lambda *a, **kw: runs.append(1) or inner(*a, **kw))
    for shape, groups, affine, activation in (((2, 6, 5, 3), 3, True, "silu"), ((3, 8, 7), 4, False, None),
                                              ((1, 4), 2, True, None)):
        x = torch.randn(*shape) * 2 + 0.5
        w, b = (torch.randn(shape[1]), torch.randn(shape[1])) if affine else (None, None)
        kwargs = dict(activation=activation)
        with monkeypatch.context() as off:  # the general path: the same kernel through the table
            off.setattr(G.DISPATCH, "call_prepared", lambda *args: None)
            expected = genfast.ops.group_norm(x, groups, w, b, **kwargs)
        genfast.ops.group_norm(x, groups, w, b, **kwargs)  # prepares
        count = len(runs)
        torch.testing.assert_close(genfast.ops.group_norm(x, groups, w, b, **kwargs), expected, rtol=0, atol=0)
        assert len(runs) == count, f"the prepared call went through the dispatch table ({shape})"
    xc = torch.randn(2, 6, 4, 4).contiguous(memory_format=torch.channels_last)  # the general path keeps NHWC
    count = len(runs)
    y = genfast.ops.group_norm(xc, 3)
    assert len(runs) == count + 1 and y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("target", [None, "v_prediction"])
def test_add_noise_prepared_equals_general_path(target, seed, monkeypatch):
    D = importlib.import_module("genfast.ops.diffusion")
    table = D.DISPATCH["add_noise"]
    runs = []
    inner = table.run
    monkeypatch.setattr(table, "run", lambda *a, **kw: runs.append(1) or inner(*a, **kw))
    x0, noise = torch.randn(3, 4, 5, 2), torch.randn(3, 4, 5, 2)
    t = torch.tensor([7, 0, 19])
    signal, noise_scale = torch.rand(20), torch.rand(20)
    for kwargs in (dict(noise=noise), dict(noise=None, noise_seed=77)):
        args = (x0, kwargs["noise"], t, signal, noise_scale, target)
        extra = {k: v for k, v in kwargs.items() if k != "noise"}
        with monkeypatch.context() as off:  # the general path: the same kernel through the table
            off.setattr(table, "call_prepared", lambda *args: None)
            expected = genfast.ops.add_noise(*args, **extra)
        genfast.ops.add_noise(*args, **extra)  # prepares
        count = len(runs)
        got = genfast.ops.add_noise(*args, **extra)
        assert len(runs) == count, f"the prepared call went through the dispatch table ({kwargs})"
        for g, e in zip(*((got, expected) if target else ((got,), (expected,)))):
            torch.testing.assert_close(g, e, rtol=0, atol=0)
    count = len(runs)  # int32 timesteps: the general path converts them
    torch.testing.assert_close(genfast.ops.add_noise(x0, noise, t.int(), signal, noise_scale),
                               genfast.ops.add_noise(x0, noise, t, signal, noise_scale), rtol=0, atol=0)
    assert len(runs) == count + 1


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_diffusion_loss_prepared_equals_general_path(reduction, seed, monkeypatch):
    """diffusion_loss without gradients: the prepared per-sample sums (no dispatch table) give the
    general path's result bitwise; on the CPU the batch reduction is done once in float64 on the
    host (exact sum, one rounding), so it matches the float64 loss to the output's rounding."""
    D = importlib.import_module("genfast.ops.diffusion")
    table = D.DISPATCH["per_sample_sums"]
    runs = []
    inner = table.run
    monkeypatch.setattr(table, "run", lambda *a, **kw: runs.append(1) or inner(*a, **kw))
    m, t = torch.randn(5, 3, 4, 4), torch.randn(5, 3, 4, 4)
    with monkeypatch.context() as off:
        off.setattr(table, "call_prepared", lambda *args: None)
        expected = genfast.ops.diffusion_loss(m, t, reduction=reduction)
    genfast.ops.diffusion_loss(m, t, reduction=reduction)  # prepares
    count = len(runs)
    got = genfast.ops.diffusion_loss(m, t, reduction=reduction)
    assert len(runs) == count, "the prepared call went through the dispatch table"
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    per_sample = ((m.double() - t.double()) ** 2).flatten(1).mean(1)
    exact = {"mean": per_sample.mean(), "sum": per_sample.sum(), "none": per_sample}[reduction]
    assert got.dtype == torch.float32 and got.shape == exact.shape
    torch.testing.assert_close(got, exact.float(), rtol=0, atol=0)  # float64 math, one rounding
    strided = genfast.ops.diffusion_loss(m.transpose(2, 3), t.transpose(2, 3), reduction=reduction)
    torch.testing.assert_close(strided.double(), exact, rtol=1e-6, atol=0)  # general path, another layout


def test_prepared_calls_read_the_thread_count_at_each_call(seed, monkeypatch):
    """A call prepared once passes torch's current thread count to the kernel at every call:
    torch.set_num_threads between calls is obeyed (a count fixed at the first call was a bug:
    a set_num_threads(1) run after a 2-thread one ran on two threads)."""
    real, seen = _ext._C, []

    class Spy:  # the extension, recording each CPU entry's num_threads
        def __getattr__(self, name):
            fn = getattr(real, name)
            if not name.endswith("_cpu"):
                return fn
            return lambda *args, **kwargs: seen.append(kwargs.get("num_threads")) or fn(*args, **kwargs)

    monkeypatch.setattr(_ext, "_C", Spy())
    _dispatch.refresh_environment()  # clears every prepared call: the next ones capture the spy
    big = (1, 4, 512, 64)  # past the attention and elementwise one-thread thresholds
    q, k, v = (torch.randn(*big) for _ in range(3))
    q1, kc, vc = torch.randn(2, 1, 4, 64), torch.randn(2, 1024, 4, 64), torch.randn(2, 1024, 4, 64)
    x = torch.randn(2, 64, 32, 32)
    coefs = torch.randn(16)
    calls = {
        "sdpa": lambda: genfast.scaled_dot_product_attention(q, k, v),
        "kvcache": lambda: genfast.flash_attn_with_kvcache(q1, kc, vc, cache_seqlens=1000),
        "bias_act": lambda: genfast.ops.bias_act(x, torch.randn(64), act="lrelu"),
        "group_norm": lambda: genfast.ops.group_norm(x, 8, activation="silu"),
        "sampler_step": lambda: genfast.ops.sampler_step(x, x, coefs),
    }
    threads = torch.get_num_threads()
    try:
        for name, call in calls.items():
            counts = []
            for n in (2, 1, 2):
                torch.set_num_threads(n)
                seen.clear()
                call()
                assert seen, f"{name}: no CPU kernel ran"
                counts.append(seen[-1])
            assert counts == [2, 1, 2], f"{name}: num_threads passed {counts} after set_num_threads 2, 1, 2"
    finally:
        torch.set_num_threads(threads)
        monkeypatch.undo()
        _dispatch.refresh_environment()
