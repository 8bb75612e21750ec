"""k-diffusion style sigma schedulers: Euler, Euler ancestral, Heun (diffusers-compatible)."""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from ..reference.diffusion import (AUX_X0, PREV_HIST1, PREV_HIST2, PREV_NOISE, PREV_SAMPLE, PREV_X0, X0_FROM_MODEL,
                                   X0_FROM_SAMPLE)
from . import _ops
from . import schedules as S
from .alpha import AlphaScheduleMixin
from .base import (KARRAS_COMPATIBLES, PREDICTION_TYPES, SampleOutput, SchedulerMixin, check_choice, fold_x0, new_rows,
                   randn_tensor, register_to_config)
from .sigma_base import SigmaStepMixin


def _sigma_x0(prediction_type: str, sigma_hat: float, sigma: float) -> tuple:
    """x0 = cx * x + cm * m at sigma (epsilon uses sigma_hat, v-prediction sigma, as diffusers)."""
    if prediction_type == "epsilon":
        return 1.0, -sigma_hat
    if prediction_type == "v_prediction":
        return 1.0 / (sigma ** 2 + 1), -sigma / math.sqrt(sigma ** 2 + 1)
    return 0.0, 1.0  # sample / original_sample


def _reject_integer_timestep(name, timestep):
    if isinstance(timestep, bool) or isinstance(timestep, (int, np.integer)) or (
            isinstance(timestep, torch.Tensor) and not timestep.is_floating_point()):
        raise ValueError(f"{name}.step: integer timesteps (e.g. from enumerate(timesteps)) are not supported; pass "
                         f"one of scheduler.timesteps")


class _SigmaSchedule(AlphaScheduleMixin, SigmaStepMixin, SchedulerMixin):
    """Interpolated sigmas for a spacing, with Karras / exponential variants."""

    _compatibles = KARRAS_COMPATIBLES

    def _check_sigma_variants(self):
        cfg = self.config
        if getattr(cfg, "use_beta_sigmas", False):
            raise ValueError(f"{type(self).__name__}: use_beta_sigmas is not supported by genfast (needs scipy); "
                             f"use use_karras_sigmas or use_exponential_sigmas")
        if sum(bool(getattr(cfg, k, False)) for k in ("use_karras_sigmas", "use_exponential_sigmas")) > 1:
            raise ValueError(f"{type(self).__name__}: only one of use_karras_sigmas, use_exponential_sigmas can be set")

    def _train_sigmas(self):
        sig = S.sigmas_from_alphas_cumprod(self._abar)
        return sig, np.log(sig)

    def _sigma_range(self, in_sigmas):
        cfg = self.config
        lo = getattr(cfg, "sigma_min", None)
        hi = getattr(cfg, "sigma_max", None)
        return (lo if lo is not None else float(in_sigmas[-1])), (hi if hi is not None else float(in_sigmas[0]))

    def _convert_sigmas(self, sigmas, n, log_sigmas):
        """Karras / exponential respacing; returns (sigmas, timesteps or None)."""
        cfg = self.config
        if cfg.use_karras_sigmas:
            sigmas = S.karras_sigmas(*self._sigma_range(sigmas), n)
        elif cfg.use_exponential_sigmas:
            sigmas = S.exponential_sigmas(*self._sigma_range(sigmas), n)
        else:
            return sigmas, None
        return sigmas, S.sigma_to_t(sigmas, log_sigmas)

    def _sigma_timesteps(self, n, T, custom=None):
        cfg = self.config
        if custom is not None:
            t = np.asarray(custom, dtype=np.float64)
        else:
            t = S.spaced_timesteps(cfg.timestep_spacing, n, T, cfg.steps_offset, rounded_linspace=False)
        return t.astype(np.float32).astype(np.float64)  # the float32 timesteps the model sees


class EulerDiscreteScheduler(_SigmaSchedule):
    """Euler (Karras et al. 2022, Algorithm 2 with s_churn); diffusers' EulerDiscreteScheduler."""

    order = 1

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, prediction_type: str = "epsilon",
                 interpolation_type: str = "linear", use_karras_sigmas: Optional[bool] = False,
                 use_exponential_sigmas: Optional[bool] = False, use_beta_sigmas: Optional[bool] = False,
                 sigma_min: Optional[float] = None, sigma_max: Optional[float] = None,
                 timestep_spacing: str = "linspace", timestep_type: str = "discrete", steps_offset: int = 0,
                 rescale_betas_zero_snr: bool = False, final_sigmas_type: str = "zero"):
        SchedulerMixin.__init__(self)
        name = type(self).__name__
        check_choice(name, "prediction_type", prediction_type, PREDICTION_TYPES + ("original_sample",))
        check_choice(name, "interpolation_type", interpolation_type, ("linear", "log_linear"))
        check_choice(name, "timestep_spacing", timestep_spacing, S.TIMESTEP_SPACINGS)
        check_choice(name, "timestep_type", timestep_type, ("discrete", "continuous"))
        check_choice(name, "final_sigmas_type", final_sigmas_type, ("zero", "sigma_min"))
        self._check_sigma_variants()
        self._init_alphas(("linear", "scaled_linear", "squaredcos_cap_v2"), num_train_timesteps, beta_start, beta_end,
                          beta_schedule, trained_betas, rescale_betas_zero_snr, terminal_fix=True)
        self.is_scale_input_called = False
        self.use_karras_sigmas = use_karras_sigmas
        self.use_exponential_sigmas = use_exponential_sigmas
        self.use_beta_sigmas = use_beta_sigmas
        self.timesteps = torch.linspace(num_train_timesteps - 1, 0, num_train_timesteps, dtype=torch.float32)

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device=None, timesteps=None, sigmas=None):
        cfg, name = self.config, type(self).__name__
        T = cfg.num_train_timesteps
        if timesteps is not None and sigmas is not None:
            raise ValueError(f"{name}.set_timesteps: pass timesteps or sigmas, not both")
        if num_inference_steps is None and timesteps is None and sigmas is None:
            raise ValueError(f"{name}.set_timesteps: pass num_inference_steps, timesteps or sigmas")
        if num_inference_steps is not None and (timesteps is not None or sigmas is not None):
            raise ValueError(f"{name}.set_timesteps: pass only one of num_inference_steps, timesteps, sigmas")
        if timesteps is not None and (cfg.use_karras_sigmas or cfg.use_exponential_sigmas):
            raise ValueError(f"{name}.set_timesteps: custom timesteps cannot be used with Karras/exponential sigmas")
        continuous_v = cfg.timestep_type == "continuous" and cfg.prediction_type == "v_prediction"
        if timesteps is not None and continuous_v:
            raise ValueError(f"{name}.set_timesteps: custom timesteps cannot be used with continuous v-prediction")
        if num_inference_steps is None:
            num_inference_steps = len(timesteps) if timesteps is not None else len(sigmas) - 1
        n = int(num_inference_steps)
        if n < 1:
            raise ValueError(f"{name}.set_timesteps: num_inference_steps must be >= 1, got {num_inference_steps}")
        self.num_inference_steps = n
        train_sigmas, log_sigmas = self._train_sigmas()
        if sigmas is not None:
            sig = np.asarray(sigmas, dtype=np.float32).astype(np.float64)
            ts = S.sigma_to_t(sig[:-1], log_sigmas)
        else:
            ts = self._sigma_timesteps(n, T, timesteps)
            if cfg.interpolation_type == "linear":
                sig = S.interp_sigmas(ts, train_sigmas)
            else:
                sig = np.exp(np.linspace(np.log(train_sigmas[-1]), np.log(train_sigmas[0]), n + 1))
            sig, new_ts = self._convert_sigmas(sig, n, log_sigmas)
            if new_ts is not None:
                ts = new_ts
            last = float(train_sigmas[0]) if cfg.final_sigmas_type == "sigma_min" else 0.0
            sig = np.concatenate([sig, [last]])
        if continuous_v:
            ts = 0.25 * np.log(sig[:-1].astype(np.float32).astype(np.float64))
        ts32 = ts.astype(np.float32)
        self._sigmas_host = [float(s) for s in sig]
        self.sigmas = torch.tensor(sig, dtype=torch.float32)
        self._timesteps_host = [float(t) for t in ts32]
        self.timesteps = torch.from_numpy(ts32.copy()).to(device)
        self._rows = self._euler_rows(0.0, 0.0, float("inf"))
        self._finish_set_timesteps(device)

    def _gamma(self, sigma, s_churn, s_tmin, s_tmax):
        return min(s_churn / (len(self._sigmas_host) - 1), 2 ** 0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0

    def _euler_rows(self, s_churn, s_tmin, s_tmax):
        """Every step's row at once (numpy over the steps; as _gamma and _sigma_x0 per step)."""
        p = self.config.prediction_type
        n = len(self._timesteps_host)
        sig = np.asarray(self._sigmas_host, dtype=np.float64)
        sigma, sigma_next = sig[:n], sig[1:n + 1]
        churn = min(s_churn / (len(sig) - 1), 2 ** 0.5 - 1)
        sigma_hat = sigma * (np.where((s_tmin <= sigma) & (sigma <= s_tmax), churn, 0.0) + 1)
        rows = new_rows(n, 1)
        r = rows[:, 0]
        if p == "epsilon":
            r[:, X0_FROM_SAMPLE], r[:, X0_FROM_MODEL] = 1.0, -sigma_hat
        elif p == "v_prediction":
            r[:, X0_FROM_SAMPLE], r[:, X0_FROM_MODEL] = 1.0 / (sigma ** 2 + 1), -sigma / np.sqrt(sigma ** 2 + 1)
        else:
            r[:, X0_FROM_SAMPLE], r[:, X0_FROM_MODEL] = 0.0, 1.0
        dt = sigma_next - sigma_hat
        r[:, PREV_SAMPLE], r[:, PREV_X0] = 1 + dt / sigma_hat, -dt / sigma_hat
        r[:, AUX_X0] = 1.0
        return fold_x0(rows)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, s_churn: float = 0.0,
             s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0, generator=None,
             return_dict: bool = True):
        name = type(self).__name__
        _reject_integer_timestep(name, timestep)
        self._check_tensors(name, model_output, sample)
        i = self._current_index(timestep)
        sigma = self._sigmas_host[i]
        gamma = self._gamma(sigma, s_churn, s_tmin, s_tmax)
        key = None
        if gamma > 0:
            key = ("churn", float(s_churn), float(s_tmin), float(s_tmax))
            if key not in self._extra_rows:
                self._extra_rows[key] = self._euler_rows(s_churn, s_tmin, s_tmax)
            sigma_hat = sigma * (gamma + 1)
            noise = randn_tensor(model_output.shape, dtype=model_output.dtype, device=model_output.device,
                                 generator=generator)
            sample = sample.to(torch.float32) + noise * (s_noise * (sigma_hat ** 2 - sigma ** 2) ** 0.5)
        prev, x0 = self._run(i, 0, sample, model_output, out_dtype=model_output.dtype, rows_key=key)
        self._step_index = i + 1
        if not return_dict:
            return prev, x0
        return SampleOutput(prev_sample=prev, pred_original_sample=x0)

    def add_noise(self, original_samples, noise, timesteps):
        """original + sigma * noise at each timestep's step (diffusers' index rule)."""
        return self._scaled_noise("add_noise", original_samples, noise, timesteps, [1.0] * len(self._sigmas_host),
                                  self._sigmas_host)

    def get_velocity(self, sample, noise, timesteps):
        """As diffusers: alphas_cumprod indexed by the *step index* of each timestep."""
        _reject_integer_timestep(type(self).__name__, timesteps)
        self._require_timesteps("get_velocity")
        self._check_pair(type(self).__name__, "get_velocity", sample, noise)
        values = timesteps.reshape(-1).tolist() if isinstance(timesteps, torch.Tensor) else [timesteps]
        idx = torch.tensor([self._lookup(v, first=False) for v in values], dtype=torch.long).to(sample.device)
        a, s = self._alpha_tables(sample.device, sample.dtype)
        return _ops.add_noise(sample, noise, idx, a, s, target="v_prediction")[1]


class EulerAncestralDiscreteScheduler(_SigmaSchedule):
    """Euler ancestral (k-diffusion sample_euler_ancestral); diffusers' EulerAncestralDiscreteScheduler."""

    order = 1

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, prediction_type: str = "epsilon",
                 timestep_spacing: str = "linspace", steps_offset: int = 0, rescale_betas_zero_snr: bool = False):
        SchedulerMixin.__init__(self)
        name = type(self).__name__
        if prediction_type == "sample":
            raise ValueError(f"{name}: prediction_type 'sample' is not implemented (nor in diffusers); use epsilon "
                             f"or v_prediction")
        check_choice(name, "prediction_type", prediction_type, ("epsilon", "v_prediction"))
        check_choice(name, "timestep_spacing", timestep_spacing, S.TIMESTEP_SPACINGS)
        self._init_alphas(("linear", "scaled_linear", "squaredcos_cap_v2"), num_train_timesteps, beta_start, beta_end,
                          beta_schedule, trained_betas, rescale_betas_zero_snr, terminal_fix=True)
        self.is_scale_input_called = False
        self.timesteps = torch.linspace(num_train_timesteps - 1, 0, num_train_timesteps, dtype=torch.float64)

    def set_timesteps(self, num_inference_steps: int, device=None):
        cfg, name = self.config, type(self).__name__
        if num_inference_steps is None or int(num_inference_steps) < 1:
            raise ValueError(f"{name}.set_timesteps: num_inference_steps must be >= 1, got {num_inference_steps}")
        n = self.num_inference_steps = int(num_inference_steps)
        train_sigmas, _ = self._train_sigmas()
        ts = self._sigma_timesteps(n, cfg.num_train_timesteps)
        sig = np.concatenate([S.interp_sigmas(ts, train_sigmas), [0.0]])
        rows = new_rows(n, 1)
        for i in range(n):
            s_from, s_to = sig[i], sig[i + 1]
            s_up = math.sqrt(s_to ** 2 * (s_from ** 2 - s_to ** 2) / s_from ** 2)
            s_down = math.sqrt(max(s_to ** 2 - s_up ** 2, 0.0))
            r = rows[i, 0]
            r[X0_FROM_SAMPLE], r[X0_FROM_MODEL] = _sigma_x0(cfg.prediction_type, s_from, s_from)
            dt = s_down - s_from
            r[PREV_SAMPLE], r[PREV_X0], r[PREV_NOISE] = 1 + dt / s_from, -dt / s_from, s_up
            r[AUX_X0] = 1.0
        self._rows = fold_x0(rows)
        ts32 = ts.astype(np.float32)
        self._sigmas_host = [float(s) for s in sig]
        self.sigmas = torch.tensor(sig, dtype=torch.float32)
        self._timesteps_host = [float(t) for t in ts32]
        self.timesteps = torch.from_numpy(ts32.copy()).to(device)
        self._finish_set_timesteps(device)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True):
        name = type(self).__name__
        _reject_integer_timestep(name, timestep)
        self._check_tensors(name, model_output, sample)
        i = self._current_index(timestep)
        noise = randn_tensor(model_output.shape, dtype=model_output.dtype, device=model_output.device,
                             generator=generator)
        prev, x0 = self._run(i, 0, sample, model_output, noise=noise, out_dtype=model_output.dtype)
        self._step_index = i + 1
        if not return_dict:
            return prev, x0
        return SampleOutput(prev_sample=prev, pred_original_sample=x0)

    def add_noise(self, original_samples, noise, timesteps):
        return self._scaled_noise("add_noise", original_samples, noise, timesteps, [1.0] * len(self._sigmas_host),
                                  self._sigmas_host)


class HeunDiscreteScheduler(_SigmaSchedule):
    """Heun's 2nd-order method (Karras et al. 2022, Algorithm 1); two calls per step, as diffusers."""

    order = 2

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                 beta_schedule: str = "linear", trained_betas=None, prediction_type: str = "epsilon",
                 use_karras_sigmas: bool = False, use_exponential_sigmas: bool = False, use_beta_sigmas: bool = False,
                 clip_sample: bool = False, clip_sample_range: float = 1.0, timestep_spacing: str = "linspace",
                 steps_offset: int = 0):
        SchedulerMixin.__init__(self)
        name = type(self).__name__
        check_choice(name, "prediction_type", prediction_type, PREDICTION_TYPES)
        check_choice(name, "timestep_spacing", timestep_spacing, S.TIMESTEP_SPACINGS)
        self._check_sigma_variants()
        self._init_alphas(("linear", "scaled_linear", "squaredcos_cap_v2", "exp"), num_train_timesteps, beta_start,
                          beta_end, beta_schedule, trained_betas, False)
        self.use_karras_sigmas = use_karras_sigmas
        self._first_stage = None  # (x0, sample) of the first stage while the second is pending
        self.dt = None
        self.timesteps = torch.linspace(num_train_timesteps - 1, 0, num_train_timesteps, dtype=torch.float32)

    @property
    def state_in_first_order(self) -> bool:
        return self._first_stage is None

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device=None,
                      num_train_timesteps: Optional[int] = None, timesteps=None):
        cfg, name = self.config, type(self).__name__
        if num_inference_steps is None and timesteps is None:
            raise ValueError(f"{name}.set_timesteps: pass num_inference_steps or timesteps")
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError(f"{name}.set_timesteps: pass num_inference_steps or timesteps, not both")
        if timesteps is not None and (cfg.use_karras_sigmas or cfg.use_exponential_sigmas):
            raise ValueError(f"{name}.set_timesteps: custom timesteps cannot be used with Karras/exponential sigmas")
        n = int(num_inference_steps or len(timesteps))
        if n < 1:
            raise ValueError(f"{name}.set_timesteps: num_inference_steps must be >= 1, got {num_inference_steps}")
        self.num_inference_steps = n
        T = num_train_timesteps or cfg.num_train_timesteps
        train_sigmas, log_sigmas = self._train_sigmas()
        ts = self._sigma_timesteps(n, T, timesteps)
        sig = S.interp_sigmas(ts, train_sigmas)
        sig, new_ts = self._convert_sigmas(sig, n, log_sigmas)
        if new_ts is not None:
            ts = new_ts
        sig = np.concatenate([sig, [0.0]])
        sig2 = np.concatenate([sig[:1], np.repeat(sig[1:-1], 2), sig[-1:]])
        ts2 = np.concatenate([ts[:1], np.repeat(ts[1:], 2)]).astype(np.float32)
        p, clip = cfg.prediction_type, cfg.clip_sample
        rows = new_rows(len(ts2), 2)
        for i in range(len(ts2)):
            # variant 0: first stage (sigma_i -> sigma_{i+1}); Euler step, keeps x0 and the sample
            s, s_next = sig2[i], sig2[i + 1]
            r = rows[i, 0]
            r[X0_FROM_SAMPLE], r[X0_FROM_MODEL] = _sigma_x0(p, s, s)
            dt = s_next - s
            r[PREV_SAMPLE], r[PREV_X0], r[AUX_X0] = 1 + dt / s, -dt / s, 1.0
            if i == 0:
                continue
            # variant 1: second stage at sigma_next = sig2[i] of the step from sigma = sig2[i-1]:
            # prev = x_1 + dt/2 * ((x_1 - x0_1)/sigma + (x - x0)/sigma_next); h1 = x0_1, h2 = x_1
            s, s_next = sig2[i - 1], sig2[i]
            r = rows[i, 1]
            r[X0_FROM_SAMPLE], r[X0_FROM_MODEL] = _sigma_x0(p, s_next, s_next)
            dt = s_next - s
            r[PREV_HIST2], r[PREV_HIST1] = 1 + dt / (2 * s), -dt / (2 * s)
            r[PREV_SAMPLE], r[PREV_X0] = dt / (2 * s_next), -dt / (2 * s_next)
            r[AUX_X0] = 1.0
        self._rows = rows if clip else fold_x0(rows)
        self._sigmas_host = [float(x) for x in sig2]
        self.sigmas = torch.tensor(sig2, dtype=torch.float32)
        self._timesteps_host = [float(t) for t in ts2]
        self.timesteps = torch.from_numpy(ts2.copy()).to(device=device, dtype=torch.float32)
        self._first_stage = None
        self.dt = None
        self._finish_set_timesteps(device)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        name = type(self).__name__
        self._check_tensors(name, model_output, sample)
        i = self._current_index(timestep)
        clip = self.config.clip_sample_range if self.config.clip_sample else None
        if self._first_stage is None:
            prev, x0 = self._run(i, 0, sample, model_output, clip=clip)
            self._first_stage = (x0, sample)
            self.dt = self._sigmas_host[i + 1] - self._sigmas_host[i]
        else:
            if i == 0:
                raise ValueError(f"{name}.step: a second stage cannot be step 0")
            h1, h2 = self._first_stage
            if h2.shape != sample.shape:
                raise ValueError(f"{name}.step: sample shape {tuple(sample.shape)} differs from the first stage's "
                                 f"{tuple(h2.shape)}")
            prev, x0 = self._run(i, 1, sample, model_output, history=h1, history2=h2, clip=clip, out_dtype=h2.dtype)
            self._first_stage = None
            self.dt = None
        self._step_index = i + 1
        if not return_dict:
            return prev, x0
        return SampleOutput(prev_sample=prev, pred_original_sample=x0)

    def add_noise(self, original_samples, noise, timesteps):
        return self._scaled_noise("add_noise", original_samples, noise, timesteps, [1.0] * len(self._sigmas_host),
                                  self._sigmas_host)
