"""genfast: fast kernels for generative models, each with a plain-PyTorch reference.

    import genfast
    y = genfast.ops.bias_act(x, b, act="lrelu")      # fused StyleGAN bias + activation
    genfast.info()                                    # what runs here, and why not

Importing genfast never fails for lack of a GPU, a compiler or triton: backends that cannot
run are reported by ``genfast.info()`` and skipped by the dispatcher.
"""
from __future__ import annotations

__version__ = "0.1.0"

from . import distributed, models, nn, ops, reference, schedulers
from ._dispatch import BACKENDS, BackendWarning, refresh_environment, use_backend
from ._info import info
from .optimize import optimize, revert
from .ops.attention import (flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache,
                            scaled_dot_product_attention)
from .ops.merge import merge_attention_states

__all__ = ["__version__", "BACKENDS", "BackendWarning", "info", "models", "nn", "ops", "reference", "schedulers",
           "use_backend", "refresh_environment", "optimize", "revert"]
__all__ += ["scaled_dot_product_attention", "flash_attn_func", "flash_attn_varlen_func", "flash_attn_with_kvcache",
            "merge_attention_states", "distributed"]
