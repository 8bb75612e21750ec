"""genfast.nn: drop-in modules built on genfast.ops. One module per op family."""
from .attention import CausalSelfAttention, KVCache, MultiheadAttention, register_transformers_attention
from .bias_act import BiasAct, FusedLeakyReLU
from .gan import (AdaIN, BatchNorm2dAct, ConditionalBatchNorm2d, EqualizedConv2d, EqualizedLinear, FusedLinearAct,
                  MinibatchStd, ModulatedConv2d, PixelNorm, SpectralNorm, ToRGB, fuse_conv_bn, spectral_norm_all)
from .group_norm import GroupNorm, GroupNormSiLU

__all__ = ["BiasAct", "FusedLeakyReLU", "GroupNorm", "GroupNormSiLU",
           "EqualizedLinear", "EqualizedConv2d", "FusedLinearAct", "PixelNorm", "MinibatchStd", "ModulatedConv2d",
           "ToRGB", "SpectralNorm", "spectral_norm_all", "ConditionalBatchNorm2d", "AdaIN", "BatchNorm2dAct",
           "fuse_conv_bn"]
__all__ += ["MultiheadAttention", "CausalSelfAttention", "KVCache", "register_transformers_attention"]
