"""The one place the schedulers import their step kernels from: the fused backends of
``genfast.ops.diffusion`` (one launch per step; same contract as ``genfast.reference.diffusion``)."""
from ..ops.diffusion import add_noise, sampler_step, sampler_step_in_loop  # noqa: F401
