"""Plain-PyTorch references: the specification every fast backend is tested against."""
from . import attention
from .bias_act import ACTIVATIONS, bias_act, bias_act_derivative

__all__ = ["ACTIVATIONS", "bias_act", "bias_act_derivative"]
__all__ += ["attention"]
