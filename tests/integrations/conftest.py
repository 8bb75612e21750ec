"""The integration tests skip when their library is missing, so a plain `pytest` works in a
minimal environment; in CI (CI=true) every library must be there, so a broken install fails
instead of hiding behind skips."""
import importlib.util
import os

import pytest

from _attention_counts import count_attention_dispatches

INTEGRATION_LIBRARIES = ("transformers", "diffusers", "timm")


def pytest_configure(config):
    if os.environ.get("CI", "").lower() not in ("", "0", "false"):
        missing = [name for name in INTEGRATION_LIBRARIES if importlib.util.find_spec(name) is None]
        if missing:
            raise RuntimeError(f"CI: the integration tests need {', '.join(missing)} (see the README's test command)")


@pytest.fixture
def attention_calls(monkeypatch):
    """Counts genfast's attention forward/backward dispatches, whichever path reaches them."""
    return count_attention_dispatches(monkeypatch.setattr)
