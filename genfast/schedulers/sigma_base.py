"""Shared parts of the sigma-parameterised (k-diffusion style) schedulers: step-index lookup of
timesteps for add_noise, input scaling by host floats, init_noise_sigma."""
from __future__ import annotations

import math

import torch

from . import _ops


class SigmaStepMixin:
    """Needs ``self._sigmas_host`` (python floats, the step's sigma at each step index) and the
    SchedulerMixin index machinery."""

    @property
    def init_noise_sigma(self) -> float:
        if self._rows is None:  # before set_timesteps: the full training schedule, as diffusers
            abar = getattr(self, "_abar", None)
            sigma_max = float(((1 - abar.min()) / abar.min()) ** 0.5) if abar is not None else 1.0
        else:
            sigma_max = max(self._sigmas_host)
        if self.config.timestep_spacing in ("linspace", "trailing"):
            return sigma_max
        return (sigma_max ** 2 + 1) ** 0.5

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """sample / sqrt(sigma^2 + 1) with the current step's sigma (a host float: no table access)."""
        self._require_timesteps("scale_model_input")
        if self._step_index is None:
            self._init_step_index(timestep)
        self.is_scale_input_called = True
        sigma = self._sigmas_host[self._step_index]
        return sample / math.sqrt(sigma * sigma + 1)

    def _step_indices(self, timesteps, batch: int, not_found_last: bool = False) -> list:
        """diffusers' add_noise index rule: by begin_index/step_index when set, else each
        timestep's index in the schedule (read on the host: one sync for a device tensor)."""
        if self._begin_index is not None:
            i = self._step_index if self._step_index is not None else self._begin_index
            return [i] * batch
        values = timesteps.reshape(-1).tolist() if isinstance(timesteps, torch.Tensor) else list(
            timesteps if isinstance(timesteps, (list, tuple)) else [timesteps])
        out = []
        for v in values:
            try:
                out.append(self._lookup(v, first=False))
            except ValueError:
                if not not_found_last:
                    raise
                out.append(len(self._timesteps_host) - 1)
        return out

    def _scaled_noise(self, what, x, noise, timesteps, signal_host, noise_host, not_found_last=False):
        """signal[i] * x + noise[i] * noise, i = the step index of each timestep."""
        self._require_timesteps(what)
        if not isinstance(x, torch.Tensor) or not isinstance(noise, torch.Tensor) or x.shape != noise.shape:
            raise ValueError(f"{type(self).__name__}.{what}: sample and noise must be tensors of the same shape, got "
                             f"{getattr(x, 'shape', type(x))} and {getattr(noise, 'shape', type(noise))}")
        idx = self._step_indices(timesteps, x.shape[0], not_found_last)
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        key = ("noise", what, x.device.type, x.device.index, dtype)
        if key not in self._tables:
            self._tables[key] = (torch.tensor(signal_host, dtype=dtype).to(x.device),
                                 torch.tensor(noise_host, dtype=dtype).to(x.device))
        sig, nos = self._tables[key]
        t = torch.tensor(idx, dtype=torch.long).to(x.device)
        if len(idx) == 1 and x.ndim and x.shape[0] != 1:
            t = t.reshape(())
        return _ops.add_noise(x, noise, t, sig, nos)
