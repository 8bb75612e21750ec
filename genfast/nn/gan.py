"""GAN layers built on genfast.ops: StyleGAN2-ADA (equalized learning rate, modulated conv,
ToRGB, pixel norm, minibatch stddev), DCGAN (BatchNorm + activation, conv/BN folding),
MLP-GAN (Linear + activation with a fused epilogue), spectral norm with batched power
iteration, conditional batch norm and AdaIN.
"""
from __future__ import annotations

import copy
import math
from typing import Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.bias_act import bias_act
from ..ops.gan import conv2d_resample, minibatch_stddev, modulated_conv2d, pixel_norm
from ..ops.upfirdn2d import setup_filter
from ..reference.bias_act import ACTIVATIONS

__all__ = [
    "EqualizedLinear", "EqualizedConv2d", "FusedLinearAct", "PixelNorm", "MinibatchStd", "ModulatedConv2d", "ToRGB",
    "SpectralNorm", "spectral_norm_all", "ConditionalBatchNorm2d", "AdaIN", "BatchNorm2dAct", "fuse_conv_bn",
]


def _check_activation(activation: str, allowed: Optional[Iterable[str]] = None, owner: str = "") -> str:
    names = list(allowed) if allowed is not None else list(ACTIVATIONS)
    if activation not in names:
        raise ValueError(f"{owner}: unknown activation {activation!r}; expected one of {', '.join(names)}")
    return activation


def _positive_int(name: str, value, owner: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")
    return value


# ----------------------------------------------------------------------------- StyleGAN2-ADA


class EqualizedLinear(nn.Module):
    """StyleGAN2-ADA FullyConnectedLayer: weight ~ N(0, 1) / lr_multiplier, used at run time
    times lr_multiplier / sqrt(in_features) (equalized learning rate); bias initialised to
    ``bias_init`` and used times lr_multiplier; optional activation fused with the bias
    through ``bias_act`` (with the activation's default gain, e.g. sqrt(2) for lrelu)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, activation: str = "linear",
                 lr_multiplier: float = 1.0, bias_init: float = 0.0):
        super().__init__()
        _positive_int("in_features", in_features, "EqualizedLinear")
        _positive_int("out_features", out_features, "EqualizedLinear")
        self.in_features, self.out_features = in_features, out_features
        self.activation = _check_activation(activation, owner="EqualizedLinear")
        self.weight = nn.Parameter(torch.randn([out_features, in_features]) / lr_multiplier)
        self.bias = nn.Parameter(torch.full([out_features], float(bias_init))) if bias else None
        self.weight_gain = lr_multiplier / math.sqrt(in_features)
        self.bias_gain = lr_multiplier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"EqualizedLinear: expected x of shape [batch, {self.in_features}], got {tuple(x.shape)}")
        w = self.weight.to(x.dtype) * self.weight_gain
        b = self.bias
        if b is not None:
            b = b.to(x.dtype)
            if self.bias_gain != 1:
                b = b * self.bias_gain
        if self.activation == "linear" and b is not None:
            return torch.addmm(b.unsqueeze(0), x, w.t())
        return bias_act(x.matmul(w.t()), b, act=self.activation)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, activation={self.activation!r}"


class EqualizedConv2d(nn.Module):
    """StyleGAN2-ADA Conv2dLayer: weight ~ N(0, 1) / lr_multiplier used times
    lr_multiplier / sqrt(fan_in), bias times lr_multiplier, ``conv2d_resample`` with the FIR
    ``resample_filter`` for up/down, then bias + activation (default gain) + ``conv_clamp``
    fused in ``bias_act``. ``forward(x, gain=1)`` scales the activation gain and the clamp."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, bias: bool = True,
                 activation: str = "linear", up: int = 1, down: int = 1, resample_filter: Sequence = (1, 3, 3, 1),
                 conv_clamp: Optional[float] = None, channels_last: bool = False, lr_multiplier: float = 1.0):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels),
                            ("kernel_size", kernel_size), ("up", up), ("down", down)):
            _positive_int(name, value, "EqualizedConv2d")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.activation = _check_activation(activation, owner="EqualizedConv2d")
        self.up, self.down, self.conv_clamp = up, down, conv_clamp
        # A buffer (moves with .to(device)); used as float32 even after .double() / .half().
        self.register_buffer("resample_filter", setup_filter(list(resample_filter)))
        self.padding = kernel_size // 2
        self.weight_gain = lr_multiplier / math.sqrt(in_channels * kernel_size ** 2)
        self.bias_gain = lr_multiplier
        self.act_gain = ACTIVATIONS[activation].default_gain
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.weight = nn.Parameter(torch.randn([out_channels, in_channels, kernel_size, kernel_size]).to(
            memory_format=memory_format) / lr_multiplier)
        self.bias = nn.Parameter(torch.zeros([out_channels])) if bias else None

    def forward(self, x: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
        w = self.weight * self.weight_gain
        b = self.bias
        if b is not None:
            b = b.to(x.dtype) * self.bias_gain if self.bias_gain != 1 else b.to(x.dtype)
        x = conv2d_resample(x, w.to(x.dtype), f=self.resample_filter.float(), up=self.up, down=self.down,
                            padding=self.padding, flip_weight=self.up == 1)
        clamp = self.conv_clamp * gain if self.conv_clamp is not None else None
        return bias_act(x, b, act=self.activation, gain=self.act_gain * gain, clamp=clamp)

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, out_channels={self.out_channels}, activation={self.activation!r}, "
                f"up={self.up}, down={self.down}, conv_clamp={self.conv_clamp}")


class PixelNorm(nn.Module):
    """``x * rsqrt(mean(x^2 over dim) + eps)`` (ProGAN / StyleGAN mapping-network input norm)."""

    def __init__(self, dim: int = 1, eps: float = 1e-8):
        super().__init__()
        self.dim, self.eps = dim, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pixel_norm(x, self.dim, self.eps)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, eps={self.eps}"


class MinibatchStd(nn.Module):
    """StyleGAN2 MinibatchStdLayer: appends ``num_channels`` stddev feature maps."""

    def __init__(self, group_size: Optional[int] = 4, num_channels: int = 1):
        super().__init__()
        self.group_size, self.num_channels = group_size, num_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return minibatch_stddev(x, self.group_size, self.num_channels)

    def extra_repr(self) -> str:
        return f"group_size={self.group_size}, num_channels={self.num_channels}"


NOISE_MODES = ("random", "const", "none")


class ModulatedConv2d(nn.Module):
    """StyleGAN2-ADA SynthesisLayer: style = affine(w) (EqualizedLinear, bias 1), modulated
    (and demodulated) conv with optional 2x upsampling, per-pixel noise scaled by a learned
    strength, then bias + activation + ``conv_clamp`` through ``bias_act``.

    ``forward(x, w, noise_mode='random'|'const'|'none', fused_modconv=True, gain=1)``.
    """

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int, kernel_size: int = 3,
                 up: int = 1, use_noise: bool = True, activation: str = "lrelu",
                 resample_filter: Sequence = (1, 3, 3, 1), conv_clamp: Optional[float] = None,
                 channels_last: bool = False):
        super().__init__()
        self.in_channels, self.out_channels, self.w_dim = in_channels, out_channels, w_dim
        self.resolution, self.up, self.use_noise, self.conv_clamp = resolution, up, use_noise, conv_clamp
        self.activation = _check_activation(activation, owner="ModulatedConv2d")
        self.affine = EqualizedLinear(w_dim, in_channels, bias_init=1)
        self.register_buffer("resample_filter", setup_filter(list(resample_filter)))
        self.padding = kernel_size // 2
        self.act_gain = ACTIVATIONS[activation].default_gain
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.weight = nn.Parameter(torch.randn([out_channels, in_channels, kernel_size, kernel_size]).to(
            memory_format=memory_format))
        if use_noise:
            self.register_buffer("noise_const", torch.randn([resolution, resolution]))
            self.noise_strength = nn.Parameter(torch.zeros([]))
        self.bias = nn.Parameter(torch.zeros([out_channels]))

    def forward(self, x: torch.Tensor, w: torch.Tensor, noise_mode: str = "random", fused_modconv: bool = True,
                gain: float = 1.0) -> torch.Tensor:
        if noise_mode not in NOISE_MODES:
            raise ValueError(f"ModulatedConv2d: noise_mode must be one of {', '.join(NOISE_MODES)}, got {noise_mode!r}")
        in_resolution = self.resolution // self.up
        if x.ndim != 4 or tuple(x.shape[1:]) != (self.in_channels, in_resolution, in_resolution):
            raise ValueError(f"ModulatedConv2d: expected x of shape [batch, {self.in_channels}, {in_resolution}, "
                             f"{in_resolution}], got {tuple(x.shape)}")
        styles = self.affine(w)
        noise = None
        if self.use_noise and noise_mode == "random":
            noise = (torch.randn([x.shape[0], 1, self.resolution, self.resolution], device=x.device)
                     * self.noise_strength)
        if self.use_noise and noise_mode == "const":
            noise = self.noise_const * self.noise_strength
        x = modulated_conv2d(x, self.weight, styles, noise=noise, up=self.up, padding=self.padding,
                             resample_filter=self.resample_filter.float(), flip_weight=self.up == 1,
                             fused_modconv=fused_modconv)
        clamp = self.conv_clamp * gain if self.conv_clamp is not None else None
        return bias_act(x, self.bias.to(x.dtype), act=self.activation, gain=self.act_gain * gain, clamp=clamp)

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, out_channels={self.out_channels}, w_dim={self.w_dim}, "
                f"resolution={self.resolution}, up={self.up}, activation={self.activation!r}")


class ToRGB(nn.Module):
    """StyleGAN2-ADA ToRGBLayer: modulated 1x1 conv without demodulation (styles scaled by
    1/sqrt(fan_in)), then bias and ``conv_clamp``."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, kernel_size: int = 1,
                 conv_clamp: Optional[float] = None, channels_last: bool = False):
        super().__init__()
        self.conv_clamp = conv_clamp
        self.affine = EqualizedLinear(w_dim, in_channels, bias_init=1)
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.weight = nn.Parameter(torch.randn([out_channels, in_channels, kernel_size, kernel_size]).to(
            memory_format=memory_format))
        self.bias = nn.Parameter(torch.zeros([out_channels]))
        self.weight_gain = 1 / math.sqrt(in_channels * kernel_size ** 2)

    def forward(self, x: torch.Tensor, w: torch.Tensor, fused_modconv: bool = True) -> torch.Tensor:
        styles = self.affine(w) * self.weight_gain
        x = modulated_conv2d(x, self.weight, styles, demodulate=False, fused_modconv=fused_modconv)
        return bias_act(x, self.bias.to(x.dtype), clamp=self.conv_clamp)


# ----------------------------------------------------------------------------- MLP-GAN


FUSED_LINEAR_ACTIVATIONS = ("relu", "lrelu", "tanh", "sigmoid", "linear")

# torch's own activation after ``F.linear(x, W, b)`` (addmm fuses the bias into the matmul).
_TORCH_LINEAR_EPILOGUE = {
    "relu": lambda y, slope: F.relu(y), "lrelu": lambda y, slope: F.leaky_relu(y, slope),
    "tanh": lambda y, slope: torch.tanh(y), "sigmoid": lambda y, slope: torch.sigmoid(y),
}


def fused_epilogue_pays(device) -> bool:
    """Whether ``FusedLinearAct``'s genfast ``bias_act`` epilogue beats ``F.linear(x, W, b)``
    followed by torch's activation on ``device`` (and so whether ``genfast.optimize`` swaps a
    Linear + activation pair for it there). Not on CPU: the matmul dominates and addmm already
    adds the bias, so the separate epilogue pass only adds work (MLP-GAN G/D at batch 64-256,
    1 thread, AMD EPYC AVX2: forward 0.95-1.01x, forward+backward 0.88-0.96x of eager)."""
    return torch.device(device).type != "cpu"


class FusedLinearAct(nn.Linear):
    """``act(x W^T + b)`` with the bias and activation fused into one pass after the matmul.

    Same parameters, initialisation and ``state_dict`` keys as ``nn.Linear`` (it is one), so it
    loads nn.Linear weights. ``activation``: relu, lrelu (``negative_slope``), tanh, sigmoid or
    linear; the result equals ``nn.Linear`` followed by the activation module (gain 1). The
    epilogue is ``bias_act``, whose backward gives dx and the bias gradient in one pass;
    ``linear`` is a plain ``F.linear`` (addmm already fuses its bias). On devices where that
    epilogue does not pay (``fused_epilogue_pays``: CPU) it runs ``F.linear(x, W, b)`` and
    torch's activation instead, the same ops as the nn.Linear + activation pair.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, activation: str = "relu",
                 negative_slope: float = 0.2, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.activation = _check_activation(activation, FUSED_LINEAR_ACTIVATIONS, "FusedLinearAct")
        if isinstance(negative_slope, bool) or not isinstance(negative_slope, (int, float)):
            raise TypeError(f"FusedLinearAct: negative_slope must be a number, got {type(negative_slope).__name__}")
        self.negative_slope = float(negative_slope)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"FusedLinearAct: expected x with last dimension {self.in_features}, "
                             f"got shape {tuple(x.shape)}")
        if self.activation == "linear":
            return F.linear(x, self.weight, self.bias)
        if not fused_epilogue_pays(x.device):
            return _TORCH_LINEAR_EPILOGUE[self.activation](F.linear(x, self.weight, self.bias), self.negative_slope)
        y = F.linear(x, self.weight)
        b = self.bias.to(y.dtype) if self.bias is not None else None
        alpha = self.negative_slope if self.activation == "lrelu" else None
        return bias_act(y, b, dim=-1, act=self.activation, alpha=alpha, gain=1.0)

    def extra_repr(self) -> str:
        slope = f", negative_slope={self.negative_slope}" if self.activation == "lrelu" else ""
        return f"{super().extra_repr()}, activation={self.activation!r}{slope}"


# ----------------------------------------------------------------------------- DCGAN


BN_ACTIVATIONS = ("relu", "lrelu", "linear")


class BatchNorm2dAct(nn.BatchNorm2d):
    """``act(BatchNorm2d(x))`` for DCGAN blocks, with relu / lrelu (``negative_slope``) / linear.

    It is an ``nn.BatchNorm2d`` (same parameters, buffers, ``state_dict``, running-stat updates
    in training, eval behaviour); the activation is applied in place on the normalised output,
    so the block allocates one tensor instead of two and autograd keeps one (the BN backward
    needs its input, not its output; the in-place activation's backward needs only the sign).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, activation: str = "relu", negative_slope: float = 0.2,
                 device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.activation = _check_activation(activation, BN_ACTIVATIONS, "BatchNorm2dAct")
        self.negative_slope = float(negative_slope)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        if self.activation == "relu":
            return F.relu_(y)
        if self.activation == "lrelu":
            return F.leaky_relu_(y, self.negative_slope)
        return y

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation!r}, negative_slope={self.negative_slope}"


@torch.no_grad()
def fuse_conv_bn(conv: nn.Module, bn: nn.Module) -> nn.Module:
    """A single Conv2d / ConvTranspose2d equal (in eval mode) to ``bn(conv(x))``, with
    ``w' = w * gamma / sqrt(running_var + eps)`` per output channel and
    ``b' = (b - running_mean) * gamma / sqrt(running_var + eps) + beta``. For inference only:
    the result is in eval mode and uses the BN's running statistics."""
    if not isinstance(conv, (nn.Conv2d, nn.ConvTranspose2d)):
        raise TypeError(f"fuse_conv_bn: conv must be an nn.Conv2d or nn.ConvTranspose2d, got {type(conv).__name__}")
    if not isinstance(bn, nn.BatchNorm2d):
        raise TypeError(f"fuse_conv_bn: bn must be an nn.BatchNorm2d, got {type(bn).__name__}")
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("fuse_conv_bn: bn has no running statistics (track_running_stats=False); nothing to fold")
    if bn.num_features != conv.out_channels:
        raise ValueError(f"fuse_conv_bn: bn has {bn.num_features} features but conv has {conv.out_channels} "
                         "output channels")
    fused = copy.deepcopy(conv)
    dtype = conv.weight.dtype
    scale = bn.running_var.double().add(bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    shift = -bn.running_mean.double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    w = conv.weight.double()
    if isinstance(conv, nn.Conv2d):
        w = w * scale.reshape(-1, 1, 1, 1)
    else:  # [in, out / groups, kh, kw]: the output channel is group-major over dims 0 and 1
        g = conv.groups
        w = w.reshape(g, conv.in_channels // g, conv.out_channels // g, *w.shape[2:])
        w = (w * scale.reshape(g, 1, conv.out_channels // g, 1, 1)).reshape(conv.weight.shape)
    b = shift if conv.bias is None else conv.bias.double() * scale + shift
    fused.weight = nn.Parameter(w.to(dtype), requires_grad=conv.weight.requires_grad)
    fused.bias = nn.Parameter(b.to(dtype), requires_grad=conv.weight.requires_grad)
    return fused.eval()


# ----------------------------------------------------------------------------- conditioning


class ConditionalBatchNorm2d(nn.Module):
    """Class-conditional batch norm (BigGAN / SNGAN projection discriminators' generators):
    ``gamma[y] * BN(x) + beta[y]`` with an affine-free BatchNorm2d and a per-class embedding of
    (gamma, beta), initialised to (1, 0). ``forward(x, y)`` with y int64 class labels [N]."""

    def __init__(self, num_features: int, num_classes: int, eps: float = 1e-5, momentum: Optional[float] = 0.1):
        super().__init__()
        self.num_features, self.num_classes = num_features, num_classes
        self.bn = nn.BatchNorm2d(num_features, eps=eps, momentum=momentum, affine=False)
        self.embed = nn.Embedding(num_classes, 2 * num_features)
        with torch.no_grad():
            self.embed.weight[:, :num_features].fill_(1.0)
            self.embed.weight[:, num_features:].zero_()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.num_features:
            raise ValueError(f"ConditionalBatchNorm2d: expected x of shape [batch, {self.num_features}, H, W], "
                             f"got {tuple(x.shape)}")
        if (not isinstance(y, torch.Tensor) or y.dtype not in (torch.int64, torch.int32)
                or tuple(y.shape) != (x.shape[0],)):
            raise ValueError(f"ConditionalBatchNorm2d: y must be integer class labels of shape [{x.shape[0]}], got "
                             f"{tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__}")
        gamma, beta = self.embed(y).to(x.dtype).chunk(2, dim=1)
        return torch.addcmul(beta[:, :, None, None], self.bn(x), gamma[:, :, None, None])


class AdaIN(nn.Module):
    """Adaptive instance norm (StyleGAN1 / MUNIT): style [N, style_dim] -> per-channel (scale,
    bias) by a linear layer (bias initialised to scale 1, bias 0), applied to the
    instance-normalised x: ``scale * (x - mean_hw) / sqrt(var_hw + eps) + bias``."""

    def __init__(self, num_features: int, style_dim: int, eps: float = 1e-5):
        super().__init__()
        self.num_features, self.eps = num_features, eps
        self.style = nn.Linear(style_dim, 2 * num_features)
        with torch.no_grad():
            self.style.bias[:num_features].fill_(1.0)
            self.style.bias[num_features:].zero_()

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.num_features:
            raise ValueError(f"AdaIN: expected x of shape [batch, {self.num_features}, H, W], got {tuple(x.shape)}")
        if style.ndim != 2 or style.shape[0] != x.shape[0] or style.shape[1] != self.style.in_features:
            raise ValueError(f"AdaIN: expected style of shape [{x.shape[0]}, {self.style.in_features}], "
                             f"got {tuple(style.shape)}")
        scale, bias = self.style(style).to(x.dtype).chunk(2, dim=1)
        return torch.addcmul(bias[:, :, None, None], F.instance_norm(x, eps=self.eps), scale[:, :, None, None])


# ----------------------------------------------------------------------------- spectral norm


class _SpectralNormWeight(nn.Module):
    """Parametrization ``weight / sigma`` with sigma = u^T W v from the stored (u, v); the
    power iteration that updates (u, v) is run for all layers at once by ``SpectralNorm``.
    Buffer names match torch.nn.utils.parametrizations.spectral_norm (``_u``, ``_v``)."""

    def __init__(self, weight: torch.Tensor, dim: int, eps: float):
        super().__init__()
        self.dim, self.eps = dim, eps
        mat = self.matrix(weight)
        h, w = mat.shape
        u = mat.new_empty(h).normal_(0, 1)
        v = mat.new_empty(w).normal_(0, 1)
        self.register_buffer("_u", F.normalize(u, dim=0, eps=eps))
        self.register_buffer("_v", F.normalize(v, dim=0, eps=eps))

    def matrix(self, weight: torch.Tensor) -> torch.Tensor:
        if self.dim != 0:
            weight = weight.permute(self.dim, *(d for d in range(weight.ndim) if d != self.dim))
        return weight.flatten(1)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        u = self._u.clone(memory_format=torch.contiguous_format)
        v = self._v.clone(memory_format=torch.contiguous_format)
        sigma = torch.vdot(u, torch.mv(self.matrix(weight), v))
        return weight / sigma


SPECTRAL_NORM_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                       nn.ConvTranspose3d)


class SpectralNorm:
    """Spectral normalisation of every Linear / Conv / ConvTranspose layer of ``model`` with
    the power iteration of ALL layers batched: at each forward of ``model`` in training mode,
    one step (``n_power_iterations`` iterations) runs for every layer at once, as one
    ``bmm`` per group of layers with the same weight-matrix shape, dtype and device.

    Results match ``torch.nn.utils.parametrizations.spectral_norm`` applied to the same layers in
    module order: the same random initialisation of (u, v) from the same seed, the same 16
    warm-up iterations, the same (u, v) updates per training forward (torch updates a layer
    when its weight is read, once per forward for layers used once; the weights do not change
    within a forward, so running all updates at its start gives the same u and v), the same
    weight in eval. The state_dict keys are torch's (``parametrizations.weight.original``,
    ``parametrizations.weight.0._u`` / ``_v``).
    """

    def __init__(self, model: nn.Module, n_power_iterations: int = 1, eps: float = 1e-12,
                 layer_types: Sequence[type] = SPECTRAL_NORM_TYPES):
        if not isinstance(model, nn.Module):
            raise TypeError(f"SpectralNorm: model must be an nn.Module, got {type(model).__name__}")
        _positive_int("n_power_iterations", n_power_iterations, "SpectralNorm")
        self.n_power_iterations, self.eps = n_power_iterations, eps
        self.params: list = []
        for module in list(model.modules()):
            if isinstance(module, tuple(layer_types)) and isinstance(getattr(module, "weight", None), nn.Parameter):
                if torch.nn.utils.parametrize.is_parametrized(module, "weight"):
                    raise ValueError(f"SpectralNorm: {type(module).__name__} already has a parametrized weight")
                dim = 1 if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)) else 0
                param = _SpectralNormWeight(module.weight.detach(), dim, eps)
                torch.nn.utils.parametrize.register_parametrization(module, "weight", param)
                self.params.append((module, param))
        if not self.params:
            raise ValueError("SpectralNorm: the model has no Linear or Conv layer to normalise")
        with torch.no_grad():
            # torch's warm-up: 15 iterations in _SpectralNorm.__init__, plus one more when
            # register_parametrization evaluates the (new, training-mode) parametrization once.
            self._power_iteration(16, only_training=False)
        self._hook = model.register_forward_pre_hook(lambda module, args: self.step())

    def _groups(self, only_training: bool) -> dict:
        groups: dict = {}
        for module, param in self.params:
            if only_training and not param.training:
                continue
            original = module.parametrizations.weight.original
            mat = param.matrix(original)
            groups.setdefault((tuple(mat.shape), mat.dtype, mat.device), []).append((param, mat))
        return groups

    @torch.no_grad()
    def _power_iteration(self, iterations: int, only_training: bool = True) -> None:
        for items in self._groups(only_training).values():
            mats = torch.stack([mat for _, mat in items])  # [L, h, w]
            u = torch.stack([p._u for p, _ in items])
            v = torch.stack([p._v for p, _ in items])
            for _ in range(iterations):
                u = F.normalize(torch.bmm(mats, v.unsqueeze(2)).squeeze(2), dim=1, eps=self.eps)
                v = F.normalize(torch.bmm(mats.transpose(1, 2), u.unsqueeze(2)).squeeze(2), dim=1, eps=self.eps)
            for i, (p, _) in enumerate(items):
                p._u.copy_(u[i])
                p._v.copy_(v[i])

    def step(self) -> None:
        """One power-iteration step for every layer in training mode (called by the hook)."""
        self._power_iteration(self.n_power_iterations, only_training=True)

    def remove(self) -> None:
        """Stop the batched updates (the parametrizations stay)."""
        self._hook.remove()


def spectral_norm_all(model: nn.Module, n_power_iterations: int = 1, eps: float = 1e-12) -> nn.Module:
    """Applies ``SpectralNorm`` to ``model`` (in place) and returns the model; the controller is
    kept as ``model.spectral_norm``."""
    controller = SpectralNorm(model, n_power_iterations, eps)
    object.__setattr__(model, "spectral_norm", controller)
    return model
