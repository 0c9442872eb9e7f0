"""Snapshots of a folder tree (every file, hidden ones too) to prove nothing was lost."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from typer.testing import CliRunner

from cli.main import app


def snapshot(*roots: Path) -> dict[str, str]:
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
