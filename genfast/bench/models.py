"""End-to-end model benchmarks (``python -m genfast bench models``): training steps and
sampling of genfast's model classes, fast paths against the same model on its reference paths.

Cases (mode, model):
  train     gpt        zero_grad, forward, cross-entropy, backward, clip_grad_norm_(1.0), AdamW step
                       (nanoGPT's step); output (loss, grad norm); tokens/s and TFLOP/s (nanoGPT's
                       6N + 12*L*H*Q*T FLOPs per token)
  generate  gpt        GPT.generate with its KV cache, greedy; new tokens/s (the prompt's prefill included)
  sample    unet-ddpm  DiffusionPipeline, genfast's DDPMScheduler, a few steps; images/s
  train     stylegan2  D step (softplus loss on fakes and reals + gamma/2 * R1 every step),
                       then G step (non-saturating loss); output (D loss, R1, G loss); images/s
  train     dcgan      D step then G step (BCE-with-logits); output (D loss, G loss); images/s
  train     mlpgan     the same with the classic MNIST MLP GAN
  train     vae        negative ELBO, backward, Adam step; output (loss, grad norm); images/s

Providers (the same weights, copied from one model built per case, and the same inputs):
  genfast    the model on its fast paths (automatic backend)
  reference  the same model after ``set_backend("reference")``: every genfast op runs its
             plain-PyTorch specification (GPT: math attention), the schedulers too
  sdpa       GPT only: the same weights in ``GPT(attention="sdpa")`` (torch's
             F.scaled_dot_product_attention, training and cached generation)
  compile    ``torch.compile`` of the reference model (not for generation). genfast ops are
             torch.library custom ops, opaque to Inductor: it fuses the code around them, and
             the reference ops inside run as their eager PyTorch code. Where compiling fails
             (e.g. R1's double backward) the row says why.
  sdpa-compile  GPT training only: ``torch.compile`` of the SDPA model, all plain PyTorch (the
             usual nanoGPT setup, and the compile baseline Inductor can fuse end to end)
The compile providers are skipped with ``--quick`` on a CPU (compiling takes minutes there).
Every step is a training step of its own model copy, so the first call of each provider
starts from the same weights: that call's output is what the genfast row is checked against.
Random draws (dropout, StyleGAN2 noise) are reseeded at the start of every step, so every
provider draws the same numbers. Generation is checked by teacher forcing: every token the
genfast path chose must be a greedy choice of the reference model within rounding.

Sizes: GPU the issue's (GPT-small 124M at sequence 1024, StyleGAN2 at 256x256, ...); CPU small
models (``--quick`` smaller still, about a minute on two cores); ``preset="tiny"`` for tests.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F

from .._dispatch import use_backend
from ..models import (DCGANDiscriminator, DCGANGenerator, GPT, GPTConfig, MLPGAN, StyleGAN2Discriminator,
                      StyleGAN2Generator, UNet2D, VAE, DiffusionPipeline, r1_penalty)
from .providers import NO_COMPILE, case_device, reset_compile
from .timing import BASELINE, GENFAST, CHECK_TOLERANCE, Case, Provider, outputs_close, synchronize

NAME = "models"
PROVIDERS = ("genfast", "reference", "sdpa", "compile", "sdpa-compile")
BASELINES = PROVIDERS[1:]
COMPILED = ("compile", "sdpa-compile")
CASES = ("gpt-train", "gpt-generate", "unet-ddpm", "stylegan2", "dcgan", "mlpgan", "vae")
STEP_SEED = 1234  # reseeded at the start of every step: the same dropout masks and noise everywhere

# Per preset, per case: the model's constructor arguments and the batch. GPT configs are
# GPTConfig fields; "seq" is the training sequence, "prompt"/"new" the generation lengths.
PRESETS = {
    "gpu": {
        "gpt-train": dict(config=dict(n_layer=12, n_head=12, n_embd=768, block_size=1024), batch=8, seq=1024),
        "gpt-generate": dict(config=dict(n_layer=12, n_head=12, n_embd=768, block_size=1024), batch=16,
                             prompt=512, new=128),
        "unet-ddpm": dict(model=dict(in_channels=3, sample_size=32, block_channels=(128, 256, 256, 256),
                                     layers_per_block=2, attention_levels=(False, True, False, False),
                                     norm_groups=32, attention_heads=1), batch=64, steps=10),
        "stylegan2": dict(g=dict(z_dim=512, w_dim=512, img_resolution=256), d=dict(img_resolution=256), batch=16),
        "dcgan": dict(g=dict(latent_dim=100, channels=64, image_size=64), d=dict(channels=64, image_size=64),
                      batch=128),
        "mlpgan": dict(model=dict(), batch=256),
        "vae": dict(model=dict(in_channels=3, image_size=64, latent_dim=128, channels=(64, 128)), batch=256),
    },
    "cpu": {
        "gpt-train": dict(config=dict(n_layer=4, n_head=4, n_embd=256, block_size=256, vocab_size=8192),
                          batch=4, seq=256),
        "gpt-generate": dict(config=dict(n_layer=4, n_head=4, n_embd=256, block_size=256, vocab_size=8192),
                             batch=4, prompt=64, new=32),
        "unet-ddpm": dict(model=dict(in_channels=3, sample_size=16, block_channels=(32, 64), layers_per_block=1,
                                     attention_levels=(False, True), norm_groups=8, attention_heads=2),
                          batch=16, steps=5),
        "stylegan2": dict(g=dict(z_dim=64, w_dim=64, img_resolution=32, channel_base=1024, channel_max=64,
                                 mapping_layers=4),
                          d=dict(img_resolution=32, channel_base=1024, channel_max=64), batch=8),
        "dcgan": dict(g=dict(latent_dim=100, channels=32, image_size=32), d=dict(channels=32, image_size=32),
                      batch=32),
        "mlpgan": dict(model=dict(), batch=64),
        "vae": dict(model=dict(in_channels=1, image_size=28, latent_dim=16, channels=(32, 64)), batch=64),
    },
    "cpu-quick": {
        "gpt-train": dict(config=dict(n_layer=2, n_head=4, n_embd=128, block_size=128, vocab_size=4096),
                          batch=4, seq=128),
        "gpt-generate": dict(config=dict(n_layer=2, n_head=4, n_embd=128, block_size=128, vocab_size=4096),
                             batch=2, prompt=32, new=16),
        "unet-ddpm": dict(model=dict(in_channels=3, sample_size=16, block_channels=(16, 32), layers_per_block=1,
                                     attention_levels=(False, True), norm_groups=8, attention_heads=2),
                          batch=8, steps=3),
        "stylegan2": dict(g=dict(z_dim=32, w_dim=32, img_resolution=16, channel_base=256, channel_max=32,
                                 mapping_layers=2),
                          d=dict(img_resolution=16, channel_base=256, channel_max=32), batch=4),
        "dcgan": dict(g=dict(latent_dim=64, channels=16, image_size=32), d=dict(channels=16, image_size=32),
                      batch=16),
        "mlpgan": dict(model=dict(), batch=64),
        "vae": dict(model=dict(in_channels=1, image_size=28, latent_dim=16, channels=(32, 64)), batch=32),
    },
    "tiny": {  # the tests: every case end to end in a few seconds
        "gpt-train": dict(config=dict(n_layer=1, n_head=2, n_embd=32, block_size=32, vocab_size=64), batch=2, seq=16),
        "gpt-generate": dict(config=dict(n_layer=1, n_head=2, n_embd=32, block_size=32, vocab_size=64), batch=2,
                             prompt=8, new=4),
        "unet-ddpm": dict(model=dict(in_channels=1, sample_size=8, block_channels=(8, 16), layers_per_block=1,
                                     attention_levels=(False, True), norm_groups=4, attention_heads=1),
                          batch=2, steps=2),
        "stylegan2": dict(g=dict(z_dim=8, w_dim=8, img_resolution=8, channel_base=64, channel_max=8, mapping_layers=2),
                          d=dict(img_resolution=8, channel_base=64, channel_max=8, mbstd_group_size=2), batch=2),
        "dcgan": dict(g=dict(latent_dim=8, channels=4, image_size=8), d=dict(channels=4, image_size=8), batch=4),
        "mlpgan": dict(model=dict(latent_dim=8, image_dim=16, hidden_g=(16, 16, 16), hidden_d=(16, 16, 8)), batch=4),
        "vae": dict(model=dict(in_channels=1, image_size=8, latent_dim=4, channels=(8, 16)), batch=4),
    },
}


def preset_for(device, quick: bool) -> str:
    if torch.device(device).type == "cuda":
        return "gpu"
    return "cpu-quick" if quick else "cpu"


def _dtype_for(case: str, device: torch.device) -> torch.dtype:
    # GPT trains and generates in bf16 on a GPU (what GPT-small runs in); the pipelines and
    # GANs stay fp32 (the DDPM pipeline draws fp32 noise, R1 is second order).
    return torch.bfloat16 if device.type == "cuda" and case.startswith("gpt") else torch.float32


def _params_label(*models) -> str:
    n = sum(p.numel() for m in models for p in {id(p): p for p in m.parameters()}.values())
    for unit, div in (("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.3g}{unit} params"
    return f"{n} params"


def _reseed() -> None:
    torch.manual_seed(STEP_SEED)  # seeds the CUDA generators too


def _grad_norm(params) -> torch.Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


def _adam(params, device, **kw):
    fused = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.Adam(params, **kw, **fused)


def _variant(base, provider: str):
    """A copy of ``base`` with the provider's paths (the same weights). The compiled copy keeps
    backend None: the model's own backend scope sets a ContextVar, which Dynamo cannot trace
    (it would fall back to eager); ``_scope`` sets "reference" around the compiled call instead,
    and the ops read it when they run."""
    model = copy.deepcopy(base)
    return model.set_backend("reference" if provider == "reference" else None)


def _scope(provider: str):
    """The backend every genfast op runs on inside a provider's step (including ops called
    outside the model, e.g. the scheduler, and ops under torch.compile)."""
    return use_backend("reference" if provider in ("reference", "compile") else None)


def _other_providers(compile_reason: Optional[str]) -> dict:
    """Reasons for the providers a non-GPT case does not have or cannot run."""
    return {"sdpa": "GPT only", "sdpa-compile": "GPT only", "compile": compile_reason}


WARMUP_CALLS = 2


def _prepared(provider: str, build: Callable, device: torch.device) -> Callable:
    """The provider's factory: ``build(inputs)`` makes a fresh model copy and its step.

    A throwaway copy runs WARMUP_CALLS steps first (first calls are slow: allocations, lazy
    initialisation; torch.compile compiles there, so a failure makes the row n/a with the
    reason). The returned step then starts from the case's initial weights, as every other
    provider's does, so their first outputs compare."""

    def factory(inputs):
        warm = _scoped(provider, build(inputs))
        for _ in range(WARMUP_CALLS):
            warm()
        synchronize(device)
        del warm
        return _scoped(provider, build(inputs))
    return factory


def _scoped(provider: str, step: Callable) -> Callable:
    def scoped():
        with _scope(provider):
            return step()
    return scoped


def compile_unavailable(device, quick: bool, use_compile: bool) -> Optional[str]:
    """Why the torch.compile providers do not run (None: they do)."""
    if not use_compile:
        return NO_COMPILE
    if torch.device(device).type == "cpu" and quick:
        return "skipped with --quick on a CPU (compiling the models takes minutes there)"
    return None


# ----------------------------------------------------------------------------- GPT


def gpt_flops_per_token(config: GPTConfig, n_params: int, seq: int) -> float:
    """nanoGPT's estimate (PaLM appendix B): 6N + 12 * L * H * Q * T per trained token."""
    head_dim = config.n_embd // config.n_head
    return 6.0 * n_params + 12.0 * config.n_layer * config.n_head * head_dim * seq


def _gpt_models(config: dict, device, dtype):
    torch.manual_seed(0)
    with torch.device(device):  # initialised on the device: 124M parameters are slow to draw on a CPU
        base = GPT(GPTConfig(**config)).to(dtype=dtype)

    def variant(provider: str):
        if provider in ("sdpa", "sdpa-compile"):
            with torch.device(device):
                model = GPT(dataclasses.replace(base.config, attention="sdpa")).to(dtype=dtype)
            model.load_state_dict(base.state_dict())
            return model
        return _variant(base, provider)
    return base, variant


def build_gpt_train_case(spec: dict, device, compile_reason: Optional[str] = None) -> Case:
    device = case_device(device)
    dtype = _dtype_for("gpt-train", device)
    base, variant = _gpt_models(spec["config"], device, dtype)
    B, S = spec["batch"], spec["seq"]
    vocab = base.config.vocab_size

    def make_inputs(i):
        gen = torch.Generator(device=device).manual_seed(100 + i)
        data = torch.randint(0, vocab, (B, S + 1), generator=gen, device=device)
        return {"idx": data[:, :-1].contiguous(), "targets": data[:, 1:].contiguous()}

    def factory_for(provider):
        def build(inputs):
            model = variant(provider).train()
            forward = torch.compile(model) if provider in COMPILED else model
            opt = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1,
                                    **({"fused": True} if device.type == "cuda" else {"foreach": True}))

            def step():
                opt.zero_grad(set_to_none=True)
                _, loss = forward(inputs["idx"], inputs["targets"])
                loss.backward()
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                return loss.detach(), norm
            return step
        return _prepared(provider, build, device)

    n_params = sum(p.numel() for p in base.parameters())
    reasons = {"compile": compile_reason, "sdpa-compile": compile_reason}
    providers = {name: _provider(name, factory_for, reasons.get(name)) for name in PROVIDERS}
    return _case("train", "gpt", (B, S), dtype, device, make_inputs, providers, items=B * S, unit="tok/s",
                 variant=_params_label(base), flops=gpt_flops_per_token(base.config, n_params, S) * B * S,
                 compiled=compile_reason is None)


def greedy_choice_check(model, prompt_len: int):
    """Check of generated tokens by teacher forcing: ``model`` (the reference) scores the
    sequence a provider generated; every new token must be within rounding of the reference's
    largest logit at its position. Error: the worst (max logit - chosen logit) / max |logit|."""

    def check(out, ref, dtype):
        if not isinstance(out, torch.Tensor) or out.shape != ref.shape:
            return False, math.inf
        if torch.equal(out, ref):
            return True, 0.0
        with torch.no_grad(), use_backend("reference"):
            logits, _ = model(out[:, :-1])
        logits = logits[:, prompt_len - 1:].float()
        chosen = logits.gather(-1, out[:, prompt_len:, None]).squeeze(-1)
        gap = (logits.max(-1).values - chosen).max().item()
        err = gap / max(logits.abs().max().item(), 1e-30)
        return err <= CHECK_TOLERANCE.get(dtype, 1e-2), err
    return check


def build_gpt_generate_case(spec: dict, device, compile_reason: Optional[str] = None) -> Case:
    device = case_device(device)
    dtype = _dtype_for("gpt-generate", device)
    base, variant = _gpt_models(spec["config"], device, dtype)
    base.eval()
    B, P, N = spec["batch"], spec["prompt"], spec["new"]
    vocab = base.config.vocab_size

    def make_inputs(i):
        gen = torch.Generator(device=device).manual_seed(200 + i)
        return {"prompt": torch.randint(0, vocab, (B, P), generator=gen, device=device)}

    def factory_for(provider):
        def build(inputs):
            model = variant(provider).eval()
            return lambda: model.generate(inputs["prompt"], N, temperature=0)
        return _prepared(provider, build, device)

    not_compiled = "generation is not compiled: GPT.generate's KV cache grows every token"
    reasons = {"compile": not_compiled, "sdpa-compile": not_compiled}
    providers = {name: _provider(name, factory_for, reasons.get(name)) for name in PROVIDERS}
    return _case("generate", "gpt", (B, P, N), dtype, device, make_inputs, providers, items=B * N, unit="tok/s",
                 variant=_params_label(base), check=greedy_choice_check(base.set_backend("reference"), P))


# ----------------------------------------------------------------------------- UNet / DDPM


def build_unet_ddpm_case(spec: dict, device, compile_reason: Optional[str] = None) -> Case:
    from ..schedulers import DDPMScheduler

    device = case_device(device)
    torch.manual_seed(0)
    base = UNet2D(**spec["model"]).to(device).eval()
    B, steps = spec["batch"], spec["steps"]

    def factory_for(provider):
        def build(inputs):
            unet = _variant(base, provider)
            model = torch.compile(unet) if provider == "compile" else unet
            scheduler = DDPMScheduler(num_train_timesteps=1000)

            def sample():  # torch.compile's wrapper passes in_channels etc. through to the module
                gen = torch.Generator(device=device).manual_seed(300)
                return DiffusionPipeline(model, scheduler)(batch_size=B, num_inference_steps=steps, generator=gen,
                                                           progress=False, device=device)
            return sample
        return _prepared(provider, build, device)

    reasons = _other_providers(compile_reason)
    providers = {name: _provider(name, factory_for, reasons.get(name)) for name in PROVIDERS}
    shape = (B, base.in_channels, base.sample_size, base.sample_size)
    return _case("sample", "unet-ddpm", shape, torch.float32, device, lambda i: {}, providers, items=B,
                 unit="img/s", variant=f"{_params_label(base)}, {steps} steps", compiled=compile_reason is None)


# ----------------------------------------------------------------------------- GANs


def build_stylegan2_case(spec: dict, device, compile_reason: Optional[str] = None) -> Case:
    device = case_device(device)
    torch.manual_seed(0)
    base_g = StyleGAN2Generator(**spec["g"]).to(device)
    base_d = StyleGAN2Discriminator(**spec["d"]).to(device)
    B, res, z_dim = spec["batch"], base_g.img_resolution, base_g.z_dim
    gamma = 10.0

    def make_inputs(i):
        gen = torch.Generator(device=device).manual_seed(400 + i)
        return {"z": torch.randn(B, z_dim, generator=gen, device=device),
                "real": torch.randn(B, 3, res, res, generator=gen, device=device).tanh()}

    def factory_for(provider):
        def build(inputs):
            g, d = _variant(base_g, provider), _variant(base_d, provider)
            g_fwd, d_fwd = (torch.compile(g), torch.compile(d)) if provider == "compile" else (g, d)
            opt_g = _adam(g.parameters(), device, lr=2e-3, betas=(0.0, 0.99))
            opt_d = _adam(d.parameters(), device, lr=2e-3, betas=(0.0, 0.99))
            z, real = inputs["z"], inputs["real"]

            def step():
                _reseed()
                opt_d.zero_grad(set_to_none=True)
                fake = g_fwd(z).detach()
                d_loss = F.softplus(d_fwd(fake)).mean() + F.softplus(-d_fwd(real)).mean()
                r1 = r1_penalty(d_fwd, real)
                (d_loss + gamma / 2 * r1).backward()
                opt_d.step()
                opt_g.zero_grad(set_to_none=True)
                g_loss = F.softplus(-d_fwd(g_fwd(z))).mean()
                g_loss.backward()
                opt_g.step()
                return d_loss.detach(), r1.detach(), g_loss.detach()
            return step
        return _prepared(provider, build, device)

    reasons = _other_providers(compile_reason)
    providers = {name: _provider(name, factory_for, reasons.get(name)) for name in PROVIDERS}
    return _case("train", "stylegan2", (B, 3, res, res), torch.float32, device, make_inputs, providers, items=B,
                 unit="img/s", variant=f"G+D+R1, {_params_label(base_g, base_d)}",
                 compiled=compile_reason is None)


def _classic_gan_step(g_fwd, d_fwd, opt_g, opt_d, z, real):
    """One D step (BCE-with-logits, reals 1, fakes 0) then one G step (fakes labelled 1)."""

    def step():
        _reseed()
        opt_d.zero_grad(set_to_none=True)
        fake = g_fwd(z)
        real_logits, fake_logits = d_fwd(real).flatten(), d_fwd(fake.detach()).flatten()
        d_loss = (F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
                  + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)))
        d_loss.backward()
        opt_d.step()
        opt_g.zero_grad(set_to_none=True)
        logits = d_fwd(fake).flatten()
        g_loss = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))
        g_loss.backward()
        opt_g.step()
        return d_loss.detach(), g_loss.detach()
    return step


def build_dcgan_case(spec: dict, device, compile_reason: Optional[str] = None) -> Case:
    device = case_device(device)
    torch.manual_seed(0)
    base_g, base_d = DCGANGenerator(**spec["g"]).to(device), DCGANDiscriminator(**spec["d"]).to(device)
    B, res, latent = spec["batch"], spec["g"]["image_size"], base_g.latent_dim

    def make_inputs(i):
        gen = torch.Generator(device=device).manual_seed(500 + i)
        return {"z": torch.randn(B, latent, generator=gen, device=device),
                "real": torch.rand(B, 3, res, res, generator=gen, device=device) * 2 - 1}

    def factory_for(provider):
        def build(inputs):
            g, d = _variant(base_g, provider).train(), _variant(base_d, provider).train()
            g_fwd, d_fwd = (torch.compile(g), torch.compile(d)) if provider == "compile" else (g, d)
            opt_g = _adam(g.parameters(), device, lr=2e-4, betas=(0.5, 0.999))
            opt_d = _adam(d.parameters(), device, lr=2e-4, betas=(0.5, 0.999))
            step = _classic_gan_step(g_fwd, d_fwd, opt_g, opt_d, inputs["z"], inputs["real"])
            return step
        return _prepared(provider, build, device)

    reasons = _other_providers(compile_reason)
    providers = {name: _provider(name, factory_for, reasons.get(name)) for name in PROVIDERS}
    return _case("train", "dcgan", (B, 3, res, res), torch.float32, device, make_inputs, providers, items=B,
                 unit="img/s", variant=f"G+D, {_params_label(base_g, base_d)}", compiled=compile_reason is None)


def build_mlpgan_case(spec: dict, device, compile_reason: Optional[str] = None) -> Case:
    device = case_device(device)
    torch.manual_seed(0)
    base = MLPGAN(**spec["model"]).to(device)
    B = spec["batch"]

    def make_inputs(i):
        gen = torch.Generator(device=device).manual_seed(600 + i)
        return {"z": torch.randn(B, base.latent_dim, generator=gen, device=device),
                "real": torch.rand(B, base.image_dim, generator=gen, device=device) * 2 - 1}

    def factory_for(provider):
        def build(inputs):
            gan = _variant(base, provider).train()
            g, d = gan.generator, gan.discriminator
            g_fwd, d_fwd = (torch.compile(g), torch.compile(d)) if provider == "compile" else (g, d)
            opt_g = _adam(g.parameters(), device, lr=2e-4, betas=(0.5, 0.999))
            opt_d = _adam(d.parameters(), device, lr=2e-4, betas=(0.5, 0.999))
            step = _classic_gan_step(g_fwd, d_fwd, opt_g, opt_d, inputs["z"], inputs["real"])
            return step
        return _prepared(provider, build, device)

    reasons = _other_providers(compile_reason)
    providers = {name: _provider(name, factory_for, reasons.get(name)) for name in PROVIDERS}
    return _case("train", "mlpgan", (B, base.image_dim), torch.float32, device, make_inputs, providers, items=B,
                 unit="img/s", variant=f"G+D, {_params_label(base)}", compiled=compile_reason is None)


# ----------------------------------------------------------------------------- VAE


def build_vae_case(spec: dict, device, compile_reason: Optional[str] = None) -> Case:
    device = case_device(device)
    torch.manual_seed(0)
    base = VAE(**spec["model"]).to(device)
    B, C, S, L = spec["batch"], base.in_channels, base.image_size, base.latent_dim

    def make_inputs(i):
        gen = torch.Generator(device=device).manual_seed(700 + i)
        return {"x": torch.rand(B, C, S, S, generator=gen, device=device),
                "eps": torch.randn(B, L, generator=gen, device=device)}

    def factory_for(provider):
        def build(inputs):
            model = _variant(base, provider).train()
            loss_fn = torch.compile(model.loss) if provider == "compile" else model.loss
            opt = _adam(model.parameters(), device, lr=1e-3)

            def step():
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(inputs["x"], inputs["eps"])
                loss.backward()
                norm = _grad_norm(model.parameters())
                opt.step()
                return loss.detach(), norm
            return step
        return _prepared(provider, build, device)

    reasons = _other_providers(compile_reason)
    providers = {name: _provider(name, factory_for, reasons.get(name)) for name in PROVIDERS}
    return _case("train", "vae", (B, C, S, S), torch.float32, device, make_inputs, providers, items=B,
                 unit="img/s", variant=_params_label(base), compiled=compile_reason is None)


# ----------------------------------------------------------------------------- suite

BUILDERS = {
    "gpt-train": build_gpt_train_case,
    "gpt-generate": build_gpt_generate_case,
    "unet-ddpm": build_unet_ddpm_case,
    "stylegan2": build_stylegan2_case,
    "dcgan": build_dcgan_case,
    "mlpgan": build_mlpgan_case,
    "vae": build_vae_case,
}


def _provider(name: str, factory_for, reason: Optional[str]) -> Provider:
    kind = GENFAST if name == "genfast" else BASELINE
    return Provider(name, kind, None if reason else factory_for(name), reason)


def _case(mode, model, shape, dtype, device, make_inputs, providers, *, items, unit, variant, flops=None,
          check=outputs_close, compiled=False) -> Case:
    extra = {"items": items, "unit": unit}
    if flops:
        extra["flops"] = flops
    return Case(op=NAME, mode=mode, shape=tuple(shape), dtype=dtype, act=model, device=device, bytes_moved=0,
                make_inputs=make_inputs, providers=providers, reference="reference", baselines=BASELINES,
                variant=variant, check=check, cleanup=reset_compile if compiled else None, extra=extra)


def build_cases(device, quick: bool = False, use_compile: bool = True, preset: Optional[str] = None,
                cases=CASES) -> Iterator[Case]:
    """One Case per model (``cases``: names from CASES), sized by ``preset`` (a key of
    PRESETS; default: by device and ``quick``). Each case builds its models when yielded."""
    specs = PRESETS[preset or preset_for(device, quick)]
    compile_reason = compile_unavailable(device, quick, use_compile)
    for name in cases:
        yield BUILDERS[name](specs[name], device, compile_reason=compile_reason)


def count_cases(device, quick: bool = False) -> int:
    return len(CASES)
