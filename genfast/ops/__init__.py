"""genfast.ops: the functional ops. One module per op family."""
from .bias_act import bias_act, fused_leaky_relu
from .group_norm import group_norm

__all__ = ["bias_act", "fused_leaky_relu", "group_norm"]
