"""The main job, `python -m genfast bench`, runs end to end and writes its reports."""
import json
import subprocess
import sys


def test_bench_quick_runs_and_writes_reports(tmp_path):
    cmd = [sys.executable, "-m", "genfast", "bench", "bias_act", "--quick", "--no-compile", "--out", str(tmp_path)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FAIL" not in result.stdout
    (json_path,) = tmp_path.glob("bench_*.json")
    report = json.loads(json_path.read_text())
    providers = {row["provider"] for row in report["rows"]}
    assert {"cpu", "eager"} <= providers
    assert all(row["status"] == "ok" for row in report["rows"] if row["provider"] == "cpu")
    meta = report["metadata"]
    assert meta["copy_gbps"] > 0 and meta["device"] and meta["torch"] and "git_sha" in meta and meta["date_utc"]
    assert list(tmp_path.glob("bench_*.csv")) and list(tmp_path.glob("bench_*.png"))


def test_bench_rejects_unknown_op():
    result = subprocess.run([sys.executable, "-m", "genfast", "bench", "no_such_op"], capture_output=True, text=True)
    assert result.returncode == 2 and "no_such_op" in result.stderr


def test_overhead_suite_times_host_calls_of_every_case():
    """`bench overhead`: every case's genfast row is checked against its torch baseline and timed
    on the host (per call), and the speedup column compares the two."""
    from genfast.bench import overhead
    from genfast.bench.timing import HOST_INTERLEAVED_SPLIT, HOST_ROUNDS, run_case, strict_dispatch

    cases = list(overhead.build_cases("cpu", quick=True))
    assert len(cases) == overhead.count_cases("cpu", quick=True)
    names = {c.op for c in cases}
    assert {"scaled_dot_product_attention", "flash_attn_with_kvcache", "bias_act", "scheduler_step"} <= names
    picked = [c for c in cases if c.op in ("scaled_dot_product_attention", "bias_act")][:2]
    with strict_dispatch():
        rows = [row for case in picked for row in run_case(case, None, quick=True)]
    for row in rows:
        assert row["status"] == "ok", row
        assert 0 < row["median_ms"] < 1000 and row["reps"] == HOST_ROUNDS * HOST_INTERLEAVED_SPLIT
    genfast_rows = [r for r in rows if r["provider"] == "genfast"]
    assert genfast_rows and all(r["vs_torch"] > 0 for r in genfast_rows)


def test_host_timing_interleaves_the_providers():
    """Host-timed providers of one case take turns round by round (A B, B A, ...), so a burst of
    load on a shared machine lands on both instead of on whichever was being timed."""
    from genfast.bench.timing import HOST_INTERLEAVED_SPLIT, HOST_ROUNDS, time_host_interleaved

    calls = []
    slow = lambda: calls.append("slow") or sum(range(2000))  # noqa: E731
    fast = lambda: calls.append("fast")  # noqa: E731
    stats = time_host_interleaved({"slow": slow, "fast": fast}, "cpu", quick=True)
    assert set(stats) == {"slow", "fast"}
    assert all(s["reps"] == HOST_ROUNDS * HOST_INTERLEAVED_SPLIT for s in stats.values())
    assert stats["slow"]["median_ms"] > stats["fast"]["median_ms"] > 0
    # Runs of calls to one provider: rounds A B, B A, A B, ... give one run per round (B B and A A
    # merge) beyond the warm-up's two; timed one after the other there would be 4 in all.
    runs = [name for i, name in enumerate(calls) if i == 0 or calls[i - 1] != name]
    assert len(runs) >= HOST_ROUNDS * HOST_INTERLEAVED_SPLIT + 1, runs


def test_shared_providers_thunks_table_and_compile_failures(monkeypatch):
    """genfast.bench.providers, which every op suite builds its providers with: the fwd / fwd+bwd /
    bwd thunks return the right values, the table routes each genfast backend to its own call,
    and a failed torch.compile is remembered as the reason the compile baseline cannot run."""
    import pytest
    import torch

    from genfast.bench import providers

    x, b = torch.randn(3, 5, requires_grad=True), torch.randn(5, requires_grad=True)
    inputs = {"x": x, "b": b, "dy": torch.randn(3, 5)}
    z = (x + b).detach()
    dz = inputs["dy"] * z.cos()

    def fn(x_, b_):
        return (x_ + b_).sin()

    def thunk(mode):
        return providers.thunk_factory(fn, mode, args=("x", "b"), wrt=("x", "b"))(inputs)

    torch.testing.assert_close(thunk("fwd")(), z.sin())
    y, dx, db = thunk("fwd+bwd")()
    torch.testing.assert_close(y, z.sin())
    torch.testing.assert_close(dx, dz)
    torch.testing.assert_close(db, dz.sum(0))
    backward_only = thunk("bwd")
    for _ in range(2):  # the graph is built once and kept: the timed call repeats the backward
        dx, db = backward_only()
        torch.testing.assert_close(db, dz.sum(0))
    with pytest.raises(ValueError, match="mode"):
        providers.thunk_factory(fn, "sideways")

    class Dispatch:
        @staticmethod
        def unavailable_reason(name, device, dtype):
            return None if name == "cpu" else f"no {name} here"

    called = []

    def fast(x_, b_, backend):
        called.append(backend)
        return fn(x_, b_)

    monkeypatch.setattr(torch, "compile", lambda f, **kw: f)  # no real compile: the failure path is the point
    failures = providers.CompileFailures()

    def broken(x_, b_):
        raise RuntimeError("cannot trace this")

    table = providers.op_providers(fast, broken, "fwd", "cpu", torch.float32, Dispatch, True, failures, ("cpu", "fwd"),
                                   args=("x", "b"))
    assert list(table) == list(providers.PROVIDERS)
    assert table["cuda"].unavailable == "no cuda here" and table["triton"].unavailable == providers.TRITON_ON_CPU
    assert [table[n].kind for n in table] == ["genfast"] * 3 + ["baseline"] * 2
    torch.testing.assert_close(table["cpu"].factory(inputs)(), z.sin())
    assert called == ["cpu"]
    with pytest.raises(RuntimeError, match="cannot trace"):
        table["compile"].factory(inputs)
    again = providers.op_providers(fast, broken, "fwd", "cpu", torch.float32, Dispatch, True, failures, ("cpu", "fwd"),
                                   args=("x", "b"))
    assert "cannot trace this" in again["compile"].unavailable and again["compile"].factory is None
    assert providers.compile_cleanup(again) is None and providers.compile_cleanup(table) is providers.reset_compile
    no_compile = providers.op_providers(fast, fn, "fwd", "cpu", torch.float32, Dispatch, False, failures, "other")
    assert no_compile["compile"].unavailable == providers.NO_COMPILE


def test_ring_rows_of_the_attention_bench(monkeypatch):
    """`bench attention` has ring-attention rows: W gloo processes vs one process; the ring's
    gathered outputs and gradients pass the check against the one-process run, and its time is
    the ranks' own (one per timed step). A tiny plan keeps it short."""
    from genfast.bench import attention, ring
    from genfast.bench.timing import run_case

    monkeypatch.setattr(ring, "RING_CPU_QUICK", dict(ring.RING_CPU_QUICK, S=256, H=2, Hk=1, D=32, steps=2))
    cases = [c for c in attention.build_cases("cpu", quick=True) if c.act.startswith("ring")]
    assert len(cases) == ring.count_cases("cpu", quick=True) == 2
    assert {c.act for c in cases} == {"ring2-contiguous", "ring2-zigzag-causal"}
    for case in cases:
        rows = {row["provider"]: row for row in run_case(case, None, quick=True)}
        assert rows["ring"]["status"] == "ok" and rows["1-proc"]["status"] == "ok", rows
        assert rows["ring"]["reps"] == 2 and rows["ring"]["max_rel_err"] < 1e-4 and rows["ring"]["vs_1-proc"] > 0
    gpu = next(c for c in ring.build_cases("cuda", quick=True))
    assert "NCCL" in gpu.providers["ring"].unavailable


def test_cpu_timing_interleaves_and_keeps_going_past_a_failing_provider():
    """CPU providers of one case are timed in alternating rounds; one that raises (a baseline
    that cannot run) is reported as its exception while the others are still timed."""
    from genfast.bench.timing import CPU_INTERLEAVED_ROUNDS, time_cpu_interleaved

    calls = []

    def failing():
        if len(calls) > 3:
            raise RuntimeError("baseline broke")

    stats = time_cpu_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b") or sum(range(500)),
                                  "bad": failing}, quick=True)
    assert isinstance(stats["bad"], RuntimeError) and "baseline broke" in str(stats["bad"])
    assert stats["a"]["reps"] >= 5 and stats["b"]["reps"] >= 5 and stats["b"]["median_ms"] > 0
    runs = [name for i, name in enumerate(calls) if i == 0 or calls[i - 1] != name]
    assert len(runs) >= CPU_INTERLEAVED_ROUNDS + 1, runs  # a b, b a, a b, ...: not all of a, then all of b
