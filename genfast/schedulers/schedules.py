"""Noise schedules, timestep spacings and sigma schedules, computed in float64 on the host.

Values are those of huggingface/diffusers (0.42) for the same configuration; diffusers computes
most of them in float32, genfast in float64 (then the schedulers store them on the device), so
the two agree to float32 rounding. Everything here returns float64 numpy arrays (or int64 for
integer timesteps).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace", "exp")
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")


def betas_for_alpha_bar(num_train_timesteps: int, max_beta: float = 0.999,
                        alpha_transform_type: str = "cosine") -> np.ndarray:
    """Betas of a continuous alpha_bar(t), t in [0, 1]: beta_i = min(1 - abar(t_{i+1})/abar(t_i), max_beta).
    ``cosine`` is squaredcos_cap_v2 (Nichol & Dhariwal 2021)."""
    if alpha_transform_type == "cosine":
        def alpha_bar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    elif alpha_transform_type == "laplace":
        def alpha_bar(t):
            lmb = -0.5 * math.copysign(1, 0.5 - t) * math.log(1 - 2 * math.fabs(0.5 - t) + 1e-6)
            snr = math.exp(lmb)
            return math.sqrt(snr / (1 + snr))
    elif alpha_transform_type == "exp":
        def alpha_bar(t):
            return math.exp(t * -12.0)
    else:
        raise ValueError(f"alpha_transform_type must be 'cosine', 'laplace' or 'exp', got {alpha_transform_type!r}")
    n = num_train_timesteps
    return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)], dtype=np.float64)


def make_betas(beta_schedule: str, num_train_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02,
               trained_betas: Optional[Sequence[float]] = None) -> np.ndarray:
    """The (num_train_timesteps,) betas of a named schedule (or ``trained_betas`` as given)."""
    if trained_betas is not None:
        return np.asarray(trained_betas, dtype=np.float64).copy()
    n = int(num_train_timesteps)
    if beta_schedule == "linear":
        return np.linspace(beta_start, beta_end, n, dtype=np.float64)
    if beta_schedule == "scaled_linear":
        return np.linspace(beta_start ** 0.5, beta_end ** 0.5, n, dtype=np.float64) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        return betas_for_alpha_bar(n, alpha_transform_type="cosine")
    if beta_schedule == "laplace":
        return betas_for_alpha_bar(n, alpha_transform_type="laplace")
    if beta_schedule == "exp":
        return betas_for_alpha_bar(n, alpha_transform_type="exp")
    if beta_schedule == "sigmoid":
        x = np.linspace(-6.0, 6.0, n, dtype=np.float64)
        return 1.0 / (1.0 + np.exp(-x)) * (beta_end - beta_start) + beta_start
    raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {beta_schedule!r}")


def rescale_betas_zero_snr(betas: np.ndarray) -> np.ndarray:
    """Zero terminal SNR (Lin et al. 2023, Algorithm 1): shift and scale sqrt(alpha_bar) so the last is 0
    and the first unchanged."""
    abar_sqrt = np.sqrt(np.cumprod(1.0 - np.asarray(betas, dtype=np.float64)))
    first, last = abar_sqrt[0], abar_sqrt[-1]
    abar_sqrt = (abar_sqrt - last) * (first / (first - last))
    abar = abar_sqrt ** 2
    alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas


def alphas_cumprod(betas: np.ndarray) -> np.ndarray:
    return np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))


def sigmas_from_alphas_cumprod(abar: np.ndarray) -> np.ndarray:
    """Variance-exploding sigmas sqrt((1 - abar) / abar), indexed by train timestep."""
    return np.sqrt((1.0 - abar) / abar)


def spaced_timesteps(spacing: str, num_inference_steps: int, num_train_timesteps: int, steps_offset: int = 0,
                     *, rounded_linspace: bool = True) -> np.ndarray:
    """Descending timesteps of a spacing, as float64 values (integers except unrounded linspace).

    linspace: linspace(0, T-1, n) (rounded to integers when ``rounded_linspace``, as DDPM/DDIM do;
    Euler/Heun keep the fractions); leading: arange(n) * (T // n) + steps_offset;
    trailing: round(arange(T, 0, -T/n)) - 1.
    """
    n, T = int(num_inference_steps), int(num_train_timesteps)
    if spacing == "linspace":
        t = np.linspace(0, T - 1, n, dtype=np.float64)
        if rounded_linspace:
            t = t.round()
        return t[::-1].copy()
    if spacing == "leading":
        return (np.arange(0, n) * (T // n)).round()[::-1].astype(np.float64) + steps_offset
    if spacing == "trailing":
        return np.round(np.arange(T, 0, -T / n)).astype(np.float64) - 1
    raise ValueError(f"timestep_spacing must be one of {TIMESTEP_SPACINGS}, got {spacing!r}")


def dpm_spaced_timesteps(spacing: str, num_inference_steps: int, num_train_timesteps: int, last_timestep: int,
                         steps_offset: int = 0) -> np.ndarray:
    """DPM-Solver's spacing: n of n+1 points up to ``last_timestep`` (lambda_min_clipped), int64."""
    n = int(num_inference_steps)
    if spacing == "linspace":
        t = np.linspace(0, last_timestep - 1, n + 1).round()[::-1][:-1]
    elif spacing == "leading":
        ratio = last_timestep // (n + 1)
        t = (np.arange(0, n + 1) * ratio).round()[::-1][:-1] + steps_offset
    elif spacing == "trailing":
        t = np.arange(last_timestep, 0, -num_train_timesteps / n).round() - 1
    else:
        raise ValueError(f"timestep_spacing must be one of {TIMESTEP_SPACINGS}, got {spacing!r}")
    return np.ascontiguousarray(t).astype(np.int64)


def deduplicate_timesteps(timesteps: np.ndarray) -> np.ndarray:
    """Drop repeated timesteps, keeping the first occurrence and the order."""
    t = np.asarray(timesteps)
    _, first = np.unique(t, return_index=True)
    return t[np.sort(first)]


def interp_sigmas(timesteps: np.ndarray, sigmas: np.ndarray) -> np.ndarray:
    """sigma at (fractional) timesteps, linear between train timesteps."""
    return np.interp(np.asarray(timesteps, dtype=np.float64), np.arange(len(sigmas)), sigmas)


def sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional train timestep of each sigma (linear in log sigma between train timesteps)."""
    sigma = np.asarray(sigma, dtype=np.float64)
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high = low + 1
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[high]), 0, 1)
    return ((1 - w) * low + w * high).reshape(sigma.shape)


def karras_sigmas(sigma_min: float, sigma_max: float, num_inference_steps: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022: (max^(1/rho) + i/(n-1) (min^(1/rho) - max^(1/rho)))^rho."""
    ramp = np.linspace(0, 1, num_inference_steps)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, num_inference_steps: int) -> np.ndarray:
    """Log-uniform sigmas from sigma_max down to sigma_min."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), num_inference_steps))


def flow_shift(sigmas: np.ndarray, shift: float) -> np.ndarray:
    """Flow-matching timestep shift (SD3): s*sigma / (1 + (s-1)*sigma)."""
    sigmas = np.asarray(sigmas, dtype=np.float64)
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def time_shift(mu: float, sigma: float, t: np.ndarray, kind: str = "exponential") -> np.ndarray:
    """Resolution-dependent shift (Flux): e^mu / (e^mu + (1/t - 1)^sigma), or mu / (mu + ...) for linear."""
    t = np.asarray(t, dtype=np.float64)
    if kind == "exponential":
        return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)
    if kind == "linear":
        return mu / (mu + (1 / t - 1) ** sigma)
    raise ValueError(f"time_shift_type must be 'exponential' or 'linear', got {kind!r}")


def stretch_shift_to_terminal(t: np.ndarray, shift_terminal: float) -> np.ndarray:
    one_minus = 1 - np.asarray(t, dtype=np.float64)
    return 1 - one_minus / (one_minus[-1] / (1 - shift_terminal))
