"""Diffusion schedulers compatible with huggingface/diffusers (same config keys, defaults and
methods; ``pipe.scheduler = genfast.schedulers.DDIMScheduler.from_config(pipe.scheduler.config)``)
whose step is one fused ``sampler_step`` launch with coefficients precomputed in float64 and
no host-device synchronisation. ``genfast.schedulers.schedules`` has the schedules themselves.

diffusers pipelines save and load them like their own (``pipe.save_pretrained`` writes
``["genfast.schedulers", "<class>"]`` and ``scheduler/scheduler_config.json``;
``DiffusionPipeline.from_pretrained`` builds the genfast class again once genfast is imported).
Importing this package does not import diffusers.
"""
from . import schedules
from .alpha import DDIMScheduler, DDPMScheduler, LCMScheduler
from .euler import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler
from .dpmsolver import DPMSolverMultistepScheduler
from .flow_match import FlowMatchEulerDiscreteScheduler
from .base import FrozenConfig, LCMSchedulerOutput, SampleOutput, SchedulerMixin, SchedulerOutput, randn_tensor
from . import _diffusers

__all__ = ["schedules", "DDPMScheduler", "DDIMScheduler", "LCMScheduler", "EulerDiscreteScheduler",
           "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "DPMSolverMultistepScheduler",
           "FlowMatchEulerDiscreteScheduler", "SchedulerMixin", "FrozenConfig", "SchedulerOutput",
           "SampleOutput", "LCMSchedulerOutput", "randn_tensor"]

# The public path, not the defining file: diffusers saves it in model_index.json as the library to
# load the class from (and pickle records it), so it must not change when the code moves.
for _cls in (DDPMScheduler, DDIMScheduler, LCMScheduler, EulerDiscreteScheduler, EulerAncestralDiscreteScheduler,
             HeunDiscreteScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, SchedulerMixin):
    _cls.__module__ = __name__
del _cls

_diffusers.install()
