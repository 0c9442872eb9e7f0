"""Running a stage over shards: read one table, write one table, resumable part by part.

Rows go to shard `shard_of(problem_id, N)`, so a problem's whole group lands in one part and
every stage can split the same way. Without `shard_index`, one process runs every missing part
in turn; with it, the job runs only its own part (N machines split a stage). Whichever job sees
all N parts done writes the manifest.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import polars as pl
import pyarrow as pa

from scope_data.hashing import sha256_hex
from scope_data.schema import SchemaError, conform, schema_for, validate
from scope_data.shards import Manifest, TableStore, add_stats, read_manifest, scan

ProcessFn = Callable[[pa.Table, int], tuple[pa.Table, dict[str, Any]]]


def shard_of(problem_id: str, num_shards: int) -> int:
    """The shard that owns a problem (and all its rollouts); stable across runs."""
    return int(sha256_hex(problem_id)[:8], 16) % num_shards


def check_input_columns(url: str, table_name: str, lf: pl.LazyFrame) -> None:
    """SchemaError naming the input table and its first missing column (types and nulls are
    checked per part, when the rows are read)."""
    names = set(lf.collect_schema().names())
    for f in schema_for(table_name):
        if f.name not in names:
            raise SchemaError(f"{table_name} table {url}: missing column {f.name!r} ({f.type})")


@dataclass
class StageResult:
    """What a stage run did: the manifest once complete, else None and the missing parts."""

    manifest: Manifest | None
    parts_written: int
    parts_skipped: int
    missing: list[str]
    stats: dict[str, Any]


def input_rows(lf: pl.LazyFrame, shard_index: int, num_shards: int) -> pa.Table:
    """The rows of `lf` owned by shard k (all rows when N == 1), in input order."""
    if num_shards == 1:
        return lf.collect().to_arrow()
    ids = lf.select("problem_id").unique().collect()["problem_id"].to_list()
    mine = [pid for pid in ids if shard_of(pid, num_shards) == shard_index]
    return lf.filter(pl.col("problem_id").is_in(mine)).collect().to_arrow()


def run_stage(
    *,
    input_url: str,
    output_url: str,
    output_table: str,
    config: dict[str, Any],
    process: ProcessFn,
    num_shards: int = 1,
    shard_index: int | None = None,
    storage_options: dict[str, Any] | None = None,
    input_filter: Callable[[pl.LazyFrame], pl.LazyFrame] | None = None,
) -> StageResult:
    """Run `process` on each owned, unfinished shard of the input and finalize when complete.

    `config` is what the output depends on; the input table's content hash is added to it, so a
    changed upstream table or option reruns the stage and an unchanged one resumes it.
    """
    if num_shards < 1:
        raise ValueError(f"--num-shards must be >= 1, got {num_shards}")
    upstream = read_manifest(input_url, storage_options)
    full_config = {**config, "input": upstream.content_hash, "num_shards": num_shards}
    store = TableStore(output_url, output_table, storage_options)
    lf = scan(input_url, storage_options)
    check_input_columns(input_url, upstream.table, lf)
    if input_filter is not None:
        lf = input_filter(lf)
    shards = range(num_shards) if shard_index is None else [shard_index]
    written = skipped = 0
    stats: dict[str, Any] = {}
    for k in shards:
        if store.part_done(k, num_shards, full_config):
            skipped += 1
            continue
        rows = input_rows(lf, k, num_shards)
        rows = conform(upstream.table, rows, f"{input_url} (rows of part {k})")
        validate(upstream.table, rows, f"{input_url} (rows of part {k})")
        table, part_stats = process(rows, k)
        store.write_part(table, k, num_shards, full_config, part_stats)
        add_stats(stats, part_stats)
        written += 1
    missing = store.missing_parts(num_shards, full_config)
    manifest = None
    if not missing:
        manifest = store.finalize(num_shards, full_config, [upstream])
    return StageResult(manifest, written, skipped, missing, stats)
