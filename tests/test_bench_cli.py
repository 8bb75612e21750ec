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
    from genfast.bench.timing import run_case, strict_dispatch

    cases = list(overhead.build_cases("cpu", quick=True))
    assert len(cases) == overhead.count_cases("cpu", quick=True)
    names = {c.op for c in cases}
    assert {"scaled_dot_product_attention", "flash_attn_with_kvcache", "bias_act", "scheduler_step"} <= names
    picked = [c for c in cases if c.op in ("scaled_dot_product_attention", "bias_act")][:2]
    with strict_dispatch():
        rows = [row for case in picked for row in run_case(case, None, quick=True)]
    for row in rows:
        assert row["status"] == "ok", row
        assert 0 < row["median_ms"] < 1000 and row["reps"] == 5
    genfast_rows = [r for r in rows if r["provider"] == "genfast"]
    assert genfast_rows and all(r["vs_torch"] > 0 for r in genfast_rows)
