"""genfast.ops: the functional ops. One module per op family."""
from .bias_act import bias_act, fused_leaky_relu

__all__ = ["bias_act", "fused_leaky_relu"]
from .upfirdn2d import downsample2d, filter2d, setup_filter, upfirdn2d, upsample2d

__all__ += ["upfirdn2d", "setup_filter", "filter2d", "upsample2d", "downsample2d"]
from .gan import conv2d_resample, minibatch_stddev, modulated_conv2d, pixel_norm

__all__ += ["pixel_norm", "minibatch_stddev", "conv2d_resample", "modulated_conv2d"]
