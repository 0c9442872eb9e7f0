"""Shared fixtures: the public test data folder and the cached tiny models."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data, or skip: those tests need the public data sets beside the checkout."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"public test data not found at {SHARED_DATA} (see README: Test data)")
    return SHARED_DATA


from tests.fixtures_tiny import tiny_policy, tiny_teacher  # noqa: E402,F401
from tests.s3_server import s3_bucket, s3_server  # noqa: E402,F401
