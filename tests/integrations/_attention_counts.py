"""Counting genfast's attention dispatches, so a test can check genfast really ran (used by the
conftest fixture and by the distributed test's rank processes, which run this folder's files as
scripts)."""
from genfast.ops import attention


def count_attention_dispatches(patch=setattr) -> dict:
    """Wraps the attention FORWARD/BACKWARD tables' ``run`` (whatever path reaches them) with
    counters; ``patch(obj, name, value)`` installs the wrapper (``monkeypatch.setattr`` in tests,
    to undo it afterwards). Returns the live ``{"forward": n, "backward": n}`` counts."""
    counts = {"forward": 0, "backward": 0}
    for key, table in (("forward", attention.FORWARD), ("backward", attention.BACKWARD)):
        real = table.run

        def run(*args, _real=real, _key=key, **kwargs):
            counts[_key] += 1
            return _real(*args, **kwargs)

        patch(table, "run", run)
    return counts
