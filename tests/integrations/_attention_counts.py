"""Counting genfast's attention dispatches, so a test can check genfast really ran (used by the
conftest fixture and by the distributed test's rank processes, which run this folder's files as
scripts)."""
from genfast.ops import attention
from genfast.testing import count_table_runs


def count_attention_dispatches(patch=setattr) -> dict:
    """Counts the runs of the attention FORWARD/BACKWARD tables' backends (whatever path reaches
    them, prepared eager calls included); ``patch(obj, name, value)`` installs the counters
    (``monkeypatch.setattr`` in tests, to undo them afterwards). Returns the live
    ``{"forward": n, "backward": n}`` counts."""
    counts = {"forward": 0, "backward": 0}
    for key, table in (("forward", attention.FORWARD), ("backward", attention.BACKWARD)):
        count_table_runs(table, lambda _key=key: counts.__setitem__(_key, counts[_key] + 1), patch)
    return counts
