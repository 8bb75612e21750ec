"""genfast under torch.distributed: DDP and FSDP2 (``fully_shard``) training of
``genfast.models.GPT`` on 2 CPU processes (gloo, loopback) ends with the same parameters as
single-process training on the same global batch, and genfast's attention really ran in
every rank.

One launch of 2 processes runs both wrappers (each process pays the torch + genfast import
once). The parent hosts the rendezvous store on a port the OS picks (bound to port 0, so no
race for a free port) and runs the single-process references while the ranks work. Every
wait is bounded: the parent kills the ranks at its deadline, each rank dumps its stack and
exits at its own, and gloo collectives time out, so a dead rank never hangs the test.

This file is also the rank's program: ``python test_distributed.py RANK WORLD PORT WORKDIR``.
"""
import datetime
import faulthandler
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

WORLD = 2
STEPS = 3
PER_RANK = 2  # sequences per rank per step; the global batch is WORLD * PER_RANK
SEQ = 13
# No biases: the key projection's bias gets a gradient of exactly 0 in exact arithmetic (softmax
# ignores a constant added to every key's score), so its float32 gradient is rounding noise that
# AdamW scales up to updates of random sign, different in every run and in neither reference.
CONFIG = dict(vocab_size=67, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=False)
RANK_TIMEOUT_S = 150    # a rank exits (with its stack dumped) after this long
COLLECTIVE_TIMEOUT_S = 90
TEST_TIMEOUT_S = 180    # the parent kills both ranks after this long


# AdamW is what people train with; SGD also catches a gradient off by a constant factor
# (e.g. summed instead of averaged over ranks), which Adam's normalisation would hide.
ADAMW_LR = 3e-3
OPTIMIZERS = {
    "adamw": lambda params: torch.optim.AdamW(params, lr=ADAMW_LR, weight_decay=0.1),
    "sgd": lambda params: torch.optim.SGD(params, lr=0.5, momentum=0.9),
}
# Rounding floors of the parameter comparison (None: error_vs_reference's own). AdamW divides
# each gradient element by its own running magnitude, so where a gradient is small and its
# float32 value rests on cancellation, two float32 runs (one process or two) differ by a few
# 1e-6 after these steps (measured up to 8.1e-6 with seed 3319501808, past the default floor;
# 4e-3 of the learning rate, 1.2e-5, allows for it), while a wrong batch split or a gradient
# 0.1% off in a rank moves parameters by 3e-5 to 2e-2.
FLOORS = {"adamw": 4e-3 * ADAMW_LR, "sgd": None}
WRAPPERS = ("ddp", "fsdp2")


def batch(setup, step, rank=None):
    """The step's global batch, or rank ``rank``'s contiguous slice of it."""
    idx, targets = setup["idx"][step], setup["targets"][step]
    if rank is None:
        return idx, targets
    rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    return idx[rows], targets[rows]


# ----------------------------------------------------------------------------- a rank


def _train_rank(rank: int, world: int, port: int, workdir: Path) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    from _attention_counts import count_attention_dispatches  # this folder: ranks run the file as a script
    from genfast.models import GPT, GPTConfig
    from genfast.ops.attention import selected_backend

    timeout = datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S)
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timeout)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timeout)
    setup = torch.load(workdir / "setup.pt")
    counts = count_attention_dispatches()
    result = {"backend": selected_backend(torch.empty(1, 1, 1, 16))}
    for wrapper, optimizer_name in ((w, o) for w in WRAPPERS for o in OPTIMIZERS):
        model = GPT(GPTConfig(**CONFIG))
        model.load_state_dict(setup["state"])
        if wrapper == "ddp":
            wrapped = DistributedDataParallel(model)
        else:
            mesh = init_device_mesh("cpu", (world,))
            for block in model.h:
                fully_shard(block, mesh=mesh)
            wrapped = fully_shard(model, mesh=mesh)
        optimizer = OPTIMIZERS[optimizer_name](wrapped.parameters())
        before = dict(counts)
        for step in range(STEPS):
            idx, targets = batch(setup, step, rank)
            _, loss = wrapped(idx, targets)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        params = {}
        for name, p in model.named_parameters():  # FSDP2: DTensor shards, gathered on every rank
            params[name] = (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
        result[wrapper, optimizer_name] = {"params": params, "calls": {k: counts[k] - before[k] for k in counts}}
        dist.barrier()
    torch.save(result, workdir / f"rank{rank}.pt")
    dist.destroy_process_group()


# ----------------------------------------------------------------------------- the test


def _single_process(setup, optimizer_name, dtype, backend):
    """The same training in one process on the global batch (no torch.distributed)."""
    from genfast.models import GPT, GPTConfig

    model = GPT(GPTConfig(**CONFIG), backend=backend)
    model.load_state_dict(setup["state"])
    model.to(dtype)
    optimizer = OPTIMIZERS[optimizer_name](model.parameters())
    for step in range(STEPS):
        idx, targets = batch(setup, step)
        _, loss = model(idx, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {name: p.detach() for name, p in model.named_parameters()}


def _launch_ranks(workdir: Path):
    """Starts the ranks against a store this process hosts; returns (store, processes)."""
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(store.port), GENFAST_STRICT="1",
               OMP_NUM_THREADS="1")
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # gloo's own connections on loopback too
    processes = []
    for rank in range(WORLD):
        log = open(workdir / f"rank{rank}.log", "w")
        processes.append(subprocess.Popen(
            [sys.executable, __file__, str(rank), str(WORLD), str(store.port), str(workdir)],
            env=env, stdout=log, stderr=subprocess.STDOUT))
        log.close()
    return store, processes


def _wait(processes, workdir: Path, deadline: float) -> None:
    from _ranks import wait_for_ranks  # this folder (also on the path of the test modules)

    wait_for_ranks(processes, workdir, deadline)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="this torch build has no torch.distributed")
def test_ddp_and_fsdp2_training_match_single_process(tmp_path, seed):
    from genfast.models import GPT, GPTConfig
    from genfast.testing import error_vs_reference

    deadline = time.monotonic() + TEST_TIMEOUT_S
    model = GPT(GPTConfig(**CONFIG))
    global_batch = WORLD * PER_RANK
    tokens = torch.randint(0, CONFIG["vocab_size"], (STEPS, global_batch, SEQ + 1))
    setup = {"state": model.state_dict(), "idx": tokens[..., :-1].clone(), "targets": tokens[..., 1:].clone()}
    torch.save(setup, tmp_path / "setup.pt")
    store, processes = _launch_ranks(tmp_path)
    try:
        # While the ranks run: the float64 specification, and the same training in one process
        # in float32 on genfast's kernels, whose rounding error the ranks' must not exceed much.
        ref64 = {o: _single_process(setup, o, torch.float64, "reference") for o in OPTIMIZERS}
        single32 = {o: _single_process(setup, o, torch.float32, None) for o in OPTIMIZERS}
        _wait(processes, tmp_path, deadline)
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
        del store
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    runs = [(w, o) for w in WRAPPERS for o in OPTIMIZERS]
    per_rank_forwards = STEPS * CONFIG["n_layer"]
    for rank, result in enumerate(results):
        assert result["backend"] == "cpu", f"rank {rank} would run attention on {result['backend']!r}"
        for run in runs:
            assert result[run]["calls"] == {"forward": per_rank_forwards, "backward": per_rank_forwards}, (
                f"rank {rank} {run}: genfast attention calls {result[run]['calls']}")
    for wrapper, optimizer_name in runs:
        trained = results[0][wrapper, optimizer_name]["params"]
        expected64, single = ref64[optimizer_name], single32[optimizer_name]
        assert trained.keys() == expected64.keys()
        for name, param in trained.items():
            label = f"{wrapper} + {optimizer_name}: {name} (seed {seed})"
            assert not torch.equal(param, setup["state"][name]), f"{label}: not trained"
            error_vs_reference(param, expected64[name], single[name], name=label, floor=FLOORS[optimizer_name])
        # DDP keeps the replicas identical: every rank applies the same averaged gradients.
        if wrapper == "ddp":
            for name, param in results[1][wrapper, optimizer_name]["params"].items():
                assert torch.equal(param, trained[name]), f"ddp + {optimizer_name}: {name} differs between ranks"


if __name__ == "__main__":
    faulthandler.dump_traceback_later(RANK_TIMEOUT_S, exit=True)  # a hung rank shows where, then exits
    _train_rank(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
