import os

# Before anything imports triton: run Triton kernels on CPU tensors through the interpreter
# when there is no GPU, and never let the dispatcher hide a failing backend behind a fallback.
try:
    import torch as _torch

    _has_gpu = _torch.cuda.is_available()
except Exception:  # pragma: no cover
    _has_gpu = False
if not _has_gpu:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["GENFAST_STRICT"] = "1"
os.environ.pop("GENFAST_BACKEND", None)

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def seed():
    from genfast.testing import fresh_seed

    s = fresh_seed()
    torch.manual_seed(s)
    return s


@pytest.fixture(autouse=True)
def _genfast_environment_follows_os_environ():
    """genfast reads GENFAST_BACKEND/GENFAST_STRICT once (refresh_environment() re-reads them);
    after each test, monkeypatch has put os.environ back, and genfast re-reads it too."""
    yield
    from genfast._dispatch import refresh_environment

    refresh_environment()
