"""The shard store against a real S3-compatible server on loopback (moto), not patched calls."""

from __future__ import annotations

import json

import polars as pl
import pyarrow as pa
import pytest

from scope_data.schema import conform
from scope_data.shards import ShardError, TableStore, read_arrow, read_manifest, scan


def _problems(n: int) -> pa.Table:
    return conform("problems", pa.table({
        "problem_id": [f"p{i}" for i in range(n)], "source": ["s"] * n,
        "source_index": list(range(n)), "task": ["math"] * n,
        "prompt": [f"What is {i}+1?" for i in range(n)], "answer": [str(i + 1) for i in range(n)],
        "solution": [None] * n,
    }))


def test_s3_round_trip_and_no_credentials_in_manifest(s3_bucket):
    url, options = s3_bucket
    table = _problems(50)
    config = {"source": "unit", "storage_options": options, "api_key": "sk-should-not-leak"}
    TableStore(url, "problems", options).write(table, config)
    manifest = read_manifest(url, options)
    assert manifest.rows == 50
    assert scan(url, options).collect().equals(pl.from_arrow(table))
    assert read_arrow(url, options).equals(table)
    import s3fs

    from scope_data.layout import MANIFEST, record_payload

    raw = record_payload(s3fs.S3FileSystem(**options).cat(f"{url}/{MANIFEST}")).decode()
    for secret in ("testing-key-id", "testing-secret-value", "sk-should-not-leak"):
        assert secret not in raw
    assert json.loads(raw)["config"]["api_key"] == "***"


def test_s3_sharded_write_refuses_to_finalize_until_all_parts_exist(s3_bucket):
    url, options = s3_bucket
    table = _problems(30)
    store = TableStore(url, "problems", options)
    store.write_part(table.slice(20, 10), 2, 3, {"x": 1})
    store.write_part(table.slice(0, 10), 0, 3, {"x": 1})
    with pytest.raises(ShardError, match="part-00001-of-00003"):
        store.finalize(3, {"x": 1})
    with pytest.raises(ShardError, match="no manifest"):
        read_manifest(url, options)
    store.write_part(table.slice(10, 10), 1, 3, {"x": 1})
    assert store.finalize(3, {"x": 1}).rows == 30
    assert sorted(scan(url, options).collect()["problem_id"].to_list()) == sorted(
        table["problem_id"].to_pylist())
