"""Reference (plain PyTorch) diffusion kernels: the specification the fused backends follow.

Every sampler step of every scheduler genfast offers (DDPM, DDIM, Euler, Euler ancestral,
Heun, DPM-Solver++ 2M / 2M SDE, flow-match Euler, LCM) is one *linear* combination of the
tensors it touches, once the prediction has been turned into x0 (and x0 clamped). The
schedulers compute the per-step coefficients once, in float64, when the timesteps are set,
and keep them on the device; a step is then one launch of ``sampler_step`` with a row of
that table, with no host synchronisation.

    x0   = X0_FROM_SAMPLE * x + X0_FROM_MODEL * m                     (prediction -> x0)
    x0   = clamp(x0, -r, r) [/ r if x0_rescale]   when x0_clamp = r is given
    prev = PREV_X0 * x0 + PREV_SAMPLE * x + PREV_MODEL * m + PREV_HIST1 * h1 + PREV_HIST2 * h2 + PREV_NOISE * z
    aux  = AUX_X0  * x0 + AUX_SAMPLE  * x + AUX_MODEL  * m + AUX_HIST1  * h1 + AUX_HIST2  * h2

x = sample, m = model output, h1/h2 = history tensors the scheduler keeps (previous x0 for
DPM-Solver, the first-stage derivative and sample for Heun), z = noise. ``aux`` is what the
scheduler keeps for the next step (x0 for DDIM/DPM, the derivative for Heun). Arithmetic is
float32 (float64 for float64 inputs), whatever the storage dtype.
"""
from __future__ import annotations

import torch

# Column indices of a sampler_step coefficient row (the last dimension of ``coefs``).
X0_FROM_SAMPLE, X0_FROM_MODEL = 0, 1
PREV_X0, PREV_SAMPLE, PREV_MODEL, PREV_HIST1, PREV_HIST2, PREV_NOISE = 2, 3, 4, 5, 6, 7
AUX_X0, AUX_SAMPLE, AUX_MODEL, AUX_HIST1, AUX_HIST2 = 8, 9, 10, 11, 12
NUM_STEP_COEFS = 16  # 13..15 reserved (zero)

# add_noise training targets.
TARGETS = ("epsilon", "v_prediction", "sample", "flow")


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _per_sample(values: torch.Tensor, ndim: int, dtype: torch.dtype) -> torch.Tensor:
    """(B,) or scalar -> broadcastable against a (B, ...) tensor of ``ndim`` dims."""
    values = values.to(dtype)
    if values.ndim == 0:
        return values
    return values.reshape(values.shape[0], *([1] * (ndim - 1)))


def sampler_step(sample, model_output, coefs, history=None, history2=None, noise=None,
                 x0_clamp=None, x0_rescale=False, out_dtype=None, aux_dtype=None):
    """One sampler step. ``coefs``: (NUM_STEP_COEFS,) or (B, NUM_STEP_COEFS).

    ``x0_clamp``: None, a float, or a (B,) tensor of per-sample bounds (dynamic thresholding);
    with ``x0_rescale`` x0 is also divided by the bound. Missing history/noise tensors count
    as zeros (their coefficients must then be zero). Returns ``(prev, aux)`` with dtypes
    ``out_dtype`` and ``aux_dtype`` (default: the sample's dtype).
    """
    cd = _compute_dtype(sample)
    nd = sample.ndim
    c = coefs.to(cd)
    if c.ndim == 1:
        col = lambda i: c[i]  # noqa: E731 - scalar coefficient shared by the batch
    else:
        col = lambda i: c[:, i].reshape(c.shape[0], *([1] * (nd - 1)))  # noqa: E731
    x = sample.to(cd)
    m = model_output.to(cd)
    zero = torch.zeros((), dtype=cd, device=sample.device)
    h1 = history.to(cd) if history is not None else zero
    h2 = history2.to(cd) if history2 is not None else zero
    z = noise.to(cd) if noise is not None else zero

    x0 = col(X0_FROM_SAMPLE) * x + col(X0_FROM_MODEL) * m
    if x0_clamp is not None:
        r = x0_clamp if not torch.is_tensor(x0_clamp) else _per_sample(x0_clamp, nd, cd)
        x0 = torch.clamp(x0, -r, r) if torch.is_tensor(r) else x0.clamp(-r, r)
        if x0_rescale:
            x0 = x0 / r
    prev = (col(PREV_X0) * x0 + col(PREV_SAMPLE) * x + col(PREV_MODEL) * m
            + col(PREV_HIST1) * h1 + col(PREV_HIST2) * h2 + col(PREV_NOISE) * z)
    aux = (col(AUX_X0) * x0 + col(AUX_SAMPLE) * x + col(AUX_MODEL) * m
           + col(AUX_HIST1) * h1 + col(AUX_HIST2) * h2)
    return prev.to(out_dtype or sample.dtype), aux.to(aux_dtype or sample.dtype)


def add_noise(x0, noise, timesteps, signal_scale, noise_scale, target=None):
    """Forward noising q(x_t | x_0) for training, optionally with the training target.

    ``signal_scale``/``noise_scale``: (T,) tables indexed by ``timesteps`` (B,) int64 (for DDPM:
    sqrt(alphas_cumprod) and sqrt(1 - alphas_cumprod); for flow matching 1 - sigma and sigma).
    noisy = signal_scale[t] * x0 + noise_scale[t] * noise. ``target``: None (return only the
    noisy sample), "epsilon" (noise), "v_prediction" (signal_scale*noise - noise_scale*x0),
    "sample" (x0) or "flow" (noise - x0). Returns noisy, or (noisy, target).
    """
    cd = _compute_dtype(x0)
    nd = x0.ndim
    a = _per_sample(signal_scale[timesteps], nd, cd)
    s = _per_sample(noise_scale[timesteps], nd, cd)
    x = x0.to(cd)
    n = noise.to(cd)
    noisy = (a * x + s * n).to(x0.dtype)
    if target is None:
        return noisy
    if target == "epsilon":
        tgt = n
    elif target == "v_prediction":
        tgt = a * n - s * x
    elif target == "sample":
        tgt = x
    elif target == "flow":
        tgt = n - x
    else:
        raise ValueError(f"add_noise: target must be None or one of {TARGETS}, got {target!r}")
    return noisy, tgt.to(x0.dtype)


# ----------------------------------------------------------------------------- additions
# (genfast.ops.diffusion's fused kernels follow these; none changes the semantics above)

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def guided_model_output(model_output, model_output_uncond, guidance_scale):
    """Classifier-free guidance as sampler_step fuses it: m = uncond + g * (cond - uncond),
    in the compute dtype (returned in it)."""
    cd = _compute_dtype(model_output)
    m, u = model_output.to(cd), model_output_uncond.to(cd)
    return u + guidance_scale * (m - u)


def philox_uniforms(seed: int, index: torch.Tensor):
    """The uniforms behind genfast's seeded noise (kernels/diffusion.h): Philox4x32-10 with
    counter (index lo, index hi, 0, 0) and key (seed lo, seed hi), the constants and rounds of
    triton.language.random; the first two words, 24 bits each, centred in their bin. Host
    numpy (uint64 products are exact), so this spec is slow and synchronises."""
    import numpy as np

    idx = index.detach().cpu().numpy().astype(np.uint64)
    mask = np.uint64(0xFFFFFFFF)
    c0, c1 = idx & mask, idx >> np.uint64(32)
    c2 = np.zeros_like(c0)
    c3 = np.zeros_like(c0)
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64((seed >> 32) & 0xFFFFFFFF)
    a, b = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
    for _ in range(10):
        p0, p2 = c0, c2
        c0 = ((b * p2) >> np.uint64(32)) ^ c1 ^ k0
        c2 = ((a * p0) >> np.uint64(32)) ^ c3 ^ k1
        c1 = (b * p2) & mask
        c3 = (a * p0) & mask
        k0 = (k0 + np.uint64(0x9E3779B9)) & mask
        k1 = (k1 + np.uint64(0xBB67AE85)) & mask
    scale = 2.0 ** -24
    u1 = ((c0 >> np.uint64(8)).astype(np.float64) + 0.5) * scale
    u2 = ((c1 >> np.uint64(8)).astype(np.float64) + 0.5) * scale
    return torch.from_numpy(u1).to(index.device), torch.from_numpy(u2).to(index.device)


def seeded_normal(like: torch.Tensor, seed: int, dtype=None) -> torch.Tensor:
    """The standard normal noise genfast draws in-kernel for ``noise_seed=seed``: element i of
    ``like``'s memory (dense, batch outermost; contiguous here) gets Box-Muller of
    philox_uniforms(seed, i): sqrt(-2 log u1) cos(2 pi u2)."""
    index = torch.arange(like.numel(), device=like.device)
    u1, u2 = philox_uniforms(seed, index)
    z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * torch.pi * u2)
    return z.reshape(like.shape).to(dtype or _compute_dtype(like))


def cfg_combine(uncond, cond, guidance_scale, guidance_rescale=0.0):
    """Classifier-free guidance: cfg = uncond + g * (cond - uncond); with guidance_rescale > 0,
    diffusers' rescale_noise_cfg (Lin et al. 2023, sec. 3.4): cfg is rescaled to the standard
    deviation (unbiased, over every non-batch dimension) of the conditional prediction ``cond``
    and mixed: rescale * cfg * std(cond) / std(cfg) + (1 - rescale) * cfg. Computed in float32
    (float64 for float64), returned in ``cond``'s dtype."""
    cd = _compute_dtype(cond)
    u, c = uncond.to(cd), cond.to(cd)
    cfg = u + guidance_scale * (c - u)
    if guidance_rescale > 0:
        dims = list(range(1, c.ndim))
        std_text = c.std(dim=dims, keepdim=True)
        std_cfg = cfg.std(dim=dims, keepdim=True)
        cfg = guidance_rescale * (cfg * (std_text / std_cfg)) + (1 - guidance_rescale) * cfg
    return cfg.to(cond.dtype)


def diffusion_loss(model_output, target, weights=None, reduction="mean"):
    """Per-sample weighted MSE: l_b = w_b * mean over non-batch dims of (model_output - target)^2;
    reduction "mean" (mean over the batch), "sum", or "none" (the (B,) vector). Computed and
    returned in float32 (float64 for float64 model_output)."""
    cd = _compute_dtype(model_output)
    d = model_output.to(cd) - target.to(cd)
    per_sample = (d * d).reshape(d.shape[0], -1).mean(dim=1)
    if weights is not None:
        per_sample = per_sample * weights.to(cd)
    if reduction == "none":
        return per_sample
    if reduction == "sum":
        return per_sample.sum()
    if reduction == "mean":
        return per_sample.mean()
    raise ValueError(f"diffusion_loss: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def min_snr_weights(timesteps, alphas_cumprod, gamma, prediction_type="epsilon"):
    """Min-SNR-gamma loss weights (Hang et al. 2023) for (B,) integer ``timesteps``:
    SNR = abar / (1 - abar); min(SNR, g) for "sample" (x0), min(SNR, g) / SNR for "epsilon",
    min(SNR, g) / (SNR + 1) for "v_prediction". float32 (float64 for a float64 table)."""
    cd = _compute_dtype(alphas_cumprod)
    abar = alphas_cumprod.to(cd)[timesteps]
    snr = abar / (1 - abar)
    clipped = torch.clamp(snr, max=gamma)
    if prediction_type == "sample":
        return clipped
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    raise ValueError(f"min_snr_weights: prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def timestep_embedding(timesteps, dim, flip_sin_to_cos=False, downscale_freq_shift=1.0, scale=1.0,
                       max_period=10000):
    """diffusers get_timestep_embedding (embeddings.py), re-implemented: (N,) timesteps ->
    (N, dim) [sin | cos] (or [cos | sin] with flip_sin_to_cos) of timesteps * exp(-ln(max_period)
    * j / (dim // 2 - downscale_freq_shift)) * scale, zero-padded to an odd dim. float32 like
    diffusers (float64 for float64 timesteps: the float64 spec)."""
    import math

    cd = torch.float64 if timesteps.dtype == torch.float64 else torch.float32
    half_dim = dim // 2
    exponent = -math.log(max_period) * torch.arange(start=0, end=half_dim, dtype=cd, device=timesteps.device)
    exponent = exponent / (half_dim - downscale_freq_shift)
    emb = torch.exp(exponent)
    emb = timesteps[:, None].to(cd) * emb[None, :]
    emb = scale * emb
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half_dim:], emb[:, :half_dim]], dim=-1)
    if dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1, 0, 0))
    return emb
