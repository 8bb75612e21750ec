"""genfast as a transformers attention implementation (genfast.integrations.transformers).

Tiny random Llama (GQA, rotary) and GPT-2 models built from configs. Each test runs the same
weights through attn_implementation="genfast" and through transformers' own sdpa path (float64
as the reference, float32 as the error baseline), and checks which genfast path ran (varlen
segments, key counts / split-KV decode, dense mask) and that genfast's kernels really ran.
"""
from __future__ import annotations

import collections
import copy

import pytest
import torch

import genfast
import genfast.integrations.transformers as gt
from genfast.testing import count_table_runs, error_vs_reference

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

DEVICE = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
# genfast runs float64 on the CPU only; there greedy decoding is compared in float64 (no near-ties).
GEN_DTYPE = torch.float64 if DEVICE.type == "cpu" else torch.float32
VOCAB, LAYERS = 128, 2
PATHS = ("_segments", "_key_counts", "_dense", "_unmasked", "_packed")

NAME = genfast.nn.register_transformers_attention()


def llama_config(head_dim=16):
    return LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=LAYERS,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim, max_position_embeddings=64,
                       pad_token_id=0, bos_token_id=1, eos_token_id=VOCAB + 1)


def gpt2_config(head_dim=16):
    return GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=4 * head_dim, n_layer=LAYERS, n_head=4,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0, bos_token_id=1,
                      eos_token_id=VOCAB + 1)


MODELS = {"llama": (LlamaForCausalLM, llama_config), "gpt2": (GPT2LMHeadModel, gpt2_config)}


def build(kind, head_dim=16, impls=("genfast", "sdpa"), dtypes=(torch.float32, torch.float64)):
    """{(impl, dtype): model} with one set of random weights (each model gets its own config:
    transformers stores attn_implementation in it)."""
    cls, make_config = MODELS[kind]
    state = cls(make_config(head_dim)).state_dict()
    models = {}
    for impl in impls:
        for dtype in dtypes:
            m = cls._from_config(copy.deepcopy(make_config(head_dim)), attn_implementation=impl)
            m.load_state_dict(state)
            models[impl, dtype] = m.to(device=DEVICE, dtype=dtype).eval()
    return models


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts runs of genfast's attention kernel tables (at run time, also inside compiled graphs)."""
    counts = collections.Counter()
    for table in ("FORWARD", "BACKWARD", "DECODE"):
        count_table_runs(getattr(genfast.ops.attention, table), lambda _name=table: counts.update([_name]),
                         monkeypatch.setattr)
    return counts


@pytest.fixture
def calls(kernel_calls, monkeypatch):
    """kernel_calls plus which of the adapter's paths ran (eager only: a counter in a traced
    function would be guarded on and recompile the graph)."""
    for name in PATHS:
        def path(*args, _inner=getattr(gt, name), _name=name, **kwargs):
            kernel_calls[_name] += 1
            return _inner(*args, **kwargs)
        monkeypatch.setattr(gt, name, path)
    return kernel_calls


def padded_batch(side, batch=4, length=13, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    for b, pad in enumerate((5, 2, 0, 7)[:batch]):
        if side == "left" and pad:
            mask[b, :pad] = 0
        elif side == "right" and pad:
            mask[b, length - pad:] = 0
        elif side == "mixed" and pad:  # left, right and both sides: still one run of tokens per row
            mask[b, :pad // 2] = 0
            mask[b, length - (pad + 1) // 2:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return ids.to(DEVICE), mask.to(DEVICE)


def logits(model, ids, mask=None, **kwargs):
    return model(ids, attention_mask=mask, **kwargs).logits


# ----------------------------------------------------------------------------- registration


def test_registers_attention_and_mask():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    assert AttentionInterface._global_mapping[NAME] is gt.genfast_attention_forward
    assert AttentionMaskInterface._global_mapping[NAME] is gt.genfast_attention_mask
    assert genfast.nn.register_transformers_attention is gt.register_transformers_attention
    with pytest.raises(ValueError, match="name"):
        gt.register_transformers_attention("")


def test_unsupported_head_dim_is_a_clear_error():
    model = LlamaForCausalLM._from_config(llama_config(head_dim=12), attn_implementation=NAME)
    with pytest.raises(ValueError, match="head_dim 12"):
        model(torch.randint(2, VOCAB, (1, 5)))


# ----------------------------------------------------------------------------- forward / backward


@pytest.mark.parametrize("kind,head_dim", [("llama", 16), ("llama", 32), ("gpt2", 16)])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_logits(kind, head_dim, side, calls):
    models = build(kind, head_dim)
    ids, mask = padded_batch(side)
    with torch.no_grad():
        fast = logits(models["genfast", torch.float32], ids, mask)
        ref = logits(models["sdpa", torch.float64], ids, mask)
        lowp = logits(models["sdpa", torch.float32], ids, mask)
    valid = mask.bool()[..., None].expand_as(fast)
    error_vs_reference(fast, ref, lowp, name=f"{kind} {side}-padded logits", mask=valid)
    assert calls["_segments"] == LAYERS and calls["FORWARD"] == LAYERS  # varlen, no dense mask
    assert calls["_dense"] == calls["_unmasked"] == 0


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_padded_gradients(kind, calls):
    models = build(kind, impls=("genfast", "sdpa"))
    ids, mask = padded_batch("mixed")
    weights = torch.randn(*ids.shape, VOCAB, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    weights = weights * mask[..., None]  # the loss sees only real tokens
    def grads_of(key):
        model = models[key]
        model.zero_grad()
        loss = (logits(model, ids, mask, use_cache=False) * weights.to(key[1])).sum()
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    grads = {key: grads_of(key) for key in models}
    # torch's float32 run once more on one thread (torch splits CPU reductions by thread): one
    # run's rounding error is a noisy estimate of the low-precision error; the worse one counts.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        lowp_one_thread = grads_of(("sdpa", torch.float32))
    finally:
        torch.set_num_threads(threads)
    assert grads["genfast", torch.float32].keys() == grads["sdpa", torch.float64].keys()
    for name, g in grads["genfast", torch.float32].items():
        error_vs_reference(g, grads["sdpa", torch.float64][name],
                           [grads["sdpa", torch.float32][name], lowp_one_thread[name]], name=f"{kind} d{name}")
    assert calls["_segments"] == 2 * LAYERS  # the float32 and float64 genfast models
    assert calls["FORWARD"] == 2 * LAYERS and calls["BACKWARD"] == 2 * LAYERS
    assert calls["_dense"] == 0


def test_padding_with_a_hole_runs_the_dense_mask(calls):
    models = build("llama")
    ids, mask = padded_batch("left")
    mask[2, 4] = 0  # not one run of tokens: no segment form exists
    with torch.no_grad():
        fast = logits(models["genfast", torch.float32], ids, mask)
        ref = logits(models["sdpa", torch.float64], ids, mask)
        lowp = logits(models["sdpa", torch.float32], ids, mask)
    error_vs_reference(fast, ref, lowp, name="holey mask logits", mask=mask.bool()[..., None].expand_as(fast))
    assert calls["_dense"] == LAYERS and calls["FORWARD"] == LAYERS and calls["_segments"] == 0


def test_no_padding_runs_plain_causal(calls):
    models = build("llama")
    ids, _ = padded_batch("left")
    with torch.no_grad():
        fast = logits(models["genfast", torch.float32], ids, use_cache=False)
        ref = logits(models["sdpa", torch.float64], ids, use_cache=False)
        lowp = logits(models["sdpa", torch.float32], ids, use_cache=False)
    error_vs_reference(fast, ref, lowp, name="unpadded logits")
    assert calls["_unmasked"] == LAYERS and calls["FORWARD"] + calls["DECODE"] == LAYERS


# ----------------------------------------------------------------------------- packed sequences


def packed_inputs(lengths, seed=2):
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(2, VOCAB, (n,), generator=g) for n in lengths]
    collator = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=True)
    batch = collator([{"input_ids": s.tolist()} for s in seqs])
    return seqs, {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in batch.items() if k != "labels"}


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("given", ["position_ids", "position_ids+cache", "flash_kwargs"])
def test_packed_sequences(kind, given, calls):
    models = build(kind)
    lengths = [5, 9, 1, 7]
    seqs, batch = packed_inputs(lengths)
    kwargs = {"position_ids": batch["position_ids"], "use_cache": given == "position_ids+cache"}
    if given == "flash_kwargs":
        kwargs.update({k: batch[k] for k in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")})
    with torch.no_grad():
        fast = logits(models["genfast", torch.float32], batch["input_ids"], **kwargs)[0]
        calls_packed = dict(calls)
        ref = torch.cat([logits(models["sdpa", torch.float64], s[None].to(DEVICE), use_cache=False)[0] for s in seqs])
        lowp = torch.cat([logits(models["sdpa", torch.float32], s[None].to(DEVICE), use_cache=False)[0] for s in seqs])
    error_vs_reference(fast, ref, lowp, name=f"{kind} packed ({given}) logits")
    path = "_packed" if given == "flash_kwargs" else "_segments"
    assert calls_packed.get(path) == LAYERS and calls_packed.get("FORWARD") == LAYERS, calls_packed
    assert not calls_packed.get("_dense") and not calls_packed.get("_unmasked"), calls_packed


# ----------------------------------------------------------------------------- generate


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("side", ["left", "none"])
def test_greedy_generate(kind, cache, side, calls):
    models = build(kind, dtypes=(GEN_DTYPE,))
    ids, mask = padded_batch(side)
    new = 6
    out = {}
    for impl in ("genfast", "sdpa"):
        out[impl] = models[impl, GEN_DTYPE].generate(
            ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
            cache_implementation="static" if cache == "static" else None)
    assert out["genfast"].shape == (ids.shape[0], ids.shape[1] + new)
    assert torch.equal(out["genfast"], out["sdpa"])
    assert calls["FORWARD"] + calls["DECODE"] == new * LAYERS
    if side == "left":  # segments: the prefill varlen, decode steps split-KV with cache_leftpad (no K/V copy)
        assert calls["_segments"] == new * LAYERS and calls["FORWARD"] == LAYERS
        assert calls["DECODE"] == (new - 1) * LAYERS
    elif cache == "static":  # per-row key counts: the split-KV decode kernel reads only the written rows
        assert calls["_key_counts"] == new * LAYERS and calls["DECODE"] == new * LAYERS
    else:
        assert calls["_unmasked"] == new * LAYERS
    assert calls["_dense"] == 0


def test_compiled_static_cache_generate(kernel_calls):
    """generate compiles the decode step (fullgraph) with a static cache; genfast's ops are in the graph."""
    from transformers.generation import CompileConfig

    models = build("llama", dtypes=(GEN_DTYPE,))
    ids, mask = padded_batch("left")
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    compile_config = CompileConfig(fullgraph=True, backend=backend, mode=None)
    compile_config._compile_all_devices = True  # auto-compilation is otherwise for GPUs only
    new = 5
    torch._dynamo.reset()
    out = {impl: models[impl, GEN_DTYPE].generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                                  do_sample=False, cache_implementation="static",
                                                  compile_config=compile_config)
           for impl in ("genfast", "sdpa")}
    assert torch.equal(out["genfast"], out["sdpa"])
    ops = [n for g in graphs for n in g.graph.nodes if "genfast" in str(n.target)]
    assert len(graphs) == 2 and len(ops) == LAYERS  # genfast's decode graph and sdpa's: no break, no recompile
    for node in ops:  # varlen (cu_seqlens_q given), no dense bias
        assert "attention_forward" in str(node.target) and node.args[3] is None and node.args[5] is not None
    assert kernel_calls["FORWARD"] == new * LAYERS  # eager prefill + 4 compiled decode steps
