"""genfast.optimize on tiny random diffusers UNets: outputs and parameter gradients match
diffusers' own path (float64 model as the reference), genfast's attention and fused
GroupNorm+SiLU really run, the report lists every swap and every candidate left alone, and
revert gives back diffusers' processors and blocks."""
import copy

import pytest
import torch

import genfast
from genfast.testing import count_table_runs, error_vs_reference

diffusers = pytest.importorskip("diffusers")
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0  # noqa: E402
from diffusers.models.resnet import ResnetBlock2D, ResnetBlockCondNorm2D  # noqa: E402

from genfast.integrations.diffusers import GenfastAttnProcessor  # noqa: E402

# Head dims genfast serves: 16 and 32 (a multiple of 8 in [16, 256]).
UNET_CONFIG = dict(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
                   down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                   norm_num_groups=8, attention_head_dim=16)
# attention_head_dim is the number of heads in UNet2DConditionModel: 32/2 and 64/2 channels per head.
COND_UNET_CONFIG = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8,
                        cross_attention_dim=32, attention_head_dim=2)


def unet_inputs(dtype):
    return dict(sample=torch.randn(2, 3, 10, 6, dtype=dtype), timestep=torch.tensor([3, 517]))


def cond_unet_inputs(dtype):
    mask = torch.ones(2, 7)
    mask[1, 4:] = 0  # the second prompt is 4 tokens long: its padding gets -10000 in the cross-attention
    return dict(sample=torch.randn(2, 4, 10, 6, dtype=dtype), timestep=torch.tensor([3, 517]),
                encoder_hidden_states=torch.randn(2, 7, 32, dtype=dtype), encoder_attention_mask=mask)


def genfast_call_counters(monkeypatch) -> dict:
    """Counts forward calls into genfast's attention kernels and its fused GroupNorm+SiLU kernels."""
    import importlib

    # importlib: genfast.ops.group_norm the attribute is the function, not the module.
    attention_ops = importlib.import_module("genfast.ops.attention")
    group_norm_ops = importlib.import_module("genfast.ops.group_norm")

    counts = {"attention": 0, "group_norm_silu": 0}
    group_norm_run = group_norm_ops.DISPATCH.run
    count_table_runs(attention_ops.FORWARD, lambda: counts.__setitem__("attention", counts["attention"] + 1),
                     monkeypatch.setattr)

    def count_group_norm(requested, device, dtype, direction, *args):
        if direction == group_norm_ops.FORWARD and args[-1]:  # the last argument: silu
            counts["group_norm_silu"] += 1
        return group_norm_run(requested, device, dtype, direction, *args)

    monkeypatch.setattr(group_norm_ops.DISPATCH, "run", count_group_norm)
    return counts


def channels_last(inputs: dict) -> dict:
    return dict(inputs, sample=inputs["sample"].contiguous(memory_format=torch.channels_last))


def one_thread(fn, *args):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(threads)


def outputs_and_grads(model, inputs, weights):
    model.zero_grad(set_to_none=True)
    out = model(**inputs).sample
    (out * weights.to(out.dtype)).sum().backward()
    return out.detach(), {name: p.grad.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("kind", ["UNet2DModel", "UNet2DConditionModel"])
def test_optimized_unet_matches_diffusers(kind, seed, monkeypatch):
    config, make_inputs = (UNET_CONFIG, unet_inputs) if kind == "UNet2DModel" else (COND_UNET_CONFIG, cond_unet_inputs)
    diffusers_model = getattr(diffusers, kind)(**config)
    reference = copy.deepcopy(diffusers_model).double()
    fast = copy.deepcopy(diffusers_model)
    attentions = [name for name, m in fast.named_modules() if isinstance(m, Attention)]
    resnets = [name for name, m in fast.named_modules() if isinstance(m, ResnetBlock2D)]
    assert attentions and resnets

    report = genfast.optimize(fast)
    text = str(report)
    assert sorted(p for p, _, new in report.swapped
                  if new.startswith("GenfastAttnProcessor")) == sorted(attentions), text
    assert sorted(p for p, _, new in report.swapped if new.startswith("FusedResnetBlock2D")) == sorted(resnets), text
    assert not report.skipped, text

    inputs64 = make_inputs(torch.float64)
    inputs32 = {k: v.float() if v.is_floating_point() else v for k, v in inputs64.items()}
    weights = torch.randn(inputs64["sample"].shape[0], config["out_channels"], 10, 6, dtype=torch.float64)
    counts = genfast_call_counters(monkeypatch)
    out_fast, grads_fast = outputs_and_grads(fast, inputs32, weights)
    # Each Attention runs once per forward, each ResnetBlock2D fuses norm1+SiLU and norm2+SiLU.
    assert counts == {"attention": len(attentions), "group_norm_silu": 2 * len(resnets)}, counts
    assert not report.fallbacks, str(report)
    out_ref, grads_ref = outputs_and_grads(reference, inputs64, weights)
    out_lowp, grads_lowp = outputs_and_grads(diffusers_model, inputs32, weights)
    # diffusers in float32 twice more, in other reduction orders: channels-last, and on one
    # thread (torch splits its CPU reductions by thread). One run's error is a noisy estimate:
    # over 60 seeds a parameter's error moved up to 6x between these orders, and torch's own
    # one-thread run came within 7% of failing against a baseline without it. A batch-reversed
    # run was little help: half its errors equal the contiguous run's bit for bit.
    grads_lowp_orders = [grads_lowp, outputs_and_grads(copy.deepcopy(diffusers_model).to(
        memory_format=torch.channels_last), channels_last(inputs32), weights)[1],
        one_thread(outputs_and_grads, diffusers_model, inputs32, weights)[1]]
    error_vs_reference(out_fast, out_ref, out_lowp)
    for name in grads_ref:
        error_vs_reference(grads_fast[name], grads_ref[name], [g[name] for g in grads_lowp_orders], name=name)

    genfast.revert(fast)
    assert all(type(m.processor) is AttnProcessor2_0 for m in fast.modules() if isinstance(m, Attention))
    assert all(type(m) is ResnetBlock2D for m in fast.modules() if isinstance(m, ResnetBlock2D))
    counts.update(attention=0, group_norm_silu=0)
    with torch.no_grad():
        torch.testing.assert_close(fast(**inputs32).sample, out_lowp, rtol=0, atol=0)
    assert counts == {"attention": 0, "group_norm_silu": 0}


def test_genfast_attn_processor_on_its_own(seed, monkeypatch):
    model = diffusers.UNet2DConditionModel(**COND_UNET_CONFIG).eval()
    inputs = cond_unet_inputs(torch.float32)
    with torch.no_grad():
        expected = model(**inputs).sample
        model.set_attn_processor(GenfastAttnProcessor())
        counts = genfast_call_counters(monkeypatch)
        out = model(**inputs).sample
    assert counts["attention"] == sum(isinstance(m, Attention) for m in model.modules())
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


class Blocks(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.classic_attention = Attention(32, heads=2, dim_head=16, scale_qk=False)  # AttnProcessor (baddbmm)
        self.narrow_attention = Attention(32, heads=4, dim_head=8)  # head dim 8
        self.mish_resnet = ResnetBlock2D(in_channels=16, temb_channels=8, groups=4, non_linearity="mish")
        self.ada_resnet = ResnetBlockCondNorm2D(in_channels=16, temb_channels=8, groups=4,
                                                time_embedding_norm="ada_group")
        self.scale_shift_resnet = ResnetBlock2D(in_channels=16, out_channels=24, temb_channels=8, groups=4,
                                                time_embedding_norm="scale_shift")

    def forward(self, x, temb):
        return self.scale_shift_resnet(x, temb)


def test_candidates_left_alone_are_listed_with_reasons(seed, monkeypatch):
    model = Blocks()
    assert type(model.classic_attention.processor) is AttnProcessor
    reference = copy.deepcopy(model).double()
    lowp = copy.deepcopy(model)
    report = genfast.optimize(model)
    reasons = {path: reason for path, _, reason in report.skipped}
    assert "AttnProcessor is not AttnProcessor2_0" in reasons["classic_attention"], str(report)
    assert "head dim 8" in reasons["narrow_attention"], str(report)
    assert "Mish is not SiLU" in reasons["mish_resnet"], str(report)
    assert "ada_group" in reasons["ada_resnet"], str(report)
    assert [p for p, _, new in report.swapped if "scale/shift" in new] == ["scale_shift_resnet"], str(report)
    assert type(model.classic_attention.processor) is AttnProcessor and type(model.mish_resnet) is ResnetBlock2D

    # scale_shift: norm1+SiLU fused, norm2 then the time scale/shift then SiLU as diffusers does.
    counts = genfast_call_counters(monkeypatch)
    x, temb = torch.randn(2, 16, 7, 5, dtype=torch.float64), torch.randn(2, 8, dtype=torch.float64)
    out = model(x.float(), temb.float())
    assert counts["group_norm_silu"] == 1
    error_vs_reference(out.detach(), reference(x, temb).detach(), lowp(x.float(), temb.float()).detach())
    genfast.revert(model)
    assert type(model.scale_shift_resnet) is ResnetBlock2D and "_genfast_backend" not in vars(model.scale_shift_resnet)
