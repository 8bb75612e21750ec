"""``python -m genfast demo``: train a small DDPM and a GAN on real handwritten digits, sample
from both, and time genfast's fast paths against the reference paths in the same run.

Data: scikit-learn's ``load_digits`` (1,797 8x8 grey images, shipped with scikit-learn, no
download). Writes into ``--out``: ``digits_real.png``, ``digits_ddpm.png``, ``digits_gan.png``,
``loss_curves.png`` and ``demo.json`` (losses, timings, settings).

The DDPM is ``genfast.models.UNet2D`` trained with the fused ``add_noise`` + loss and sampled
with ``genfast.schedulers.DDIMScheduler`` (one fused kernel per step); the GAN is the classic
MLP GAN (``genfast.models.MLPGAN``, fused Linear + activation layers). ``--quick`` runs few
steps (minutes on 2 CPU cores): the pipeline end to end, not good digits; the full run on a GPU
gives recognisable digits.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

QUICK = dict(ddpm_steps=150, gan_steps=300, timing_steps=5, sample_steps=25, batch=128, num_train_timesteps=200)
# CI's end-to-end check of the whole pipeline (seconds); not a useful result.
SMOKE = dict(ddpm_steps=8, gan_steps=8, timing_steps=2, sample_steps=3, batch=32, num_train_timesteps=50)
FULL = dict(ddpm_steps=6000, gan_steps=8000, timing_steps=20, sample_steps=50, batch=128, num_train_timesteps=1000)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="few training steps (the pipeline, not good digits)")
    parser.add_argument("--out", default="demo_results", metavar="DIR", help="output folder (default: demo_results)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="a few steps of everything (the CI test)")


def load_digits_tensor(device) -> torch.Tensor:
    """The 1,797 digits as (N, 1, 8, 8) floats in [-1, 1]."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise SystemExit("genfast demo needs scikit-learn for its dataset: pip install scikit-learn") from exc
    images = torch.tensor(load_digits().images, dtype=torch.float32) / 16.0
    return (images * 2 - 1).unsqueeze(1).to(device)


class Progress:
    """A dependency-free progress bar on stderr with the latest loss values."""

    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.start = total, desc, time.perf_counter()

    def update(self, i: int, **values) -> None:
        if i % max(1, self.total // 100) and i != self.total:
            return
        width = 28
        done = int(width * i / self.total)
        extra = " ".join(f"{k}={v:.4f}" for k, v in values.items())
        elapsed = time.perf_counter() - self.start
        print(f"\r{self.desc:<5} [{'#' * done}{'.' * (width - done)}] {i}/{self.total} {elapsed:5.0f}s {extra}",
              end="", file=sys.stderr, flush=True)
        if i == self.total:
            print(file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- DDPM


def make_ddpm(settings, device):
    from .models import UNet2D
    from .schedulers import DDPMScheduler

    unet = UNet2D(in_channels=1, sample_size=8, block_channels=(32, 64), attention_levels=(False, True),
                  norm_groups=8, attention_heads=4).to(device)
    scheduler = DDPMScheduler(num_train_timesteps=settings["num_train_timesteps"], beta_schedule="squaredcos_cap_v2")
    return unet, scheduler


def ddpm_loss(unet, scheduler, x0, generator):
    from .ops.diffusion import add_noise, diffusion_loss

    t = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), device=x0.device, generator=generator)
    noise = torch.randn(x0.shape, device=x0.device, generator=generator)
    ac = scheduler.alphas_cumprod.to(device=x0.device, dtype=torch.float32)
    noisy, target = add_noise(x0, noise, t, ac.sqrt(), (1 - ac).sqrt(), target="epsilon")
    return diffusion_loss(unet(noisy, t), target)


# ----------------------------------------------------------------------------- GAN


def make_gan(device):
    from .models import MLPGAN

    return MLPGAN(latent_dim=32, image_dim=64, hidden_g=(128, 256, 512), hidden_d=(512, 256, 128)).to(device)


def gan_step(gan, opt_g, opt_d, real, generator):
    """One non-saturating GAN step (D then G); returns (loss_d, loss_g) as tensors."""
    import torch.nn.functional as F

    real = real.flatten(1)
    z = torch.randn(real.shape[0], gan.latent_dim, device=real.device, generator=generator)
    fake = gan.generator(z)
    logits_real, logits_fake = gan.discriminator(real), gan.discriminator(fake.detach())
    loss_d = F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean()
    opt_d.zero_grad(set_to_none=True)
    loss_d.backward()
    opt_d.step()
    loss_g = F.softplus(-gan.discriminator(fake)).mean()
    opt_g.zero_grad(set_to_none=True)
    loss_g.backward()
    opt_g.step()
    return loss_d.detach(), loss_g.detach()


# ----------------------------------------------------------------------------- timing


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_paths(run_step, models, steps: int, device) -> dict:
    """Median seconds per call of ``run_step()`` with the models on the fast path and on the
    reference path (same weights), measured back to back in this run."""
    out = {}
    for label, backend in (("fast", None), ("reference", "reference")):
        for m in models:
            m.set_backend(backend)
        run_step()  # warm-up
        times = []
        for _ in range(steps):
            _sync(device)
            t0 = time.perf_counter()
            run_step()
            _sync(device)
            times.append(time.perf_counter() - t0)
        times.sort()
        out[label] = times[len(times) // 2]
    for m in models:
        m.set_backend(None)
    return out


# ----------------------------------------------------------------------------- pictures


def save_grid(images: torch.Tensor, path: Path, title: str, columns: int = 16) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = images.detach().float().cpu().clamp(-1, 1).reshape(-1, 8, 8)
    n = images.shape[0]
    rows = math.ceil(n / columns)
    grid = torch.ones(rows * 9 + 1, columns * 9 + 1)
    for i in range(n):
        r, c = divmod(i, columns)
        grid[1 + r * 9:1 + r * 9 + 8, 1 + c * 9:1 + c * 9 + 8] = (images[i] + 1) / 2
    fig, ax = plt.subplots(figsize=(columns * 0.45, rows * 0.45 + 0.5))
    ax.imshow(grid.numpy(), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
    ax.set_title(title)
    ax.axis("off")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def save_curves(curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.5))
    for ax, (name, series) in zip(axes, curves.items()):
        for label, values in series.items():
            ax.plot(values, label=label, linewidth=0.8)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- main


def run(args) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("genfast demo: --device cuda but no CUDA GPU is visible to torch", flush=True)
        return 2
    settings = SMOKE if getattr(args, "smoke", False) else QUICK if args.quick else FULL
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    data = load_digits_tensor(device)
    print(f"genfast demo on {device}: {data.shape[0]} digits (8x8), "
          f"{'smoke' if settings is SMOKE else 'quick' if args.quick else 'full'} run, output in {out}", flush=True)
    batch = settings["batch"]

    def next_batch():
        return data[torch.randint(0, data.shape[0], (batch,), device=device, generator=gen)]

    started = time.perf_counter()
    # DDPM
    unet, scheduler = make_ddpm(settings, device)
    opt = torch.optim.AdamW(unet.parameters(), lr=2e-3)
    ddpm_losses = []
    bar = Progress(settings["ddpm_steps"], "ddpm")
    for i in range(1, settings["ddpm_steps"] + 1):
        loss = ddpm_loss(unet, scheduler, next_batch(), gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ddpm_losses.append(loss.item())
        bar.update(i, loss=ddpm_losses[-1])

    # GAN
    gan = make_gan(device)
    opt_g = torch.optim.Adam(gan.generator.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(gan.discriminator.parameters(), lr=2e-4, betas=(0.5, 0.999))
    gan_d, gan_g = [], []
    bar = Progress(settings["gan_steps"], "gan")
    for i in range(1, settings["gan_steps"] + 1):
        loss_d, loss_g = gan_step(gan, opt_g, opt_d, next_batch(), gen)
        gan_d.append(loss_d.item())
        gan_g.append(loss_g.item())
        bar.update(i, d=gan_d[-1], g=gan_g[-1])

    # Samples
    from .models import DiffusionPipeline
    from .schedulers import DDIMScheduler

    ddim = DDIMScheduler.from_config(scheduler.config)
    unet.eval()
    t0 = time.perf_counter()
    ddpm_images = DiffusionPipeline(unet, ddim)(batch_size=64, num_inference_steps=settings["sample_steps"],
                                                generator=gen)
    _sync(device)
    ddpm_sample_s = time.perf_counter() - t0
    unet.train()
    with torch.no_grad():
        gan_images = gan.generator(torch.randn(64, gan.latent_dim, device=device, generator=gen))
    save_grid(data[:64], out / "digits_real.png", "real digits (scikit-learn load_digits)")
    save_grid(ddpm_images, out / "digits_ddpm.png", f"DDPM samples ({settings['ddpm_steps']} training steps, "
                                                    f"DDIM {settings['sample_steps']} steps)")
    save_grid(gan_images, out / "digits_gan.png", f"MLP GAN samples ({settings['gan_steps']} training steps)")
    save_curves({"DDPM loss": {"train": ddpm_losses}, "GAN losses": {"D": gan_d, "G": gan_g}}, out / "loss_curves.png")

    # Fast vs reference, same weights, same run.
    x = next_batch()
    timing = {
        "ddpm_train_step": time_paths(lambda: ddpm_loss(unet, scheduler, x, gen).backward(), [unet],
                                      settings["timing_steps"], device),
        "gan_train_step": time_paths(lambda: gan_step(gan, opt_g, opt_d, x, gen), [gan],
                                     settings["timing_steps"], device),
    }
    print("\nfast paths vs reference paths (median per step, this run):", flush=True)
    for name, t in timing.items():
        print(f"  {name:<16} fast {t['fast'] * 1e3:8.2f} ms   reference {t['reference'] * 1e3:8.2f} ms   "
              f"speedup {t['reference'] / t['fast']:.2f}x", flush=True)
    summary = dict(device=str(device), settings=settings, seed=args.seed, timing_s=timing,
                   ddpm_sampling_s=ddpm_sample_s,
                   final_losses=dict(ddpm=ddpm_losses[-1], gan_d=gan_d[-1], gan_g=gan_g[-1]),
                   elapsed_s=time.perf_counter() - started)
    (out / "demo.json").write_text(json.dumps(summary, indent=2))
    for name in ("digits_real.png", "digits_ddpm.png", "digits_gan.png", "loss_curves.png", "demo.json"):
        print(f"wrote {out / name}", flush=True)
    print(f"done in {time.perf_counter() - started:.0f} s", flush=True)
    return 0
