"""Reading and rewriting a table's bookkeeping records (manifest, markers) in tests."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from scope_data.layout import MANIFEST, record_bytes, record_payload


def manifest_body(url: str) -> dict[str, Any]:
    return json.loads(record_payload((Path(url) / MANIFEST).read_bytes()))


def write_manifest_payload(url: str, payload: bytes) -> None:
    """Replace the manifest's JSON text by `payload` (any bytes), keeping it a Parquet record."""
    path = Path(url) / MANIFEST
    path.write_bytes(record_bytes(pq.read_schema(path), payload))


def write_manifest_body(url: str, body: dict[str, Any]) -> None:
    write_manifest_payload(url, json.dumps(body).encode())


def local_files(url: str) -> list[str]:
    """Every file below a local table folder, as sorted relative paths."""
    return sorted(os.path.relpath(os.path.join(d, f), url)
                  for d, _, files in os.walk(url) for f in files)
