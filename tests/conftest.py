"""Test-wide set-up: Prefect state in a temp dir, one shared Prefect test server."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Must be set before Prefect is imported anywhere in the test session.
_PREFECT_HOME = tempfile.mkdtemp(prefix="ddps-prefect-")
os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.pop("PREFECT_API_URL", None)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def prefect_harness():
    """One Prefect test server for the whole session (starting one takes ~10-30 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def one_thread():
    """One torch thread for the test: numeric results do not depend on it, and tests that
    train or extract then share the 2-core machine with the rest of the run."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
