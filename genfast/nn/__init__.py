"""genfast.nn: drop-in modules built on genfast.ops. One module per op family."""
from .attention import CausalSelfAttention, KVCache, MultiheadAttention, register_transformers_attention
from .bias_act import BiasAct, FusedLeakyReLU

__all__ = ["BiasAct", "FusedLeakyReLU"]
__all__ += ["MultiheadAttention", "CausalSelfAttention", "KVCache", "register_transformers_attention"]
