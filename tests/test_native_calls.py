"""The extension's typed entry points (csrc/tensor_view.h): tensors are read from torch tensors
by the bindings and checked against each other, options are named and complete, so a wrong,
swapped or missing argument raises a clear error instead of reaching a kernel."""
import pytest
import torch

from genfast import _ext
from genfast.ops import attention

pytestmark = pytest.mark.skipif(_ext._C is None, reason="the genfast._C extension is not built")


def test_dtype_codes_come_from_the_extension():
    codes = _ext._C.DTYPE_CODES
    assert {"float32", "float16", "bfloat16", "float64", "int32", "int64", "bool"} <= set(codes)
    assert len(set(codes.values())) == len(codes)
    assert all(_ext.DTYPE_CODES[getattr(torch, name)] == code for name, code in codes.items())


def _options(**overrides):
    fields = dict(scale=0.25, softcap=0.0, window_left=-1, window_right=-1, align_bottom_right=False, dropout_p=0.0,
                  seq_first=False)
    fields.update(overrides)
    return _ext._C.AttentionOptions(**fields)


def test_options_need_every_field_by_name():
    o = _options(scale=0.5, window_left=3)
    assert (o.scale, o.window_left, o.window_right) == (0.5, 3, -1)
    with pytest.raises(TypeError):
        _ext._C.AttentionOptions(scale=0.25, softcap=0.0, window_left=-1, window_right=-1, align_bottom_right=False,
                                 dropout_p=0.0)
    with pytest.raises(TypeError):
        _options(scale=0.25, causal=True)  # unknown field
    with pytest.raises(TypeError):
        _ext._C.AttentionOptions(0.25, 0.0, -1, -1, False, 0.0, False)  # positional: not accepted
    with pytest.raises(ValueError, match="dropout_p"):
        _options(dropout_p=1.0)
    with pytest.raises(ValueError, match="NaN"):
        _options(scale=float("nan"))


def _forward_args(B=2, H=4, Hk=2, Sq=5, Sk=7, D=16, dtype=torch.float32):
    q = torch.randn(B, H, Sq, D, dtype=dtype)
    k, v = torch.randn(B, Hk, Sk, D, dtype=dtype), torch.randn(B, Hk, Sk, D, dtype=dtype)
    out, lse = torch.empty_like(q), torch.empty(B, H, Sq, dtype=torch.float32)
    return dict(q=q, k=k, v=v, out=out, lse=lse)


def _forward(**args):
    kwargs = dict(bias=None, alibi_slopes=None, cu_seqlens_q=None, cu_seqlens_k=None, seqused_k=None,
                  keep_mask=None, seed=0, options=_options(), num_threads=1)
    kwargs.update({k: args.pop(k) for k in list(args) if k in kwargs})
    _ext._C.attention_forward_cpu(args["q"], args["k"], args["v"], args["out"], args["lse"], **kwargs)


def test_forward_entry_computes_attention():
    a = _forward_args()
    _forward(**a)
    k, v = (t.repeat_interleave(2, dim=1) for t in (a["k"], a["v"]))
    ref = torch.softmax(a["q"] @ k.transpose(-1, -2) * 0.25, -1) @ v
    torch.testing.assert_close(a["out"], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case, error, message", [
    (dict(out=torch.empty(2, 4, 5, 8)), ValueError, "out must have the shape of q"),
    (dict(lse=torch.empty(2, 4, 5, dtype=torch.float64)), TypeError, "lse must be float32"),
    (dict(v=torch.randn(2, 2, 6, 16)), ValueError, "v must have the shape of k"),
    (dict(k=torch.randn(2, 3, 7, 16), v=torch.randn(2, 3, 7, 16)), ValueError, "multiple of the key heads"),
    (dict(k=torch.randn(2, 2, 7, 16, dtype=torch.float64)), TypeError, "k must be float32"),
    (dict(out=None), ValueError, "out is required"),
    (dict(q=torch.randn(2, 4, 5, 16)[..., ::2].repeat(1, 1, 1, 2)[..., ::2]), ValueError, "unit stride"),
    (dict(alibi_slopes=torch.rand(3)), ValueError, r"alibi_slopes must have shape \(4\)"),
    (dict(seqused_k=torch.tensor([3, 4], dtype=torch.int64)), TypeError, "seqused_k must be int32"),
    (dict(cu_seqlens_q=torch.tensor([0, 5], dtype=torch.int32)), ValueError, "go together"),
    (dict(bias=torch.randn(2, 4, 5, 6)), ValueError, "bias must have shape"),
    (dict(num_threads=0), ValueError, "num_threads"),
])
def test_forward_entry_rejects_bad_arguments(case, error, message):
    a = _forward_args()
    a.update(case)
    with pytest.raises(error, match=message):
        _forward(**a)


def test_swapped_tensors_raise_instead_of_reading_past_the_end():
    a = _forward_args(Sq=5, Sk=7)
    with pytest.raises(ValueError, match="out must have the shape of q"):
        _ext._C.attention_forward_cpu(a["q"], a["k"], a["v"], a["k"], a["lse"], bias=None, alibi_slopes=None,
                                      cu_seqlens_q=None, cu_seqlens_k=None, seqused_k=None, keep_mask=None, seed=0,
                                      options=_options(), num_threads=1)
    with pytest.raises(ValueError, match="lse must have shape"):
        _ext._C.attention_forward_cpu(a["q"], a["k"], a["v"], a["out"], torch.empty(2, 4, 7), bias=None,
                                      alibi_slopes=None, cu_seqlens_q=None, cu_seqlens_k=None, seqused_k=None,
                                      keep_mask=None, seed=0, options=_options(), num_threads=1)


def test_entry_rejects_non_tensors_and_unknown_keywords():
    a = _forward_args()
    with pytest.raises(TypeError):
        _ext._C.attention_forward_cpu(a["q"].data_ptr(), a["k"], a["v"], a["out"], a["lse"], bias=None,
                                      alibi_slopes=None, cu_seqlens_q=None, cu_seqlens_k=None, seqused_k=None,
                                      keep_mask=None, seed=0, options=_options(), num_threads=1)
    with pytest.raises(TypeError):  # an unknown keyword
        _ext._C.attention_forward_cpu(a["q"], a["k"], a["v"], a["out"], a["lse"], bias=None, alibi_slopes=None,
                                      cu_seqlens_q=None, cu_seqlens_k=None, seqused_k=None, keep_mask=None, seed=0,
                                      options=_options(), num_threads=1, window=3)


def test_backward_entry_checks_gradient_buffers():
    a = _forward_args()
    _forward(**a)
    dq, dk, dv = torch.empty_like(a["q"]), torch.zeros_like(a["k"]), torch.zeros_like(a["v"])
    common = dict(bias=None, alibi_slopes=None, cu_seqlens_q=None, cu_seqlens_k=None, seed=0, options=_options(),
                  num_threads=1)
    dout = torch.randn_like(a["q"])
    _ext._C.attention_backward_cpu(dout, a["q"], a["k"], a["v"], a["out"], a["lse"], dq, dk, dv, **common)
    assert torch.isfinite(dq).all() and dk.abs().sum() > 0
    with pytest.raises(ValueError, match="dk must have the shape of k"):
        _ext._C.attention_backward_cpu(dout, a["q"], a["k"], a["v"], a["out"], a["lse"], dq, dq, dv, **common)


def test_attention_ops_are_native_ops():
    """Every attention op is defined through genfast.ops._define (one way to define an op)."""
    from genfast.ops._define import NativeOp

    for op in (attention.attention_forward, attention.attention_backward, attention.attention_decode,
               attention.attention_kvcache_append):
        assert isinstance(op, NativeOp) and hasattr(torch.ops.genfast, op.name)


def test_kvcache_append_entry_writes_rows_and_checks_bounds():
    B, S_max, Hk, D = 3, 6, 2, 16
    k_cache, v_cache = torch.randn(B, S_max, Hk, D), torch.randn(B, S_max, Hk, D)
    k, v = torch.randn(B, 2, Hk, D), torch.randn(B, 2, Hk, D)
    rows = torch.tensor([0, 4, 2], dtype=torch.int32)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    for b, r in enumerate(rows.tolist()):
        expected_k[b, r:r + 2], expected_v[b, r:r + 2] = k[b], v[b]
    _ext._C.attention_kvcache_append_cpu(k_cache, v_cache, k=k, v=v, cache_seqlens=rows)
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)
    before = k_cache.clone()
    with pytest.raises(ValueError, match=r"holds 6 positions per row but cache_seqlens\[1\] = 5 \+ 2 new tokens"):
        _ext._C.attention_kvcache_append_cpu(k_cache, v_cache, k=k, v=v,
                                             cache_seqlens=torch.tensor([0, 5, 1], dtype=torch.int32))
    assert torch.equal(k_cache, before), "nothing is written when a row is out of bounds"
    with pytest.raises(ValueError, match=r"cache_seqlens\[0\] = -1 must be >= 0"):
        _ext._C.attention_kvcache_append_cpu(k_cache, v_cache, k=k, v=v,
                                             cache_seqlens=torch.tensor([-1, 0, 0], dtype=torch.int32))
    with pytest.raises(TypeError, match="k must be float32"):
        _ext._C.attention_kvcache_append_cpu(k_cache, v_cache, k=k.double(), v=v, cache_seqlens=rows)
    with pytest.raises(ValueError, match="k must have shape"):
        _ext._C.attention_kvcache_append_cpu(k_cache, v_cache, k=k[:, :, :1], v=v[:, :, :1], cache_seqlens=rows)
    with pytest.raises(TypeError, match="cache_seqlens must be int32"):
        _ext._C.attention_kvcache_append_cpu(k_cache, v_cache, k=k, v=v, cache_seqlens=rows.long())


def test_tensor_views_read_through_dlpack_and_reject_other_devices():
    """The bindings read tensors through DLPack (views of any strides, tensors that require
    grad) and reject what no kernel takes with a clear error."""
    B, S_max, Hk, D = 2, 5, 2, 16
    base = torch.randn(B, S_max, 2 * Hk, D, requires_grad=True)
    k_cache = base.detach()[:, :, ::2]  # a strided view (no unit stride in dim 2)
    v_cache = torch.randn(B, S_max, Hk, D)
    k = torch.randn(B, 1, Hk, D, requires_grad=True)
    rows = torch.tensor([1, 3], dtype=torch.int32)
    _ext._C.attention_kvcache_append_cpu(k_cache, v_cache, k=k, v=k.detach(), cache_seqlens=rows)
    assert torch.equal(base[0, 1, ::2], k[0, 0]) and torch.equal(base[1, 3, ::2], k[1, 0])
    with pytest.raises(ValueError, match=r"device other than the CPU or a CUDA GPU .*\(meta\)"):
        _ext._C.attention_kvcache_append_cpu(k_cache, v_cache, k=k.to("meta"), v=k, cache_seqlens=rows)
    with pytest.raises(ValueError, match="a tensor with 9 dimensions"):
        _ext._C.attention_kvcache_append_cpu(k_cache, v_cache, k=torch.randn([1] * 9), v=k, cache_seqlens=rows)
    with pytest.raises(TypeError):  # not a tensor
        _ext._C.attention_kvcache_append_cpu(k_cache, v_cache, k=k.detach().numpy(), v=k, cache_seqlens=rows)


def test_argument_names_are_read_from_the_entry_points():
    names = _ext.argument_names(_ext._C.attention_forward_cpu)
    assert names[:6] == ("q", "k", "v", "out", "lse", "bias")
    assert {"options", "num_threads", "seqused_k", "block_table", "k_new", "v_new"} <= set(names)
    assert _ext.argument_names(_ext._C.diffusion_sampler_step_cpu) == (
        "prev", "aux", "sample", "model_output", "model_output_uncond", "history", "history2", "noise", "coefs",
        "clamp", "seed", "options", "num_threads")
    assert _ext.argument_names(lambda a, b=1: None) == ("a", "b")
    assert _ext.argument_names(lambda *a, **kw: None) is None


def test_bind_positional_matches_names_once_and_calls_by_position(seed):
    """A prepared call binds an entry point's fixed arguments by name once and passes the rest
    by position (pybind11 matches keywords by name at every call): a misspelt, missing or
    repeated name raises at binding, the bound call computes what the keyword call does."""
    native = _ext._C.bias_act_cpu
    options = _ext._C.BiasActOptions(mode="forward", act="lrelu", dim=1, alpha=0.2, gain=1.0, clamp=-1.0)
    bound = dict(dy=None, ddx=None, db=None, options=options)
    with pytest.raises(TypeError, match=r"unknown \['dx'\]"):
        _ext.bind_positional(native, ("out", "x", "b", "num_threads"), dx=None, ddx=None, db=None, options=options)
    with pytest.raises(TypeError, match=r"missing \['num_threads'\]"):
        _ext.bind_positional(native, ("out", "x", "b"), **bound)
    with pytest.raises(TypeError, match=r"given twice \['b'\]"):
        _ext.bind_positional(native, ("out", "x", "b", "num_threads"), b=None, dy=None, ddx=None, db=None,
                             options=options)
    call = _ext.bind_positional(native, ("x", "out", "b", "num_threads"), **bound)  # any order of the free names
    x, b = torch.randn(5, 7), torch.randn(7)
    by_keyword, by_position = torch.empty_like(x), torch.empty_like(x)
    native(by_keyword, x, b=b, num_threads=1, **bound)
    call(x, by_position, b, 1)
    torch.testing.assert_close(by_position, by_keyword, rtol=0, atol=0)
    torch.testing.assert_close(by_position, torch.nn.functional.leaky_relu(x + b, 0.2))
    seen = {}
    stand_in = _ext.bind_positional(lambda *args, **kwargs: seen.update(kwargs), ("out", "x"), db=None)
    stand_in(1, 2)
    assert seen == {"out": 1, "x": 2, "db": None}  # a *args/**kwargs stand-in gets every argument by name
