"""``genfast.optimize(model)``: swap genfast's fast paths into any ``nn.Module``, keeping its
weights, and ``genfast.revert(model)`` to undo it.

Only swaps whose results are the same as the original modules' (within the tolerance of the
op) are made:

  * ``nn.MultiheadAttention`` (also inside ``nn.TransformerEncoderLayer``/``DecoderLayer``)
    -> ``genfast.nn.MultiheadAttention`` sharing the same parameters;
  * ``nn.Linear`` followed by ``nn.ReLU``/``LeakyReLU``/``Tanh``/``Sigmoid`` in a
    ``nn.Sequential`` -> ``genfast.nn.FusedLinearAct`` (matmul, then bias + activation in one
    pass) and an ``nn.Identity`` in the activation's place;
  * ``nn.GroupNorm`` followed by ``nn.SiLU`` in a ``nn.Sequential`` -> ``genfast.nn.GroupNormSiLU``;
  * ``nn.Conv2d``/``nn.ConvTranspose2d`` followed by ``nn.BatchNorm2d`` in a ``nn.Sequential``,
    in eval mode only -> one convolution with the batch norm folded in;
  * calls to ``F.scaled_dot_product_attention`` in the model's own ``forward`` code -> genfast's
    (a forward pre-hook points the function at genfast's for the duration of the call).

Swapped modules share ``nn.Parameter`` objects with the originals, so training through the
swapped model trains the original weights and ``revert`` gives back modules that carry them
(folded convolutions are the exception: they exist only in eval mode, and ``revert`` restores
the unfolded pair). The report lists every swap and, for each candidate left alone, why.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Optional

import torch.nn.functional as F
from torch import nn

__all__ = ["optimize", "revert", "OptimizeReport"]

_ORIGINALS = "_genfast_originals"  # attribute on the root: {path: original module}
_HOOKS = "_genfast_hooks"          # attribute on the root: hook handles to remove on revert

@dataclass
class OptimizeReport:
    """What ``optimize`` did. ``swapped``: (path, original type, replacement type);
    ``skipped``: (path, type, reason) for candidates left alone. ``model``: the optimized
    model (the same object as the input when ``inplace=True``)."""

    model: nn.Module
    swapped: list = field(default_factory=list)
    skipped: list = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"genfast.optimize: {len(self.swapped)} swapped, {len(self.skipped)} left alone"]
        for path, old, new in self.swapped:
            lines.append(f"  swapped  {path or '<root>'}: {old} -> {new}")
        for path, old, reason in self.skipped:
            lines.append(f"  kept     {path or '<root>'}: {old} ({reason})")
        return "\n".join(lines)

    __repr__ = __str__

def _type(m: nn.Module) -> str:
    return type(m).__name__

def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name

def _share_parameters(new: nn.Module, old: nn.Module) -> nn.Module:
    """Point every parameter and buffer of ``new`` at the same-named tensor of ``old``."""
    for name, value in list(old.named_parameters(recurse=True)) + list(old.named_buffers(recurse=True)):
        owner_path, _, leaf = name.rpartition(".")
        owner = new.get_submodule(owner_path) if owner_path else new
        if isinstance(value, nn.Parameter):
            owner.register_parameter(leaf, value)
        else:
            owner.register_buffer(leaf, value)
    return new

# ----------------------------------------------------------------------------- rules

def _swap_multihead_attention(m: nn.MultiheadAttention):
    """Returns (replacement, None) or (None, reason)."""
    from .nn.attention import MultiheadAttention

    if not m._qkv_same_embed_dim:
        return None, "kdim/vdim differ from embed_dim (separate q/k/v projections are not fused)"
    if m.add_zero_attn:
        return None, "add_zero_attn=True is not supported by the fused kernel"
    if m.bias_k is not None:
        return None, "add_bias_kv=True is not supported by the fused kernel"
    from .ops.attention import MAX_HEAD_DIM, MIN_HEAD_DIM

    if not (MIN_HEAD_DIM <= m.head_dim <= MAX_HEAD_DIM and m.head_dim % 8 == 0):
        return None, f"head dim {m.head_dim} is outside the kernels' range (a multiple of 8 in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}])"
    device, dtype = m.in_proj_weight.device, m.in_proj_weight.dtype
    new = MultiheadAttention(m.embed_dim, m.num_heads, dropout=m.dropout, bias=m.in_proj_bias is not None,
                             batch_first=m.batch_first, device=device, dtype=dtype)
    new.train(m.training)
    return _share_parameters(new, m), None

_LINEAR_ACTIVATIONS = {nn.ReLU: "relu", nn.LeakyReLU: "lrelu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid"}

def _swap_linear_act(linear: nn.Linear, act: nn.Module):
    from .nn.gan import FusedLinearAct

    kind = _LINEAR_ACTIVATIONS.get(type(act))
    if kind is None:
        return None, f"{_type(act)} after Linear has no fused epilogue"
    slope = act.negative_slope if isinstance(act, nn.LeakyReLU) else 0.2
    w = linear.weight
    new = FusedLinearAct(linear.in_features, linear.out_features, bias=linear.bias is not None, activation=kind,
                         negative_slope=slope, device=w.device, dtype=w.dtype)
    new.train(linear.training)
    return _share_parameters(new, linear), None

def _swap_group_norm_silu(norm: nn.GroupNorm, act: nn.Module):
    from .nn.group_norm import GroupNormSiLU

    w = norm.weight if norm.affine else None
    new = GroupNormSiLU(norm.num_groups, norm.num_channels, eps=norm.eps, affine=norm.affine,
                        device=w.device if w is not None else None, dtype=w.dtype if w is not None else None)
    new.train(norm.training)
    return _share_parameters(new, norm), None

def _fold_conv_bn(conv: nn.Module, bn: nn.BatchNorm2d):
    from .nn.gan import fuse_conv_bn

    if conv.training or bn.training:
        return None, "BatchNorm2d in training mode (folding is exact only in eval mode; call model.eval() first)"
    if not bn.track_running_stats or bn.running_mean is None:
        return None, "BatchNorm2d without running statistics cannot be folded"
    return fuse_conv_bn(conv, bn), None

# (first module type, second module type) -> rule(first, second) for adjacent Sequential pairs
_PAIR_RULES: list = [
    ((nn.Linear,), tuple(_LINEAR_ACTIVATIONS) + (nn.GELU, nn.SiLU, nn.ELU, nn.Softplus), _swap_linear_act),
    ((nn.GroupNorm,), (nn.SiLU,), _swap_group_norm_silu),
    ((nn.Conv2d, nn.ConvTranspose2d), (nn.BatchNorm2d,), _fold_conv_bn),
]

def _uses_sdpa(module: nn.Module) -> bool:
    fwd = type(module).forward
    if fwd is nn.Module.forward or type(module).__module__.startswith(("torch.", "genfast.")):
        return False
    try:
        source = inspect.getsource(fwd)
    except (OSError, TypeError):
        return False
    return "scaled_dot_product_attention" in source

def _sdpa_hooks(module: nn.Module, backend: Optional[str]) -> list:
    """Pre/post forward hooks pointing F.scaled_dot_product_attention at genfast's while
    ``module.forward`` runs (the model's code calls it through torch.nn.functional)."""
    from .ops.attention import scaled_dot_product_attention as genfast_sdpa

    original = F.scaled_dot_product_attention
    depth = [0]

    def fast_sdpa(*args, **kwargs):
        try:
            return genfast_sdpa(*args, backend=backend, **kwargs)
        except ValueError:
            # Arguments genfast does not cover (e.g. head dim 8): torch's own function gives the
            # model its original result, or raises its own error for a genuinely bad call.
            return original(*args, **kwargs)

    def pre(mod, args):
        depth[0] += 1
        F.scaled_dot_product_attention = fast_sdpa

    def post(mod, args, output):
        depth[0] -= 1
        if depth[0] == 0:
            F.scaled_dot_product_attention = original

    handles = [module.register_forward_pre_hook(pre), module.register_forward_hook(post, always_call=True)]
    for handle in handles:
        handle.module = module  # lets a second optimize() see the module is already hooked
    return handles

def _set(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, module)

def optimize(model: nn.Module, backend: Optional[str] = None, inplace: bool = True) -> OptimizeReport:
    """Swap genfast's fast paths into ``model`` (see the module docstring for the rules).

    ``backend``: the genfast backend the swapped modules use (None: automatic).
    ``inplace=False`` works on a deep copy and leaves ``model`` untouched.
    Returns an ``OptimizeReport`` (print it); ``report.model`` is the optimized model.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"genfast.optimize: model must be a torch.nn.Module, got {type(model).__name__}")
    if not inplace:
        import copy

        model = copy.deepcopy(model)
    report = OptimizeReport(model)
    originals = getattr(model, _ORIGINALS, None)
    if originals is None:
        originals = {}
        object.__setattr__(model, _ORIGINALS, originals)
        object.__setattr__(model, _HOOKS, [])

    def record(path, old, new):
        originals.setdefault(path, old)
        _set(model, path, new)
        report.swapped.append((path, _type(old), _type(new)))
        if backend is not None and hasattr(new, "backend"):
            new.backend = backend

    for path, module in list(model.named_modules()):
        if isinstance(module, nn.MultiheadAttention) and path not in originals:
            new, reason = _swap_multihead_attention(module)
            if new is None:
                report.skipped.append((path, _type(module), reason))
            else:
                record(path, module, new)
        elif isinstance(module, nn.Sequential):
            names = list(module._modules)
            i = 0
            while i < len(names) - 1:
                first, second = module._modules[names[i]], module._modules[names[i + 1]]
                for first_types, second_types, rule in _PAIR_RULES:
                    # Exact types: subclasses (genfast's own modules among them) may differ.
                    if type(first) in first_types and type(second) in second_types:
                        p1, p2 = _join(path, names[i]), _join(path, names[i + 1])
                        new, reason = rule(first, second)
                        if new is None:
                            report.skipped.append((p1, f"{_type(first)}+{_type(second)}", reason))
                        else:
                            record(p1, first, new)
                            record(p2, second, nn.Identity())
                            i += 1
                        break
                i += 1
        if _uses_sdpa(module) and not any(h.module is module for h in getattr(model, _HOOKS)):
            handles = _sdpa_hooks(module, backend)
            getattr(model, _HOOKS).extend(handles)
            report.swapped.append((path, f"{_type(module)} calls F.scaled_dot_product_attention",
                                   "genfast.scaled_dot_product_attention"))
    return report

def revert(model: nn.Module) -> nn.Module:
    """Put back every module ``optimize`` replaced (with the weights they share) and remove
    its hooks. Returns ``model``."""
    originals = getattr(model, _ORIGINALS, None)
    if originals is None:
        return model
    for path in sorted(originals, key=lambda p: p.count("."), reverse=True):
        _set(model, path, originals[path])
    for handle in getattr(model, _HOOKS, []):
        handle.remove()
    object.__delattr__(model, _ORIGINALS)
    object.__delattr__(model, _HOOKS)
    return model
