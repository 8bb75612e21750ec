"""genfast.optimize on a timm Vision Transformer (tiny, random weights): outputs and every
gradient match timm's own path under the project's criterion, and genfast's attention really
ran (timm's ``Attention`` calls ``F.scaled_dot_product_attention`` when ``fused_attn`` is on,
the default).

timm imports torchvision at import time; where torchvision is not installed (the test
environment: see _torchvision_stub.py), a test-only stub stands in for the import only.
"""
import copy
import importlib.util

import pytest
import torch

import genfast
from genfast.testing import error_vs_reference

from _torchvision_stub import import_timm  # tests/integrations/, a test-only helper


def _import_timm():
    if importlib.util.find_spec("timm") is None:
        pytest.skip("timm is not installed (the test environment installs it with --no-deps)")
    try:
        return import_timm()
    except RuntimeError as exc:  # e.g. torchvision::nms does not exist
        pytest.fail(f"timm's import of the installed torchvision fails ({exc}): that torchvision is not built "
                    "for this torch; without torchvision installed, the test stubs it")


DEPTH = 2


def tiny_vit(timm):
    # 32x32 images in 8x8 patches: 16 patch tokens + the class token = 17 (odd); head dim 16.
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=DEPTH,
                             embed_dim=48, num_heads=3, mlp_ratio=2.0, num_classes=7)


def outputs_and_grads(model, images, weights):
    images = images.detach().clone().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    out = model(images)
    (out * weights).sum().backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    grads["input"] = images.grad
    return out.detach(), grads


def test_timm_vit_optimize_matches_timm_in_training_and_eval(seed, attention_calls):
    timm = _import_timm()
    model = tiny_vit(timm)
    assert all(block.attn.fused_attn for block in model.blocks), "timm's SDPA path is off (TIMM_FUSED_ATTN=0?)"
    timm_fp32 = copy.deepcopy(model)
    timm_fp64 = copy.deepcopy(model).double()
    images = torch.randn(3, 3, 32, 32)
    weights = torch.randn(3, 7)  # a random linear loss: every output element gets its own gradient

    report = genfast.optimize(model)
    str(report)  # the report renders

    out, grads = outputs_and_grads(model, images, weights)
    assert attention_calls == {"forward": DEPTH, "backward": DEPTH}, f"genfast attention calls: {attention_calls}"
    out32, grads32 = outputs_and_grads(timm_fp32, images, weights)
    out64, grads64 = outputs_and_grads(timm_fp64, images.double(), weights.double())
    # timm in float32 once more with the batch reversed (other reduction orders): a parameter
    # gradient sums over the batch, and one run's rounding error is a noisy baseline.
    _, grads32_reversed = outputs_and_grads(timm_fp32, images.flip(0), weights.flip(0))
    grads32_reversed["input"] = grads32_reversed["input"].flip(0)
    error_vs_reference(out, out64, out32, name=f"logits (seed {seed})")
    assert grads.keys() == grads64.keys()
    for name in grads:
        assert grads[name] is not None, f"{name}: no gradient through the optimized model"
        error_vs_reference(grads[name], grads64[name], [grads32[name], grads32_reversed[name]],
                           name=f"grad {name} (seed {seed})")

    for m in (model, timm_fp32, timm_fp64):
        m.eval()
    attention_calls.update(forward=0, backward=0)
    with torch.no_grad():
        out = model(images)
        assert attention_calls["forward"] == DEPTH, f"genfast attention calls in eval: {attention_calls}"
        error_vs_reference(out, timm_fp64(images.double()), timm_fp32(images), name=f"eval logits (seed {seed})")

    # revert hands timm's own path back: genfast no longer runs, the output is timm's.
    genfast.revert(model)
    attention_calls.update(forward=0, backward=0)
    with torch.no_grad():
        torch.testing.assert_close(model(images), timm_fp32(images), rtol=0, atol=0)
    assert attention_calls["forward"] == 0
