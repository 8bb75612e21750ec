"""Rectified-flow Euler (SD3, Flux): diffusers' FlowMatchEulerDiscreteScheduler."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from ..reference.diffusion import PREV_MODEL, PREV_NOISE, PREV_SAMPLE, PREV_X0, X0_FROM_MODEL, X0_FROM_SAMPLE
from . import schedules as S
from .base import SchedulerMixin, SchedulerOutput, check_choice, new_rows, randn_tensor, register_to_config
from .euler import _reject_integer_timestep
from .sigma_base import SigmaStepMixin


class FlowMatchEulerDiscreteScheduler(SigmaStepMixin, SchedulerMixin):
    """x' = x + (sigma_next - sigma) v; stochastic_sampling: x' = (1 - sigma_next) x0 + sigma_next z."""

    order = 1

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0, use_dynamic_shifting: bool = False,
                 base_shift: Optional[float] = 0.5, max_shift: Optional[float] = 1.15, base_image_seq_len: int = 256,
                 max_image_seq_len: int = 4096, invert_sigmas: bool = False, shift_terminal: Optional[float] = None,
                 use_karras_sigmas: bool = False, use_exponential_sigmas: bool = False, use_beta_sigmas: bool = False,
                 time_shift_type: str = "exponential", stochastic_sampling: bool = False):
        SchedulerMixin.__init__(self)
        name = type(self).__name__
        check_choice(name, "time_shift_type", time_shift_type, ("exponential", "linear"))
        if use_beta_sigmas:
            raise ValueError(f"{name}: use_beta_sigmas is not supported by genfast (needs scipy)")
        if use_karras_sigmas and use_exponential_sigmas:
            raise ValueError(f"{name}: only one of use_karras_sigmas, use_exponential_sigmas can be set")
        if invert_sigmas:
            raise ValueError(f"{name}: invert_sigmas=True is not supported by genfast")
        T = int(num_train_timesteps)
        sig = np.linspace(1, T, T, dtype=np.float32)[::-1].astype(np.float64) / T
        if not use_dynamic_shifting:
            sig = S.flow_shift(sig, shift)
        sig32 = sig.astype(np.float32)
        self._shift = shift
        self.sigmas = torch.from_numpy(sig32.copy())
        self.timesteps = self.sigmas * T
        self.sigma_min = float(sig32[-1])
        self.sigma_max = float(sig32[0])

    @property
    def shift(self):
        return self._shift

    def set_shift(self, shift: float) -> None:
        self._shift = shift

    @property
    def init_noise_sigma(self) -> float:
        return 1.0

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device=None, sigmas=None,
                      mu: Optional[float] = None, timesteps=None):
        cfg, name = self.config, type(self).__name__
        T = cfg.num_train_timesteps
        if cfg.use_dynamic_shifting and mu is None:
            raise ValueError(f"{name}.set_timesteps: mu must be passed when use_dynamic_shifting is True")
        if sigmas is not None and timesteps is not None and len(sigmas) != len(timesteps):
            raise ValueError(f"{name}.set_timesteps: sigmas and timesteps must have the same length")
        if num_inference_steps is not None:
            if (sigmas is not None and len(sigmas) != num_inference_steps) or (
                    timesteps is not None and len(timesteps) != num_inference_steps):
                raise ValueError(f"{name}.set_timesteps: sigmas/timesteps must have num_inference_steps entries")
        elif sigmas is None and timesteps is None:
            raise ValueError(f"{name}.set_timesteps: pass num_inference_steps, sigmas or timesteps")
        else:
            num_inference_steps = len(sigmas) if sigmas is not None else len(timesteps)
        n = int(num_inference_steps)
        if n < 1:
            raise ValueError(f"{name}.set_timesteps: num_inference_steps must be >= 1, got {num_inference_steps}")
        self.num_inference_steps = n
        given_t = np.asarray(timesteps, dtype=np.float32).astype(np.float64) if timesteps is not None else None
        if sigmas is None:
            t = given_t if given_t is not None else np.linspace(self.sigma_max * T, self.sigma_min * T, n)
            sig = t / T
        else:
            sig = np.asarray(sigmas, dtype=np.float32).astype(np.float64)
            n = len(sig)
        sig = (S.time_shift(mu, 1.0, sig, cfg.time_shift_type) if cfg.use_dynamic_shifting
               else S.flow_shift(sig, self.shift))
        if cfg.shift_terminal:
            sig = S.stretch_shift_to_terminal(sig, cfg.shift_terminal)
        if cfg.use_karras_sigmas:
            sig = S.karras_sigmas(float(sig[-1]), float(sig[0]), n)
        elif cfg.use_exponential_sigmas:
            sig = S.exponential_sigmas(float(sig[-1]), float(sig[0]), n)
        sig32 = sig.astype(np.float32)
        ts32 = given_t.astype(np.float32) if given_t is not None else (sig32 * np.float32(T)).astype(np.float32)
        sig = np.concatenate([sig32.astype(np.float64), [0.0]])
        rows = new_rows(n, 1)
        for i in range(n):
            r = rows[i, 0]
            if cfg.stochastic_sampling:
                r[X0_FROM_SAMPLE], r[X0_FROM_MODEL] = 1.0, -sig[i]
                r[PREV_X0], r[PREV_NOISE] = 1.0 - sig[i + 1], sig[i + 1]
            else:
                r[PREV_SAMPLE], r[PREV_MODEL] = 1.0, sig[i + 1] - sig[i]
        self._rows = rows
        self._sigmas_host = [float(s) for s in sig]
        self.sigmas = torch.tensor(sig, dtype=torch.float32).to(device)
        self._timesteps_host = [float(t) for t in ts32]
        self.timesteps = torch.from_numpy(ts32.copy()).to(device)
        self._finish_set_timesteps(device)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, s_churn: float = 0.0,
             s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0, generator=None,
             per_token_timesteps: Optional[torch.Tensor] = None, return_dict: bool = True):
        name = type(self).__name__
        if per_token_timesteps is not None:
            raise ValueError(f"{name}.step: per_token_timesteps is not supported by genfast")
        _reject_integer_timestep(name, timestep)
        self._check_tensors(name, model_output, sample)
        i = self._current_index(timestep)
        noise = None
        if self.config.stochastic_sampling:
            noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=torch.float32)
        prev, _ = self._run(i, 0, sample, model_output, noise=noise, out_dtype=model_output.dtype)
        self._step_index = i + 1
        if not return_dict:
            return (prev,)
        return SchedulerOutput(prev_sample=prev)

    def scale_noise(self, sample: torch.Tensor, timestep, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Flow-matching forward process: sigma * noise + (1 - sigma) * sample."""
        sig = self._sigmas_host
        return self._scaled_noise("scale_noise", sample, noise, timestep, [1.0 - s for s in sig], sig)

    def add_noise(self, original_samples, noise, timesteps):
        """genfast extra (diffusers has only scale_noise): the same forward process."""
        return self.scale_noise(original_samples, timesteps, noise)
