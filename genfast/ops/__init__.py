"""genfast.ops: the functional ops. One module per op family."""
from .bias_act import bias_act, fused_leaky_relu

__all__ = ["bias_act", "fused_leaky_relu"]
