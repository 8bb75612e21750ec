"""The main job, `python -m genfast demo`, runs end to end (smoke mode: a few steps of every
stage) and writes its pictures, loss curves and summary."""
import json
import subprocess
import sys

import pytest


def test_demo_smoke_runs_end_to_end(tmp_path):
    pytest.importorskip("sklearn")
    cmd = [sys.executable, "-m", "genfast", "demo", "--smoke", "--out", str(tmp_path)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    for name in ("digits_real.png", "digits_ddpm.png", "digits_gan.png", "loss_curves.png"):
        assert (tmp_path / name).stat().st_size > 1000, name
    summary = json.loads((tmp_path / "demo.json").read_text())
    for step in ("ddpm_train_step", "gan_train_step"):
        assert summary["timing_s"][step]["fast"] > 0 and summary["timing_s"][step]["reference"] > 0
    assert "fast paths vs reference paths" in result.stdout
