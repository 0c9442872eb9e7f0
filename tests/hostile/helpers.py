"""Helpers of the hostile-input tests: what a folder tree holds (every file, hidden ones too),
to prove nothing was lost or changed, and the CLI's one error line."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from typer.testing import CliRunner

from cli.main import app


def snapshot(*roots: str | Path) -> dict[str, str]:
    """{path: sha256} of every file below `roots` (missing roots: no entries)."""
    out = {}
    for root in roots:
        for d, _, files in os.walk(root):
            for f in files:
                path = Path(d, f)
                out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def cli(*args: str) -> tuple[int, str]:
    """(exit code, one-line output) of `scope ARGS`."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, " ".join(result.output.split())


def one_error_line(result) -> str:
    """The CLI result's single `error: ...` line (exit 1, no traceback, nothing else printed)."""
    lines = [x for x in result.output.splitlines() if x.strip()]
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]
