"""genfast.optimize / genfast.revert on stock PyTorch models: same outputs and gradients,
training still works, the report says what was swapped and why not, revert restores."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import genfast


def outputs_and_grads(model, run):
    model.zero_grad(set_to_none=True)
    out = run(model)
    out.float().square().mean().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads


def check_same(original, optimized, run, rtol=1e-4, atol=1e-5):
    out_a, grads_a = outputs_and_grads(original, run)
    out_b, grads_b = outputs_and_grads(optimized, run)
    torch.testing.assert_close(out_b, out_a, rtol=rtol, atol=atol)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def test_transformer_encoder_stack(seed):
    layer = nn.TransformerEncoderLayer(d_model=64, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    x = torch.randn(3, 11, 64)
    mask = nn.Transformer.generate_square_subsequent_mask(11)
    reference = copy.deepcopy(model)
    report = genfast.optimize(model)
    assert sum("MultiheadAttention" in old for _, old, _ in report.swapped) == 2, str(report)
    assert isinstance(model.layers[0].self_attn, genfast.nn.MultiheadAttention)
    check_same(reference, model, lambda m: m(x, mask=mask, is_causal=True))
    check_same(reference, model, lambda m: m(x))
    genfast.revert(model)
    assert type(model.layers[0].self_attn) is nn.MultiheadAttention
    check_same(reference, model, lambda m: m(x))


def test_model_with_multihead_attention_trains_through_the_swap(seed):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(32, 2, batch_first=False)
            self.head = nn.Linear(32, 1)

        def forward(self, x, key_padding_mask=None):
            y, _ = self.attn(x, x, x, key_padding_mask=key_padding_mask, need_weights=False)
            return self.head(y)

    model = Net()
    reference = copy.deepcopy(model)
    x = torch.randn(7, 3, 32)
    kpm = torch.zeros(3, 7, dtype=torch.bool)
    kpm[1, 5:] = True
    genfast.optimize(model)
    check_same(reference, model, lambda m: m(x, kpm))
    # Training the swapped model trains the original parameters, which revert hands back.
    weight = model.attn.in_proj_weight
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.zero_grad()
    model(x).square().mean().backward()
    opt.step()
    genfast.revert(model)
    assert model.attn.in_proj_weight is weight


def mlp_with_activations():
    return nn.Sequential(nn.Linear(10, 32), nn.LeakyReLU(0.1), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 16),
                         nn.GELU(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 1), nn.Sigmoid())


def force_fused_epilogue(monkeypatch) -> list:
    """Make FusedLinearAct's device rule say the bias_act epilogue pays on this device (as on
    CUDA); every call the swapped modules make into genfast's bias_act appends to the list."""
    import genfast.nn.gan as gan_layers

    calls = []
    real = gan_layers.bias_act
    monkeypatch.setattr(gan_layers, "fused_epilogue_pays", lambda device: True)
    monkeypatch.setattr(gan_layers, "bias_act", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_linear_activation_pairs_left_alone_on_cpu_with_the_reason(seed):
    # On CPU, addmm + torch's activation beats genfast's separate epilogue: swapping would slow the model.
    model = mlp_with_activations()
    reference = copy.deepcopy(model)
    report = genfast.optimize(model)
    text = str(report)
    assert not [s for s in report.swapped if s[2] == "FusedLinearAct"], text
    slower = [path for path, _, reason in report.skipped if "slower than addmm" in reason]
    assert slower == ["0", "2", "6", "8"], text
    assert any("GELU" in reason for _, _, reason in report.skipped), text
    assert [type(m) for m in model] == [type(m) for m in reference]
    x = torch.randn(5, 10)
    check_same(reference, model, lambda m: m(x))


def test_mlp_with_leaky_relu_and_other_activations(seed, monkeypatch):
    calls = force_fused_epilogue(monkeypatch)
    model = mlp_with_activations()
    reference = copy.deepcopy(model)
    report = genfast.optimize(model)
    text = str(report)
    assert len([s for s in report.swapped if s[2] == "FusedLinearAct"]) == 4, text
    assert any("GELU" in reason for _, _, reason in report.skipped), text
    assert isinstance(model[0], genfast.nn.FusedLinearAct) and isinstance(model[1], nn.Identity)
    x = torch.randn(5, 10)
    check_same(reference, model, lambda m: m(x))
    assert len(calls) == 4  # each swapped layer ran genfast's epilogue
    genfast.revert(model)
    assert [type(m) for m in model] == [type(m) for m in reference]


def test_conv_groupnorm_silu_block_and_conv_bn_folding(seed):
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.SiLU(), nn.Conv2d(8, 8, 3, padding=1),
                          nn.BatchNorm2d(8), nn.ReLU())
    with torch.no_grad():
        model[4].running_mean.normal_()
        model[4].running_var.uniform_(0.5, 2)
    reference = copy.deepcopy(model)
    x = torch.randn(2, 3, 9, 7)

    report = genfast.optimize(model)  # training mode: the BatchNorm stays (with a reason)
    assert isinstance(model[1], genfast.nn.GroupNormSiLU), str(report)
    assert any("training mode" in reason for _, _, reason in report.skipped), str(report)
    check_same(reference, model, lambda m: m(x))
    genfast.revert(model)

    model.eval()
    reference.eval()
    report = genfast.optimize(model)
    assert isinstance(model[4], nn.Identity), str(report)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-4, atol=1e-5)
    genfast.revert(model)
    assert type(model[4]) is nn.BatchNorm2d and type(model[1]) is nn.GroupNorm


def count_genfast_attention(monkeypatch) -> list:
    """Every forward call into genfast's attention kernels appends one entry to the returned list."""
    import genfast.ops.attention as attention_ops

    from genfast.testing import count_table_runs

    calls = []
    count_table_runs(attention_ops.FORWARD, lambda: calls.append(1), monkeypatch.setattr)
    return calls


class SelfAttention(nn.Module):
    """Imports SDPA by name, as some models do: no F.scaled_dot_product_attention in its source."""

    def __init__(self, dim=32):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)

    def forward(self, x, heads=2):
        from torch.nn.functional import scaled_dot_product_attention as attend

        q, k, v = self.qkv(x).reshape(x.shape[0], x.shape[1], 3, heads, x.shape[2] // heads).permute(2, 0, 3, 1, 4)
        return attend(q, k, v, is_causal=True).transpose(1, 2).reshape(x.shape)


def test_sdpa_imported_by_name_is_routed_to_genfast(seed, monkeypatch):
    model = nn.Sequential(nn.Linear(32, 32), SelfAttention())
    reference = copy.deepcopy(model)
    calls = count_genfast_attention(monkeypatch)
    report = genfast.optimize(model)
    assert any("scaled_dot_product_attention" in old for _, old, _ in report.swapped), str(report)
    assert not genfast.optimize(model).swapped  # a second call finds nothing new to do
    x = torch.randn(2, 9, 32)
    check_same(reference, model, lambda m: m(x))
    assert len(calls) == 1 and not report.fallbacks
    assert torch._C._len_torch_function_stack() == 0  # the routing left with the forward
    genfast.revert(model)
    calls.clear()
    model(x)
    assert not calls
    report = genfast.optimize(model, route_sdpa=False)
    model(x)
    assert not calls and not any("scaled_dot_product_attention" in old for _, old, _ in report.swapped)


def test_sdpa_call_from_another_thread_is_not_routed(seed, monkeypatch):
    import threading

    q = torch.randn(1, 2, 5, 16)
    other_thread_result = []

    class SpawnsAThread(nn.Module):
        def forward(self, x):
            # Another thread attends while this forward runs (and is routed): it must get torch's own.
            worker = threading.Thread(
                target=lambda: other_thread_result.append(F.scaled_dot_product_attention(q, q, q)))
            worker.start()
            worker.join()
            return F.scaled_dot_product_attention(x, x, x)

    model = SpawnsAThread()
    calls = count_genfast_attention(monkeypatch)
    genfast.optimize(model)
    out = model(q)
    assert len(calls) == 1 and len(other_thread_result) == 1
    torch.testing.assert_close(other_thread_result[0], out, rtol=1e-5, atol=1e-6)


def test_sdpa_call_genfast_cannot_serve_runs_torch_and_is_reported(seed, monkeypatch):
    model = SelfAttention()
    reference = copy.deepcopy(model)
    calls = count_genfast_attention(monkeypatch)
    report = genfast.optimize(model)
    x = torch.randn(2, 9, 32)
    with pytest.warns(genfast.BackendWarning, match="head dim 8") as warned:
        check_same(reference, model, lambda m: m(x, heads=4))  # head dim 8: outside genfast's kernels
        model(x, heads=4)
    assert len([w for w in warned if issubclass(w.category, genfast.BackendWarning)]) == 1
    assert not calls
    assert len(report.fallbacks) == 1 and "head dim 8" in report.fallbacks[0][1], str(report)
    assert "fallback" in str(report) and "head dim 8" in str(report)
    # A call torch rejects as well raises torch's error, and is no fallback.
    rejected = _Lambda(lambda t: F.scaled_dot_product_attention(t, t[..., :8], t))  # key head dim 8, query 16
    report = genfast.optimize(rejected)
    with pytest.raises(RuntimeError):
        rejected(torch.randn(1, 2, 5, 16))
    assert not report.fallbacks


class _Lambda(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def test_compiled_optimized_model_runs_genfast_sdpa(seed, monkeypatch):
    model = SelfAttention()
    reference = copy.deepcopy(model)
    calls = count_genfast_attention(monkeypatch)
    genfast.optimize(model)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(2, 9, 32)
    # Gradients land on model's parameters, which compiled runs; check_same reads them from model.
    check_same(reference, model, lambda m: compiled(x) if m is model else m(x))
    assert calls  # genfast's kernels ran inside the compiled graph


def test_transformer_encoder_fast_path_does_not_skip_the_swap(seed, monkeypatch):
    layer = nn.TransformerEncoderLayer(d_model=32, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False).eval()
    reference = copy.deepcopy(model)
    report = genfast.optimize(model)
    assert sum("fast path" in text for _, text in report.notes) == 2, str(report)
    calls = count_genfast_attention(monkeypatch)
    x = torch.randn(3, 7, 32)
    with torch.no_grad():  # where torch's own fused encoder layer would run instead
        torch.testing.assert_close(model(x), reference(x), rtol=1e-4, atol=1e-5)
    assert len(calls) == 2


def test_unsupported_attention_is_left_alone_with_a_reason():
    model = nn.Sequential(nn.MultiheadAttention(16, 4))  # head dim 4
    report = genfast.optimize(model)
    assert not [s for s in report.swapped if "MultiheadAttention" in s[1]] and "head dim 4" in str(report)


def test_optimize_not_inplace_and_bad_input(monkeypatch):
    force_fused_epilogue(monkeypatch)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    report = genfast.optimize(model, inplace=False)
    assert report.model is not model and type(model[0]) is nn.Linear
    assert isinstance(report.model[0], genfast.nn.FusedLinearAct)
    with pytest.raises(TypeError, match="nn.Module"):
        genfast.optimize(lambda x: x)
    with pytest.raises(ValueError, match="backend"):
        genfast.optimize(model, backend="fastest")
    with pytest.raises(TypeError, match="route_sdpa"):
        genfast.optimize(model, route_sdpa="yes")
