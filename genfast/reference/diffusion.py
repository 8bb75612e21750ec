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
