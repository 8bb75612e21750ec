"""genfast.optimize on torch's own ``nn.TransformerEncoder`` as people build it (the default
``enable_nested_tensor=True``) with a key padding mask, in training and in eval under no_grad
(where torch would take its fused nested-tensor path): outputs and gradients match under the
project's criterion and genfast's attention runs in every layer. tests/test_optimize.py covers
the training-mode stack without padding (causal mask and none)."""
import copy

import pytest
import torch
from torch import nn

import genfast
from genfast.testing import error_vs_reference

LAYERS = 2


def encoder_and_batch():
    layer = nn.TransformerEncoderLayer(d_model=64, nhead=4, dim_feedforward=72, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(layer, num_layers=LAYERS)  # enable_nested_tensor=True: the default
    x = torch.randn(3, 11, 64)
    padding = torch.zeros(3, 11, dtype=torch.bool)
    padding[1, 7:] = True  # sequence 1 has 7 tokens, the others 11
    padding[2, 10:] = True
    return encoder, x, padding


def run(model, x, padding, grad_weights=None):
    if model.training:
        x = x.detach().clone().requires_grad_(True)
        model.zero_grad(set_to_none=True)
        out = model(x, src_key_padding_mask=padding)
        (out * grad_weights).sum().backward()
        grads = {name: p.grad for name, p in model.named_parameters()}
        grads["input"] = x.grad
        return out.detach(), grads
    with torch.no_grad():
        out = model(x, src_key_padding_mask=padding)
    return (out.to_padded_tensor(0.0) if out.is_nested else out), {}


def test_encoder_with_padding_mask_training(seed, attention_calls):
    encoder, x, padding = encoder_and_batch()
    torch_fp32, torch_fp64 = copy.deepcopy(encoder), copy.deepcopy(encoder).double()
    genfast.optimize(encoder)
    weights = torch.randn(3, 11, 64)
    out, grads = run(encoder, x, padding, weights)
    assert attention_calls == {"forward": LAYERS, "backward": LAYERS}, f"genfast attention calls: {attention_calls}"
    out32, grads32 = run(torch_fp32, x, padding, weights)
    out64, grads64 = run(torch_fp64, x.double(), padding, weights.double())
    # torch in float32 once more with the batch reversed (other reduction orders): a parameter
    # gradient sums over the batch, and one run's rounding error is a noisy baseline.
    _, grads32_reversed = run(torch_fp32, x.flip(0), padding.flip(0), weights.flip(0))
    grads32_reversed["input"] = grads32_reversed["input"].flip(0)
    error_vs_reference(out, out64, out32, name=f"output (seed {seed})")
    assert grads.keys() == grads64.keys()
    for name in grads:
        error_vs_reference(grads[name], grads64[name], [grads32[name], grads32_reversed[name]],
                           name=f"grad {name} (seed {seed})")


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning")  # torch's own path
def test_encoder_with_padding_mask_eval_no_grad(seed, attention_calls):
    encoder, x, padding = encoder_and_batch()
    torch_fp32, torch_fp64 = copy.deepcopy(encoder).eval(), copy.deepcopy(encoder).double().eval()
    genfast.optimize(encoder.eval())
    out, _ = run(encoder, x, padding)
    assert attention_calls["forward"] == LAYERS, f"genfast attention calls: {attention_calls}"
    # torch's nested-tensor path returns zeros at padded positions; genfast's layers (like torch's
    # own training-mode path) compute them, so only the real tokens are compared.
    real_tokens = ~padding
    error_vs_reference(out, run(torch_fp64, x.double(), padding)[0], run(torch_fp32, x, padding)[0],
                       name=f"output (seed {seed})", mask=real_tokens)
