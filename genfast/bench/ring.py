"""Ring attention across processes vs one process on the whole sequence: rows of
``python -m genfast bench attention`` (``build_cases``), and on its own
``python -m genfast.bench.ring [--seq S] [--world 2 4] [--threads T] [--quick]``.

Each row: the time of one forward (fwd) or forward + backward (fwd+bwd) step of
``genfast.distributed.ring_attention`` on W processes (gloo on loopback, each rank holding
S / W tokens, ``threads`` CPU threads per rank), and of ``genfast.flash_attn_func`` on all S
tokens in one process with W x threads threads: the same machine, the same work. A ratio
below 1 means the ring is faster per token. Step times are medians over the steps, each
between two barriers (the slowest rank sets it). In the bench the ring's outputs and
gradients, gathered from the ranks, are checked against the one-process run first. CPU and
gloo only: on GPUs the same rows would need NCCL and one device per rank, which this runner
does not set up (the rows say so).
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


def _gathered(x, layout, group=None):
    from genfast.distributed import gather_sequence

    return gather_sequence(x.detach().contiguous(), 1, group=group, layout=layout)


def _rank_main(rank, world, port, threads, shape, cases, steps, results, with_outputs):
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

        outputs = None
        if with_outputs:  # the whole sequence's results, for the bench's check against one process
            if mode == "fwd":
                with torch.no_grad():
                    outputs = (_gathered(fn(q, k, v), layout),)
            else:
                leaves = [t.detach().requires_grad_() for t in (q, k, v)]
                out = fn(*leaves)
                outputs = tuple(_gathered(t, layout) for t in (out, *torch.autograd.grad(out, leaves, dout)))
        times = []
        for i in range(steps + 1):  # the first step warms up
            dist.barrier()
            t0 = time.perf_counter()
            _step(fn, q, k, v, dout, mode)
            dist.barrier()
            times.append((time.perf_counter() - t0) * 1e3)
        if rank == 0:  # numpy arrays: a tensor would travel as a shared-memory handle that dies with this process
            results.put((layout, causal, mode, times[1:], outputs and tuple(t.numpy() for t in outputs)))
    dist.destroy_process_group()


def single_process_step(shape, causal, mode, threads):
    """A thunk running ``flash_attn_func`` on the whole sequence in this process with
    ``threads`` threads (the same cores as the ring's ranks); it returns out (and dq, dk, dv)."""
    import genfast

    q, k, v, dout = _inputs(*shape)

    def thunk():
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            if mode == "fwd":
                with torch.no_grad():
                    return (genfast.flash_attn_func(q, k, v, causal=causal),)
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]
            out = genfast.flash_attn_func(*leaves, causal=causal)
            return (out.detach(), *torch.autograd.grad(out, leaves, dout))
        finally:
            torch.set_num_threads(previous)

    return thunk


def _single(shape, causal, mode, threads, steps):
    thunk = single_process_step(shape, causal, mode, threads)
    times = []
    for _ in range(steps + 1):  # the first step warms up
        t0 = time.perf_counter()
        thunk()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def run_ring(world, shape, cases, threads, steps, with_outputs: bool = False):
    """{(layout, causal, mode): (step times in ms, outputs)} of the ring on ``world`` processes;
    outputs (with ``with_outputs``): the whole sequence's out (and dq, dk, dv for fwd+bwd)."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=120))
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    processes = [ctx.Process(target=_rank_main,
                             args=(r, world, store.port, threads, shape, cases, steps, results, with_outputs))
                 for r in range(world)]
    for p in processes:
        p.start()
    out = {}
    try:
        for _ in cases:
            layout, causal, mode, times, outputs = results.get(timeout=600)
            out[layout, causal, mode] = (times, outputs and tuple(torch.from_numpy(a) for a in outputs))
    finally:
        for p in processes:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    return out


# ----------------------------------------------------------------------------- rows of `bench attention`

RING_CPU = dict(B=1, S=4096, H=8, Hk=8, D=64, worlds=(2, 4), modes=MODES, steps=5)
RING_CPU_QUICK = dict(RING_CPU, S=2048, worlds=(2,), modes=("fwd+bwd",), steps=3)
THREADS_PER_RANK = 1


def _ring_plan(quick: bool) -> tuple:
    plan = RING_CPU_QUICK if quick else RING_CPU
    # causal: the load-balanced layout, and in the full run also the contiguous one (uneven work)
    layouts = {False: ("contiguous",), True: ("zigzag",) if quick else ("contiguous", "zigzag")}
    cases = [(layout, causal, mode) for causal in (False, True) for layout in layouts[causal] for mode in plan["modes"]]
    return plan, cases


class _RingMeasurement:
    """One world size's ring runs, made once (one set of processes) for all of its rows."""

    def __init__(self, world, shape, cases, steps):
        self.args, self.result = (world, shape, cases, THREADS_PER_RANK, steps), None

    def get(self, layout, causal, mode):
        if self.result is None:
            self.result = run_ring(*self.args, with_outputs=True)
        return self.result[layout, causal, mode]


def build_cases(device, quick: bool = False):
    """Ring-attention rows for ``genfast.bench.attention``: ``ring_attention`` on W CPU processes
    (gloo on loopback, one thread each, each rank S / W tokens) vs ``flash_attn_func`` on the
    whole sequence in one process with W threads. The ring's time is the median step between
    two barriers (its own timer: the slowest rank sets it); its outputs, gathered from the
    ranks, are checked against the one-process run before the times count."""
    from .attention import NAME, attention_flops
    from .timing import BASELINE, GENFAST, Case, Provider, _summary

    device = torch.device(device)
    plan, cases = _ring_plan(quick)
    B, S, H, Hk, D = (plan[k] for k in ("B", "S", "H", "Hk", "D"))
    shape = (B, S, H, Hk, D)
    gpu_reason = ("the ring rows run CPU processes over gloo; on GPUs they need one device per rank and NCCL, "
                  "which this runner does not set up") if device.type != "cpu" else None
    for world in plan["worlds"]:
        measurement = _RingMeasurement(world, shape, cases, plan["steps"])
        for layout, causal, mode in cases:
            def ring_factory(_case_inputs, layout=layout, causal=causal, mode=mode, measurement=measurement):
                times, outputs = measurement.get(layout, causal, mode)

                def thunk():
                    return outputs
                thunk.stats = _summary(times)  # timed by the ranks themselves
                return thunk

            def single_factory(_case_inputs, causal=causal, mode=mode, world=world):
                return single_process_step(shape, causal, mode, world * THREADS_PER_RANK)

            providers = {"ring": Provider("ring", GENFAST, ring_factory, gpu_reason),
                         "1-proc": Provider("1-proc", BASELINE, single_factory, gpu_reason)}
            tokens = B * S * H * D
            yield Case(op=NAME, mode=mode, shape=(B, H, S, D), dtype=torch.float32,
                       act=f"ring{world}-{layout}" + ("-causal" if causal else ""), device=device,
                       bytes_moved=(4 if mode == "fwd" else 9) * tokens * 4, make_inputs=lambda i: None,
                       providers=providers, reference="1-proc", baselines=("1-proc",),
                       extra={"flops": attention_flops(B, H, S, S, D, causal, mode)})


def count_cases(device, quick: bool = False) -> int:
    plan, cases = _ring_plan(quick)
    return len(plan["worlds"]) * len(cases)


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
            r = statistics.median(ring[layout, causal, mode][0]) * 1e-3
            print(f"{world:>5} {layout:>10} {str(causal):>6} {mode:>8} {r * 1e3:>9.1f} {single * 1e3:>10.1f} "
                  f"{r / single:>11.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
