"""``genfast.optimize(model)``: swap genfast's fast paths into any ``nn.Module``, keeping its
weights, and ``genfast.revert(model)`` to undo it.

Only swaps whose results are the same as the original modules' (within the tolerance of the
op) are made:

  * ``nn.MultiheadAttention`` (also inside ``nn.TransformerEncoderLayer``/``DecoderLayer``)
    -> ``genfast.nn.MultiheadAttention`` sharing the same parameters;
  * ``nn.Linear`` followed by ``nn.ReLU``/``LeakyReLU``/``Tanh``/``Sigmoid`` in a
    ``nn.Sequential`` -> ``genfast.nn.FusedLinearAct`` (matmul, then bias + activation in one
    pass) and an ``nn.Identity`` in the activation's place, on devices where that epilogue is
    faster than addmm + torch's activation (``genfast.nn.gan.fused_epilogue_pays``: not on CPU,
    where the pair is left alone with that reason);
  * ``nn.GroupNorm`` followed by ``nn.SiLU`` in a ``nn.Sequential`` -> ``genfast.nn.GroupNormSiLU``;
  * ``nn.Conv2d``/``nn.ConvTranspose2d`` followed by ``nn.BatchNorm2d`` in a ``nn.Sequential``,
    in eval mode only -> one convolution with the batch norm folded in;
  * diffusers models (when diffusers is imported): every ``Attention`` running diffusers'
    ``AttnProcessor2_0`` gets ``genfast.integrations.diffusers.GenfastAttnProcessor``, and every
    ``ResnetBlock2D`` with SiLU and GroupNorms runs its norm + SiLU pairs fused
    (``genfast.ops.group_norm(..., activation="silu")``, the op behind ``GroupNormSiLU``);
  * every ``torch.nn.functional.scaled_dot_product_attention`` call made while the model's
    ``forward`` runs -> ``genfast.scaled_dot_product_attention`` (``route_sdpa=True``).

In eval mode with gradients off, torch's ``nn.TransformerEncoderLayer`` takes a fast path
(``torch._transformer_encoder_layer_fwd`` on ``self_attn``'s weights) that never calls
``self_attn``. It is off while a torch-function mode is active, so inside an SDPA-routed model
the swapped attention runs; the report has a note for each layer where this applies (and says
when nothing turns the fast path off: ``route_sdpa=False``, or the layer called on its own).

SDPA routing: forward pre/post hooks on the root module enter and leave a
``torch.overrides.TorchFunctionMode``. The mode stack is per thread, so only calls made by the
thread running the model's forward are routed (another thread's SDPA calls are untouched), and
a mode sees the call however the code reached the function (``F.scaled_dot_product_attention``,
``from torch.nn.functional import scaled_dot_product_attention``, diffusers' attention dispatch,
torch's own ``nn.MultiheadAttention``). Dynamo traces the mode, so ``torch.compile(fullgraph=True)``
of an optimized model compiles genfast's op into the graph. Routing covers calls through the root
model (``model(x)``); a submodule called on its own is not routed. A call genfast cannot serve
(e.g. head dim 8, a value head dim that differs from the query's, a mask that needs gradients)
runs torch's own function and is reported: appended once to ``report.fallbacks`` (path, reason)
and announced with one ``genfast.BackendWarning`` (eager runs; under ``torch.compile`` it is
recorded in ``report.fallbacks`` only).

Swapped modules share ``nn.Parameter`` objects with the originals, so training through the
swapped model trains the original weights and ``revert`` gives back modules that carry them
(folded convolutions are the exception: they exist only in eval mode, and ``revert`` restores
the unfolded pair). The report lists every swap and, for each candidate left alone, why.
"""
from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ._dispatch import BackendWarning

__all__ = ["optimize", "revert", "OptimizeReport"]

_ORIGINALS = "_genfast_originals"   # attribute on the root: {(kind, path): what to put back}
_ROUTING = "_genfast_sdpa_routing"  # attribute on the root: its _SDPARouting mode
_FALLBACKS = "_genfast_fallbacks"   # attribute on the root: [(path, reason)] of SDPA calls torch served

# What torch.nn.functional.scaled_dot_product_attention is, whatever name a model imported it by.
_TORCH_SDPA = torch._C._nn.scaled_dot_product_attention


@dataclass
class OptimizeReport:
    """What ``optimize`` did. ``swapped``: (path, original, replacement); ``skipped``: (path,
    type, reason) for candidates left alone; ``notes``: (path, text), e.g. where torch itself
    can bypass a swap; ``fallbacks``: (path, reason) for each kind of SDPA call genfast could not
    serve and torch's own function ran instead, filled in while the model runs (shared by every
    report of the model). ``model``: the optimized model (the input itself when ``inplace=True``)."""

    model: nn.Module
    swapped: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    fallbacks: list = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"genfast.optimize: {len(self.swapped)} swapped, {len(self.skipped)} left alone"]
        for path, old, new in self.swapped:
            lines.append(f"  swapped  {path or '<root>'}: {old} -> {new}")
        for path, old, reason in self.skipped:
            lines.append(f"  kept     {path or '<root>'}: {old} ({reason})")
        for path, text in self.notes:
            lines.append(f"  note     {path or '<root>'}: {text}")
        if self.fallbacks:
            lines.append(f"  {len(self.fallbacks)} kind(s) of SDPA call ran torch's own function:")
            for path, reason in self.fallbacks:
                lines.append(f"  fallback {path or '<root>'}: {reason}")
        return "\n".join(lines)

    __repr__ = __str__

def _type(m) -> str:
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

# ----------------------------------------------------------------------------- SDPA routing


class _SDPARouting(TorchFunctionMode):
    """While on this thread's torch-function mode stack, sends every
    ``torch.nn.functional.scaled_dot_product_attention`` call to genfast's; a call genfast
    cannot serve runs torch's own function and is recorded in ``fallbacks`` (path, reason).
    One instance per routed model (or processor): it holds no per-call state, so threads and
    nested calls can push it at once. Its ``__enter__``/``__exit__`` are TorchFunctionMode's,
    which Dynamo knows how to trace."""

    def __init__(self, where: str, backend: Optional[str], fallbacks: list):
        super().__init__()
        self.where = where
        self.backend = backend
        self.fallbacks = fallbacks

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not _TORCH_SDPA:
            return func(*args, **kwargs)
        return routed_sdpa(args, kwargs, self.where, self.backend, self.fallbacks)


def routed_sdpa(args: tuple, kwargs: dict, where: str, backend: Optional[str], fallbacks: list):
    """genfast's SDPA for a ``torch.nn.functional.scaled_dot_product_attention(*args, **kwargs)``
    call, or torch's own function (recorded in ``fallbacks``) for one genfast cannot serve."""
    from .ops.attention import scaled_dot_product_attention as genfast_sdpa

    try:
        return genfast_sdpa(*args, backend=backend, **kwargs)
    except (ValueError, TypeError) as exc:  # genfast's argument checks: a case it does not cover
        reason = str(exc)
    # Torch functions disabled: the call goes straight to torch's kernel, not to another genfast
    # routing further down the mode stack (it would fail the same way and report it twice). A call
    # torch rejects as well raises torch's own error here.
    with torch._C.DisableTorchFunction():
        out = _TORCH_SDPA(*args, **kwargs)
    entry = (where, f"{reason}; torch's scaled_dot_product_attention ran instead")
    if entry not in fallbacks:
        fallbacks.append(entry)
        # Dynamo cannot trace warnings.warn; compiled runs record the fallback only.
        if not torch.compiler.is_compiling():
            warnings.warn(f"genfast.optimize: {where or '<root>'}: {entry[1]}", BackendWarning, stacklevel=3)
    return out


def _enter_sdpa_routing(module: nn.Module, args) -> None:
    getattr(module, _ROUTING).__enter__()


def _exit_sdpa_routing(module: nn.Module, args, output) -> None:
    depth = torch._C._len_torch_function_stack()
    # The forward left the stack as it found it, unless it leaked a mode of its own: then ours is
    # not on top and popping would remove the wrong one.
    if depth and torch._C._get_function_stack_at(depth - 1) is getattr(module, _ROUTING):
        getattr(module, _ROUTING).__exit__(None, None, None)


def _sdpa_routed(model: nn.Module) -> bool:
    return any(hook is _enter_sdpa_routing for hook in model._forward_pre_hooks.values())


def _remove_sdpa_routing(model: nn.Module) -> None:
    for hooks, fn in ((model._forward_pre_hooks, _enter_sdpa_routing), (model._forward_hooks, _exit_sdpa_routing)):
        for key in [key for key, hook in hooks.items() if hook is fn]:
            del hooks[key]
            model._forward_hooks_always_called.pop(key, None)


def _encoder_fast_path_note(layer: nn.TransformerEncoderLayer, route_sdpa: bool) -> Optional[str]:
    """Whether torch's eval-mode fast path of ``TransformerEncoderLayer.forward`` (one fused
    ``torch._transformer_encoder_layer_fwd`` on ``self_attn``'s weights, which never calls
    ``self_attn``) can skip the swapped attention: the static conditions of torch's check."""
    attn = layer.self_attn
    if not (attn.batch_first and attn.in_proj_bias is not None and attn._qkv_same_embed_dim
            and layer.activation_relu_or_gelu and layer.norm1.eps == layer.norm2.eps and attn.num_heads % 2 == 0):
        return None
    bypass = ("in eval mode with gradients off, torch's fast path (torch._transformer_encoder_layer_fwd) "
              "computes this layer from self_attn's weights without calling the swapped attention")
    if route_sdpa:
        return (bypass + "; while genfast's SDPA routing is active (the layer runs inside the model's forward) "
                "torch sees a torch-function mode and takes the regular path, so genfast's attention runs; "
                "calling the layer on its own takes torch's fast path")
    return bypass + " (route_sdpa=False: nothing turns it off)"

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
        return None, (f"head dim {m.head_dim} is outside the kernels' range "
                      f"(a multiple of 8 in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}])")
    device, dtype = m.in_proj_weight.device, m.in_proj_weight.dtype
    new = MultiheadAttention(m.embed_dim, m.num_heads, dropout=m.dropout, bias=m.in_proj_bias is not None,
                             batch_first=m.batch_first, device=device, dtype=dtype)
    new.train(m.training)
    return _share_parameters(new, m), None

_LINEAR_ACTIVATIONS = {nn.ReLU: "relu", nn.LeakyReLU: "lrelu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid"}

def _swap_linear_act(linear: nn.Linear, act: nn.Module):
    from .nn.gan import FusedLinearAct, fused_epilogue_pays

    kind = _LINEAR_ACTIVATIONS.get(type(act))
    if kind is None:
        return None, f"{_type(act)} after Linear has no fused epilogue"
    w = linear.weight
    if not fused_epilogue_pays(w.device):
        return None, (f"on {w.device.type} FusedLinearAct would run the same F.linear + {_type(act)} (genfast's fused "
                      f"bias+activation epilogue is slower than addmm + torch's activation there; see "
                      f"genfast.nn.gan.fused_epilogue_pays)")
    slope = act.negative_slope if isinstance(act, nn.LeakyReLU) else 0.2
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

def _set(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, module)

def _diffusers_integration(report: OptimizeReport):
    """genfast.integrations.diffusers when the model can hold diffusers modules (diffusers is
    imported), else None: optimizing a plain torch model never imports diffusers."""
    if "diffusers" not in sys.modules:
        return None
    try:
        from .integrations import diffusers as integration
    except ImportError as exc:  # a diffusers without the modules genfast knows: say so, go on without
        report.notes.append(("", f"diffusers is imported but genfast.integrations.diffusers could not load "
                                 f"({type(exc).__name__}: {exc}); diffusers modules were left as they are"))
        return None
    return integration


def optimize(model: nn.Module, backend: Optional[str] = None, inplace: bool = True,
             route_sdpa: bool = True) -> OptimizeReport:
    """Swap genfast's fast paths into ``model`` (see the module docstring for the rules).

    ``backend``: the genfast backend the swapped modules and routed SDPA calls use (None:
    automatic). ``inplace=False`` works on a deep copy and leaves ``model`` untouched.
    ``route_sdpa``: send every ``torch.nn.functional.scaled_dot_product_attention`` call the
    model's forward makes (in the calling thread) to genfast's; calls genfast cannot serve run
    torch's function and are listed in ``report.fallbacks`` with one ``genfast.BackendWarning``.
    Returns an ``OptimizeReport`` (print it); ``report.model`` is the optimized model.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"genfast.optimize: model must be a torch.nn.Module, got {type(model).__name__}")
    if backend is not None:
        from ._dispatch import BACKENDS

        if backend not in BACKENDS:
            raise ValueError(f"genfast.optimize: backend must be one of {BACKENDS} or None, got {backend!r}")
    if not isinstance(route_sdpa, bool):
        raise TypeError(f"genfast.optimize: route_sdpa must be a bool, got {type(route_sdpa).__name__}")
    if not inplace:
        import copy

        model = copy.deepcopy(model)
    originals = model.__dict__.get(_ORIGINALS)
    if originals is None:
        originals = {}
        object.__setattr__(model, _ORIGINALS, originals)
    fallbacks = model.__dict__.get(_FALLBACKS)
    if fallbacks is None:
        fallbacks = []
        object.__setattr__(model, _FALLBACKS, fallbacks)
    report = OptimizeReport(model, fallbacks=fallbacks)
    diffusers_integration = _diffusers_integration(report)

    def record(path, old, new):
        originals.setdefault(("module", path), old)
        _set(model, path, new)
        report.swapped.append((path, _type(old), _type(new)))
        if backend is not None and hasattr(new, "backend"):
            new.backend = backend

    for path, module in list(model.named_modules()):
        if isinstance(module, nn.MultiheadAttention) and ("module", path) not in originals:
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
        if diffusers_integration is not None:
            for entry in diffusers_integration.optimize_module(path, module, backend, fallbacks, route_sdpa):
                if entry[0] == "skip":
                    report.skipped.append((path, entry[1], entry[2]))
                else:
                    _, kind, original, old, new = entry
                    originals.setdefault((kind, path), original)
                    report.swapped.append((path, old, new))
    from .nn.attention import MultiheadAttention as GenfastMultiheadAttention

    for path, module in model.named_modules():
        if isinstance(module, nn.TransformerEncoderLayer) and isinstance(module.self_attn, GenfastMultiheadAttention):
            note = _encoder_fast_path_note(module, route_sdpa)
            if note is not None:
                report.notes.append((path, note))
    if route_sdpa and not _sdpa_routed(model):
        object.__setattr__(model, _ROUTING, _SDPARouting("", backend, fallbacks))
        model.register_forward_pre_hook(_enter_sdpa_routing)
        model.register_forward_hook(_exit_sdpa_routing, always_call=True)
        report.swapped.append(("", f"F.scaled_dot_product_attention calls while {_type(model)}.forward runs",
                               "genfast.scaled_dot_product_attention (calling thread only)"))
    return report


def revert(model: nn.Module) -> nn.Module:
    """Put back every module, attention processor and block class ``optimize`` replaced (with
    the weights they share) and stop routing SDPA calls. Returns ``model``."""
    originals = model.__dict__.get(_ORIGINALS)
    if originals is None:
        return model
    # Deepest paths first: a parent put back first would detach the children still to restore.
    for (kind, path), original in sorted(originals.items(), key=lambda item: item[0][1].count("."), reverse=True):
        if kind == "module":
            _set(model, path, original)
        else:
            from .integrations import diffusers as integration

            integration.restore(kind, model.get_submodule(path), original)
    _remove_sdpa_routing(model)
    for name in (_ORIGINALS, _ROUTING, _FALLBACKS):
        model.__dict__.pop(name, None)
    return model
