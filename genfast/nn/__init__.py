"""genfast.nn: drop-in modules built on genfast.ops. One module per op family."""
from .bias_act import BiasAct, FusedLeakyReLU
from .group_norm import GroupNorm, GroupNormSiLU

__all__ = ["BiasAct", "FusedLeakyReLU", "GroupNorm", "GroupNormSiLU"]
