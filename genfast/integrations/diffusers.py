"""genfast inside diffusers models (diffusers >= 0.30; written against 0.42).

``genfast.optimize(unet)`` uses this module when diffusers is imported:

  * ``GenfastAttnProcessor`` replaces diffusers' ``AttnProcessor2_0`` on every ``Attention``
    module (self- and cross-attention, ``attention_mask``, group_norm / spatial_norm / residual /
    rescale: it *is* ``AttnProcessor2_0``, whose ``F.scaled_dot_product_attention`` call runs in
    genfast while the processor runs; a call genfast cannot serve runs torch's and is reported).
    It also works on its own: ``unet.set_attn_processor(GenfastAttnProcessor())``.
  * ``ResnetBlock2D`` with a SiLU nonlinearity and GroupNorm norms runs ``norm1`` + SiLU and
    ``norm2`` + SiLU as one fused ``genfast.ops.group_norm(..., activation="silu")`` each (the op
    behind ``genfast.nn.GroupNormSiLU``); with ``time_embedding_norm="scale_shift"`` only ``norm1``
    (the scale and shift sit between ``norm2`` and the SiLU). The block's class becomes
    ``FusedResnetBlock2D``, a subclass with the same modules and ``state_dict``; ``revert`` puts
    the class back.

diffusers' own attention-backend registry (``models/attention_dispatch.py``,
``model.set_attention_backend(...)`` / ``attention_backend(...)``) is keyed by the closed enum
``AttentionBackendName``: a "genfast" backend cannot be registered without patching the enum, so
genfast does not register one. Processors that call ``dispatch_attention_fn`` with the "native"
backend end in ``F.scaled_dot_product_attention``, which ``optimize``'s SDPA routing sends to genfast.
"""
from __future__ import annotations

import ast
import hashlib
import inspect
import textwrap
from typing import Optional

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from diffusers.models.resnet import ResnetBlock2D, ResnetBlockCondNorm2D
from diffusers.utils import deprecate

from ..ops.attention import MAX_HEAD_DIM, MIN_HEAD_DIM
from ..ops.group_norm import group_norm

__all__ = ["GenfastAttnProcessor", "FusedResnetBlock2D"]


class GenfastAttnProcessor(AttnProcessor2_0):
    """diffusers' ``AttnProcessor2_0`` with its scaled-dot-product attention on genfast.

    The processor's own code runs unchanged (every feature of ``AttnProcessor2_0`` stays as
    diffusers wrote it); while it runs, the calling thread's SDPA calls go to
    ``genfast.scaled_dot_product_attention`` (a ``TorchFunctionMode``, traced by Dynamo). A call
    genfast cannot serve runs torch's function and is recorded in ``fallbacks`` as (where, reason)
    with one ``genfast.BackendWarning``. ``backend`` picks genfast's backend (None: automatic)."""

    def __init__(self, backend: Optional[str] = None, where: str = "Attention", fallbacks: Optional[list] = None):
        super().__init__()
        from ..optimize import _SDPARouting

        self.backend = backend
        self.fallbacks = [] if fallbacks is None else fallbacks
        self.routing = _SDPARouting(where, backend, self.fallbacks)

    # Same parameters as AttnProcessor2_0.__call__: Attention.forward filters the keyword
    # arguments it passes by this signature.
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        with self.routing:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)


def _forward_fingerprint(cls) -> str:
    """Hash of the syntax tree of ``cls.forward`` (comments and formatting do not count)."""
    source = textwrap.dedent(inspect.getsource(cls.forward))
    return hashlib.sha256(ast.dump(ast.parse(source)).encode()).hexdigest()[:16]


# ResnetBlock2D.forward versions FusedResnetBlock2D.forward mirrors (diffusers 0.42). Another
# version may compute something else: such blocks are left alone, with the reason.
_MIRRORED_RESNET_FORWARDS = {"c33728fbb237b59e"}


def _group_norm_silu(norm: torch.nn.GroupNorm, x: torch.Tensor, backend: Optional[str]) -> torch.Tensor:
    """``silu(norm(x))`` in one genfast pass."""
    weight, bias = norm.weight, norm.bias
    if x.dtype != weight.dtype and torch.is_autocast_enabled(x.device.type):
        x = x.to(weight.dtype)  # autocast runs group_norm in float32, as torch's would
    return group_norm(x, norm.num_groups, weight, bias, norm.eps, activation="silu", backend=backend)


class FusedResnetBlock2D(ResnetBlock2D):
    """``ResnetBlock2D`` whose GroupNorm + SiLU pairs run fused (``optimize`` sets a block's class
    to this one; modules, parameters and ``state_dict`` stay the block's own). ``forward`` is
    diffusers 0.42's, line for line, with the two fused calls."""

    _genfast_backend: Optional[str] = None
    _genfast_fuse_norm2: bool = True

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if len(args) > 0 or kwargs.get("scale", None) is not None:
            deprecation_message = ("The `scale` argument is deprecated and will be ignored. Please remove it, as "
                                   "passing it will raise an error in the future. `scale` should directly be passed "
                                   "while calling the underlying pipeline component i.e., via "
                                   "`cross_attention_kwargs`.")
            deprecate("scale", "1.0.0", deprecation_message)

        hidden_states = _group_norm_silu(self.norm1, input_tensor, self._genfast_backend)

        if self.upsample is not None:
            if hidden_states.shape[0] >= 64:
                input_tensor = input_tensor.contiguous()
                hidden_states = hidden_states.contiguous()
            input_tensor = self.upsample(input_tensor)
            hidden_states = self.upsample(hidden_states)
        elif self.downsample is not None:
            input_tensor = self.downsample(input_tensor)
            hidden_states = self.downsample(hidden_states)

        hidden_states = self.conv1(hidden_states)

        if self.time_emb_proj is not None:
            if not self.skip_time_act:
                temb = self.nonlinearity(temb)
            temb = self.time_emb_proj(temb)[:, :, None, None]

        if self.time_embedding_norm == "default":
            if temb is not None:
                hidden_states = hidden_states + temb
            hidden_states = _group_norm_silu(self.norm2, hidden_states, self._genfast_backend)
        elif self.time_embedding_norm == "scale_shift":
            if temb is None:
                raise ValueError(
                    f" `temb` should not be None when `time_embedding_norm` is {self.time_embedding_norm}"
                )
            time_scale, time_shift = torch.chunk(temb, 2, dim=1)
            hidden_states = self.norm2(hidden_states)
            hidden_states = hidden_states * (1 + time_scale) + time_shift
            hidden_states = self.nonlinearity(hidden_states)
        else:
            hidden_states = _group_norm_silu(self.norm2, hidden_states, self._genfast_backend)

        hidden_states = self.dropout(hidden_states)
        hidden_states = self.conv2(hidden_states)

        if self.conv_shortcut is not None:
            if self.training:
                input_tensor = input_tensor.contiguous()
            input_tensor = self.conv_shortcut(input_tensor)

        output_tensor = (input_tensor + hidden_states) / self.output_scale_factor

        return output_tensor


# ----------------------------------------------------------------------------- used by genfast.optimize


def _attention_head_dim(attn: Attention) -> int:
    # AttnProcessor2_0 splits the key/value projection into attn.heads heads.
    return attn.inner_kv_dim // attn.heads


def _optimize_attention(path: str, attn: Attention, backend, fallbacks, route_sdpa: bool) -> list:
    processor = attn.processor
    if isinstance(processor, GenfastAttnProcessor):
        return []  # optimized before
    name = f"Attention with {type(processor).__name__}"
    if type(processor) is not AttnProcessor2_0:
        routed = (" (its F.scaled_dot_product_attention calls, if any, are routed to genfast while the model runs)"
                  if route_sdpa else "")
        return [("skip", name, f"processor {type(processor).__name__} is not AttnProcessor2_0, the one genfast "
                               f"replaces{routed}")]
    head_dim = _attention_head_dim(attn)
    if not (MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM and head_dim % 8 == 0):
        return [("skip", name, f"head dim {head_dim} is outside genfast's kernels (a multiple of 8 in "
                               f"[{MIN_HEAD_DIM}, {MAX_HEAD_DIM}]); torch's SDPA runs it")]
    attn.set_processor(GenfastAttnProcessor(backend=backend, where=path, fallbacks=fallbacks))
    return [("swap", "processor", processor, name, "GenfastAttnProcessor (SDPA on genfast)")]


def _optimize_resnet(path: str, block, backend) -> list:
    if type(block) is FusedResnetBlock2D:
        return []  # optimized before
    name = type(block).__name__
    if type(block) is ResnetBlockCondNorm2D:
        return [("skip", name, f"time_embedding_norm={block.time_embedding_norm!r}: its norms are conditioned on "
                               f"the time embedding ({type(block.norm1).__name__}), no fused kernel")]
    if type(block) is not ResnetBlock2D:
        return [("skip", name, "a subclass of ResnetBlock2D whose forward genfast does not know")]
    if type(block.nonlinearity) is not torch.nn.SiLU:
        return [("skip", name, f"nonlinearity {type(block.nonlinearity).__name__} is not SiLU (fused kernel: "
                               "GroupNorm + SiLU)")]
    for norm_name in ("norm1", "norm2"):
        norm = getattr(block, norm_name)
        if type(norm) is not torch.nn.GroupNorm or not norm.affine:
            return [("skip", name, f"{norm_name} is {type(norm).__name__}"
                                   f"{'' if type(norm) is not torch.nn.GroupNorm else ' without affine parameters'}, "
                                   "not an affine torch.nn.GroupNorm")]
    fingerprint = _forward_fingerprint(ResnetBlock2D)
    if fingerprint not in _MIRRORED_RESNET_FORWARDS:
        return [("skip", name, f"this diffusers' ResnetBlock2D.forward (fingerprint {fingerprint}) is not the "
                               "version genfast's fused forward mirrors (diffusers 0.42)")]
    block.__class__ = FusedResnetBlock2D
    if backend is not None:
        block._genfast_backend = backend
    if block.time_embedding_norm == "scale_shift":
        fused = "norm1+SiLU fused (norm2 is followed by the time scale/shift, kept)"
    else:
        fused = "norm1+SiLU and norm2+SiLU fused"
    return [("swap", "class", ResnetBlock2D, name, f"FusedResnetBlock2D ({fused})")]


def optimize_module(path: str, module: torch.nn.Module, backend: Optional[str], fallbacks: list,
                    route_sdpa: bool) -> list:
    """What ``genfast.optimize`` does to one diffusers module: a list of
    ("swap", undo kind, original value, old description, new description) and
    ("skip", description, reason) entries (empty for modules this integration does not handle)."""
    if isinstance(module, Attention):
        return _optimize_attention(path, module, backend, fallbacks, route_sdpa)
    if isinstance(module, (ResnetBlock2D, ResnetBlockCondNorm2D)):
        return _optimize_resnet(path, module, backend)
    return []


def restore(kind: str, module: torch.nn.Module, original) -> None:
    """Undo one ``optimize_module`` swap."""
    if kind == "processor":
        module.set_processor(original)
    elif kind == "class":
        module.__class__ = original
        module.__dict__.pop("_genfast_backend", None)
    else:
        raise ValueError(f"restore: unknown kind {kind!r}")
