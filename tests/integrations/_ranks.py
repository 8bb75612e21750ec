"""Waiting for the rank processes the distributed integration tests spawn (shared by
test_distributed.py and test_dtensor_attention.py)."""
import time
from pathlib import Path


def wait_for_ranks(processes, workdir: Path, deadline: float) -> None:
    """Waits for every rank; as soon as one fails or the deadline passes, kills the rest.
    Each rank writes its output to ``workdir / f"rank{r}.log"``, shown when one fails."""
    try:
        while any(p.poll() is None for p in processes):
            if any(p.poll() not in (None, 0) for p in processes) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=30)
    logs = "\n".join(f"--- rank {r} (exit {p.returncode}) ---\n{(workdir / f'rank{r}.log').read_text()[-4000:]}"
                     for r, p in enumerate(processes))
    assert all(p.returncode == 0 for p in processes), f"a rank failed or timed out:\n{logs}"
