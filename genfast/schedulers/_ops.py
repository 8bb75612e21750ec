"""The one place the schedulers import their step kernels from (the lead switches this import
to the fused backends in ``genfast.ops`` at merge; the contract and signatures are the same)."""
from ..reference.diffusion import add_noise, sampler_step  # noqa: F401
