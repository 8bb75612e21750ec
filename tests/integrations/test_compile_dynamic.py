"""torch.compile(fullgraph=True, dynamic=True) of every public op, layer and the GPT model.

Each case runs at three sizes and asserts: no graph break (fullgraph=True raises on one), no
recompilation (the backend is not called again after the first size, and Dynamo's
error_on_recompile is set), genfast's own ops are in the graph (not a fallback composition),
and outputs and gradients equal eager's. Backend "aot_eager" (traces forward and backward
like inductor, without its slow code generation).

Sizes start at 2: Dynamo specialises sizes 0 and 1 by design (a size-1 dim broadcasts), so a
1 followed by a larger size would always recompile, with any op. Duck sizing is off: it ties
two sizes that happen to be equal at the first call into one symbol (a recompile when they
later differ), an accident of the test's sizes rather than of the op.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch._dynamo
import torch.fx.experimental._config
from torch._dynamo.testing import CompileCounterWithBackend

import genfast
import genfast.nn
import genfast.ops as ops
from genfast.models import GPT

TOL = dict(rtol=1e-5, atol=1e-5)


def _genfast_ops_in(graphs) -> set:
    """Names of the torch.ops.genfast.* calls in the captured graphs, including the subgraphs
    of autograd.Function calls (their forward and backward bodies)."""
    found = set()
    for gm in graphs:
        for sub in gm.modules():
            if isinstance(sub, torch.fx.GraphModule):
                found.update(str(n.target) for n in sub.graph.nodes
                             if n.op == "call_function" and str(n.target).startswith("genfast."))
    return found


def _grad_leaves(args):
    return [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]


def _copy(args):
    """Fresh leaves with the same values (the compiled and the eager run get their own grads)."""
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            a = a.detach().clone().requires_grad_(a.requires_grad)
        out.append(a)
    return out


def _flat(result):
    if isinstance(result, torch.Tensor):
        return [result]
    return [t for t in result if isinstance(t, torch.Tensor)]


def check_compiles_once(fn, make_args, sizes, *, backward=True, expect_genfast=True, params=(), tol=TOL):
    """Compiles ``fn`` once (fullgraph, dynamic) and runs it on ``make_args(size)`` for each
    size: same outputs (and gradients of every input that requires them, and of ``params``,
    e.g. a module's parameters) as eager, and no recompilation after the first size."""
    assert len(sizes) == 3
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, backend=counter, fullgraph=True, dynamic=True)
    frames_after_first = None
    with torch._dynamo.config.patch(error_on_recompile=True), torch.fx.experimental._config.patch(use_duck_shape=False):
        for i, size in enumerate(sizes):
            torch.manual_seed(1000 + i)
            args = make_args(size)
            eager_args, compiled_args = _copy(args), _copy(args)
            expected = _flat(fn(*eager_args))
            got = _flat(compiled(*compiled_args))
            assert len(got) == len(expected)
            for g, e in zip(got, expected):
                assert g.shape == e.shape
                torch.testing.assert_close(g, e, **tol)
            leaves_e, leaves_c = _grad_leaves(eager_args) + list(params), _grad_leaves(compiled_args) + list(params)
            if backward and leaves_e:
                seeds = [torch.randn_like(e) for e in expected if e.is_floating_point() and e.requires_grad]
                assert seeds, "a differentiable case must have a differentiable output"
                outs_e = [e for e in expected if e.is_floating_point() and e.requires_grad]
                outs_c = [g for g in got if g.is_floating_point() and g.requires_grad]
                grads_e = torch.autograd.grad(outs_e, leaves_e, seeds, allow_unused=True)
                grads_c = torch.autograd.grad(outs_c, leaves_c, seeds, allow_unused=True)
                for gc, ge in zip(grads_c, grads_e):
                    assert (gc is None) == (ge is None)
                    if ge is not None:
                        torch.testing.assert_close(gc, ge, **tol)
            if i == 0:
                frames_after_first = counter.frame_count
    assert frames_after_first >= 1
    # Dynamo may restart its analysis once inside the first compile (a float default that feeds
    # a custom op becomes a constant): that happens before the second size and is no recompile.
    assert counter.frame_count == frames_after_first, "recompiled for a new size"
    if expect_genfast:
        assert _genfast_ops_in(counter.graphs), "no torch.ops.genfast op in the compiled graph"
    torch._dynamo.reset()
    return counter


def _randn(*shape, grad=True, dtype=torch.float64):
    return torch.randn(*shape, dtype=dtype).requires_grad_(grad)


# ----------------------------------------------------------------------------- attention


def test_sdpa():
    def fn(q, k, v):
        return ops.scaled_dot_product_attention(q, k, v, is_causal=True)

    # batch, sequence and head dim all change
    check_compiles_once(fn, lambda s: [_randn(s, 3, 2 * s + 1, 8 * s) for _ in range(3)], [2, 3, 4])


def test_sdpa_mask_scale_and_lse():
    def fn(q, k, v, mask):
        return ops.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3, return_lse=True)

    def args(s):
        q, k, v = _randn(2, 2, s + 3, 16), _randn(2, 2, 2 * s, 16), _randn(2, 2, 2 * s, 16)
        mask = torch.rand(s + 3, 2 * s) > 0.3
        mask[:, 0] = True
        return [q, k, v, mask]

    check_compiles_once(fn, args, [2, 3, 5])


def test_flash_attn_func():
    def fn(q, k, v):
        return ops.flash_attn_func(q, k, v, causal=True, window_size=(3, -1), softcap=5.0)

    # GQA: 4 query heads over 2 key/value heads; sequence lengths differ between q and k.
    check_compiles_once(fn, lambda s: [_randn(2, s + 5, 4, 16), _randn(2, 2 * s + 9, 2, 16),
                                       _randn(2, 2 * s + 9, 2, 16)], [2, 4, 7])


def test_flash_attn_varlen_func():
    def fn(q, k, v, cu_q, cu_k, max_q, max_k):
        return ops.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, causal=True)

    def args(s):
        lens_q, lens_k = [s, s + 2, 2], [s + 1, 3, s + 2]
        cu_q = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32)
        cu_k = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32)
        return [_randn(sum(lens_q), 2, 16), _randn(sum(lens_k), 2, 16), _randn(sum(lens_k), 2, 16), cu_q, cu_k,
                max(lens_q), max(lens_k)]

    check_compiles_once(fn, args, [2, 4, 6])


def test_flash_attn_with_kvcache():
    def fn(q, k_cache, v_cache, k, v, seqlens):
        return ops.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=seqlens, causal=True,
                                           return_softmax_lse=True)

    def args(s):
        B, S_max = 2, 3 * s + 4
        k_cache, v_cache = _randn(B, S_max, 2, 16, grad=False), _randn(B, S_max, 2, 16, grad=False)
        seqlens = torch.tensor([s, 2 * s], dtype=torch.int32)
        return [_randn(B, 2, 4, 16, grad=False), k_cache, v_cache, _randn(B, 2, 2, 16, grad=False),
                _randn(B, 2, 2, 16, grad=False), seqlens]

    # The caches are written in place: _copy gives the compiled and the eager run their own.
    check_compiles_once(fn, args, [2, 3, 5], backward=False)


def test_merge_attention_states():
    def fn(out_a, lse_a, out_b, lse_b):
        return ops.merge_attention_states(out_a, lse_a, out_b, lse_b)

    def args(s):
        lse_a, lse_b = _randn(2, 3, s + 3), _randn(2, 3, s + 3)
        with torch.no_grad():
            lse_a[0, 1, 0] = -math.inf  # a row one part never saw a key of
        return [_randn(2, s + 3, 3, 8 * s), lse_a, _randn(2, s + 3, 3, 8 * s), lse_b]

    # Plain PyTorch (no genfast kernel to find in the graph).
    check_compiles_once(fn, args, [2, 3, 5], expect_genfast=False)


def test_nn_multihead_attention():
    torch.manual_seed(0)
    mha = genfast.nn.MultiheadAttention(32, 2, batch_first=True, dtype=torch.float64)

    def fn(x):
        return mha(x, x, x, need_weights=False)[0]

    check_compiles_once(fn, lambda s: [_randn(s, 2 * s + 1, 32)], [2, 3, 4])


def test_nn_causal_self_attention():
    torch.manual_seed(0)
    attn = genfast.nn.CausalSelfAttention(64, 4, num_kv_heads=2, dtype=torch.float64)
    check_compiles_once(attn, lambda s: [_randn(2, 2 * s + 1, 64)], [2, 3, 5])


def test_gpt():
    torch.manual_seed(0)
    model = GPT(vocab_size=53, block_size=32, n_layer=1, n_head=2, n_embd=32).double()

    def fn(idx, targets):
        return model(idx, targets)

    def args(s):
        return [torch.randint(0, 53, (2, 3 * s + 1)), torch.randint(0, 53, (2, 3 * s + 1))]

    # logits and loss, and the gradients of every parameter (a training step)
    check_compiles_once(fn, args, [2, 3, 5], params=list(model.parameters()))


# ----------------------------------------------------------------------------- bias_act


def test_bias_act():
    def fn(x, b):
        return ops.bias_act(x, b, dim=1, act="swish", clamp=3.0)

    # channels, height and width change (also the bias length)
    check_compiles_once(fn, lambda s: [_randn(2, s + 3, 3 * s + 1, s + 9), _randn(s + 3)], [2, 3, 5])


def test_bias_act_one_dimensional():
    def fn(x, b):
        return ops.bias_act(x, b, dim=0, act="lrelu", alpha=0.1, gain=1.5)

    check_compiles_once(fn, lambda s: [_randn(4 * s + 1), _randn(4 * s + 1)], [2, 3, 5])


def test_fused_leaky_relu():
    def fn(x, b):
        return ops.fused_leaky_relu(x, b)

    check_compiles_once(fn, lambda s: [_randn(2, s + 3, 2 * s + 1), _randn(s + 3)], [2, 3, 5])


# ----------------------------------------------------------------------------- diffusion


def test_sampler_step():
    def fn(sample, model_output, coefs, history, uncond):
        return ops.sampler_step(sample, model_output, coefs, history=history, x0_clamp=2.5, noise_seed=1234,
                                model_output_uncond=uncond, guidance_scale=4.0)

    def args(s):
        shape = (s, 3, s + 4, 2 * s + 3)
        return [_randn(*shape, grad=False), _randn(*shape, grad=False), torch.randn(s, 16, dtype=torch.float64),
                _randn(*shape, grad=False), _randn(*shape, grad=False)]

    check_compiles_once(fn, args, [2, 3, 5], backward=False)


def test_add_noise():
    def fn(x0, noise, timesteps, signal_scale, noise_scale):
        return ops.add_noise(x0, noise, timesteps, signal_scale, noise_scale, target="v_prediction")

    def args(s):
        T = 10 * s + 7  # the tables' length changes too
        abar = torch.rand(T, dtype=torch.float64) * 0.9 + 0.05
        return [_randn(s, 3, s + 4, grad=False), _randn(s, 3, s + 4, grad=False), torch.randint(0, T, (s,)),
                abar.sqrt(), (1 - abar).sqrt()]

    check_compiles_once(fn, args, [2, 3, 5], backward=False)


def test_diffusion_loss_and_min_snr_weights():
    def fn(model_output, target, timesteps, abar):
        weights = ops.min_snr_weights(timesteps, abar, 5.0)
        return ops.diffusion_loss(model_output, target, weights)

    def args(s):
        T = 10 * s + 7
        return [_randn(s, 3, s + 4, 2 * s + 5), _randn(s, 3, s + 4, 2 * s + 5), torch.randint(0, T, (s,)),
                torch.rand(T, dtype=torch.float64) * 0.9 + 0.05]

    check_compiles_once(fn, args, [2, 3, 5])


def test_cfg_combine():
    def fn(uncond, cond):
        return ops.cfg_combine(uncond, cond, 7.5, guidance_rescale=0.7)

    check_compiles_once(fn, lambda s: [_randn(s, 4, s + 4, grad=False), _randn(s, 4, s + 4, grad=False)], [2, 3, 5],
                        backward=False)


def test_timestep_embedding():
    def fn(timesteps):
        return ops.timestep_embedding(timesteps, 33, flip_sin_to_cos=True, downscale_freq_shift=0.0)

    check_compiles_once(fn, lambda s: [torch.rand(3 * s + 1, dtype=torch.float64) * 1000], [2, 3, 5], backward=False)


# ----------------------------------------------------------------------------- upfirdn2d, filtered_lrelu


def _image(s, channels=3, grad=True):
    return _randn(2, channels, s + 4, 2 * s + 3, grad=grad)


def test_upfirdn2d():
    f = ops.setup_filter([1, 3, 3, 1])

    def fn(x):
        return ops.upfirdn2d(x, f, up=2, down=1, padding=[2, 1, 1, 2], gain=4.0)

    # The backward is upfirdn2d again, with a padding computed from x's and dy's sizes.
    check_compiles_once(fn, lambda s: [_image(s)], [2, 3, 5])


def test_upfirdn2d_helpers():
    f = ops.setup_filter([1, 2, 1])

    def fn(x, f_sep):  # the separable filter is an input: its taps are symbolic too
        return ops.upsample2d(x, f_sep), ops.filter2d(x, f, padding=1), ops.downsample2d(x, f, down=2)

    # forward only: their backward is upfirdn2d's adjoint, compiled in test_upfirdn2d
    check_compiles_once(fn, lambda s: [_image(s), ops.setup_filter([1, 3, 3, 1], separable=True)], [2, 3, 5],
                        backward=False)


def test_filtered_lrelu():
    fu = ops.setup_filter([1, 3, 3, 1])
    fd = ops.setup_filter([1, 3, 3, 1])

    def fn(x, b):
        return ops.filtered_lrelu(x, fu, fd, b, up=2, down=2, padding=3, clamp=2.0)

    check_compiles_once(fn, lambda s: [_image(s, 4), _randn(4)], [2, 3, 5])


# ----------------------------------------------------------------------------- GAN ops


def test_pixel_norm():
    def fn(x):
        return ops.pixel_norm(x, dim=1)

    check_compiles_once(fn, lambda s: [_image(s, s + 3)], [2, 3, 5])


def test_minibatch_stddev():
    def fn(x):
        return ops.minibatch_stddev(x, group_size=2, num_channels=2)

    # A composition of torch ops (no genfast kernel of its own): checks that its validation traces.
    check_compiles_once(fn, lambda s: [_randn(2 * s, 4, s + 4, s + 6)], [2, 3, 5], backward=False,
                        expect_genfast=False)


def test_conv2d_resample():
    f = ops.setup_filter([1, 3, 3, 1])

    def fn(x, w):  # downsampling (strided conv); modulated_conv2d below covers upsampling
        return ops.conv2d_resample(x, w, f, down=2, padding=1)

    check_compiles_once(fn, lambda s: [_image(s, 4), _randn(5, 4, 3, 3)], [2, 3, 5])


def test_modulated_conv2d():
    f = ops.setup_filter([1, 3, 3, 1])

    # fused_modconv=False: the fused path differs only by torch's grouped convolution, whose
    # symbolic tracing costs ~12 s of CPU here; both validate and resample through genfast alike.
    def fn(x, weight, styles, noise):
        return ops.modulated_conv2d(x, weight, styles, noise, up=2, padding=1, resample_filter=f,
                                    fused_modconv=False)

    def args(s):
        x = _image(s, 4)
        return [x, _randn(5, 4, 3, 3), _randn(2, 4), _randn(2, 1, 2 * (s + 4), 2 * (2 * s + 3), grad=False)]

    check_compiles_once(fn, args, [2, 3, 5])


# ----------------------------------------------------------------------------- group_norm, VAE


def test_group_norm():
    def fn(x, weight, bias):
        return ops.group_norm(x, 2, weight, bias, eps=1e-5, activation="silu")

    # the channel count changes too (2 groups of s + 1 channels)
    check_compiles_once(fn, lambda s: [_image(s, 2 * s + 2), _randn(2 * s + 2), _randn(2 * s + 2)], [2, 3, 5])


def test_reparameterize_kl_and_friends():
    def fn(mu, logvar, eps):
        z, kl = ops.reparameterize_kl(mu, logvar, eps, reduction="mean")
        return z, kl, ops.reparameterize(mu, logvar, eps), ops.kl_divergence(mu, logvar, reduction="none")

    def args(s):
        return [_randn(s, 4, s + 3), _randn(s, 4, s + 3) * 0.5, _randn(s, 4, s + 3, grad=False)]

    check_compiles_once(fn, args, [2, 3, 5])


# ----------------------------------------------------------------------------- coverage

# Every public op of genfast.ops has a case above; setup_filter builds a filter on the host
# (it is called outside the compiled region) and attention is the module.
COMPILED_OPS = {
    "scaled_dot_product_attention", "flash_attn_func", "flash_attn_varlen_func", "flash_attn_with_kvcache",
    "bias_act", "fused_leaky_relu", "sampler_step", "add_noise", "diffusion_loss", "min_snr_weights", "cfg_combine",
    "timestep_embedding", "group_norm", "upfirdn2d", "filter2d", "upsample2d", "downsample2d", "filtered_lrelu",
    "pixel_norm", "minibatch_stddev", "conv2d_resample", "modulated_conv2d", "kl_divergence", "reparameterize",
    "reparameterize_kl", "merge_attention_states",
}


def test_every_public_op_has_a_compile_case():
    missing = set(ops.__all__) - COMPILED_OPS - {"attention", "setup_filter"}
    assert not missing, f"genfast.ops functions without a torch.compile(dynamic=True) case here: {sorted(missing)}"


def test_bad_argument_still_raises_its_error_when_compiled():
    def fn(q, k, v, p):
        return ops.scaled_dot_product_attention(q, k, v, dropout_p=p)

    q = torch.randn(2, 2, 5, 16)
    torch._dynamo.reset()
    with pytest.raises(ValueError, match="dropout_p must not be NaN"):  # Dynamo runs the frame eagerly
        torch.compile(fn, backend="aot_eager", dynamic=True)(q, q, q, math.nan)
    torch._dynamo.reset()
    # fullgraph=True turns every raise into Dynamo's error, which quotes the op's message
    with pytest.raises(Exception, match="dropout_p must not be NaN"):
        torch.compile(fn, backend="aot_eager", fullgraph=True, dynamic=True)(q, q, q, math.nan)
    torch._dynamo.reset()
