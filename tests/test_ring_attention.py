"""genfast.merge_attention_states and genfast.distributed.ring_attention.

The ring runs in 2 and 4 CPU processes over gloo (loopback; torch.multiprocessing spawn) on a
sequence that the ranks shard; the parent unshards their outputs and q/k/v gradients and
compares them with single-process attention on the whole sequence (float64 reference, the
float32 PyTorch ops as the precision yardstick): contiguous and zigzag layouts, causal and
not, GQA, packed sequences (cu_seqlens), subgroups, a group of one rank, the reference
backend's path, and ranks that disagree. One launch per world size runs every case
(each process pays the torch + genfast import once). Every wait is bounded: the store and the
gloo collectives time out, each rank dumps its stack and exits at its own deadline, and the
parent kills the ranks at its deadline.
"""
from __future__ import annotations

import datetime
import faulthandler
import math
import os
import time
import traceback
from pathlib import Path

import pytest
import torch

import genfast
from genfast.distributed import ring_attention, shard_sequence, unshard_sequence
from genfast.reference.attention import attention_dense
from genfast.testing import error_vs_reference

BATCH, HEADS, KV_HEADS, HEAD_DIM = 2, 4, 2, 16
LOCAL = {"contiguous": 7, "zigzag": 6}  # per-rank sequence length; zigzag's two chunks need it even
CASES = [(layout, causal) for layout in ("contiguous", "zigzag") for causal in (False, True)]
PAIR_LOCAL = 5
# Packed sequences: each sequence's length per rank (an empty one included); zigzag's even.
PACKED_LOCAL = {"contiguous": [3, 0, 5, 2], "zigzag": [4, 2, 6]}
PACKED_CASES = [("contiguous", True), ("zigzag", True), ("zigzag", False)]
COLLECTIVE_TIMEOUT_S = 60
RANK_TIMEOUT_S = 90   # a rank dumps its stack and exits after this long
LAUNCH_TIMEOUT_S = 120  # the parent kills the ranks after this long


def _inputs(seed: int, seq: int):
    """q, k, v and the output gradient of the whole sequence, identical in every process."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(BATCH, seq, HEADS, HEAD_DIM, generator=g)
    k = torch.randn(BATCH, seq, KV_HEADS, HEAD_DIM, generator=g)
    v = torch.randn(BATCH, seq, KV_HEADS, HEAD_DIM, generator=g)
    dout = torch.randn(BATCH, seq, HEADS, HEAD_DIM, generator=g)
    return q, k, v, dout


def _reference(q, k, v, dout, causal: bool, dtype: torch.dtype):
    """Dense attention on the whole sequence in ``dtype``: out, lse (B, H, S), dq, dk, dv."""
    qd, kd, vd = (t.to(dtype).transpose(1, 2).requires_grad_() for t in (q, k, v))
    out, lse, _ = attention_dense(qd, kd, vd, scale=1 / math.sqrt(HEAD_DIM), window_left=-1,
                                  window_right=0 if causal else -1)
    dq, dk, dv = torch.autograd.grad(out, (qd, kd, vd), dout.to(dtype).transpose(1, 2))
    return [out.transpose(1, 2).detach(), lse.detach()] + [g.transpose(1, 2) for g in (dq, dk, dv)]


def _blockwise_grads(q, k, v, dout, out, lse, causal: bool, blocks: int):
    """dq, dk, dv in fp32 summed over ``blocks`` equal key chunks, each chunk's share computed from
    the global out and lse, as the ring does: the same ops in the same low precision, so the
    baseline of the ring's gradients (a dense fp32 backward rounds fewer partial sums)."""
    B, S, H, D = q.shape
    G, scale = H // k.shape[2], 1 / math.sqrt(D)
    qt, dot, ot = (t.float().transpose(1, 2) for t in (q, dout, out))
    kt, vt = (t.float().transpose(1, 2).repeat_interleave(G, 1) for t in (k, v))
    delta = (dot * ot).sum(-1, keepdim=True)
    dq, dk, dv = torch.zeros_like(qt), torch.zeros_like(kt), torch.zeros_like(vt)
    rows = torch.arange(S)
    for j in range(blocks):
        a, b = j * S // blocks, (j + 1) * S // blocks
        s = qt @ kt[:, :, a:b].transpose(-1, -2) * scale
        if causal:
            s = s.masked_fill(torch.arange(a, b)[None, :] > rows[:, None], -math.inf)
        p = torch.exp(s - lse.float()[..., None])
        ds = p * (dot @ vt[:, :, a:b].transpose(-1, -2) - delta)
        dq += ds @ kt[:, :, a:b] * scale
        dk[:, :, a:b] += ds.transpose(-1, -2) @ qt * scale
        dv[:, :, a:b] += p.transpose(-1, -2) @ dot
    dk, dv = (t.view(B, -1, G, S, D).sum(2) for t in (dk, dv))
    return [t.transpose(1, 2) for t in (dq, dk, dv)]


def _global_cu(layout: str, world: int) -> torch.Tensor:
    lengths = torch.tensor([0] + [world * n for n in PACKED_LOCAL[layout]])
    return lengths.cumsum(0).to(torch.int32)


def _reference_packed(q, k, v, dout, cu, causal: bool, dtype: torch.dtype):
    """_reference per packed sequence: out (total, H, D), lse (H, total), dq, dk, dv."""
    parts = []
    for a, b in zip(cu.tolist(), cu.tolist()[1:]):
        parts.append(_reference(*(t[None, a:b] for t in (q, k, v, dout)), causal, dtype))
    return [torch.cat([p[0][0] for p in parts]), torch.cat([p[1][0] for p in parts], dim=1)] + [
        torch.cat([p[i][0] for p in parts]) for i in (2, 3, 4)]


def _run_packed(rank, world, seed, causal, layout, backend=None):
    """ring_attention on packed sequences (this rank's share of each): its results."""
    from genfast.distributed import local_cu_seqlens

    cu = _global_cu(layout, world)
    q, k, v, dout = (t[0] for t in _inputs(seed, int(cu[-1])))
    cu_local, max_local = local_cu_seqlens(cu, world, layout)

    def shard(x):
        return shard_sequence(x, 0, rank, world, layout, cu_seqlens=cu).detach().clone()

    ql, kl, vl = (shard(t).requires_grad_() for t in (q, k, v))
    out, lse = ring_attention(ql, kl, vl, causal=causal, layout=layout, cu_seqlens=cu_local, max_seqlen=max_local,
                              return_lse=True, backend=backend)
    out.backward(shard(dout))
    return {"out": out.detach(), "lse": lse, "dq": ql.grad, "dk": kl.grad, "dv": vl.grad}


def _run_ring(rank, world, seed, seq_local, causal, layout, group=None, group_rank=None, backend=None):
    """One ring_attention forward + backward on this rank's shard; returns its results."""
    group_rank = rank if group_rank is None else group_rank
    q, k, v, dout = _inputs(seed, world * seq_local)

    def shard(x):
        return shard_sequence(x, 1, group_rank, world, layout).detach().clone()

    ql, kl, vl = (shard(t).requires_grad_() for t in (q, k, v))
    out, lse = ring_attention(ql, kl, vl, causal=causal, layout=layout, group=group, return_lse=True,
                              backend=backend)
    out.backward(shard(dout))
    return {"out": out.detach(), "lse": lse, "dq": ql.grad, "dk": kl.grad, "dv": vl.grad}


def _rank_main(rank: int, world: int, port: int, workdir: str, seed: int) -> None:
    """A rank: every case, saved to workdir/rank{rank}.pt (or the traceback to rank{rank}.err)."""
    faulthandler.dump_traceback_later(RANK_TIMEOUT_S, exit=True)
    workdir = Path(workdir)
    try:
        import torch.distributed as dist

        from genfast.ops import attention

        torch.set_num_threads(1)
        timeout = datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S)
        store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timeout)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timeout)
        counts = {"forward": 0, "backward": 0}  # genfast's attention really runs each block
        for key, table in (("forward", attention.FORWARD), ("backward", attention.BACKWARD)):
            def run(*args, _real=table.run, _key=key, **kwargs):
                counts[_key] += 1
                return _real(*args, **kwargs)
            table.run = run
        results = {"backend": attention.selected_backend(torch.empty(1, 1, 1, HEAD_DIM))}
        for layout, causal in CASES:
            before = dict(counts)
            results[layout, causal] = _run_ring(rank, world, seed, LOCAL[layout], causal, layout)
            results[layout, causal]["calls"] = {k: counts[k] - before[k] for k in counts}

        for layout, causal in PACKED_CASES:
            before = dict(counts)
            results["packed", layout, causal] = _run_packed(rank, world, seed, causal, layout)
            results["packed", layout, causal]["calls"] = {k: counts[k] - before[k] for k in counts}

        # A group of one rank: no ring, the same as flash_attn_func on the local sequence.
        singles = [dist.new_group([r]) for r in range(world)]
        q, k, v = (torch.randn(BATCH, 5, h, HEAD_DIM, requires_grad=True) for h in (HEADS, KV_HEADS, KV_HEADS))
        ring = ring_attention(q, k, v, causal=True, group=singles[rank])
        grads = torch.autograd.grad(ring, (q, k, v), torch.ones_like(ring))
        plain = genfast.flash_attn_func(q, k, v, causal=True)
        plain_grads = torch.autograd.grad(plain, (q, k, v), torch.ones_like(plain))
        results["single"] = max((a - b).abs().max().item() for a, b in zip((ring,) + grads, (plain,) + plain_grads))

        if world == 4:  # two rings of two ranks each: peers' global ranks differ from their group ranks
            pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
            results["pair"] = _run_ring(rank, 2, seed + 1 + rank // 2, PAIR_LOCAL, True, "contiguous",
                                        group=pairs[rank // 2], group_rank=rank % 2)
        if world == 2:
            # The reference backend's own backward recomputes a block's softmax: the ring uses
            # its plain-PyTorch block backward from the global lse there instead.
            results["reference"] = _run_ring(rank, world, seed, LOCAL["zigzag"], True, "zigzag",
                                             backend="reference")
            results["reference", "packed"] = _run_packed(rank, world, seed, True, "zigzag", backend="reference")
        if world == 2:  # ranks that disagree on the shapes all raise, none waits forever
            local = 4 + rank
            q, k, v = (torch.randn(1, local, 2, HEAD_DIM) for _ in range(3))
            try:
                ring_attention(q, k, v)
                results["mismatch"] = None
            except ValueError as exc:
                results["mismatch"] = str(exc)
        torch.save(results, workdir / f"rank{rank}.pt")
        dist.destroy_process_group()
    except BaseException:
        (workdir / f"rank{rank}.err").write_text(traceback.format_exc())
        raise


def _launch(world: int, workdir: Path, seed: int) -> list:
    """Runs ``world`` ranks to completion (bounded) and returns their results."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    saved = {k: os.environ.get(k) for k in ("GLOO_SOCKET_IFNAME", "OMP_NUM_THREADS")}
    os.environ.update(GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")  # spawned ranks inherit these
    ctx = mp.get_context("spawn")
    processes = [ctx.Process(target=_rank_main, args=(r, world, store.port, str(workdir), seed), daemon=True)
                 for r in range(world)]
    try:
        for p in processes:
            p.start()
        deadline = time.monotonic() + LAUNCH_TIMEOUT_S
        while any(p.is_alive() for p in processes) and time.monotonic() < deadline:
            if any(p.exitcode not in (None, 0) for p in processes):
                break
            time.sleep(0.1)
    finally:
        for p in processes:
            if p.is_alive():
                p.kill()
            p.join(timeout=30)
        for k, value in saved.items():
            if value is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = value
        del store
    errors = "\n".join(f"--- rank {r} (exit {p.exitcode}) ---\n"
                       + ((workdir / f"rank{r}.err").read_text() if (workdir / f"rank{r}.err").exists() else "")
                       for r, p in enumerate(processes))
    assert all(p.exitcode == 0 for p in processes), f"a rank failed or timed out (seed {seed}):\n{errors}"
    return [torch.load(workdir / f"rank{r}.pt") for r in range(world)]


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"world{w}")
def launched(request, tmp_path_factory):
    if not torch.distributed.is_available():
        pytest.skip("this torch build has no torch.distributed")
    from genfast.testing import fresh_seed

    seed = fresh_seed()
    world = request.param
    return world, seed, _launch(world, tmp_path_factory.mktemp(f"ring{world}"), seed)


def _compare(results, world, seed, seq_local, causal, layout, label):
    q, k, v, dout = _inputs(seed, world * seq_local)
    ref64 = _reference(q, k, v, dout, causal, torch.float64)
    ref32 = _reference(q, k, v, dout, causal, torch.float32)
    # Gradients: the ring sums one share per key chunk (2 per rank in the zigzag layout); its
    # low-precision baseline is whichever fp32 computation, dense or chunk-wise, errs more.
    chunks = world * (2 if layout == "zigzag" else 1)
    baselines = [[t] for t in ref32]
    for i, blockwise in enumerate(_blockwise_grads(q, k, v, dout, ref32[0], ref32[1], causal, chunks), start=2):
        baselines[i].append(blockwise)
    for i, name in enumerate(("out", "lse", "dq", "dk", "dv")):
        dim = 2 if name == "lse" else 1
        got = unshard_sequence([r[name] for r in results], dim, layout)
        error_vs_reference(got, ref64[i], baselines[i], name=f"{label}: {name} (seed {seed})")


@pytest.mark.parametrize("layout,causal", CASES, ids=[f"{l}-{'causal' if c else 'full'}" for l, c in CASES])
def test_ring_matches_single_process(launched, layout, causal):
    world, seed, results = launched
    per_rank = [r[layout, causal] for r in results]
    _compare(per_rank, world, seed, LOCAL[layout], causal, layout, f"world {world} {layout} causal={causal}")
    for rank, r in enumerate(results):
        assert r["backend"] == "cpu", f"rank {rank} ran attention on {r['backend']!r}"
        # Causal contiguous: rank r's queries see blocks 0..r only (later ones are skipped).
        blocks = rank + 1 if causal and layout == "contiguous" else world
        assert r[layout, causal]["calls"] == {"forward": blocks, "backward": blocks}, f"rank {rank}"


@pytest.mark.parametrize("layout,causal", PACKED_CASES,
                         ids=[f"{l}-{'causal' if c else 'full'}" for l, c in PACKED_CASES])
def test_ring_packed_sequences_match_single_process(launched, layout, causal):
    world, seed, results = launched
    cu = _global_cu(layout, world)
    q, k, v, dout = (t[0] for t in _inputs(seed, int(cu[-1])))
    ref64 = _reference_packed(q, k, v, dout, cu, causal, torch.float64)
    ref32 = _reference_packed(q, k, v, dout, cu, causal, torch.float32)
    for i, name in enumerate(("out", "lse", "dq", "dk", "dv")):
        got = unshard_sequence([r["packed", layout, causal][name] for r in results], 1 if name == "lse" else 0,
                               layout, cu_seqlens=cu)
        error_vs_reference(got, ref64[i], ref32[i], name=f"world {world} packed {layout} causal={causal}: {name} "
                                                          f"(seed {seed})")
    for rank, r in enumerate(results):
        blocks = rank + 1 if causal and layout == "contiguous" else world
        assert r["packed", layout, causal]["calls"] == {"forward": blocks, "backward": blocks}, f"rank {rank}"


def test_group_of_one_rank_is_plain_attention(launched):
    _, seed, results = launched
    for rank, r in enumerate(results):
        assert r["single"] <= 1e-6, f"rank {rank}: group of size 1 differs from flash_attn_func by {r['single']}"


def test_subgroups_and_disagreeing_ranks(launched):
    world, seed, results = launched
    if world == 4:
        for pair in (0, 1):
            _compare([results[2 * pair]["pair"], results[2 * pair + 1]["pair"]], 2, seed + 1 + pair, PAIR_LOCAL,
                     True, "contiguous", f"subgroup {pair}")
    else:
        for rank, r in enumerate(results):
            for key, fast in (("reference", r["zigzag", True]), (("reference", "packed"), r["packed", "zigzag", True])):
                for name in ("out", "lse", "dq", "dk", "dv"):
                    torch.testing.assert_close(r[key][name], fast[name], rtol=1e-5, atol=1e-5,
                                               msg=lambda m, key=key, name=name: f"rank {rank} {key} {name}: {m}")
            assert r["mismatch"] is not None and "ranks' calls differ" in r["mismatch"], f"rank {rank}: {r['mismatch']}"


# ----------------------------------------------------------------------------- single process


def test_shard_unshard_round_trip(seed):
    x = torch.randn(3, 24, 5)
    for layout, world in (("contiguous", 3), ("zigzag", 3), ("zigzag", 4)):
        shards = [shard_sequence(x, 1, r, world, layout) for r in range(world)]
        assert torch.equal(unshard_sequence(shards, 1, layout), x)
    # zigzag: rank 0 of 2 holds chunks 0 and 3 of 4
    assert torch.equal(shard_sequence(x, 1, 0, 2, "zigzag"), torch.cat([x[:, :6], x[:, 18:]], 1))


def test_bad_input_raises_clear_errors():
    q = torch.randn(2, 6, 4, 16)
    kv = torch.randn(2, 6, 2, 16)
    with pytest.raises(ValueError, match="local lengths differ"):
        ring_attention(q, torch.randn(2, 5, 2, 16), torch.randn(2, 5, 2, 16))
    with pytest.raises(ValueError, match="batch sizes differ"):
        ring_attention(q, torch.randn(3, 6, 2, 16), torch.randn(3, 6, 2, 16))
    with pytest.raises(ValueError, match="multiple of the number of key/value"):
        ring_attention(q, torch.randn(2, 6, 3, 16), torch.randn(2, 6, 3, 16))
    with pytest.raises(ValueError, match="local sequence length must be even"):
        ring_attention(q[:, :5], kv[:, :5], kv[:, :5], layout="zigzag", causal=True)
    with pytest.raises(ValueError, match="layout must be one of"):
        ring_attention(q, kv, kv, layout="striped")
    with pytest.raises(TypeError, match="causal must be a bool"):
        ring_attention(q, kv, kv, causal=1)
    with pytest.raises(ValueError, match="not divisible into 4 equal chunks"):
        shard_sequence(torch.randn(1, 10), 1, 0, 2, "zigzag")
    with pytest.raises(ValueError, match="rank must be"):
        shard_sequence(torch.randn(1, 10), 1, 2, 2)
    if not torch.distributed.is_initialized():
        with pytest.raises(RuntimeError, match="not initialized"):
            ring_attention(q, kv, kv)


# ----------------------------------------------------------------------------- merge op


def _attention_part(q, k, v):
    """Dense attention of q over k/v in flash layout, float64: out (B, S, H, D), lse (B, H, S)."""
    out, lse, _ = attention_dense(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=0.25)
    return out.transpose(1, 2), lse


def test_merge_of_two_key_halves_is_attention_over_all_keys(seed):
    q = torch.randn(2, 7, 3, 16, dtype=torch.float64)
    k, v = torch.randn(2, 11, 3, 16, dtype=torch.float64), torch.randn(2, 11, 3, 16, dtype=torch.float64)
    out64, lse64 = _attention_part(q, k, v)
    parts = [_attention_part(q, k[:, s], v[:, s]) for s in (slice(0, 4), slice(4, None))]
    for dtype in (torch.float32, torch.bfloat16):
        # the yardstick: the same merge formula written directly in PyTorch in dtype
        (oa, la), (ob, lb) = [(o.to(dtype), l.float()) for o, l in parts]
        out, lse = genfast.merge_attention_states(oa, la, ob, lb)
        assert out.dtype == dtype and lse.dtype == torch.float32
        m = torch.logaddexp(la, lb)
        lowp = (torch.exp(la - m).transpose(1, 2)[..., None].to(dtype) * oa
                + torch.exp(lb - m).transpose(1, 2)[..., None].to(dtype) * ob)
        error_vs_reference(out, out64, lowp, name=f"merged out {dtype} (seed {seed})")
        error_vs_reference(lse, lse64, m, name=f"merged lse {dtype} (seed {seed})")


def test_merge_rows_with_no_keys_take_the_other_part():
    out_a, out_b = torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8)
    lse_a, lse_b = torch.randn(1, 2, 4), torch.randn(1, 2, 4)
    lse_a[0, 0, 1] = -math.inf                   # a empty: b
    lse_b[0, 1, 2] = -math.inf                   # b empty: a
    lse_a[0, 1, 3] = lse_b[0, 1, 3] = -math.inf  # both empty: 0, -inf
    out_a.requires_grad_()
    out, lse = genfast.merge_attention_states(out_a, lse_a, out_b, lse_b)
    assert torch.equal(out[0, 1, 0], out_b[0, 1, 0]) and lse[0, 0, 1] == lse_b[0, 0, 1]
    torch.testing.assert_close(out[0, 2, 1], out_a[0, 2, 1].detach(), rtol=0, atol=1e-6)
    assert lse[0, 1, 2] == lse_a[0, 1, 2]
    assert torch.equal(out[0, 3, 1], torch.zeros(8)) and lse[0, 1, 3] == -math.inf
    out.sum().backward()
    assert not torch.isnan(out).any() and not torch.isnan(out_a.grad).any()
    assert torch.equal(out_a.grad[0, 1, 0], torch.zeros(8))  # the empty part gets no gradient


def test_merge_gradcheck(seed):
    def inputs():
        return (torch.randn(2, 3, 2, 4, dtype=torch.float64, requires_grad=True),
                torch.randn(2, 2, 3, dtype=torch.float64, requires_grad=True),
                torch.randn(2, 3, 2, 4, dtype=torch.float64, requires_grad=True),
                torch.randn(2, 2, 3, dtype=torch.float64, requires_grad=True))
    assert torch.autograd.gradcheck(genfast.merge_attention_states, inputs())
    # rows where one part is empty: gradients still exact (-inf is not perturbed by gradcheck:
    # only the finite entries are inputs here)
    oa, la, ob, lb = inputs()
    mask = torch.zeros(2, 2, 3, dtype=torch.bool)
    mask[0, 1, 2] = True
    assert torch.autograd.gradcheck(
        lambda oa, la, ob, lb: genfast.merge_attention_states(oa, la.masked_fill(mask, -math.inf), ob, lb),
        (oa, la, ob, lb))


def test_merge_bad_input():
    o, l = torch.randn(2, 5, 3, 8), torch.randn(2, 3, 5)
    with pytest.raises(ValueError, match="lse_b must have shape"):
        genfast.merge_attention_states(o, l, o, l.transpose(1, 2))
    with pytest.raises(ValueError, match="out_b has shape"):
        genfast.merge_attention_states(o, l, o[:, :4], l)
    with pytest.raises(TypeError, match="out_a must be a torch.Tensor"):
        genfast.merge_attention_states(None, l, o, l)
    with pytest.raises(TypeError, match="out_b has dtype"):
        genfast.merge_attention_states(o, l, o.double(), l)
