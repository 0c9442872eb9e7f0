"""Helpers of the hostile-input tests: what a folder holds, to prove nothing changed."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def snapshot(folder: str | Path) -> dict[str, str]:
    """{relative path: sha256} of every file below `folder` ({} when it does not exist)."""
    out = {}
    for d, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(d, name)
            out[os.path.relpath(path, folder)] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return out


def one_error_line(result) -> str:
    """The CLI result's single `error: ...` line (exit 1, no traceback, nothing else printed)."""
    lines = [x for x in result.output.splitlines() if x.strip()]
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]
