"""Ring attention across processes vs one process on the whole sequence
(``python -m genfast.bench.ring [--seq S] [--world 2 4] [--quick]``).

Each row: the time of one forward (fwd) or forward + backward (fwd+bwd) step of
``genfast.distributed.ring_attention`` on W processes (gloo on loopback, each rank holding
S / W tokens, ``threads`` CPU threads per rank), and of ``genfast.flash_attn_func`` on all S
tokens in one process with W x threads threads: the same machine, the same work. A ratio
below 1 means the ring is faster per token. Step times are medians over the steps, each
between two barriers (the slowest rank sets it). CPU and gloo only: on GPUs the same script
would need NCCL and one device per rank, which this runner does not set up.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time

import torch

MODES = ("fwd", "fwd+bwd")


def _inputs(B, S, H, Hk, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, S, H, D, generator=g), torch.randn(B, S, Hk, D, generator=g),
            torch.randn(B, S, Hk, D, generator=g), torch.randn(B, S, H, D, generator=g))


def _step(fn, q, k, v, dout, mode):
    if mode == "fwd":
        with torch.no_grad():
            fn(q, k, v)
    else:
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        torch.autograd.grad(fn(q, k, v), (q, k, v), dout)


def _rank_main(rank, world, port, threads, shape, cases, steps, results):
    import torch.distributed as dist

    from genfast.distributed import ring_attention, shard_sequence

    torch.set_num_threads(threads)
    timeout = datetime.timedelta(seconds=120)
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timeout)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timeout)
    B, S, H, Hk, D = shape
    full = _inputs(B, S, H, Hk, D)
    for layout, causal, mode in cases:
        q, k, v, dout = (shard_sequence(t, 1, rank, world, layout).contiguous() for t in full)

        def fn(q, k, v):
            return ring_attention(q, k, v, causal=causal, layout=layout, check_ranks=False)

        times = []
        for i in range(steps + 1):  # the first step warms up
            dist.barrier()
            t0 = time.perf_counter()
            _step(fn, q, k, v, dout, mode)
            dist.barrier()
            times.append(time.perf_counter() - t0)
        if rank == 0:
            results.put((layout, causal, mode, statistics.median(times[1:])))
    dist.destroy_process_group()


def _single(shape, causal, mode, threads, steps):
    import genfast

    B, S, H, Hk, D = shape
    q, k, v, dout = _inputs(B, S, H, Hk, D)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        times = []
        for _ in range(steps + 1):
            t0 = time.perf_counter()
            _step(lambda q, k, v: genfast.flash_attn_func(q, k, v, causal=causal), q, k, v, dout, mode)
            times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(previous)
    return statistics.median(times[1:])


def run_ring(world, shape, cases, threads, steps):
    """{(layout, causal, mode): seconds per step} of the ring on ``world`` processes."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=120))
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    processes = [ctx.Process(target=_rank_main, args=(r, world, store.port, threads, shape, cases, steps, results))
                 for r in range(world)]
    for p in processes:
        p.start()
    out = {}
    try:
        for _ in cases:
            layout, causal, mode, seconds = results.get(timeout=600)
            out[layout, causal, mode] = seconds
    finally:
        for p in processes:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m genfast.bench.ring", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq", type=int, default=None, help="whole sequence length (default 4096; quick 2048)")
    parser.add_argument("--world", type=int, nargs="+", default=[2], help="process counts (default: 2)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per rank (default 1)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per row (default 5; quick 3)")
    parser.add_argument("--quick", action="store_true", help="2048 tokens, 3 steps, fwd+bwd only")
    args = parser.parse_args(argv)
    seq = args.seq or (2048 if args.quick else 4096)
    steps = args.steps or (3 if args.quick else 5)
    modes = ("fwd+bwd",) if args.quick else MODES
    shape = (args.batch, seq, args.heads, args.kv_heads, args.head_dim)
    print(f"ring attention, CPU fp32, B={args.batch} S={seq} H={args.heads} Hk={args.kv_heads} D={args.head_dim}, "
          f"{args.threads} thread(s) per rank, median of {steps} steps")
    print(f"{'world':>5} {'layout':>10} {'causal':>6} {'mode':>8} {'ring ms':>9} {'1-proc ms':>10} {'ring/1-proc':>11}")
    for world in args.world:
        cases = [(layout, causal, mode) for causal in (False, True)
                 for layout in (("contiguous", "zigzag") if causal else ("contiguous",)) for mode in modes]
        ring = run_ring(world, shape, cases, args.threads, steps)
        for layout, causal, mode in cases:
            single = _single(shape, causal, mode, world * args.threads, steps)
            r = ring[layout, causal, mode]
            print(f"{world:>5} {layout:>10} {str(causal):>6} {mode:>8} {r * 1e3:>9.1f} {single * 1e3:>10.1f} "
                  f"{r / single:>11.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
