"""genfast.models: fast and reference paths agree (outputs and gradients), training lowers
the loss, and the fast/reference switch is validated."""
import copy

import pytest
import torch

import genfast
from genfast.models import VAE, DCGANDiscriminator, DCGANGenerator, MLPGAN, StyleGAN2Discriminator, StyleGAN2Generator
from genfast.models.stylegan2 import r1_penalty
from genfast.models import GPT, GPTConfig, DiffusionPipeline, UNet2D


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_fast_matches_reference(model, run, rtol=1e-4, atol=1e-5):
    """run(model) -> scalar loss; compares loss and every parameter gradient."""
    fast = model.set_backend(None)
    ref = copy.deepcopy(model).set_backend("reference")
    loss_fast = run(fast)
    loss_fast.backward()
    loss_ref = run(ref)
    loss_ref.backward()
    torch.testing.assert_close(loss_fast, loss_ref, rtol=rtol, atol=atol)
    g_fast, g_ref = grads(fast), grads(ref)
    assert g_fast.keys() == g_ref.keys() and g_fast
    for name in g_fast:
        torch.testing.assert_close(g_fast[name], g_ref[name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def test_vae_fast_matches_reference(seed):
    model = VAE(in_channels=1, image_size=8, latent_dim=5)
    x = torch.rand(6, 1, 8, 8)
    eps = torch.randn(6, 5)
    assert_fast_matches_reference(model, lambda m: m.loss(x, eps))


def test_vae_training_lowers_the_loss(seed):
    model = VAE(in_channels=1, image_size=8, latent_dim=4)
    prototypes = (torch.rand(4, 1, 8, 8) > 0.5).float()  # learnable structure, unlike pure noise
    x = prototypes[torch.randint(0, 4, (32,))]
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    first = model.loss(x, generator=gen).item()
    for _ in range(30):
        opt.zero_grad()
        model.loss(x, generator=gen).backward()
        opt.step()
    assert model.loss(x, generator=gen).item() < 0.9 * first
    samples = model.sample(3, generator=gen)
    assert samples.shape == (3, 1, 8, 8) and ((samples >= 0) & (samples <= 1)).all()


def test_model_backend_switch_is_validated():
    with pytest.raises(ValueError, match="unknown backend"):
        VAE().set_backend("gpu")
    with pytest.raises(ValueError, match="multiple of 4"):
        VAE(image_size=10)
    assert genfast.models.VAE(backend="reference").backend == "reference"


# ----------------------------------------------------------------------------- GANs


def test_mlpgan_fast_matches_reference(seed):
    gan = MLPGAN(latent_dim=12, image_dim=20, hidden_g=(16, 24, 32), hidden_d=(32, 24, 16), dropout=0.0)
    z = torch.randn(5, 12)
    x = torch.rand(5, 20) * 2 - 1
    assert_fast_matches_reference(gan, lambda m: (m.discriminator(m.generator(z)) - m.discriminator(x)).square().mean())


def test_mlpgan_shapes_and_ranges_are_the_classic_ones():
    gan = MLPGAN()
    dims = [m.out_features for m in gan.generator.modules() if isinstance(m, torch.nn.Linear)]
    assert dims == [256, 512, 1024, 784]
    dims = [m.out_features for m in gan.discriminator.modules() if isinstance(m, torch.nn.Linear)]
    assert dims == [1024, 512, 256, 1]
    img = gan(torch.randn(3, 100))
    assert img.shape == (3, 784) and img.abs().max() <= 1


@pytest.mark.parametrize("train", [True, False])
def test_dcgan_fast_matches_reference(train, seed):
    g = DCGANGenerator(latent_dim=8, channels=4, image_channels=3, image_size=16)
    d = DCGANDiscriminator(channels=4, image_channels=3, image_size=16)
    g.train(train)
    d.train(train)
    z = torch.randn(4, 8)

    class Pair(genfast.models.FastPathModel):
        def __init__(self):
            super().__init__()
            self.g, self.d = g, d

    assert_fast_matches_reference(Pair(), lambda m: m.d(m.g(z)).square().mean())
    assert g(z).shape == (4, 3, 16, 16) and d(g(z)).shape == (4,)


def test_gan_discriminator_training_lowers_its_loss(seed):
    import torch.nn.functional as F

    gan = MLPGAN(latent_dim=8, image_dim=16, hidden_g=(16, 16, 16), hidden_d=(32, 16, 8), dropout=0.0)
    real = torch.rand(64, 16) * 0.5 + 0.5
    fake = gan.generator(torch.randn(64, 8)).detach()
    opt = torch.optim.Adam(gan.discriminator.parameters(), lr=1e-2)

    def loss():
        return F.softplus(-gan.discriminator(real)).mean() + F.softplus(gan.discriminator(fake)).mean()
    first = loss().item()
    for _ in range(20):
        opt.zero_grad()
        loss().backward()
        opt.step()
    assert loss().item() < 0.7 * first


def test_dcgan_rejects_bad_image_size():
    with pytest.raises(ValueError, match="image_size"):
        DCGANGenerator(image_size=48)


# ----------------------------------------------------------------------------- StyleGAN2


def small_stylegan(double=False):
    g = StyleGAN2Generator(z_dim=8, w_dim=8, img_resolution=8, img_channels=3, channel_base=64, channel_max=8,
                           mapping_layers=2)
    d = StyleGAN2Discriminator(img_resolution=8, img_channels=3, channel_base=64, channel_max=8, mbstd_group_size=2)
    if double:
        g, d = g.double(), d.double()
    return g, d


def test_stylegan2_fast_matches_reference_with_r1(seed):
    g, d = small_stylegan(double=True)

    class Pair(genfast.models.FastPathModel):
        def __init__(self):
            super().__init__()
            self.g, self.d = g, d

    z = torch.randn(4, 8, dtype=torch.float64)
    real = torch.randn(4, 3, 8, 8, dtype=torch.float64)

    def loss(m):
        fake = m.g(z, noise_mode="const")
        return torch.nn.functional.softplus(m.d(fake)).mean() + 0.5 * r1_penalty(m.d, real)
    assert_fast_matches_reference(Pair(), loss, rtol=1e-7, atol=1e-9)


def test_stylegan2_shapes_and_training_step(seed):
    g, d = small_stylegan()
    z = torch.randn(4, 8)
    img = g(z)
    assert img.shape == (4, 3, 8, 8) and torch.isfinite(img).all()
    assert d(img).shape == (4,)
    opt = torch.optim.Adam(d.parameters(), lr=2e-3, betas=(0.0, 0.99))
    real = torch.randn(4, 3, 8, 8).tanh()
    fake = img.detach()

    def d_loss():
        return (torch.nn.functional.softplus(d(fake)) + torch.nn.functional.softplus(-d(real))).mean()
    first = d_loss().item()
    for _ in range(15):
        opt.zero_grad()
        (d_loss() + 0.1 * r1_penalty(d, real)).backward()
        opt.step()
    assert d_loss().item() < first
    with pytest.raises(ValueError, match="power of two"):
        StyleGAN2Generator(img_resolution=12)


# ----------------------------------------------------------------------------- GPT


def small_gpt(**kw):
    cfg = dict(vocab_size=37, block_size=32, n_layer=2, n_head=2, n_embd=32)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg))


@pytest.mark.parametrize("position", ["learned", "rotary"])
def test_gpt_fast_matches_reference(position, seed):
    model = small_gpt(position=position)
    idx = torch.randint(0, 37, (3, 17))
    targets = torch.randint(0, 37, (3, 17))
    assert_fast_matches_reference(model, lambda m: m(idx, targets)[1])


@pytest.mark.parametrize("position", ["learned", "rotary"])
def test_gpt_generate_with_cache_equals_without(position, seed):
    model = small_gpt(position=position).eval()
    idx = torch.randint(0, 37, (2, 5))
    cached = model.generate(idx, 9, temperature=0, use_cache=True)
    plain = model.generate(idx, 9, temperature=0, use_cache=False)
    assert cached.shape == (2, 14)
    assert torch.equal(cached, plain)
    gen = torch.Generator().manual_seed(seed)
    sampled = model.generate(idx, 4, temperature=0.8, top_k=5, top_p=0.9, generator=gen)
    assert sampled.shape == (2, 9) and torch.equal(sampled[:, :5], idx)


@pytest.mark.parametrize("position", ["learned", "rotary"])
def test_gpt_generate_ragged_prompts_from_a_paged_cache(position, seed, monkeypatch):
    """Prompts of different lengths served together from a paged cache give each prompt's own
    greedy continuation (float64 model: no near-tie can flip an argmax), prefill touches only
    each prompt's own tokens, and every decode step is one batched call with a block table."""
    from genfast.nn import attention as nn_attention
    model = small_gpt(position=position).double().eval()
    prompts = [torch.randint(0, 37, (n,)) for n in (3, 11, 20)]
    calls = []
    real = nn_attention.flash_attn_with_kvcache

    def recorded(q, *args, **kwargs):
        calls.append((tuple(q.shape[:2]), kwargs.get("block_table") is not None))
        return real(q, *args, **kwargs)

    monkeypatch.setattr(nn_attention, "flash_attn_with_kvcache", recorded)
    outputs = model.generate(prompts, 7, temperature=0, page_size=16)
    monkeypatch.undo()
    for prompt, out in zip(prompts, outputs):
        alone = model.generate(prompt[None], 7, temperature=0, use_cache=True)[0]
        assert torch.equal(out, alone)
    n_layer = model.config.n_layer
    prefill = [shape for shape, paged in calls[:3 * n_layer]]
    assert prefill == [(1, n) for n in (3, 11, 20) for _ in range(n_layer)]  # no padding tokens
    assert all(paged for _, paged in calls)
    assert [shape for shape, _ in calls[3 * n_layer:]] == [(3, 1)] * (6 * n_layer)  # batched decode
    with pytest.raises(ValueError, match="non-empty 1-D token tensors"):
        model.generate([prompts[0], torch.zeros(0, dtype=torch.long)], 2)


@pytest.mark.parametrize("position", ["learned", "rotary"])
def test_gpt_sdpa_attention_matches_genfast(position, seed):
    """attention="sdpa" (the benchmark's torch baseline) computes the same model."""
    model = small_gpt(position=position)
    sdpa = small_gpt(position=position, attention="sdpa")
    sdpa.load_state_dict(model.state_dict())
    idx = torch.randint(0, 37, (3, 17))
    targets = torch.randint(0, 37, (3, 17))
    loss, loss_sdpa = model(idx, targets)[1], sdpa(idx, targets)[1]
    loss.backward()
    loss_sdpa.backward()
    torch.testing.assert_close(loss_sdpa, loss, rtol=1e-4, atol=1e-5)
    g, g_sdpa = grads(model), grads(sdpa)
    assert g.keys() == g_sdpa.keys() and g
    for name in g:
        torch.testing.assert_close(g_sdpa[name], g[name], rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    prompt = torch.randint(0, 37, (2, 5))
    cached = sdpa.eval().generate(prompt, 9, temperature=0, use_cache=True)
    assert torch.equal(cached, sdpa.generate(prompt, 9, temperature=0, use_cache=False))
    assert torch.equal(cached, model.eval().generate(prompt, 9, temperature=0, use_cache=True))


def test_gpt_sdpa_cached_chunk_after_prefill_is_causal(seed):
    """A chunk of several new tokens after a prefill (the bottom-right causal mask)."""
    from genfast.models.gpt import _sdpa_with_cache

    B, S, H, D, first = 2, 8, 2, 16, 5
    q, k, v = (torch.randn(B, S, H, D) for _ in range(3))
    k_cache, v_cache = torch.zeros(B, S, H, D), torch.zeros(B, S, H, D)
    head = _sdpa_with_cache(q[:, :first], k[:, :first], v[:, :first], k_cache, v_cache, 0)
    tail = _sdpa_with_cache(q[:, first:], k[:, first:], v[:, first:], k_cache, v_cache, first)
    full = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                            is_causal=True).transpose(1, 2)
    torch.testing.assert_close(torch.cat([head, tail], dim=1), full)
    torch.testing.assert_close(k_cache, k)
    torch.testing.assert_close(v_cache, v)
    with pytest.raises(ValueError, match="attention must be"):
        small_gpt(attention="flash")


def test_gpt_loads_nanogpt_names(seed):
    """GPT's attention is genfast.nn.CausalSelfAttention (attn.qkv, attn.proj); state dicts with
    nanoGPT's names (attn.c_attn, attn.c_proj, the "transformer." prefix, the causal-mask buffer) load."""
    model = small_gpt(position="rotary")
    state = model.state_dict()
    assert "h.1.attn.qkv.weight" in state and "h.1.attn.proj.bias" in state and "h.1.mlp.c_proj.weight" in state
    nano = {}
    for key, value in state.items():
        key = key.replace("attn.qkv.", "attn.c_attn.").replace("attn.proj.", "attn.c_proj.")
        nano[key if key.startswith("lm_head.") else "transformer." + key] = value
    nano["transformer.h.0.attn.bias"] = torch.ones(1, 1, 32, 32).tril()
    loaded = small_gpt(position="rotary")
    loaded.load_state_dict(nano)
    for name, p in model.named_parameters():
        assert torch.equal(p, loaded.get_parameter(name)), name
    idx = torch.randint(0, 37, (2, 7))
    assert torch.equal(loaded(idx)[0], model(idx)[0])
    with pytest.raises(RuntimeError, match="Unexpected key"):
        loaded.load_state_dict({**state, "h.0.attn.c_attn.extra": state["h.0.attn.qkv.bias"]})


def test_gpt_training_lowers_the_loss(seed):
    model = small_gpt()
    data = torch.arange(0, 33).remainder(37).repeat(4, 1)  # a learnable sequence
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = model(data[:, :-1], data[:, 1:])[1].item()
    for _ in range(20):
        opt.zero_grad()
        model(data[:, :-1], data[:, 1:])[1].backward()
        opt.step()
    assert model(data[:, :-1], data[:, 1:])[1].item() < 0.7 * first
    with pytest.raises(ValueError, match="exceed"):
        model.generate(data[:, :30], 5)


def test_gpt_default_config_is_gpt2_small():
    with torch.device("meta"):
        model = GPT()
    n = sum(p.numel() for p in model.parameters())
    assert 123e6 < n < 125e6, n


# ----------------------------------------------------------------------------- UNet / DDPM


def small_unet():
    return UNet2D(in_channels=1, sample_size=8, block_channels=(8, 16), attention_levels=(False, True),
                  norm_groups=4, attention_heads=1)


def test_unet_fast_matches_reference(seed):
    unet = small_unet()
    x = torch.randn(3, 1, 8, 8)
    t = torch.randint(0, 1000, (3,))
    assert_fast_matches_reference(unet, lambda m: m(x, t).square().mean())


def test_ddpm_training_lowers_the_loss_and_pipeline_samples(seed):
    from genfast.ops import add_noise, diffusion_loss
    from genfast.schedulers import DDIMScheduler, DDPMScheduler

    unet = small_unet()
    sched = DDPMScheduler(num_train_timesteps=100)
    ac = sched.alphas_cumprod.float()
    x0 = torch.zeros(16, 1, 8, 8)
    x0[:, :, 2:6, 3:5] = 1.0  # a bar: structure the model can learn
    opt = torch.optim.Adam(unet.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)

    def loss():
        t = torch.randint(0, 100, (16,), generator=gen)
        noisy, target = add_noise(x0, torch.randn(x0.shape, generator=gen), t, ac.sqrt(), (1 - ac).sqrt(),
                                  target="epsilon")
        return diffusion_loss(unet(noisy, t), target)
    first = sum(loss().item() for _ in range(4))
    for _ in range(40):
        opt.zero_grad()
        loss().backward()
        opt.step()
    assert sum(loss().item() for _ in range(4)) < first
    images = DiffusionPipeline(unet, DDIMScheduler.from_config(sched.config))(
        batch_size=2, num_inference_steps=5, generator=gen, progress=False)
    assert images.shape == (2, 1, 8, 8) and torch.isfinite(images).all()
