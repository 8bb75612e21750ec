"""Shared by tests/test_attention_cuda.py (real GPU) and tests/test_attention_cuda_emulated.py:
the CUDA backend's forward, backward and decode checks against the float64 reference."""
from __future__ import annotations

import torch

from genfast.ops import attention as A
from genfast.reference import attention as R
from genfast.testing import error_vs_reference, rounding_floor


def problem(**kw):
    base = dict(window_left=-1, window_right=-1, align_bottom_right=False, softcap=0.0, alibi_slopes=None, bias=None,
                dropout_p=0.0, seed=0, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None)
    base.update(kw)
    return base


def lowp_dense(q, k, v, kw):
    """The contract's math in PyTorch, differentiable, in the inputs' dtype: the 'same ops in
    low precision' for fp16/bf16 inputs, the reference for float64 ones."""
    dense_kw = {key: kw[key] for key in ("scale", "window_left", "window_right", "align_bottom_right", "softcap")}
    cu_q, cu_k = kw.get("cu_seqlens_q"), kw.get("cu_seqlens_k")
    slopes = kw.get("alibi_slopes")
    if cu_q is None:
        out, lse, _ = R.attention_dense(q, k, v, alibi_slopes=slopes, **dense_kw)
        return out, lse
    outs, lses = [], []
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for s in range(len(cq) - 1):
        sl = None if slopes is None else (slopes if slopes.ndim == 1 else slopes[s:s + 1])
        o, l, _ = R.attention_dense(q[:, :, cq[s]:cq[s + 1]], k[:, :, ck[s]:ck[s + 1]], v[:, :, ck[s]:ck[s + 1]],
                                    alibi_slopes=sl, **dense_kw)
        outs.append(o)
        lses.append(l)
    return torch.cat(outs, 2), torch.cat(lses, 2)


def compare_lse(name, fast, ref64, lowp):
    assert torch.equal(torch.isinf(fast.cpu()), torch.isinf(ref64.cpu())), f"{name}: -inf pattern differs"
    keep = torch.isfinite(ref64.cpu())
    error_vs_reference(fast.cpu()[keep], ref64.cpu()[keep], lowp.float().cpu()[keep], name)


def check_forward(q, k, v, **kw):
    dtype = q.dtype
    out, lse = A._cuda_forward(q, k, v, **problem(**kw))
    assert out.dtype == dtype and out.shape == q.shape and lse.dtype == torch.float32 and lse.shape == q.shape[:3]
    to64 = {key: (val.cpu().double() if isinstance(val, torch.Tensor) and val.is_floating_point() else
                  (val.cpu() if isinstance(val, torch.Tensor) else val)) for key, val in problem(**kw).items()}
    ref_out, ref_lse = R.forward(q.cpu().double(), k.cpu().double(), v.cpu().double(), **to64)
    low_out, low_lse = lowp_dense(q, k, v, problem(**kw))
    error_vs_reference(out.cpu(), ref_out, low_out.cpu(), "out")
    compare_lse("lse", lse, ref_lse, low_lse)


def _to64(kw):
    return {key: (val.cpu().double() if isinstance(val, torch.Tensor) and val.is_floating_point() else
                  (val.cpu() if isinstance(val, torch.Tensor) else val)) for key, val in kw.items()}


def check_backward(q, k, v, **kw):
    """dq, dk, dv of the CUDA backward (on the CUDA forward's out and LSE) against float64
    autograd of the contract, within 2x PyTorch's own low-precision error + a floor sized to the
    terms that cancel in dq and dk (dP - delta)."""
    prob = problem(**kw)
    out, lse = A._cuda_forward(q, k, v, **prob)
    dout = torch.randn(q.shape, dtype=torch.float64).to(q.device, q.dtype)
    dq, dk, dv = A._cuda_backward(dout, q, k, v, out, lse, **prob)
    for name, grad, like in (("dq", dq, q), ("dk", dk, k), ("dv", dv, v)):
        assert grad.dtype == like.dtype and grad.shape == like.shape and grad.is_contiguous(), name
    x64 = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
    ref = torch.autograd.grad(lowp_dense(*x64, _to64(prob))[0], x64, dout.cpu().double())
    xl = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    low = torch.autograd.grad(lowp_dense(*xl, prob)[0], xl, dout)
    compare_grads((dq, dk, dv), ref, low, prob["scale"], q, k, dout, out)


def compare_grads(grads, ref, low, scale, q, k, dout, out):
    # dq and dk come from P o (dP - delta): where that cancels, PyTorch's own error can be ~0
    # and a correct kernel keeps the rounding of the cancelling terms; the floor is sized to them.
    qk = max(q.abs().max().item(), k.abs().max().item())
    cancel = scale * qk * (dout.double().abs() * out.double().abs()).sum(-1).max().item()
    for name, fast, r, lp in zip(("dq", "dk", "dv"), grads, ref, low):
        floor = rounding_floor(fast.dtype, r.abs().max().item())
        if name != "dv":
            floor = max(floor, 2 * torch.finfo(fast.dtype).eps * cancel)
        error_vs_reference(fast.cpu(), r, lp.cpu(), name, floor=floor)


def decode_reference(q, kc, vc, lens, **kw):
    """(out, lse) of the float64 reference decode and of the same math in q's dtype. kw: the
    decode's options, with cache_leftpad / cache_batch_idx / block_table (the contract's
    cache_rows) as well."""
    ref = R.decode(q.cpu().double(), kc.cpu().double(), vc.cpu().double(), lens.cpu(),
                   **{key: (val.cpu().double() if isinstance(val, torch.Tensor) and val.is_floating_point() else
                            (val.cpu() if isinstance(val, torch.Tensor) else val)) for key, val in kw.items()})
    index = {key: kw.get(key) for key in ("cache_batch_idx", "block_table")}
    leftpad = kw.get("cache_leftpad")
    options = {key: val for key, val in kw.items() if key not in ("alibi_slopes", "cache_leftpad", *index)}
    outs, lses = [], []
    for b, n in enumerate(lens.tolist()):
        slopes = kw.get("alibi_slopes")
        if slopes is not None and slopes.ndim == 2:
            slopes = slopes[b:b + 1]
        start = 0 if leftpad is None else int(leftpad[b])
        k = R.cache_rows(kc, b, n, **index)[:, :, start:]
        v = R.cache_rows(vc, b, n, **index)[:, :, start:]
        o, l = lowp_dense(q[b:b + 1], k, v, dict(problem(**options), alibi_slopes=slopes, align_bottom_right=True))
        outs.append(o)
        lses.append(l)
    return ref, (torch.cat(outs), torch.cat(lses))
