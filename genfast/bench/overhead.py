"""``python -m genfast bench overhead``: the host time of one call of every public op on tiny
inputs, beside the comparable torch call.

On a GPU, small ops and decode steps are launch-bound: the Python path around a kernel
(validation, dispatch, torch.library, autograd) is the whole cost. This suite makes that cost a
tracked figure on any machine. Each case times the host side only (``Case.extra["timer"] =
"host"``: blocks of back-to-back calls timed with ``time.perf_counter`` and no synchronisation
inside a block, the providers' blocks interleaved; see ``timing.time_host_interleaved``).
Inputs are tiny so that the kernels themselves cost next to nothing.

Providers: ``genfast`` (the public op, automatic backend) and ``torch``, the comparable torch
call: the single torch function where one exists (``F.scaled_dot_product_attention``,
``F.group_norm``, ``F.leaky_relu(x + b)``, ...), else the plain-PyTorch reference composition
(the variant column says ``torch=reference``). For the scheduler steps (a 50-step loop, host time
per step) the baseline is diffusers' scheduler of the same kind (when importable). The genfast
output is checked against the baseline before timing, as in every suite.
"""
from __future__ import annotations

import math
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from .. import ops
from ..reference import diffusion as ref_diffusion
from ..reference import gan as ref_gan
from ..reference import vae as ref_vae
from ..reference.filtered_lrelu import filtered_lrelu as reference_filtered_lrelu
from ..reference.upfirdn2d import upfirdn2d as reference_upfirdn2d
from .schedulers import SD_CONFIG
from .timing import BASELINE, GENFAST, Case, Provider

NAME = "overhead"
SQRT2 = math.sqrt(2.0)
SCHEDULER_STEPS = 50
SCHEDULER_SHAPE = (1, 4, 8, 8)
SCHEDULER_KINDS = {  # name -> (class name, extra config): the same class names in genfast and diffusers
    "ddim": ("DDIMScheduler", dict(clip_sample=False, set_alpha_to_one=False)),
    "euler": ("EulerDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
}


def _op_cases(device: torch.device) -> list:
    """(name, shape, make_inputs(gen) -> dict, genfast(**inputs), torch(**inputs), torch is the reference)."""
    f32 = dict(device=device, dtype=torch.float32)

    def r(gen, *shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32)

    fir = torch.tensor([1.0, 3.0, 3.0, 1.0], **f32) / 8
    cases = [
        ("scaled_dot_product_attention", (1, 2, 4, 16), lambda g: dict(q=r(g, 1, 2, 4, 16), k=r(g, 1, 2, 4, 16),
                                                                       v=r(g, 1, 2, 4, 16)),
         lambda q, k, v: ops.scaled_dot_product_attention(q, k, v),
         lambda q, k, v: F.scaled_dot_product_attention(q, k, v), False),
        ("scaled_dot_product_attention causal", (1, 2, 4, 16),
         lambda g: dict(q=r(g, 1, 2, 4, 16), k=r(g, 1, 2, 4, 16), v=r(g, 1, 2, 4, 16)),
         lambda q, k, v: ops.scaled_dot_product_attention(q, k, v, is_causal=True),
         lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), False),
        ("scaled_dot_product_attention causal fwd+bwd", (1, 2, 4, 16),  # a training step's attention
         lambda g: dict(q=r(g, 1, 2, 4, 16).requires_grad_(), k=r(g, 1, 2, 4, 16).requires_grad_(),
                        v=r(g, 1, 2, 4, 16).requires_grad_(), dout=r(g, 1, 2, 4, 16)),
         lambda q, k, v, dout: _grads(ops.scaled_dot_product_attention(q, k, v, is_causal=True), (q, k, v), dout),
         lambda q, k, v, dout: _grads(F.scaled_dot_product_attention(q, k, v, is_causal=True), (q, k, v), dout),
         False),
        ("flash_attn_func", (1, 4, 2, 16), lambda g: dict(q=r(g, 1, 4, 2, 16), k=r(g, 1, 4, 2, 16),
                                                          v=r(g, 1, 4, 2, 16)),
         lambda q, k, v: ops.flash_attn_func(q, k, v, causal=True),
         lambda q, k, v: F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                        is_causal=True).transpose(1, 2), False),
        ("flash_attn_with_kvcache", (1, 1, 2, 16),  # one query, 8 cached keys
         lambda g: dict(q=r(g, 1, 1, 2, 16), kc=r(g, 1, 8, 2, 16), vc=r(g, 1, 8, 2, 16)),
         lambda q, kc, vc: ops.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=8),
         lambda q, kc, vc: F.scaled_dot_product_attention(q.transpose(1, 2), kc.transpose(1, 2),
                                                          vc.transpose(1, 2)).transpose(1, 2), False),
        ("flash_attn_with_kvcache append", (1, 1, 2, 16),  # a decode step: write token 9, attend to 9 keys
         lambda g: dict(q=r(g, 1, 1, 2, 16), kc=r(g, 1, 16, 2, 16), vc=r(g, 1, 16, 2, 16), k=r(g, 1, 1, 2, 16),
                        v=r(g, 1, 1, 2, 16), lengths=torch.tensor([8], dtype=torch.int32, device=device)),
         lambda q, kc, vc, k, v, lengths: ops.flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=lengths),
         _torch_append_decode, False),
        ("flash_attn_with_kvcache paged", (1, 1, 2, 16),  # the same step from 2 pages of 16 rows, out of order
         lambda g: _paged(dict(q=r(g, 1, 1, 2, 16), kc=r(g, 1, 32, 2, 16), vc=r(g, 1, 32, 2, 16),
                               k=r(g, 1, 1, 2, 16), v=r(g, 1, 1, 2, 16),
                               lengths=torch.tensor([8], dtype=torch.int32, device=device))),
         lambda q, kc, vc, k, v, lengths, kp, vp, table: ops.flash_attn_with_kvcache(
             q, kp, vp, k, v, cache_seqlens=lengths, block_table=table),
         lambda q, kc, vc, k, v, lengths, kp, vp, table: _torch_append_decode(q, kc, vc, k, v, lengths), False),
        ("bias_act lrelu", (4, 8), lambda g: dict(x=r(g, 4, 8), b=r(g, 8)),
         lambda x, b: ops.bias_act(x, b, act="lrelu", gain=1.0),
         lambda x, b: F.leaky_relu(x + b, 0.2), False),
        ("fused_leaky_relu", (4, 8), lambda g: dict(x=r(g, 4, 8), b=r(g, 8)),
         lambda x, b: ops.fused_leaky_relu(x, b),
         lambda x, b: F.leaky_relu(x + b, 0.2) * SQRT2, False),
        ("group_norm", (1, 8, 4, 4), lambda g: dict(x=r(g, 1, 8, 4, 4), w=r(g, 8), b=r(g, 8)),
         lambda x, w, b: ops.group_norm(x, 4, w, b),
         lambda x, w, b: F.group_norm(x, 4, w, b), False),
        ("group_norm silu", (1, 8, 4, 4), lambda g: dict(x=r(g, 1, 8, 4, 4), w=r(g, 8), b=r(g, 8)),
         lambda x, w, b: ops.group_norm(x, 4, w, b, activation="silu"),
         lambda x, w, b: F.silu(F.group_norm(x, 4, w, b)), False),
        ("pixel_norm", (4, 8), lambda g: dict(x=r(g, 4, 8)),
         lambda x: ops.pixel_norm(x),
         lambda x: x * torch.rsqrt(x.square().mean(1, keepdim=True) + 1e-8), False),
        ("upfirdn2d", (1, 2, 8, 8), lambda g: dict(x=r(g, 1, 2, 8, 8)),
         lambda x: ops.upfirdn2d(x, fir, up=2, padding=(2, 1)),
         lambda x: reference_upfirdn2d(x, fir, up=2, padding=(2, 1)), True),
        ("filtered_lrelu", (1, 2, 8, 8), lambda g: dict(x=r(g, 1, 2, 8, 8), b=r(g, 2)),
         lambda x, b: ops.filtered_lrelu(x, fir, fir, b, up=2, down=2, padding=(2, 1)),
         lambda x, b: reference_filtered_lrelu(x, fir, fir, b, up=2, down=2, padding=(2, 1)), True),
        ("minibatch_stddev", (4, 8, 4, 4), lambda g: dict(x=r(g, 4, 8, 4, 4)),
         lambda x: ops.minibatch_stddev(x), lambda x: ref_gan.minibatch_stddev(x), True),
        ("modulated_conv2d", (2, 4, 8, 8), lambda g: dict(x=r(g, 2, 4, 8, 8), w=r(g, 4, 4, 3, 3), s=r(g, 2, 4)),
         lambda x, w, s: ops.modulated_conv2d(x, w, s, padding=1),
         lambda x, w, s: ref_gan.modulated_conv2d(x, w, s, padding=1), True),
        ("add_noise", (2, 4, 4, 4), lambda g: dict(x0=r(g, 2, 4, 4, 4), n=r(g, 2, 4, 4, 4),
                                                   t=torch.tensor([3, 7], device=device), a=r(g, 10), s=r(g, 10)),
         lambda x0, n, t, a, s: ops.add_noise(x0, n, t, a, s),
         lambda x0, n, t, a, s: a[t].view(-1, 1, 1, 1) * x0 + s[t].view(-1, 1, 1, 1) * n, False),
        ("diffusion_loss", (2, 4, 4, 4), lambda g: dict(m=r(g, 2, 4, 4, 4), t=r(g, 2, 4, 4, 4)),
         lambda m, t: ops.diffusion_loss(m, t), lambda m, t: F.mse_loss(m, t), False),
        ("cfg_combine", (2, 4, 4, 4), lambda g: dict(u=r(g, 2, 4, 4, 4), c=r(g, 2, 4, 4, 4)),
         lambda u, c: ops.cfg_combine(u, c, 7.5), lambda u, c: u + 7.5 * (c - u), False),
        ("timestep_embedding", (4, 32), lambda g: dict(t=torch.tensor([1.0, 10.0, 100.0, 999.0], **f32)),
         lambda t: ops.timestep_embedding(t, 32), lambda t: ref_diffusion.timestep_embedding(t, 32), True),
        ("reparameterize_kl", (4, 8), lambda g: dict(mu=r(g, 4, 8), lv=r(g, 4, 8), eps=r(g, 4, 8)),
         lambda mu, lv, eps: ops.reparameterize_kl(mu, lv, eps),
         lambda mu, lv, eps: (ref_vae.reparameterize(mu, lv, eps), ref_vae.kl_per_sample(mu, lv).sum()), True),
    ]
    return cases


def _grads(out, inputs, dout):
    return torch.autograd.grad(out, inputs, dout)


def _paged(inputs: dict) -> dict:
    """Adds the caches' rows as two 16-row pages in reverse order (kp, vp) and their block table."""
    kc, vc = inputs["kc"], inputs["vc"]
    inputs["kp"] = torch.stack([kc[0, 16:], kc[0, :16]])
    inputs["vp"] = torch.stack([vc[0, 16:], vc[0, :16]])
    inputs["table"] = torch.tensor([[1, 0]], dtype=torch.int32, device=kc.device)
    return inputs


def _torch_append_decode(q, kc, vc, k, v, lengths):
    """The torch equivalent of a one-token kv-cache decode step at a known position (8)."""
    kc[:, 8:9], vc[:, 8:9] = k, v
    return F.scaled_dot_product_attention(q.transpose(1, 2), kc[:, :9].transpose(1, 2),
                                          vc[:, :9].transpose(1, 2)).transpose(1, 2)


def _op_case(device, name, shape, make, fast: Callable, slow: Callable, torch_is_reference: bool) -> Case:
    def make_inputs(i: int) -> dict:
        return make(torch.Generator(device=device).manual_seed(1234 + i))

    providers = {
        "genfast": Provider("genfast", GENFAST, lambda inp: (lambda: fast(**inp))),
        "torch": Provider("torch", BASELINE, lambda inp: (lambda: slow(**inp))),
    }
    op, *act = name.split()
    mode = act.pop() if act and act[-1] == "fwd+bwd" else "fwd"  # "<op> [variant] [fwd+bwd]"
    return Case(op=op, mode=mode, shape=shape, dtype=torch.float32, act=" ".join(act) or "-",
                device=device, bytes_moved=0, make_inputs=make_inputs, providers=providers, reference="torch",
                baselines=("torch",), variant="torch=reference" if torch_is_reference else "",
                extra={"timer": "host"})


def _diffusers():
    try:
        import diffusers  # bench/test-only dependency
        return diffusers
    except Exception:
        return None


def _scheduler_case(device, kind: str) -> Case:
    from .. import schedulers as genfast_schedulers

    cls_name, extra = SCHEDULER_KINDS[kind]

    def make_inputs(i: int) -> dict:
        gen = torch.Generator(device=device).manual_seed(99 + i)
        return {name: torch.randn(SCHEDULER_SHAPE, generator=gen, device=device) for name in ("x", "m")}

    def factory(library):
        def build(inputs):
            s = getattr(library, cls_name)(**SD_CONFIG, **extra)

            def loop():  # a pipeline's sampling loop minus the model
                s.set_timesteps(SCHEDULER_STEPS, device=device)
                y = inputs["x"]
                for t in s.timesteps:
                    y = s.step(inputs["m"], t, y).prev_sample
                return y
            return loop
        return build

    lib = _diffusers()
    providers = {
        "genfast": Provider("genfast", GENFAST, factory(genfast_schedulers)),
        "diffusers": Provider("diffusers", BASELINE, factory(lib) if lib is not None else None,
                              unavailable=None if lib is not None else "diffusers is not installed"),
    }
    return Case(op="scheduler_step", mode="loop50", shape=SCHEDULER_SHAPE, dtype=torch.float32, act=kind,
                device=device, bytes_moved=0, make_inputs=make_inputs, providers=providers, reference="diffusers",
                baselines=("diffusers",), extra={"timer": "host", "calls_per_thunk": SCHEDULER_STEPS})


def build_cases(device, quick: bool = False, use_compile: bool = True) -> Iterator[Case]:
    device = torch.device(device)
    for case in _op_cases(device):
        yield _op_case(device, *case)
    for kind in SCHEDULER_KINDS:
        yield _scheduler_case(device, kind)


def count_cases(device, quick: bool = False) -> int:
    return len(_op_cases(torch.device(device))) + len(SCHEDULER_KINDS)
