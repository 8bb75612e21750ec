"""genfast.ops: the functional ops. One module per op family."""
from .bias_act import bias_act, fused_leaky_relu
from .vae import kl_divergence, reparameterize, reparameterize_kl

__all__ = ["bias_act", "fused_leaky_relu", "kl_divergence", "reparameterize", "reparameterize_kl"]
