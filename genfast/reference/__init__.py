"""Plain-PyTorch references: the specification every fast backend is tested against."""
from . import attention
from .bias_act import ACTIVATIONS, bias_act, bias_act_derivative

__all__ = ["ACTIVATIONS", "bias_act", "bias_act_derivative"]
from .upfirdn2d import upfirdn2d

__all__ += ["upfirdn2d"]
from .filtered_lrelu import filtered_lrelu

__all__ += ["filtered_lrelu"]
__all__ += ["attention"]
