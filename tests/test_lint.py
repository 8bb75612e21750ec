"""The code passes its own lint configurations: ruff (ruff.toml) for Python and clang-format
(.clang-format) for csrc/ and kernels/. Both tools are pinned in the test extra, so the
formatting a contributor sees locally is the one CI checks."""
import glob
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_passes():
    pytest.importorskip("ruff", reason="ruff is in the test extra")
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--output-format", "concise", "."], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_clang_format_passes():
    tool = shutil.which("clang-format")
    if tool is None:
        pytest.skip("clang-format is not installed (it is in the test extra)")
    files = sorted(f for pattern in ("csrc/*.cpp", "csrc/*.h", "csrc/*.inc", "kernels/*.cu", "kernels/*.h",
                                     "kernels/*.cuh") for f in glob.glob(str(ROOT / pattern)))
    assert files
    result = subprocess.run([tool, "--dry-run", "-Werror", *files], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-4000:]
