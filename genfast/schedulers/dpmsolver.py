"""DPM-Solver++ multistep (Lu et al. 2022): 2M and 2M SDE, diffusers' DPMSolverMultistepScheduler."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from ..reference.diffusion import (AUX_X0, PREV_HIST1, PREV_NOISE, PREV_SAMPLE, PREV_X0, X0_FROM_MODEL,
                                   X0_FROM_SAMPLE)
from . import schedules as S
from .alpha import AlphaScheduleMixin
from .base import (KARRAS_COMPATIBLES, SchedulerMixin, SchedulerOutput, check_choice, fold_x0, new_rows, randn_tensor,
                   register_to_config)
from .sigma_base import SigmaStepMixin

FIRST_ORDER, SECOND_ORDER = 0, 1  # row variants


class DPMSolverMultistepScheduler(AlphaScheduleMixin, SigmaStepMixin, SchedulerMixin):
    """algorithm_type dpmsolver++ / sde-dpmsolver++, solver_order 1 or 2, solver_type midpoint or
    heun. The previous x0 lives here as a tensor (``history``), replaced by each step's aux output."""

    _compatibles = KARRAS_COMPATIBLES
    order = 1

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, solver_order: int = 2,
                 prediction_type: str = "epsilon", thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, sample_max_value: float = 1.0,
                 algorithm_type: str = "dpmsolver++", solver_type: str = "midpoint",
                 lower_order_final: bool = True, euler_at_final: bool = False, use_karras_sigmas: bool = False,
                 use_exponential_sigmas: bool = False, use_beta_sigmas: bool = False, use_lu_lambdas: bool = False,
                 use_flow_sigmas: bool = False, flow_shift: float = 1.0, final_sigmas_type: str = "zero",
                 lambda_min_clipped: float = -float("inf"), variance_type: Optional[str] = None,
                 timestep_spacing: str = "linspace", steps_offset: int = 0, rescale_betas_zero_snr: bool = False,
                 use_dynamic_shifting: bool = False, time_shift_type: str = "exponential"):
        SchedulerMixin.__init__(self)
        name = type(self).__name__
        if algorithm_type in ("dpmsolver", "sde-dpmsolver", "deis"):
            raise ValueError(f"{name}: algorithm_type {algorithm_type!r} is not supported by genfast (diffusers "
                             f"deprecates it); use 'dpmsolver++' or 'sde-dpmsolver++'")
        check_choice(name, "algorithm_type", algorithm_type, ("dpmsolver++", "sde-dpmsolver++"))
        check_choice(name, "solver_type", solver_type, ("midpoint", "heun"))
        if solver_order not in (1, 2):
            raise ValueError(f"{name}: solver_order must be 1 or 2 in genfast (3 is not implemented), "
                             f"got {solver_order}")
        check_choice(name, "prediction_type", prediction_type, ("epsilon", "sample", "v_prediction", "flow_prediction"))
        check_choice(name, "timestep_spacing", timestep_spacing, S.TIMESTEP_SPACINGS)
        check_choice(name, "final_sigmas_type", final_sigmas_type, ("zero", "sigma_min"))
        if variance_type not in (None, "learned", "learned_range"):
            raise ValueError(f"{name}: variance_type must be None, 'learned' or 'learned_range', got {variance_type!r}")
        for key, value in (("use_beta_sigmas", use_beta_sigmas), ("use_lu_lambdas", use_lu_lambdas),
                           ("use_dynamic_shifting", use_dynamic_shifting)):
            if value:
                raise ValueError(f"{name}: {key}=True is not supported by genfast")
        if use_karras_sigmas and use_exponential_sigmas:
            raise ValueError(f"{name}: only one of use_karras_sigmas, use_exponential_sigmas can be set")
        self._init_alphas(("linear", "scaled_linear", "squaredcos_cap_v2"), num_train_timesteps, beta_start, beta_end,
                          beta_schedule, trained_betas, rescale_betas_zero_snr, terminal_fix=True)
        self.lower_order_nums = 0
        self._history = None
        self.timesteps = torch.linspace(num_train_timesteps - 1, 0, num_train_timesteps, dtype=torch.float32)

    @property
    def init_noise_sigma(self) -> float:
        return 1.0  # variance-preserving: x_T ~ N(0, 1)

    def scale_model_input(self, sample: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return sample

    def _alpha_sigma_of(self, sigma: np.ndarray) -> tuple:
        """(alpha, sigma) of the solver at each k-diffusion sigma in ``sigma``."""
        if self.config.use_flow_sigmas:
            return 1 - sigma, sigma
        alpha = 1 / np.sqrt(sigma ** 2 + 1)
        return alpha, sigma * alpha

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device=None, mu: Optional[float] = None,
                      timesteps=None):
        cfg, name = self.config, type(self).__name__
        T = cfg.num_train_timesteps
        if mu is not None:
            raise ValueError(f"{name}.set_timesteps: mu (dynamic shifting) is not supported by genfast")
        if num_inference_steps is None and timesteps is None:
            raise ValueError(f"{name}.set_timesteps: pass num_inference_steps or timesteps")
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError(f"{name}.set_timesteps: pass num_inference_steps or timesteps, not both")
        if timesteps is not None and (cfg.use_karras_sigmas or cfg.use_exponential_sigmas):
            raise ValueError(f"{name}.set_timesteps: custom timesteps cannot be used with Karras/exponential sigmas")
        if num_inference_steps is not None and int(num_inference_steps) < 1:
            raise ValueError(f"{name}.set_timesteps: num_inference_steps must be >= 1, got {num_inference_steps}")
        train_sigmas = S.sigmas_from_alphas_cumprod(self._abar)
        log_sigmas = np.log(train_sigmas)
        if timesteps is not None:
            ts = np.asarray(timesteps).astype(np.int64)
        else:
            alpha_t, sigma_t = np.sqrt(self._abar), np.sqrt(1 - self._abar)
            lambda_t = (np.log(alpha_t) - np.log(sigma_t)).astype(np.float32)  # diffusers' float32 search
            clipped = int(np.searchsorted(lambda_t[::-1], np.float32(cfg.lambda_min_clipped), side="left"))
            ts = S.dpm_spaced_timesteps(cfg.timestep_spacing, num_inference_steps, T, T - clipped, cfg.steps_offset)
        n = int(num_inference_steps) if timesteps is None else len(ts)
        if cfg.use_karras_sigmas or cfg.use_exponential_sigmas:
            full = train_sigmas[::-1]
            lo, hi = float(full[-1]), float(full[0])
            sig = S.karras_sigmas(lo, hi, n) if cfg.use_karras_sigmas else S.exponential_sigmas(lo, hi, n)
            tf = S.sigma_to_t(sig, log_sigmas)
            if cfg.use_karras_sigmas and cfg.beta_schedule != "squaredcos_cap_v2":
                tf = tf.round()
            ts = tf.astype(np.int64)
        elif cfg.use_flow_sigmas:
            alphas = np.linspace(1, 1 / T, n + 1)
            sig = np.flip(S.flow_shift(1.0 - alphas, cfg.flow_shift))[:-1].copy()
            ts = (sig * T).astype(np.int64)
        else:
            sig = S.interp_sigmas(ts, train_sigmas)
        last = float(train_sigmas[0]) if cfg.final_sigmas_type == "sigma_min" else 0.0
        sig = np.concatenate([sig, [last]])
        n = len(ts)
        self.num_inference_steps = n
        self._sigmas_host = [float(s) for s in sig]
        self.sigmas = torch.tensor(sig, dtype=torch.float32)
        self._rows = self._dpm_rows(sig, n)
        self._timesteps_host = [int(t) for t in ts]
        self.timesteps = torch.from_numpy(ts.copy()).to(device=device, dtype=torch.int64)
        self.lower_order_nums = 0
        self._history = None
        self._finish_set_timesteps(device)

    def _dpm_rows(self, sig, n) -> np.ndarray:
        """Every step's first- and second-order rows at once (numpy over the steps)."""
        cfg = self.config
        sde = cfg.algorithm_type == "sde-dpmsolver++"
        sig = np.asarray(sig, dtype=np.float64)
        rows = new_rows(n, 2)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            alpha_s0, sigma_s0 = self._alpha_sigma_of(sig[:n])
            alpha_t, sigma_t = self._alpha_sigma_of(sig[1:n + 1])
            lam_s0 = np.log(alpha_s0) - np.log(sigma_s0)
            lam_t = np.log(alpha_t) - np.log(sigma_t)  # +inf at a zero final sigma
            h = lam_t - lam_s0
            # x0 of each step (convert_model_output)
            p = cfg.prediction_type
            if p == "epsilon":
                x0 = (1 / alpha_s0, -sigma_s0 / alpha_s0)
            elif p == "sample":
                x0 = (0.0, 1.0)
            elif p == "v_prediction":
                x0 = (alpha_s0, -sigma_s0)
            else:  # flow_prediction
                x0 = (1.0, -sig[:n])
            em, e2m = np.exp(-h), np.exp(-2.0 * h)
            if sde:
                prev_sample, d0 = sigma_t / sigma_s0 * em, alpha_t * (1 - e2m)
            else:
                prev_sample, d0 = sigma_t / sigma_s0, -alpha_t * (em - 1.0)
            for v in (FIRST_ORDER, SECOND_ORDER):
                r = rows[:, v]
                r[:, X0_FROM_SAMPLE], r[:, X0_FROM_MODEL] = x0
                r[:, AUX_X0] = 1.0
                r[:, PREV_SAMPLE] = prev_sample
                if sde:
                    r[:, PREV_NOISE] = sigma_t * np.sqrt(1.0 - e2m)
                r[:, PREV_X0] = d0
            if n > 1:  # second order from the second step: D1 = (x0 - x0_prev) / r0
                alpha_s1, sigma_s1 = self._alpha_sigma_of(sig[:n - 1])
                h1, d01, alpha_t1, em1, e2m1 = h[1:], d0[1:], alpha_t[1:], em[1:], e2m[1:]
                r0 = (lam_s0[1:] - (np.log(alpha_s1) - np.log(sigma_s1))) / h1
                if cfg.solver_type == "midpoint":
                    d1 = 0.5 * d01
                elif sde:
                    d1 = alpha_t1 * ((1.0 - e2m1) / (-2.0 * h1) + 1.0)
                else:
                    d1 = alpha_t1 * ((em1 - 1.0) / h1 + 1.0)
                r = rows[1:, SECOND_ORDER]
                r[:, PREV_X0] = d01 + d1 / r0
                r[:, PREV_HIST1] = -d1 / r0
        if sig[n] == 0.0:  # the final step is always first order then; its 2nd-order row (h = inf) is unused
            rows[n - 1, SECOND_ORDER] = rows[n - 1, FIRST_ORDER]
        return rows if cfg.thresholding else fold_x0(rows)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             variance_noise: Optional[torch.Tensor] = None, return_dict: bool = True):
        cfg, name = self.config, type(self).__name__
        if self.num_inference_steps is None:
            raise ValueError(f"{name}.step: call set_timesteps(num_inference_steps) first")
        learned = cfg.variance_type in ("learned", "learned_range") and cfg.prediction_type == "epsilon"
        self._check_tensors(name, model_output, sample)
        i = self._current_index(timestep)
        if learned and model_output.shape[1] != sample.shape[1]:
            model_output = model_output[:, :3]
        n = len(self._timesteps_host)
        lower_final = i == n - 1 and (cfg.euler_at_final or (cfg.lower_order_final and n < 15)
                                      or cfg.final_sigmas_type == "zero")
        first = cfg.solver_order == 1 or self.lower_order_nums < 1 or lower_final or self._history is None
        noise = None
        if cfg.algorithm_type == "sde-dpmsolver++":
            if variance_noise is None:
                noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                                     dtype=torch.float32)
            else:
                noise = variance_noise.to(device=model_output.device, dtype=torch.float32)
        prev, x0 = self._run(i, FIRST_ORDER if first else SECOND_ORDER, sample, model_output,
                             history=None if first else self._history, noise=noise, threshold=cfg.thresholding,
                             out_dtype=model_output.dtype, aux_dtype=sample.dtype)
        self._history = x0
        if self.lower_order_nums < cfg.solver_order:
            self.lower_order_nums += 1
        self._step_index = i + 1
        if not return_dict:
            return (prev,)
        return SchedulerOutput(prev_sample=prev)

    def add_noise(self, original_samples, noise, timesteps):
        """alpha_t x0 + sigma_t noise at each timestep's step (diffusers' index rule)."""
        alpha, sigma = self._alpha_sigma_of(np.asarray(self._sigmas_host, dtype=np.float64))
        return self._scaled_noise("add_noise", original_samples, noise, timesteps, alpha.tolist(), sigma.tolist(),
                                  not_found_last=True)
