"""Running a stage over shards: read one table, write one table, resumable part by part.

Rows go to shard `shard_of(problem_id, N)`, so a problem's whole group lands in one part and
every stage can split the same way. Without `shard_index`, one process runs every missing part
in turn; with it, the job runs only its own part (N machines split a stage). Whichever job sees
all N parts done writes the manifest. `plan` asks a stage which parts it would write (an
executor, `executors.base`, schedules only those).

A shard streams: its rows are read in batches of about `batch_rows` rows that hold whole
problems, `process` runs once per batch, and each result is appended to the part file as it
comes (its stats summed with `add_stats`), so a stage over a shard larger than memory runs in
bounded memory. The part holds the rows in input order, as one `process` call over the whole
shard would write them.
"""

from __future__ import annotations

import contextvars
import itertools
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from scope_data.hashing import sha256_hex
from scope_data.schema import SchemaError, conform, empty_table, schema_for, validate
from scope_data.shards import (
    Manifest,
    TableStore,
    add_stats,
    read_batches,
    read_manifest,
    reading,
    scan,
)
from scope_data.validate import check_table

RETRYABLE_ROWS = "retryable_rows"
"""A part's stat: rows that failed for a reason that may pass (a remote engine down). A part
holding any is done for the manifest, but a rerun of the stage processes it again."""
ProcessFn = Callable[[pa.Table, int], tuple[pa.Table, dict[str, Any]]]
BATCH_ROWS = 4096
"""Input rows per `process` call (generate: 4096 problems, so the n requests of each problem
fill the engines' chunks of 256 and 4096 requests as one call over the shard would)."""


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


_PLANNING: contextvars.ContextVar[bool] = contextvars.ContextVar("planning", default=False)


class _Planned(Exception):
    def __init__(self, pending: list[int]):
        super().__init__(pending)
        self.pending = pending


def plan(run: Callable[[], Any]) -> list[int]:
    """The shards `run()` (a stage run over all shards) would write: it runs up to the point
    where `run_stage` knows the stage's full config, and stops there (nothing written). An
    executor schedules only these."""
    token = _PLANNING.set(True)
    try:
        run()
    except _Planned as e:
        return e.pending
    finally:
        _PLANNING.reset(token)
    raise RuntimeError("the stage finished without reaching run_stage while planning")


@dataclass
class StageResult:
    """What a stage run did: the manifest once complete, else None and the missing parts."""

    manifest: Manifest | None
    parts_written: int
    parts_skipped: int
    missing: list[str]
    stats: dict[str, Any]


def input_batches(
    manifest: Manifest, shard_index: int, num_shards: int, batch_rows: int | None = BATCH_ROWS,
    storage_options: dict[str, Any] | None = None, limit: int | None = None,
    problem_ids: Collection[str] | None = None,
) -> Iterator[pa.Table]:
    """The rows of the table owned by shard k (all rows when N == 1; only the table's first
    `limit` rows count), in input order, in batches of about `batch_rows` rows that end at a
    problem boundary (at least one batch, maybe empty).

    The whole shard is one batch when `batch_rows` is None, or when the rows of a problem are
    not contiguous in the input (a batch must hold every row of its problems).
    """
    lf = scan(manifest.url, storage_options, check=False)
    if limit is not None:
        lf = lf.head(limit)
    rows = read_batches(manifest, storage_options, batch_rows or 65_536)
    if limit is not None:
        rows = _head(rows, limit)
    if problem_ids is not None:
        wanted = pa.array(sorted(set(problem_ids)), pa.string())
        lf = lf.filter(pl.col("problem_id").is_in(wanted.to_pylist()))
        rows = (b.filter(pc.is_in(b.column("problem_id"), value_set=wanted)) for b in rows)
    if num_shards > 1:
        ids = lf.select("problem_id").unique().collect()["problem_id"].to_list()
        mine = pa.array([pid for pid in ids if shard_of(pid, num_shards) == shard_index],
                        pa.string())
        rows = (b.filter(pc.is_in(b.column("problem_id"), value_set=mine)) for b in rows)
    if batch_rows is None or not _problems_contiguous(lf):
        whole = list(rows)
        batches = [pa.Table.from_batches(whole)] if whole else []
    else:
        batches = _whole_problems(rows, batch_rows)
    empty = True
    for batch in batches:
        empty = False
        yield batch
    if empty:
        yield empty_table(manifest.table)


def _head(rows: Iterator[pa.RecordBatch], limit: int) -> Iterator[pa.RecordBatch]:
    for batch in rows:
        if limit <= 0:
            return
        yield batch.slice(0, limit)
        limit -= batch.num_rows


def _problems_contiguous(lf: pl.LazyFrame) -> bool:
    ids = pl.col("problem_id")
    runs, unique = lf.select(ids.rle_id().max().alias("runs"),
                             ids.n_unique().alias("unique")).collect().row(0)
    return runs is None or runs + 1 == unique


def _whole_problems(rows: Iterator[pa.RecordBatch], batch_rows: int) -> Iterator[pa.Table]:
    """Re-cut `rows` into tables that end at a change of problem_id: once `batch_rows` rows are
    read, a table ends before the last problem seen, whose rows wait for the next table."""
    pending: list[pa.RecordBatch] = []
    count = 0
    for batch in rows:
        pending.append(batch)
        count += batch.num_rows
        if count < batch_rows:
            continue
        table = pa.Table.from_batches(pending)
        ids = table.column("problem_id")
        others = pc.indices_nonzero(pc.not_equal(ids, ids[-1]))
        if len(others) == 0:  # one problem so far: keep reading
            continue
        cut = others[-1].as_py() + 1
        yield table.slice(0, cut)
        pending, count = table.slice(cut).to_batches(), table.num_rows - cut
    if count:
        yield pa.Table.from_batches(pending)


def _guarded(batches: Iterator[pa.Table], url: str) -> Iterator[pa.Table]:
    """`batches`, with reader errors raised while producing them (the polars reads that pick
    the shard's rows, the Parquet reads) named as `url`'s; `process` is not guarded."""
    while True:
        with reading(url):
            batch = next(batches, None)
        if batch is None:
            return
        yield batch


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
    limit: int | None = None,
    problem_ids: Collection[str] | None = None,
    batch_rows: int | None = BATCH_ROWS,
) -> StageResult:
    """Run `process` on each owned, unfinished shard of the input and finalize when complete.

    `config` is what the output depends on; the input table's content hash is added to it, so an
    unchanged upstream table and options resume the stage, and a changed one is refused in the
    same output folder (`scope_data.ownership`: a new --out reruns it).
    Only the input's first `limit` rows are read, if given, and of them only the rows of
    `problem_ids`, if given (a round's batch of problems). `batch_rows` (see `input_batches`):
    None hands `process` each shard whole, for stages that need all of a shard's rows at once.

    The input's value invariants are checked first (`scope_data.validate`), then the output
    folder is claimed (`scope_data.ownership`).
    """
    if num_shards < 1:
        raise ValueError(f"--num-shards must be >= 1, got {num_shards}")
    upstream = read_manifest(input_url, storage_options)
    full_config = {**config, "input": upstream.content_hash, "num_shards": num_shards}
    store = TableStore(output_url, output_table, storage_options)
    with reading(input_url):
        check_input_columns(input_url, upstream.table, scan(input_url, storage_options))
    if _PLANNING.get():
        raise _Planned([k for k in range(num_shards)
                        if not store.part_done(k, num_shards, full_config)])
    check_table(upstream, storage_options)
    store.claim(full_config, [input_url])
    shards = range(num_shards) if shard_index is None else [shard_index]
    written = skipped = 0
    stats: dict[str, Any] = {}
    try:
        for k in shards:
            retry = store.part_done(k, num_shards, full_config)
            if retry and not store.part_stats(k, num_shards).get(RETRYABLE_ROWS):
                skipped += 1
                continue
            where = f"{input_url} (rows of part {k})"

            def run(rows: pa.Table, k: int = k, where: str = where) -> tuple[pa.Table, dict]:
                rows = conform(upstream.table, rows, where)
                validate(upstream.table, rows, where)
                try:
                    return process(rows, k)
                except ValueError as e:  # about the rows (a bad value): say which table holds them
                    if e.args and isinstance(e.args[0], str) and input_url not in e.args[0]:
                        e.args = (f"{where}: {e.args[0]}", *e.args[1:])
                    raise

            batches = _guarded(input_batches(upstream, k, num_shards, batch_rows,
                                             storage_options, limit, problem_ids), input_url)
            results = map(run, batches)
            first = next(results)  # a stage failing on its first rows leaves the folder untouched
            if retry:  # the part changes: the table is unfinished until finalized again
                store.unfinalize()
            part_stats: dict[str, Any] = {}
            with store.part_writer(k, num_shards, full_config, part_stats) as out:
                for table, batch_stats in itertools.chain([first], results):
                    out.write(table)
                    add_stats(part_stats, batch_stats)
            add_stats(stats, part_stats)
            written += 1
    except BaseException:
        store.release(full_config)
        raise
    missing = store.missing_parts(num_shards, full_config)
    manifest = None
    if not missing:
        manifest = store.finalize(num_shards, full_config, [upstream])
    return StageResult(manifest, written, skipped, missing, stats)
