"""genfast.ops: the functional ops. One module per op family."""
from . import attention
from .attention import (flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache,
                        scaled_dot_product_attention)
from .bias_act import bias_act, fused_leaky_relu
from .diffusion import (add_noise, cfg_combine, diffusion_loss, min_snr_weights, sampler_step,
                        timestep_embedding)
from .filtered_lrelu import filtered_lrelu
from .gan import conv2d_resample, minibatch_stddev, modulated_conv2d, pixel_norm
from .group_norm import group_norm
from .merge import merge_attention_states
from .upfirdn2d import downsample2d, filter2d, setup_filter, upfirdn2d, upsample2d
from .vae import kl_divergence, reparameterize, reparameterize_kl

__all__ = [
    "bias_act", "fused_leaky_relu",
    "sampler_step", "add_noise", "diffusion_loss", "min_snr_weights", "cfg_combine", "timestep_embedding",
    "group_norm",
    "upfirdn2d", "setup_filter", "filter2d", "upsample2d", "downsample2d", "filtered_lrelu",
    "pixel_norm", "minibatch_stddev", "conv2d_resample", "modulated_conv2d",
    "kl_divergence", "reparameterize", "reparameterize_kl",
]
__all__ += ["attention", "scaled_dot_product_attention", "flash_attn_func", "flash_attn_varlen_func",
            "flash_attn_with_kvcache", "merge_attention_states"]
