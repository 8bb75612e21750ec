"""genfast.nn GAN layers against their definitions and torch's own modules: equalized-lr
layers, FusedLinearAct vs nn.Linear + activation, StyleGAN2 modulated conv / ToRGB, an R1
penalty (second order) through a small discriminator, spectral norm vs torch over optimizer
steps, BatchNorm2dAct vs nn.BatchNorm2d + activation, fuse_conv_bn, conditioning layers."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from genfast.nn import (AdaIN, BatchNorm2dAct, ConditionalBatchNorm2d, EqualizedConv2d, EqualizedLinear,
                        FusedLinearAct, MinibatchStd, ModulatedConv2d, PixelNorm, SpectralNorm, ToRGB, fuse_conv_bn,
                        spectral_norm_all)
from genfast.reference import gan as reference
from genfast.reference.bias_act import bias_act as ref_bias_act
from genfast.testing import error_vs_reference

# ----------------------------------------------------------------------------- equalized lr


def test_equalized_linear(seed):
    layer = EqualizedLinear(7, 5, activation="lrelu", lr_multiplier=0.01, bias_init=0.3).double()
    assert layer.weight.std().item() > 10  # N(0, 1) / lr_multiplier
    torch.testing.assert_close(layer.bias, torch.full([5], 0.3, dtype=torch.float64))
    x = torch.randn(4, 7, dtype=torch.float64)
    w = layer.weight * 0.01 / math.sqrt(7)
    expected = ref_bias_act(x @ w.t(), layer.bias * 0.01, act="lrelu")
    torch.testing.assert_close(layer(x), expected)
    linear = EqualizedLinear(7, 5, bias_init=1.0).double()  # linear: addmm path
    torch.testing.assert_close(linear(x), x @ (linear.weight / math.sqrt(7)).t() + 1.0)
    with pytest.raises(ValueError, match=r"expected x of shape \[batch, 7\]"):
        layer(torch.randn(4, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match="unknown activation 'gelu'"):
        EqualizedLinear(3, 3, activation="gelu")


@pytest.mark.parametrize("up, down", [(1, 1), (2, 1), (1, 2)])
def test_equalized_conv2d(seed, up, down):
    layer = EqualizedConv2d(4, 6, 3, activation="lrelu", up=up, down=down, conv_clamp=0.5).double()
    with torch.no_grad():
        layer.bias.normal_()
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    w = layer.weight / math.sqrt(4 * 9)
    y = reference.conv2d_resample(x, w, layer.resample_filter.float(), up, down, 1, flip_weight=up == 1)
    expected = ref_bias_act(y, layer.bias, act="lrelu", gain=math.sqrt(2) * 0.5, clamp=0.5 * 0.5)
    torch.testing.assert_close(layer(x, gain=0.5), expected)
    assert layer(x).shape == (2, 6, 8 * up // down, 8 * up // down)


# ----------------------------------------------------------------------------- FusedLinearAct

TORCH_ACTS = {
    "relu": lambda slope: nn.ReLU(), "lrelu": lambda slope: nn.LeakyReLU(slope), "tanh": lambda slope: nn.Tanh(),
    "sigmoid": lambda slope: nn.Sigmoid(), "linear": lambda slope: nn.Identity(),
}


def count_epilogue_calls(monkeypatch, fused: bool) -> list:
    """Force FusedLinearAct's device rule (genfast's bias_act epilogue, or F.linear + torch's
    activation) and count the calls into genfast's bias_act the module makes."""
    import genfast.nn.gan as gan_layers

    calls = []
    real = gan_layers.bias_act
    monkeypatch.setattr(gan_layers, "fused_epilogue_pays", lambda device: fused)
    monkeypatch.setattr(gan_layers, "bias_act", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_fused_epilogue_rule_by_device():
    # Measured on CPU (AMD EPYC, AVX2): addmm + torch's activation is faster than the separate epilogue.
    from genfast.nn.gan import fused_epilogue_pays

    assert not fused_epilogue_pays(torch.device("cpu")) and not fused_epilogue_pays("cpu")
    assert fused_epilogue_pays(torch.device("cuda"))


@pytest.mark.parametrize("activation", list(TORCH_ACTS))
@pytest.mark.parametrize("slope", [0.2, 0.01])
@pytest.mark.parametrize("fused", [True, False], ids=["bias_act-epilogue", "torch-epilogue"])
def test_fused_linear_act_matches_torch(seed, activation, slope, fused, monkeypatch):
    calls = count_epilogue_calls(monkeypatch, fused)
    torch.manual_seed(seed)
    ours = FusedLinearAct(37, 19, activation=activation, negative_slope=slope)
    torch.manual_seed(seed)
    linear = nn.Linear(37, 19)
    torch.testing.assert_close(ours.weight, linear.weight)  # same initialisation
    torch.testing.assert_close(ours.bias, linear.bias)
    ref = nn.Sequential(linear, TORCH_ACTS[activation](slope))
    ours2 = FusedLinearAct(37, 19, activation=activation, negative_slope=slope)
    ours2.load_state_dict(linear.state_dict())  # loads nn.Linear weights
    assert set(ours2.state_dict()) == {"weight", "bias"}
    x = torch.randn(13, 37) * 2
    x_ref, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    dy = torch.randn(13, 19)
    y_ref, y = ref(x_ref), ours2(x_ours)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    y_ref.backward(dy)
    y.backward(dy)
    torch.testing.assert_close(x_ours.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours2.weight.grad, linear.weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours2.bias.grad, linear.bias.grad, rtol=1e-5, atol=1e-5)
    # 3-D input, no bias
    nb = FusedLinearAct(37, 19, bias=False, activation=activation, negative_slope=slope)
    x3 = torch.randn(2, 3, 37)
    torch.testing.assert_close(nb(x3), TORCH_ACTS[activation](slope)(F.linear(x3, nb.weight)), rtol=1e-5, atol=1e-6)
    # "linear" is F.linear on every device; the others take the epilogue the rule picked.
    assert len(calls) == (2 if fused and activation != "linear" else 0)


def test_fused_linear_act_bad_input():
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        FusedLinearAct(3, 4, activation="swish")
    with pytest.raises(ValueError, match="expected x with last dimension 3"):
        FusedLinearAct(3, 4)(torch.randn(2, 5))


# ----------------------------------------------------------------------------- StyleGAN2 layers


@pytest.mark.parametrize("up", [1, 2])
@pytest.mark.parametrize("noise_mode", ["const", "none"])
def test_modulated_conv2d_layer(seed, up, noise_mode):
    layer = ModulatedConv2d(4, 5, w_dim=6, resolution=8, up=up, conv_clamp=256).double()
    with torch.no_grad():
        layer.noise_strength.fill_(0.7)
        layer.bias.normal_()
    x = torch.randn(3, 4, 8 // up, 8 // up, dtype=torch.float64)
    w = torch.randn(3, 6, dtype=torch.float64)
    styles = w @ (layer.affine.weight / math.sqrt(6)).t() + layer.affine.bias
    noise = layer.noise_const * 0.7 if noise_mode == "const" else None
    y = reference.modulated_conv2d(x, layer.weight, styles, noise, up=up, padding=1,
                                   resample_filter=layer.resample_filter.float(), flip_weight=up == 1)
    expected = ref_bias_act(y, layer.bias, act="lrelu", clamp=256)
    for fused in (True, False):
        torch.testing.assert_close(layer(x, w, noise_mode=noise_mode, fused_modconv=fused), expected)
    out = layer(x, w, noise_mode="random")
    assert out.shape == (3, 5, 8, 8) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="noise_mode must be one of"):
        layer(x, w, noise_mode="fixed")
    with pytest.raises(ValueError, match=r"expected x of shape \[batch, 4"):
        layer(torch.randn(3, 3, 8 // up, 8 // up, dtype=torch.float64), w)


def test_to_rgb(seed):
    layer = ToRGB(6, 3, w_dim=5, conv_clamp=1.0).double()
    x = torch.randn(2, 6, 4, 4, dtype=torch.float64)
    w = torch.randn(2, 5, dtype=torch.float64)
    styles = (w @ (layer.affine.weight / math.sqrt(5)).t() + layer.affine.bias) / math.sqrt(6)
    expected = ref_bias_act(torch.einsum("oi,ni,nihw->nohw", layer.weight[:, :, 0, 0], styles, x), layer.bias,
                            clamp=1.0)
    for fused in (True, False):
        torch.testing.assert_close(layer(x, w, fused_modconv=fused), expected)


def test_pixel_norm_and_minibatch_std_modules(seed):
    x = torch.randn(4, 6, 3, 3)
    torch.testing.assert_close(PixelNorm()(x), reference.pixel_norm(x))
    torch.testing.assert_close(MinibatchStd(2, 2)(x), reference.minibatch_stddev(x, 2, 2))


def make_discriminator(dtype=torch.float64):
    return nn.ModuleDict({
        "conv0": EqualizedConv2d(3, 8, 3, activation="lrelu"),
        "conv1": EqualizedConv2d(8, 8, 3, activation="lrelu", down=2, conv_clamp=256),
        "mbstd": MinibatchStd(2, 1),
        "fc": EqualizedLinear(9 * 4 * 4, 8, activation="lrelu"),
        "out": EqualizedLinear(8, 1),
    }).to(dtype)


def run_discriminator(d, x):
    x = d["conv1"](d["conv0"](x))
    x = d["mbstd"](x)
    return d["out"](d["fc"](x.flatten(1)))


def run_discriminator_reference(d, x):
    """The same network with the reference ops only."""
    def conv(layer, x):
        y = reference.conv2d_resample(x, layer.weight * layer.weight_gain, layer.resample_filter.float(), layer.up,
                                      layer.down, layer.padding, flip_weight=layer.up == 1)
        return ref_bias_act(y, layer.bias, act=layer.activation, clamp=layer.conv_clamp)

    def fc(layer, x):
        return ref_bias_act(x @ (layer.weight * layer.weight_gain).t(), layer.bias, act=layer.activation, dim=1)

    x = conv(d["conv1"], conv(d["conv0"], x))
    x = reference.minibatch_stddev(x, 2, 1)
    return fc(d["out"], fc(d["fc"], x.flatten(1)))


def r1_penalty(run, d, x):
    x = x.detach().requires_grad_()
    (grad,) = torch.autograd.grad(run(d, x).sum(), x, create_graph=True)
    return grad.square().sum([1, 2, 3]).mean()


def test_r1_penalty_second_order(seed):
    d = make_discriminator()
    with torch.no_grad():
        for p in d.parameters():
            if p.ndim == 1:
                p.normal_(0, 0.3)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    ours = r1_penalty(run_discriminator, d, x)
    grads = torch.autograd.grad(ours, list(d.parameters()), allow_unused=True, materialize_grads=True)
    ref = r1_penalty(run_discriminator_reference, d, x)
    ref_grads = torch.autograd.grad(ref, list(d.parameters()), allow_unused=True, materialize_grads=True)
    torch.testing.assert_close(ours, ref)
    assert all(g.abs().sum() > 0 for g in grads[:3]), "the R1 penalty must reach the conv weights and bias"
    for (name, _), g, r in zip(d.named_parameters(), grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-8, atol=1e-10, msg=f"R1 gradient of {name}")
    # float32 against the float64 reference
    d32 = copy.deepcopy(d).float()
    ours32 = r1_penalty(run_discriminator, d32, x.float())
    low = r1_penalty(run_discriminator_reference, d32, x.float())
    error_vs_reference(ours32.detach(), ref.detach(), low.detach(), "R1 float32")


# ----------------------------------------------------------------------------- spectral norm


class SNModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.up = nn.ConvTranspose2d(6, 4, 4, stride=2, padding=1)
        self.fc1 = nn.Linear(4 * 8 * 8, 16)
        self.fc2 = nn.Linear(16, 16)  # same shape as fc3: batched in one bmm
        self.fc3 = nn.Linear(16, 16)
        self.out = nn.Linear(16, 1)

    def forward(self, x):
        x = F.leaky_relu(self.conv(x), 0.2)
        x = F.leaky_relu(self.up(x), 0.2)
        x = F.leaky_relu(self.fc1(x.flatten(1)), 0.2)
        x = F.leaky_relu(self.fc2(x), 0.2)
        return self.out(F.leaky_relu(self.fc3(x), 0.2))


def _power_iteration_vectors_of_close_singular_values(model: nn.Module, ratio: float = 0.8) -> set:
    """state_dict keys of the power-iteration vectors (_u, _v) of layers whose top two singular
    values are within `ratio`: there 15 iterations leave u, v a mix of both singular vectors
    that float32 rounding (bmm vs mv) shifts far more than rounding size, while sigma (a
    Rayleigh quotient, second order in that shift) and the outputs still agree."""
    keys = set()
    for name, module in model.named_modules():
        if not hasattr(module, "parametrizations") or "weight" not in module.parametrizations:
            continue
        w = module.parametrizations.weight.original.detach()
        dim = 1 if isinstance(module, nn.ConvTranspose2d) else 0
        s = torch.linalg.svdvals(w.transpose(0, dim).flatten(1).double())
        if s.numel() > 1 and s[1] > ratio * s[0]:
            keys |= {f"{name}.parametrizations.weight.0._u", f"{name}.parametrizations.weight.0._v"}
    return keys


def test_spectral_norm_matches_torch(seed):
    torch.manual_seed(seed)
    base = SNModel()
    theirs, ours = copy.deepcopy(base), copy.deepcopy(base)
    torch.manual_seed(seed + 1)
    for m in (theirs.conv, theirs.up, theirs.fc1, theirs.fc2, theirs.fc3, theirs.out):
        nn.utils.parametrizations.spectral_norm(m)
    torch.manual_seed(seed + 1)
    spectral_norm_all(ours)
    assert isinstance(ours.spectral_norm, SpectralNorm)
    assert set(ours.state_dict()) == set(theirs.state_dict())
    skip = _power_iteration_vectors_of_close_singular_values(theirs)
    for key, value in theirs.state_dict().items():
        if key not in skip:
            torch.testing.assert_close(ours.state_dict()[key], value, rtol=1e-5, atol=1e-6, msg=f"after init: {key}")

    # SGD, not Adam: Adam divides by sqrt(v), so a gradient element near zero moves by about lr
    # whatever its rounding, and two correct implementations drifted 1.3e-5 apart on one weight of
    # 4096 in a CI run (seed 2497949499); SGD moves each weight in proportion to its gradient.
    opt_t = torch.optim.SGD(theirs.parameters(), lr=0.1)
    opt_o = torch.optim.SGD(ours.parameters(), lr=0.1)
    for step in range(5):
        x = torch.randn(4, 3, 4, 4)
        losses = []
        for model, opt in ((theirs, opt_t), (ours, opt_o)):
            opt.zero_grad()
            loss = model(x).square().mean()
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=1e-6, msg=f"loss at step {step}")
    skip = _power_iteration_vectors_of_close_singular_values(theirs)
    for key, value in theirs.state_dict().items():
        if key not in skip:
            torch.testing.assert_close(ours.state_dict()[key], value, rtol=1e-4, atol=1e-5,
                                       msg=f"after training: {key}")
    theirs.eval()
    ours.eval()
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-6)
    u_before = ours.fc2.parametrizations.weight[0]._u.clone()
    ours(x)  # eval: no power iteration
    torch.testing.assert_close(ours.fc2.parametrizations.weight[0]._u, u_before, rtol=0, atol=0)
    torch.testing.assert_close(ours.fc2.weight, theirs.fc2.weight, rtol=1e-4, atol=1e-6)


def test_spectral_norm_bad_input():
    with pytest.raises(ValueError, match="no Linear or Conv layer"):
        SpectralNorm(nn.Sequential(nn.ReLU()))
    with pytest.raises(ValueError, match="n_power_iterations must be a positive int"):
        SpectralNorm(nn.Linear(2, 2), n_power_iterations=0)


# ----------------------------------------------------------------------------- DCGAN


@pytest.mark.parametrize("activation, slope", [("relu", 0.0), ("lrelu", 0.2), ("lrelu", 0.01)])
def test_batchnorm2d_act_matches_torch(seed, activation, slope):
    theirs = nn.BatchNorm2d(5)
    ours = BatchNorm2dAct(5, activation=activation, negative_slope=slope)
    with torch.no_grad():
        theirs.weight.normal_()
        theirs.bias.normal_()
    ours.load_state_dict(theirs.state_dict())
    act = nn.ReLU() if activation == "relu" else nn.LeakyReLU(slope)
    for step in range(3):
        x = torch.randn(4, 5, 3, 3) * 2 + 1
        x_t, x_o = x.clone().requires_grad_(), x.clone().requires_grad_()
        y_t, y_o = act(theirs(x_t)), ours(x_o)
        torch.testing.assert_close(y_o, y_t)
        dy = torch.randn_like(y_t)
        y_t.backward(dy)
        y_o.backward(dy)
        torch.testing.assert_close(x_o.grad, x_t.grad)
        torch.testing.assert_close(ours.weight.grad, theirs.weight.grad)
        torch.testing.assert_close(ours.bias.grad, theirs.bias.grad)
    for key, value in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, msg=key)  # running stats
    theirs.eval()
    ours.eval()
    x = torch.randn(2, 5, 3, 3)
    torch.testing.assert_close(ours(x), act(theirs(x)))
    x_cl = x.to(memory_format=torch.channels_last)
    torch.testing.assert_close(ours(x_cl), act(theirs(x_cl)))
    with pytest.raises(ValueError, match="unknown activation 'tanh'"):
        BatchNorm2dAct(5, activation="tanh")


def trained_bn(channels):
    bn = nn.BatchNorm2d(channels)
    with torch.no_grad():
        bn.weight.normal_()
        bn.bias.normal_()
    for _ in range(3):
        bn(torch.randn(4, channels, 5, 5) * 3 + 2)
    return bn.eval()


@pytest.mark.parametrize("kind", ["conv", "conv_nobias", "convT", "convT_groups"])
def test_fuse_conv_bn(seed, kind):
    if kind == "conv":
        conv = nn.Conv2d(4, 6, 3, padding=1)
    elif kind == "conv_nobias":
        conv = nn.Conv2d(4, 6, 3, stride=2, bias=False)
    elif kind == "convT":
        conv = nn.ConvTranspose2d(4, 6, 4, stride=2, padding=1)
    else:
        conv = nn.ConvTranspose2d(4, 6, 3, groups=2)
    conv = conv.double()
    bn = trained_bn(6).double()
    fused = fuse_conv_bn(conv, bn)
    assert type(fused) is type(conv) and not fused.training
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), bn(conv(x)), rtol=1e-10, atol=1e-10)
        c32, b32, f32 = conv.float(), bn.float(), fuse_conv_bn(conv.float(), bn.float())
        torch.testing.assert_close(f32(x.float()), b32(c32(x.float())), rtol=1e-4, atol=1e-5)


def test_fuse_conv_bn_bad_input():
    with pytest.raises(TypeError, match="conv must be an nn.Conv2d"):
        fuse_conv_bn(nn.Linear(3, 3), nn.BatchNorm2d(3))
    with pytest.raises(ValueError, match="bn has 5 features but conv has 6 output channels"):
        fuse_conv_bn(nn.Conv2d(3, 6, 1), nn.BatchNorm2d(5))


# ----------------------------------------------------------------------------- conditioning


def test_conditional_batchnorm2d(seed):
    layer = ConditionalBatchNorm2d(5, num_classes=3)
    with torch.no_grad():
        layer.embed.weight.normal_()
    x = torch.randn(4, 5, 3, 3)
    y = torch.tensor([0, 2, 1, 2])
    gamma, beta = layer.embed.weight[y, :5], layer.embed.weight[y, 5:]
    mean = x.mean(dim=[0, 2, 3], keepdim=True)
    var = x.var(dim=[0, 2, 3], unbiased=False, keepdim=True)
    expected = (x - mean) / torch.sqrt(var + 1e-5) * gamma[:, :, None, None] + beta[:, :, None, None]
    torch.testing.assert_close(layer(x, y), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="integer class labels"):
        layer(x, torch.randn(4))


def test_adain(seed):
    layer = AdaIN(5, style_dim=3)
    x = torch.randn(2, 5, 4, 4) * 3 + 1
    s = torch.randn(2, 3)
    scale, bias = (s @ layer.style.weight.t() + layer.style.bias).chunk(2, dim=1)
    mean = x.mean(dim=[2, 3], keepdim=True)
    var = x.var(dim=[2, 3], unbiased=False, keepdim=True)
    expected = (x - mean) / torch.sqrt(var + 1e-5) * scale[:, :, None, None] + bias[:, :, None, None]
    torch.testing.assert_close(layer(x, s), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"expected style of shape \[2, 3\]"):
        layer(x, torch.randn(2, 4))
