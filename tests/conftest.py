"""Shared fixtures. Heavy engines load once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Most tests run their callers and the server on one event loop, so how busy that loop is
# measures the test, not the server: on a slow machine the default SHED_LOOP_BUSY would refuse
# a test's own calls as "overloaded". Shedding is off unless a test turns it on (the
# admission tests set their own threshold).
os.environ.setdefault("SHED_LOOP_BUSY", "0")

pytest_plugins = ["tests.fakes.fixtures"]

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES
