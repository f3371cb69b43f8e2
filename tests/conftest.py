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


@pytest.fixture(scope="session")
def spec_dir() -> Path:
    """``shared/spec``: beside the checkout (``../shared``) or ``$DDPS_SPEC_DIR``."""
    env = os.environ.get("DDPS_SPEC_DIR")
    path = Path(env) if env else REPO.parent / "shared" / "spec"
    if not path.is_dir():
        pytest.fail(f"spec folder not found at {path}: set DDPS_SPEC_DIR")
    return path
