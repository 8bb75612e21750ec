"""genfast.ops: the functional ops. One module per op family."""
from . import attention
from .attention import (flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache,
                        scaled_dot_product_attention)
from .bias_act import bias_act, fused_leaky_relu

__all__ = ["bias_act", "fused_leaky_relu"]
__all__ += ["attention", "scaled_dot_product_attention", "flash_attn_func", "flash_attn_varlen_func",
            "flash_attn_with_kvcache"]
