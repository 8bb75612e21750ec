"""genfast attention with DTensor inputs (genfast/ops/attention_dtensor.py): on a 1-D CPU device
mesh of 2 gloo processes, q/k/v sharded by heads or by batch (with GQA, masks, ALiBi slopes,
varlen) go through genfast's kernels on each rank's local shard (counted), forward and backward,
and give the single-process result; the gradients keep the inputs' placements; a
tensor-parallel attention module (column-parallel q/k/v projections via parallelize_module)
reaches genfast; decode appends to and reads a head-sharded KV cache; a grouped-query head
count that cannot be split raises a clear error; the strategies register whether DTensor is
imported before or after genfast.

One launch of 2 processes runs every case (each process pays the torch + genfast import once);
the parent saves the inputs, computes the references while the ranks work and compares. Every
wait is bounded (see test_distributed.py, whose launch pattern this follows).

This file is also the rank's program: ``python test_dtensor_attention.py RANK WORLD PORT WORKDIR``.
"""
import contextlib
import datetime
import faulthandler
import importlib
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

WORLD = 2
RANK_TIMEOUT_S = 100
COLLECTIVE_TIMEOUT_S = 60
TEST_TIMEOUT_S = 150

# name: (api, batch, query heads, key/value heads, query len, key len, head dim, causal, sharding,
# extra input). Odd sizes; "heads" shards q/k/v on their head dim, "batch" on the batch dim.
# Extras: "mask" an additive float mask (batch, 1, Sq, Sk) sharded like q's batch dim or
# replicated; "alibi" / "alibi_bh" ALiBi slopes (H,) / (B, H), replicated (the strategy splits
# them); "varlen" flash_attn_varlen_func on the batch's rows packed into one sequence each.
CASES = {
    "sdpa_heads_mask": ("sdpa", 3, 4, 4, 5, 7, 16, False, "heads", "mask"),
    "sdpa_heads_uneven": ("sdpa", 2, 3, 3, 7, 5, 16, True, "heads", None),  # 2 + 1 heads: independent, exact
    "sdpa_batch_gqa_mask": ("sdpa", 3, 6, 2, 5, 9, 16, False, "batch", "mask"),
    "flash_heads_gqa_alibi": ("flash", 3, 4, 2, 7, 9, 24, True, "heads", "alibi"),
    "flash_batch_alibi": ("flash", 5, 3, 3, 9, 7, 16, True, "batch", "alibi_bh"),
    "varlen_heads_gqa": ("varlen", 3, 4, 2, 5, 7, 16, True, "heads", "varlen"),
}
# GQA with 6 query and 3 key/value heads: 2 shards split the 3 kv heads unevenly.
BAD_GQA = ("flash", 2, 6, 3, 5, 5, 16, False, "heads", None)
MODULE = dict(batch=3, seq=7, dim=64, heads=4)  # head dim 16, genfast's smallest
# Decode from a KV cache sharded by heads (flash_attn_with_kvcache, no gradients).
DECODE = dict(batch=3, heads=4, kv_heads=2, cache=11, head_dim=16, new=2, seqlens=(3, 6, 9))


def _head_axis(api: str) -> int:
    return 2 if api == "flash" else 1  # sdpa (B, H, S, D); flash (B, S, H, D); varlen (T, H, D)


def _qkv_shapes(case):
    api, B, H, Hk, Sq, Sk, D = case[:7]
    if api == "sdpa":
        return (B, H, Sq, D), (B, Hk, Sk, D)
    if api == "varlen":  # B sequences of lengths Sq - b (and Sk - b) packed
        return (sum(Sq - b for b in range(B)), H, D), (sum(Sk - b for b in range(B)), Hk, D)
    return (B, Sq, H, D), (B, Sk, Hk, D)


def _make_extra(case):
    api, B, H, Hk, Sq, Sk, D, causal, sharding, extra = case
    if extra == "mask":
        return torch.randn(B if sharding == "batch" else 1, 1, Sq, Sk)  # float32 additive, any query dtype
    if extra == "alibi":
        return torch.rand(H)
    if extra == "alibi_bh":
        return torch.rand(B, H)
    if extra == "varlen":
        lengths = [(Sq - b, Sk - b) for b in range(B)]
        return torch.tensor([[0, 0]] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32).T.contiguous()
    return None


def _attend(case, q, k, v, extra, backend=None):
    import genfast

    api, B, H, Hk, Sq, Sk, D, causal, _, kind = case
    if api == "sdpa":
        return genfast.scaled_dot_product_attention(q, k, v, attn_mask=extra, is_causal=causal, enable_gqa=H != Hk,
                                                    backend=backend)
    if api == "varlen":
        return genfast.flash_attn_varlen_func(q, k, v, extra[0], extra[1], Sq, Sk, causal=causal, backend=backend)
    return genfast.flash_attn_func(q, k, v, causal=causal, alibi_slopes=extra, backend=backend)


class TinyAttention(torch.nn.Module):
    """Self-attention with separate q/k/v projections (column-parallel under tensor
    parallelism: each rank holds whole heads) and an output projection (row-parallel)."""

    def __init__(self, dim, heads, backend=None):
        super().__init__()
        self.heads, self.backend = heads, backend
        self.q_proj, self.k_proj, self.v_proj = (torch.nn.Linear(dim, dim) for _ in range(3))
        self.out_proj = torch.nn.Linear(dim, dim)

    def forward(self, x):
        import genfast

        B, S, _ = x.shape
        # -1 heads: under tensor parallelism the local projections hold heads / world heads.
        q, k, v = (p(x).view(B, S, -1, self.out_proj.in_features // self.heads).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        out = genfast.scaled_dot_product_attention(q, k, v, is_causal=True, backend=self.backend)
        return self.out_proj(out.transpose(1, 2).reshape(B, S, -1))


# ----------------------------------------------------------------------------- a rank


def _full(t):
    """A DTensor's global value as a plain tensor (full_tensor() gives a lazily waited one)."""
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def _walk(obj, path=()):
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from _walk(value, path + (key,))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from _walk(value, path + (i,))
    else:
        yield path, obj


def _rank(rank: int, world: int, port: int, workdir: Path) -> None:
    # The strategies register at genfast's import when DTensor is already imported (rank 1),
    # else right after DTensor's first import (rank 0); importing genfast never imports DTensor.
    if rank == 1:
        importlib.import_module("torch.distributed.tensor")
    import genfast.ops.attention_dtensor as attention_dtensor

    registration = {"dtensor_imported": "torch.distributed.tensor" in sys.modules,
                    "registered_at_genfast_import": attention_dtensor._registered}
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.experimental import implicit_replication
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    import genfast
    from _attention_counts import count_attention_dispatches  # this folder: ranks run the file as a script
    from genfast.ops import attention

    timeout = datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S)
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timeout)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timeout)
    mesh = DeviceMesh("cpu", list(range(world)))
    registration["registered"] = attention_dtensor._registered
    setup = torch.load(workdir / "setup.pt")
    counts = count_attention_dispatches()
    decode_real = attention.DECODE.run
    counts["decode"] = 0

    def counted_decode(*args, **kwargs):
        counts["decode"] += 1
        return decode_real(*args, **kwargs)

    attention.DECODE.run = counted_decode
    # The q each forward kernel call received: the rank's local shard, in the ops' (B, H, S, D).
    kernel_q_shapes = []
    forward_counted = attention.FORWARD.run

    def recording_forward(*args, **kwargs):
        kernel_q_shapes.append(tuple(args[3][0].shape))
        return forward_counted(*args, **kwargs)

    attention.FORWARD.run = recording_forward
    result = {"registration": registration}

    for name, case in CASES.items():
        api, sharding, kind = case[0], case[8], case[9]
        placement = Shard(_head_axis(api) if sharding == "heads" else 0)
        q, k, v, dout = (distribute_tensor(t, mesh, [placement]) for t in setup[name]["inputs"])
        for t in (q, k, v):
            t.requires_grad_(True)
        extra = setup[name]["extra"]
        if kind == "mask":  # a batch-sized mask shards with the batch; a broadcast one is replicated
            extra = distribute_tensor(extra, mesh, [placement if extra.shape[0] > 1 else Replicate()])
        elif kind in ("alibi", "alibi_bh"):
            extra = distribute_tensor(extra, mesh, [Replicate()])
        before = dict(counts)
        # varlen: the API reads cu_seqlens on the host, so they stay plain tensors, which DTensor
        # takes as replicated under implicit_replication (the backward reuses them: inside too).
        with implicit_replication() if kind == "varlen" else contextlib.nullcontext():
            out = _attend(case, q, k, v, extra)
            out.backward(dout)
        result[name] = {
            "calls": {key: counts[key] - before[key] for key in counts},
            "placements": [str(t.placements) for t in (out, q.grad, k.grad, v.grad)],
            "local_q_shape": tuple(q.to_local().shape),
            "kernel_q_shape": kernel_q_shapes[-1],
            "out": _full(out),
            "grads": [_full(t.grad) for t in (q, k, v)],
        }

    q, k, v, _ = (distribute_tensor(t, mesh, [Shard(_head_axis(BAD_GQA[0]))]) for t in setup["bad_gqa"]["inputs"])
    before = dict(counts)
    try:
        _attend(BAD_GQA, q, k, v, None)
        result["bad_gqa"] = {"error": None}
    except Exception as e:  # the message is checked by the parent
        result["bad_gqa"] = {"error": f"{type(e).__name__}: {e}"}
    result["bad_gqa"]["calls"] = {key: counts[key] - before[key] for key in counts}

    model = TinyAttention(MODULE["dim"], MODULE["heads"])
    model.load_state_dict(setup["module"]["state"])
    # use_local_output=False keeps q/k/v DTensors (sharded by heads) all the way into genfast.
    plan = {p: ColwiseParallel(use_local_output=False) for p in ("q_proj", "k_proj", "v_proj")}
    plan["out_proj"] = RowwiseParallel()
    parallelize_module(model, mesh, plan)
    before = dict(counts)
    with torch.no_grad():
        out = model(setup["module"]["x"])
    result["module"] = {"calls": {key: counts[key] - before[key] for key in counts},
                        "out": _full(out),
                        "weight_placements": str(model.q_proj.weight.placements)}

    d = setup["decode"]
    q, k_cache, v_cache, k_new, v_new = (distribute_tensor(t.clone(), mesh, [Shard(2)]) for t in d["inputs"])
    before = dict(counts)
    # A plain cache_seqlens tensor (the API reads its values on the host) stands for a
    # replicated one: DTensor's implicit replication lets it meet the sharded caches.
    with implicit_replication():
        out = genfast.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=d["seqlens"],
                                             causal=True)
    result["decode"] = {"calls": {key: counts[key] - before[key] for key in counts},
                        "placements": [str(t.placements) for t in (out, k_cache)],
                        "out": _full(out), "k_cache": _full(k_cache), "v_cache": _full(v_cache)}

    # The same step with rotary (q and the new k rotated, in the fused op, on each rank's heads).
    q, k_cache, v_cache, k_new, v_new = (distribute_tensor(t.clone(), mesh, [Shard(2)]) for t in d["inputs"])
    before = dict(counts)
    with implicit_replication():
        out = genfast.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, rotary_cos=d["cos"],
                                             rotary_sin=d["sin"], cache_seqlens=d["seqlens"], causal=True)
    result["rotary"] = {"calls": {key: counts[key] - before[key] for key in counts},
                        "placements": [str(t.placements) for t in (out, k_cache)],
                        "out": _full(out), "k_cache": _full(k_cache), "v_cache": _full(v_cache)}

    # The plain step on a paged cache (a pool of pages, head-sharded, read through a replicated
    # block table) and on a cache picked by cache_batch_idx.
    for kind in ("paged", "batch_idx"):
        step = setup[kind]
        q, k_cache, v_cache, k_new, v_new = (distribute_tensor(t.clone(), mesh, [Shard(2)]) for t in step["inputs"])
        before = dict(counts)
        with implicit_replication():
            out = genfast.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=d["seqlens"],
                                                 causal=True, **step["index"])
        result[kind] = {"calls": {key: counts[key] - before[key] for key in counts},
                        "placements": [str(t.placements) for t in (out, k_cache)],
                        "out": _full(out), "k_cache": _full(k_cache), "v_cache": _full(v_cache)}

    leaked = [path for path, t in _walk(result) if isinstance(t, torch.Tensor) and type(t) is not torch.Tensor]
    assert not leaked, f"tensor subclasses left in the results: {leaked}"
    torch.save(result, workdir / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


# ----------------------------------------------------------------------------- the test


def _launch_ranks(workdir: Path):
    """Starts the ranks against a store this process hosts (port 0: the OS picks a free one)."""
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(store.port), GENFAST_STRICT="1",
               OMP_NUM_THREADS="1")
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    processes = []
    for rank in range(WORLD):
        with open(workdir / f"rank{rank}.log", "w") as log:
            processes.append(subprocess.Popen(
                [sys.executable, __file__, str(rank), str(WORLD), str(store.port), str(workdir)],
                env=env, stdout=log, stderr=subprocess.STDOUT))
    return store, processes


def _wait(processes, workdir: Path, deadline: float) -> None:
    from _ranks import wait_for_ranks  # this folder (also on the path of the test modules)

    wait_for_ranks(processes, workdir, deadline)


def _references(case, inputs, extra):
    """(float64 reference, float32 reference) of out and the q/k/v gradients, in one process."""
    runs = []
    for dtype in (torch.float64, torch.float32):
        q, k, v, dout = (t.to(dtype) for t in inputs)
        for t in (q, k, v):
            t.requires_grad_(True)
        out = _attend(case, q, k, v, extra, backend="reference")
        out.backward(dout)
        runs.append((out.detach(), [q.grad, k.grad, v.grad]))
    return runs


def _decode_reference(inputs, seqlens, dtype, rotary=None, index=None):
    """Decode in one process with the reference backend; returns (out, k_cache, v_cache).
    ``rotary``: (cos, sin) tables; ``index``: block_table or cache_batch_idx keyword."""
    import genfast

    q, k_cache, v_cache, k_new, v_new = (t.to(dtype).clone() for t in inputs)
    cos, sin = (None, None) if rotary is None else (t.to(dtype) for t in rotary)
    out = genfast.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, rotary_cos=cos, rotary_sin=sin,
                                         cache_seqlens=seqlens, causal=True, backend="reference", **(index or {}))
    return out, k_cache, v_cache


@pytest.mark.skipif(not torch.distributed.is_available(), reason="this torch build has no torch.distributed")
def test_dtensor_attention_matches_single_process(tmp_path, seed):
    from genfast.testing import error_vs_reference

    deadline = time.monotonic() + TEST_TIMEOUT_S
    setup = {}
    for name, case in {**CASES, "bad_gqa": BAD_GQA}.items():
        q_shape, kv_shape = _qkv_shapes(case)
        setup[name] = {"inputs": [torch.randn(q_shape), torch.randn(kv_shape), torch.randn(kv_shape),
                                  torch.randn(q_shape)], "extra": _make_extra(case)}
    module = TinyAttention(MODULE["dim"], MODULE["heads"])
    setup["module"] = {"state": module.state_dict(), "x": torch.randn(MODULE["batch"], MODULE["seq"], MODULE["dim"])}
    d = DECODE
    setup["decode"] = {"inputs": [torch.randn(d["batch"], 1, d["heads"], d["head_dim"]),
                                  torch.randn(d["batch"], d["cache"], d["kv_heads"], d["head_dim"]),
                                  torch.randn(d["batch"], d["cache"], d["kv_heads"], d["head_dim"]),
                                  torch.randn(d["batch"], d["new"], d["kv_heads"], d["head_dim"]),
                                  torch.randn(d["batch"], d["new"], d["kv_heads"], d["head_dim"])],
                       "seqlens": torch.tensor(d["seqlens"], dtype=torch.int32)}
    angle = torch.rand(d["cache"], d["head_dim"] // 4) * 2 * math.pi  # rotary on half the head dim
    setup["decode"]["cos"], setup["decode"]["sin"] = angle.cos(), angle.sin()
    q, k_cache, v_cache, k_new, v_new = setup["decode"]["inputs"]
    page, table = 16, torch.tensor([[2], [0], [4]], dtype=torch.int32)  # rows' pages out of order in a pool of 5
    pools = [torch.randn(5, page, d["kv_heads"], d["head_dim"]) for _ in range(2)]
    for pool, cache in zip(pools, (k_cache, v_cache)):
        pool[table[:, 0].long(), :d["cache"]] = cache
    setup["paged"] = {"inputs": [q, *pools, k_new, v_new], "index": {"block_table": table}}
    rows = torch.tensor([2, 0, 3], dtype=torch.int32)  # batch row b uses cache row rows[b] of 4
    caches = [torch.randn(4, d["cache"], d["kv_heads"], d["head_dim"]) for _ in range(2)]
    for big, cache in zip(caches, (k_cache, v_cache)):
        big[rows.long()] = cache
    setup["batch_idx"] = {"inputs": [q, *caches, k_new, v_new], "index": {"cache_batch_idx": rows}}
    torch.save(setup, tmp_path / "setup.pt")
    store, processes = _launch_ranks(tmp_path)
    try:
        refs = {name: _references(case, setup[name]["inputs"], setup[name]["extra"]) for name, case in CASES.items()}
        module_refs = []
        for dtype in (torch.float64, torch.float32):
            reference_module = TinyAttention(MODULE["dim"], MODULE["heads"], backend="reference").to(dtype)
            reference_module.load_state_dict(setup["module"]["state"])
            with torch.no_grad():
                module_refs.append(reference_module(setup["module"]["x"].to(dtype)))
        decode_refs = [_decode_reference(setup["decode"]["inputs"], setup["decode"]["seqlens"], dtype)
                       for dtype in (torch.float64, torch.float32)]
        rotary_refs = [_decode_reference(setup["decode"]["inputs"], setup["decode"]["seqlens"], dtype,
                                         (setup["decode"]["cos"], setup["decode"]["sin"]))
                       for dtype in (torch.float64, torch.float32)]
        index_refs = {kind: [_decode_reference(setup[kind]["inputs"], setup["decode"]["seqlens"], dtype,
                                               index=setup[kind]["index"]) for dtype in (torch.float64, torch.float32)]
                      for kind in ("paged", "batch_idx")}
        _wait(processes, tmp_path, deadline)
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
        del store
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    from torch.distributed.tensor import Shard

    assert results[0]["registration"] == {"dtensor_imported": False, "registered_at_genfast_import": False,
                                          "registered": True}, results[0]["registration"]
    assert results[1]["registration"] == {"dtensor_imported": True, "registered_at_genfast_import": True,
                                          "registered": True}, results[1]["registration"]
    for rank, result in enumerate(results):
        for name, case in CASES.items():
            label = f"rank {rank} {name} (seed {seed})"
            got = result[name]
            # genfast's own kernels ran on the local shard, once forward and once backward.
            assert got["calls"] == {"forward": 1, "backward": 1, "decode": 0}, f"{label}: calls {got['calls']}"
            axis = _head_axis(case[0]) if case[8] == "heads" else 0
            assert got["placements"] == [str((Shard(axis),))] * 4, f"{label}: placements {got['placements']}"
            full = _qkv_shapes(case)[0]
            local = got["local_q_shape"]
            assert local[axis] == (full[axis] + WORLD - 1 - rank) // WORLD, f"{label}: q's shard {local} of {full}"
            # The kernel got exactly the local shard (heads / batch split, nothing gathered).
            if case[0] == "sdpa":
                in_kernel = local
            elif case[0] == "flash":  # (B, S, H, D) -> (B, H, S, D)
                in_kernel = (local[0], local[2], local[1], local[3])
            else:  # varlen (T, H, D) -> (1, H, T, D)
                in_kernel = (1, local[1], local[0], local[2])
            assert got["kernel_q_shape"] == in_kernel, f"{label}: the kernel saw q {got['kernel_q_shape']}"
            (ref64, grads64), (ref32, grads32) = refs[name]
            error_vs_reference(got["out"], ref64, ref32, name=f"{label}: out")
            for which, g, g64, g32 in zip("qkv", got["grads"], grads64, grads32):
                error_vs_reference(g, g64, g32, name=f"{label}: d{which}")

        bad = result["bad_gqa"]
        assert bad["error"] is not None, f"rank {rank}: head-sharded GQA 6/3 heads on 2 ranks did not raise"
        # DTensor reports the strategy's ValueError as a RuntimeError with the message kept.
        assert "shard the heads into 2 parts" in bad["error"], bad["error"]
        assert "6 query heads and 3 key/value heads" in bad["error"], bad["error"]
        assert bad["calls"] == {"forward": 0, "backward": 0, "decode": 0}, bad["calls"]

        mod = result["module"]
        assert mod["calls"] == {"forward": 1, "backward": 0, "decode": 0}, f"rank {rank} module: {mod['calls']}"
        assert mod["weight_placements"] == str((Shard(0),)), mod["weight_placements"]
        error_vs_reference(mod["out"], module_refs[0], module_refs[1], name=f"rank {rank} TP module (seed {seed})")

        # plain, rotary, paged and cache_batch_idx decode steps
        for kind, step_refs in (("decode", decode_refs), ("rotary", rotary_refs), *index_refs.items()):
            dec = result[kind]
            assert dec["calls"] == {"forward": 0, "backward": 0, "decode": 1}, f"rank {rank} {kind}: {dec['calls']}"
            assert dec["placements"] == [str((Shard(2),))] * 2, dec["placements"]
            for got, ref64, ref32, what in zip((dec["out"], dec["k_cache"], dec["v_cache"]), *step_refs,
                                               ("out", "k_cache", "v_cache")):
                error_vs_reference(got, ref64, ref32, name=f"rank {rank} {kind} {what} (seed {seed})")

if __name__ == "__main__":
    faulthandler.dump_traceback_later(RANK_TIMEOUT_S, exit=True)  # a hung rank shows where, then exits
    _rank(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
