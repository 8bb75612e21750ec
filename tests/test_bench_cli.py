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
