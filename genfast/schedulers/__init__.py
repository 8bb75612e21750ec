"""Diffusion schedulers compatible with huggingface/diffusers (same config keys, defaults and
methods; ``pipe.scheduler = genfast.schedulers.DDIMScheduler.from_config(pipe.scheduler.config)``)
whose step is one fused ``sampler_step`` launch with coefficients precomputed in float64 and
no host-device synchronisation. ``genfast.schedulers.schedules`` has the schedules themselves.
"""
from . import schedules
from .alpha import DDIMScheduler, DDPMScheduler, LCMScheduler
from .euler import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler
from .dpmsolver import DPMSolverMultistepScheduler
from .flow_match import FlowMatchEulerDiscreteScheduler
from .base import FrozenConfig, LCMSchedulerOutput, SampleOutput, SchedulerOutput, randn_tensor

__all__ = ["schedules", "DDPMScheduler", "DDIMScheduler", "LCMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
           "HeunDiscreteScheduler", "DPMSolverMultistepScheduler",
           "FlowMatchEulerDiscreteScheduler", "FrozenConfig", "SchedulerOutput",
           "SampleOutput", "LCMSchedulerOutput", "randn_tensor"]
