"""genfast.nn: drop-in modules built on genfast.ops. One module per op family."""
from .bias_act import BiasAct, FusedLeakyReLU

__all__ = ["BiasAct", "FusedLeakyReLU"]
