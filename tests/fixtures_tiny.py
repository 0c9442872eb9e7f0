"""Session fixtures for the cached tiny models (import them in tests/conftest.py).

Both build once per machine and config into ``$SCOPE_CACHE/tiny`` (default ``~/.cache/scope``)
and are reused by every later session; the first build takes a few minutes on 2 CPU cores.
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_policy() -> Path:
    """Folder of the default warm-started tiny policy (30% injected step errors)."""
    from pipelines.tiny.policy import build_tiny_policy

    return build_tiny_policy()


@pytest.fixture(scope="session")
def tiny_teacher() -> Path:
    """Folder of the tiny teacher: same recipe, trained on clean solutions only."""
    from pipelines.tiny.policy import build_tiny_policy

    return build_tiny_policy(teacher=True)
