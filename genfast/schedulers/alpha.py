"""Schedulers that index alpha_bar by train timestep: DDPM, DDIM, LCM (diffusers-compatible)."""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from ..reference.diffusion import (AUX_SAMPLE, AUX_X0, PREV_MODEL, PREV_NOISE, PREV_SAMPLE, PREV_X0, X0_FROM_MODEL,
                                   X0_FROM_SAMPLE)
from . import _ops
from . import schedules as S
from .base import (KARRAS_COMPATIBLES, PREDICTION_TYPES, LCMSchedulerOutput, SampleOutput, SchedulerMixin, check_choice,
                   fold_x0, new_rows, randn_tensor, register_to_config)


class AlphaScheduleMixin:
    """betas / alphas_cumprod in float64 (float32 copies as the diffusers attributes), and the
    training-side add_noise / get_velocity through the add_noise kernel with float32 tables
    (so fp16/bf16 samples never see alpha_bar rounded to 1)."""

    def _init_alphas(self, allowed_schedules, num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                     rescale_betas_zero_snr, terminal_fix=False):
        name = type(self).__name__
        if trained_betas is None:
            check_choice(name, "beta_schedule", beta_schedule, allowed_schedules)
        if int(num_train_timesteps) < 1:
            raise ValueError(f"{name}: num_train_timesteps must be >= 1, got {num_train_timesteps}")
        betas = S.make_betas(beta_schedule, num_train_timesteps, beta_start, beta_end, trained_betas)
        if rescale_betas_zero_snr:
            betas = S.rescale_betas_zero_snr(betas)
        abar = S.alphas_cumprod(betas)
        if rescale_betas_zero_snr and terminal_fix:
            abar[-1] = 2.0 ** -24  # as diffusers: a finite last sigma
        self._abar = abar
        self.betas = torch.tensor(betas, dtype=torch.float32)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.tensor(abar, dtype=torch.float32)
        self._noise_tables = {}

    def _alpha_tables(self, device, dtype):
        """(sqrt(abar), sqrt(1 - abar)) on ``device``, float32 (float64 for float64 samples)."""
        dtype = torch.float64 if dtype == torch.float64 else torch.float32
        key = (device.type, device.index, dtype)
        if key not in self._noise_tables:
            self._noise_tables[key] = (torch.tensor(np.sqrt(self._abar), dtype=dtype).to(device),
                                       torch.tensor(np.sqrt(1.0 - self._abar), dtype=dtype).to(device))
        return self._noise_tables[key]

    def _train_timesteps(self, what, x, timesteps) -> torch.Tensor:
        if not isinstance(timesteps, torch.Tensor):
            timesteps = torch.as_tensor(timesteps)
        if timesteps.is_floating_point() or timesteps.is_complex() or timesteps.dtype == torch.bool:
            if timesteps.is_floating_point() and bool((timesteps == timesteps.round()).all()):
                timesteps = timesteps.long()
            else:
                raise TypeError(f"{type(self).__name__}.{what}: timesteps must be integers, got {timesteps.dtype}")
        if timesteps.ndim > 1 or (timesteps.ndim == 1 and timesteps.shape[0] not in (1, x.shape[0])):
            raise ValueError(f"{type(self).__name__}.{what}: timesteps must be a scalar or ({x.shape[0]},), got "
                             f"shape {tuple(timesteps.shape)}")
        if timesteps.device.type == "cpu" and timesteps.numel():  # checked where it costs no device sync
            lo, hi = int(timesteps.min()), int(timesteps.max())
            if lo < 0 or hi >= len(self._abar):
                raise ValueError(f"{type(self).__name__}.{what}: timesteps must be in [0, {len(self._abar)}), got "
                                 f"values in [{lo}, {hi}]")
        return timesteps.to(x.device, torch.long).reshape(-1) if timesteps.ndim else timesteps.to(x.device, torch.long)

    @staticmethod
    def _check_pair(name, what, x, noise):
        if not isinstance(x, torch.Tensor) or not isinstance(noise, torch.Tensor):
            raise TypeError(f"{name}.{what}: expected tensors")
        if x.shape != noise.shape:
            raise ValueError(f"{name}.{what}: noise shape {tuple(noise.shape)} does not match {tuple(x.shape)}")

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
        self._check_pair(type(self).__name__, "add_noise", original_samples, noise)
        t = self._train_timesteps("add_noise", original_samples, timesteps)
        a, s = self._alpha_tables(original_samples.device, original_samples.dtype)
        return _ops.add_noise(original_samples, noise, t, a, s)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """v = sqrt(abar_t) noise - sqrt(1 - abar_t) sample."""
        self._check_pair(type(self).__name__, "get_velocity", sample, noise)
        t = self._train_timesteps("get_velocity", sample, timesteps)
        a, s = self._alpha_tables(sample.device, sample.dtype)
        return _ops.add_noise(sample, noise, t, a, s, target="v_prediction")[1]

    def _x0_coefs_of(self, a: np.ndarray) -> tuple:
        """x0 = cx * x + cm * m for the configured prediction type, at each alpha_bar in ``a``."""
        p = self.config.prediction_type
        if p == "epsilon":
            with np.errstate(divide="ignore", invalid="ignore"):
                pos = a > 0
                return (np.where(pos, 1.0 / np.sqrt(a), np.inf),
                        np.where(pos, -np.sqrt(1 - a) / np.sqrt(a), -np.inf))
        if p == "sample":
            return np.zeros_like(a), np.ones_like(a)
        return np.sqrt(a), -np.sqrt(1 - a)  # v_prediction

    def _clip_args(self):
        """_run's clamping arguments from the config, worked out once per config object (every
        step asks; register_to_config makes a new one)."""
        cfg = self.config
        cached = self.__dict__.get("_clip_args_of_config")
        if cached is None or cached[0] is not cfg:
            args = {"threshold": True} if cfg.thresholding else {"clip": cfg.clip_sample_range} if cfg.clip_sample \
                else {}
            cached = self._clip_args_of_config = (cfg, args)
        return cached[1]

    def _maybe_fold(self, rows):
        cfg = self.config
        return rows if (cfg.thresholding or cfg.clip_sample) else fold_x0(rows)


def _check_int_timesteps(name, ts: np.ndarray, T: int) -> None:
    if len(ts) and (ts.min() < 0 or ts.max() >= T):
        raise ValueError(f"{name}.set_timesteps: the schedule has timesteps outside [0, {T}): "
                         f"{ts.min()}..{ts.max()} (check steps_offset / num_inference_steps)")


class DDPMScheduler(AlphaScheduleMixin, SchedulerMixin):
    """Ho et al. 2020 ancestral sampling; diffusers' DDPMScheduler config and API."""

    _has_step_counter = False
    _compatibles = KARRAS_COMPATIBLES
    order = 1
    VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "learned", "learned_range")

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, variance_type: str = "fixed_small",
                 clip_sample: bool = True, prediction_type: str = "epsilon", thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, clip_sample_range: float = 1.0,
                 sample_max_value: float = 1.0, timestep_spacing: str = "leading", steps_offset: int = 0,
                 rescale_betas_zero_snr: bool = False):
        SchedulerMixin.__init__(self)
        name = type(self).__name__
        if variance_type == "fixed_large_log":
            raise ValueError(f"{name}: variance_type 'fixed_large_log' is not supported (diffusers takes the square "
                             f"root of a log there and returns NaN)")
        check_choice(name, "variance_type", variance_type, self.VARIANCE_TYPES)
        check_choice(name, "prediction_type", prediction_type, PREDICTION_TYPES)
        check_choice(name, "timestep_spacing", timestep_spacing, S.TIMESTEP_SPACINGS)
        self._init_alphas(("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace"), num_train_timesteps,
                          beta_start, beta_end, beta_schedule, trained_betas, rescale_betas_zero_snr)
        self.init_noise_sigma = 1.0
        self.custom_timesteps = False
        self.variance_type = variance_type
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1, dtype=torch.int64)

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device=None, timesteps=None) -> None:
        cfg, name = self.config, type(self).__name__
        T = cfg.num_train_timesteps
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError(f"{name}.set_timesteps: pass num_inference_steps or timesteps, not both")
        if timesteps is not None:
            timesteps = [int(t) for t in timesteps]
            if any(b >= a for a, b in zip(timesteps, timesteps[1:])):
                raise ValueError(f"{name}.set_timesteps: custom timesteps must be in descending order")
            if timesteps[0] >= T:
                raise ValueError(f"{name}.set_timesteps: timesteps must start below num_train_timesteps={T}")
            ts = np.array(timesteps, dtype=np.int64)
            self.custom_timesteps = True
            self.num_inference_steps = len(ts)  # diffusers keeps None here; the step math is the same
        else:
            if num_inference_steps is None or int(num_inference_steps) < 1:
                raise ValueError(f"{name}.set_timesteps: num_inference_steps must be >= 1, got {num_inference_steps}")
            if num_inference_steps > T:
                raise ValueError(f"{name}.set_timesteps: num_inference_steps={num_inference_steps} exceeds "
                                 f"num_train_timesteps={T}")
            self.num_inference_steps = int(num_inference_steps)
            self.custom_timesteps = False
            ts = S.spaced_timesteps(cfg.timestep_spacing, num_inference_steps, T, cfg.steps_offset).astype(np.int64)
        _check_int_timesteps(name, ts, T)
        n = len(ts)
        rows = new_rows(n, 1)
        x0_sample, x0_model = self._x0_coefs_of(self._abar[ts])
        self._variance_logs = []
        for i, t in enumerate(ts):
            prev_t = ts[i + 1] if i + 1 < n else -1
            a = self._abar[t]
            a_prev = self._abar[prev_t] if prev_t >= 0 else 1.0
            b, b_prev = 1 - a, 1 - a_prev
            cur_alpha = a / a_prev
            cur_beta = 1 - cur_alpha
            r = rows[i, 0]
            r[X0_FROM_SAMPLE], r[X0_FROM_MODEL] = x0_sample[i], x0_model[i]
            r[PREV_X0] = math.sqrt(a_prev) * cur_beta / b
            r[PREV_SAMPLE] = math.sqrt(cur_alpha) * b_prev / b
            r[AUX_X0] = 1.0
            variance = max(b_prev / b * cur_beta, 1e-20)
            self._variance_logs.append((math.log(variance), math.log(cur_beta) if cur_beta > 0 else -math.inf))
            if t > 0:
                if self.variance_type in ("fixed_small", "fixed_small_log"):
                    r[PREV_NOISE] = math.sqrt(variance)
                elif self.variance_type == "fixed_large":
                    r[PREV_NOISE] = math.sqrt(cur_beta)
                else:  # learned: the per-element scale is applied to the noise in torch
                    r[PREV_NOISE] = 1.0
        self._rows = self._maybe_fold(rows)
        self._timesteps_host = [int(t) for t in ts]
        self.timesteps = torch.from_numpy(ts.copy()).to(device)
        self._finish_set_timesteps(device)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True):
        name = type(self).__name__
        learned = self.variance_type in ("learned", "learned_range")
        self._check_tensors(name, model_output, sample, 2 if learned else 1)
        i = self._current_index(timestep)
        predicted_variance = None
        if learned and model_output.shape[1] == sample.shape[1] * 2:
            model_output, predicted_variance = torch.split(model_output, sample.shape[1], dim=1)
        elif model_output.shape != sample.shape:
            raise ValueError(f"{name}.step: model_output shape {tuple(model_output.shape)} does not match sample "
                             f"shape {tuple(sample.shape)}")
        noise = None
        if self._timesteps_host[i] > 0:
            noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                                 dtype=model_output.dtype)
            if self.variance_type == "learned":
                if predicted_variance is None:
                    raise ValueError(f"{name}.step: variance_type 'learned' needs the model's variance channels")
                noise = predicted_variance ** 0.5 * noise
            elif self.variance_type == "learned_range":
                if predicted_variance is None:
                    raise ValueError(f"{name}.step: variance_type 'learned_range' needs the model's variance channels")
                min_log, max_log = self._variance_logs[i]
                frac = (predicted_variance + 1) / 2
                noise = torch.exp(0.5 * (frac * max_log + (1 - frac) * min_log)) * noise
        prev, x0 = self._run(i, 0, sample, model_output, noise=noise, **self._clip_args())
        self._step_index = i + 1
        if not return_dict:
            return prev, x0
        return SampleOutput(prev_sample=prev, pred_original_sample=x0)

    def previous_timestep(self, timestep) -> int:
        i = self._index_from_timestep(timestep, first_lookup=True)
        return self._timesteps_host[i + 1] if i + 1 < len(self._timesteps_host) else -1


class DDIMScheduler(AlphaScheduleMixin, SchedulerMixin):
    """Song et al. 2021 (eta = 0: deterministic); diffusers' DDIMScheduler config and API,
    including its previous timestep t - T // n for every spacing."""

    _has_step_counter = False
    _compatibles = KARRAS_COMPATIBLES
    order = 1

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, clip_sample: bool = True,
                 set_alpha_to_one: bool = True, steps_offset: int = 0, prediction_type: str = "epsilon",
                 thresholding: bool = False, dynamic_thresholding_ratio: float = 0.995,
                 clip_sample_range: float = 1.0, sample_max_value: float = 1.0, timestep_spacing: str = "leading",
                 rescale_betas_zero_snr: bool = False):
        SchedulerMixin.__init__(self)
        name = type(self).__name__
        check_choice(name, "prediction_type", prediction_type, PREDICTION_TYPES)
        check_choice(name, "timestep_spacing", timestep_spacing, S.TIMESTEP_SPACINGS)
        self._init_alphas(("linear", "scaled_linear", "squaredcos_cap_v2"), num_train_timesteps, beta_start, beta_end,
                          beta_schedule, trained_betas, rescale_betas_zero_snr)
        self._final_abar = 1.0 if set_alpha_to_one else float(self._abar[0])
        self.final_alpha_cumprod = torch.tensor(self._final_abar, dtype=torch.float32)
        self.init_noise_sigma = 1.0
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1, dtype=torch.int64)

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        cfg, name = self.config, type(self).__name__
        T = cfg.num_train_timesteps
        if num_inference_steps is None or int(num_inference_steps) < 1:
            raise ValueError(f"{name}.set_timesteps: num_inference_steps must be >= 1, got {num_inference_steps}")
        if num_inference_steps > T:
            raise ValueError(f"{name}.set_timesteps: num_inference_steps={num_inference_steps} exceeds "
                             f"num_train_timesteps={T}")
        self.num_inference_steps = int(num_inference_steps)
        ts = S.spaced_timesteps(cfg.timestep_spacing, num_inference_steps, T, cfg.steps_offset).astype(np.int64)
        _check_int_timesteps(name, ts, T)
        self._timesteps_host = [int(t) for t in ts]
        self._rows = self._ddim_rows(0.0, False)
        self.timesteps = torch.from_numpy(ts.copy()).to(device)
        self._finish_set_timesteps(device)

    def _ddim_rows(self, eta: float, use_clipped_model_output: bool) -> np.ndarray:
        """Every step's row at once (numpy over the steps: set_timesteps runs once per sampling
        loop, its host time counts against each step's)."""
        cfg = self.config
        T, n = cfg.num_train_timesteps, self.num_inference_steps
        p = cfg.prediction_type
        ts = np.asarray(self._timesteps_host, dtype=np.int64)
        prev_t = ts - T // n
        a = self._abar[ts]
        a_prev = np.where(prev_t >= 0, self._abar[np.maximum(prev_t, 0)], self._final_abar)
        b, b_prev = 1 - a, 1 - a_prev
        rows = new_rows(len(ts), 1)
        r = rows[:, 0]
        r[:, X0_FROM_SAMPLE], r[:, X0_FROM_MODEL] = self._x0_coefs_of(a)
        # eps = ex * x + em * m + e0 * x0 (x0 after clipping)
        zero = np.zeros_like(a)
        ex, em, e0 = zero, zero, zero
        if use_clipped_model_output:
            ex, e0 = 1 / np.sqrt(b), -np.sqrt(a) / np.sqrt(b)
        elif p == "epsilon":
            em = zero + 1.0
        elif p == "sample":
            ex, em = 1 / np.sqrt(b), -np.sqrt(a) / np.sqrt(b)
        else:
            ex, em = np.sqrt(b), np.sqrt(a)
        variance = b_prev / b * (1 - a / a_prev)
        std = eta * np.sqrt(np.maximum(variance, 0.0))
        direction = np.sqrt(np.maximum(1 - a_prev - std ** 2, 0.0))
        r[:, PREV_X0] = np.sqrt(a_prev) + direction * e0
        r[:, PREV_SAMPLE] = direction * ex
        r[:, PREV_MODEL] = direction * em
        r[:, PREV_NOISE] = std
        r[:, AUX_X0] = 1.0
        return self._maybe_fold(rows)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, eta: float = 0.0,
             use_clipped_model_output: bool = False, generator=None, variance_noise: Optional[torch.Tensor] = None,
             return_dict: bool = True):
        name = type(self).__name__
        if self.num_inference_steps is None:
            raise ValueError(f"{name}.step: call set_timesteps(num_inference_steps) first")
        self._check_tensors(name, model_output, sample)
        i = self._current_index(timestep)
        eta = float(eta)
        key = None
        if eta != 0.0 or use_clipped_model_output:
            key = (eta, bool(use_clipped_model_output))
            if key not in self._extra_rows:
                self._extra_rows[key] = self._ddim_rows(eta, bool(use_clipped_model_output))
        noise = None
        if eta > 0:
            if variance_noise is not None and generator is not None:
                raise ValueError(f"{name}.step: pass generator or variance_noise, not both")
            if variance_noise is None:
                variance_noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                                              dtype=model_output.dtype)
            elif variance_noise.shape != sample.shape:
                raise ValueError(f"{name}.step: variance_noise shape {tuple(variance_noise.shape)} does not match "
                                 f"sample shape {tuple(sample.shape)}")
            noise = variance_noise
        prev, x0 = self._run(i, 0, sample, model_output, noise=noise, rows_key=key, **self._clip_args())
        self._step_index = i + 1
        if not return_dict:
            return prev, x0
        return SampleOutput(prev_sample=prev, pred_original_sample=x0)


class LCMScheduler(AlphaScheduleMixin, SchedulerMixin):
    """Latent consistency models (Luo et al. 2023); diffusers' LCMScheduler config and API."""

    order = 1

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                 beta_schedule: str = "scaled_linear", trained_betas=None, original_inference_steps: int = 50,
                 clip_sample: bool = False, clip_sample_range: float = 1.0, set_alpha_to_one: bool = True,
                 steps_offset: int = 0, prediction_type: str = "epsilon", thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, sample_max_value: float = 1.0,
                 timestep_spacing: str = "leading", timestep_scaling: float = 10.0,
                 rescale_betas_zero_snr: bool = False):
        SchedulerMixin.__init__(self)
        name = type(self).__name__
        check_choice(name, "prediction_type", prediction_type, PREDICTION_TYPES)
        check_choice(name, "timestep_spacing", timestep_spacing, S.TIMESTEP_SPACINGS)  # unused, as in diffusers
        self._init_alphas(("linear", "scaled_linear", "squaredcos_cap_v2"), num_train_timesteps, beta_start, beta_end,
                          beta_schedule, trained_betas, rescale_betas_zero_snr)
        self._final_abar = 1.0 if set_alpha_to_one else float(self._abar[0])
        self.final_alpha_cumprod = torch.tensor(self._final_abar, dtype=torch.float32)
        self.init_noise_sigma = 1.0
        self.custom_timesteps = False
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1, dtype=torch.int64)

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device=None,
                      original_inference_steps: Optional[int] = None, timesteps=None, strength: float = 1.0) -> None:
        cfg, name = self.config, type(self).__name__
        T = cfg.num_train_timesteps
        if num_inference_steps is None and timesteps is None:
            raise ValueError(f"{name}.set_timesteps: pass num_inference_steps or timesteps")
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError(f"{name}.set_timesteps: pass num_inference_steps or timesteps, not both")
        original_steps = (original_inference_steps if original_inference_steps is not None
                          else cfg.original_inference_steps)
        if original_steps > T:
            raise ValueError(f"{name}.set_timesteps: original_inference_steps={original_steps} exceeds "
                             f"num_train_timesteps={T}")
        k = T // original_steps
        origin = np.asarray(list(range(1, int(original_steps * strength) + 1))) * k - 1
        if timesteps is not None:
            timesteps = [int(t) for t in timesteps]
            if any(b >= a for a, b in zip(timesteps, timesteps[1:])):
                raise ValueError(f"{name}.set_timesteps: custom timesteps must be in descending order")
            if timesteps[0] >= T:
                raise ValueError(f"{name}.set_timesteps: timesteps must start below num_train_timesteps={T}")
            ts = np.array(timesteps, dtype=np.int64)
            self.num_inference_steps = len(ts)
            self.custom_timesteps = True
            init_timestep = min(int(self.num_inference_steps * strength), self.num_inference_steps)
            ts = ts[max(self.num_inference_steps - init_timestep, 0) * self.order:]
        else:
            if num_inference_steps > T:
                raise ValueError(f"{name}.set_timesteps: num_inference_steps={num_inference_steps} exceeds "
                                 f"num_train_timesteps={T}")
            if len(origin) // num_inference_steps < 1:
                raise ValueError(f"{name}.set_timesteps: original_inference_steps x strength = "
                                 f"{original_steps} x {strength} is smaller than "
                                 f"num_inference_steps={num_inference_steps}")
            if num_inference_steps > original_steps:
                raise ValueError(f"{name}.set_timesteps: num_inference_steps={num_inference_steps} exceeds "
                                 f"original_inference_steps={original_steps}")
            self.num_inference_steps = int(num_inference_steps)
            origin = origin[::-1].copy()
            idx = np.floor(np.linspace(0, len(origin), num=num_inference_steps, endpoint=False)).astype(np.int64)
            ts = origin[idx].astype(np.int64)
        _check_int_timesteps(name, ts, T)
        n = len(ts)
        rows = new_rows(n, 1)
        x0_sample, x0_model = self._x0_coefs_of(self._abar[ts])
        for i, t in enumerate(ts):
            prev_t = ts[i + 1] if i + 1 < n else t
            a_prev = self._abar[prev_t] if prev_t >= 0 else self._final_abar
            scaled = t * cfg.timestep_scaling
            c_skip = 0.25 / (scaled ** 2 + 0.25)  # sigma_data = 0.5
            c_out = scaled / (scaled ** 2 + 0.25) ** 0.5
            r = rows[i, 0]
            r[X0_FROM_SAMPLE], r[X0_FROM_MODEL] = x0_sample[i], x0_model[i]
            r[AUX_X0], r[AUX_SAMPLE] = c_out, c_skip  # denoised
            if i != self.num_inference_steps - 1:
                r[PREV_X0], r[PREV_SAMPLE] = math.sqrt(a_prev) * c_out, math.sqrt(a_prev) * c_skip
                r[PREV_NOISE] = math.sqrt(1 - a_prev)
            else:
                r[PREV_X0], r[PREV_SAMPLE] = c_out, c_skip
        self._rows = self._maybe_fold(rows)
        self._timesteps_host = [int(t) for t in ts]
        self.timesteps = torch.from_numpy(ts.copy()).to(device=device, dtype=torch.long)
        self._finish_set_timesteps(device)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True):
        name = type(self).__name__
        if self.num_inference_steps is None:
            raise ValueError(f"{name}.step: call set_timesteps(num_inference_steps) first")
        self._check_tensors(name, model_output, sample)
        i = self._current_index(timestep)
        out_dtype = torch.promote_types(sample.dtype, model_output.dtype)
        noise = None
        if i != self.num_inference_steps - 1:
            noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device, dtype=out_dtype)
        prev, denoised = self._run(i, 0, sample, model_output, noise=noise, out_dtype=out_dtype, aux_dtype=out_dtype,
                                   **self._clip_args())
        self._step_index = i + 1
        if not return_dict:
            return prev, denoised
        return LCMSchedulerOutput(prev_sample=prev, denoised=denoised)
