"""What `scope inspect` shows, computed with polars over the manifest's files."""

from __future__ import annotations

from typing import Any

import polars as pl

from scope_data.layout import reader_one_liners
from scope_data.shards import read_manifest, reading, scan

STATUS_COLUMNS = ("status", "score_status", "correct_status", "kind")


def describe(url: str, rows: int = 5, storage_options: dict[str, Any] | None = None) -> dict:
    """Manifest facts, schema, per-status counts, the first `rows` rows (long lists cut) and
    how to open the table with other readers."""
    manifest = read_manifest(url, storage_options)
    lf = scan(url, storage_options)
    with reading(manifest.url):
        schema = lf.collect_schema()
        counts = {}
        for col in STATUS_COLUMNS:
            if col in schema:
                df = lf.group_by(col).len().sort(col).collect()
                counts[col] = {str(k): int(v) for k, v in df.iter_rows()}
        head = lf.head(rows).collect()
    short = head.with_columns(
        pl.col(c).list.head(8) for c, t in schema.items() if isinstance(t, pl.List)
    )
    return {
        "url": manifest.url, "table": manifest.table, "rows": manifest.rows,
        "parts": len(manifest.files), "schema_version": manifest.schema_version,
        "config_hash": manifest.config_hash, "created": manifest.created,
        "config": manifest.config, "inputs": manifest.inputs, "stats": manifest.stats,
        "versions": manifest.versions, "status_counts": counts,
        "schema": {k: str(v) for k, v in schema.items()}, "head": short.to_dicts(),
        "read_with": reader_one_liners(manifest.url),
    }
