"""The shard store (scope_data.shards) and the shard executor."""

from __future__ import annotations

import hashlib
import os
import tempfile
import uuid
from pathlib import Path

import fsspec
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipelines.executors.shard_executor import run_stage, shard_of
from scope_data.folder import Folder
from scope_data.layout import MANIFEST, marker_name, part_name
from scope_data.schema import SCHEMA_VERSION, schema_for
from scope_data.shards import ShardError, TableStore, read_arrow, read_manifest, scan
from tests.helpers_tables import (
    local_files,
    manifest_body,
)

SETTINGS = settings(max_examples=15, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
CONFIG = {"stage": "test", "seed": 0}

text = st.text(max_size=12)
int32 = st.integers(-(2**31), 2**31 - 1)
float32 = st.floats(width=32, allow_nan=False)


@st.composite
def rollout_rows(draw: st.DrawFn, max_rows: int = 12) -> list[dict]:
    rows = []
    for i in range(draw(st.integers(0, max_rows))):
        n = draw(st.integers(0, 6))
        rows.append({
            "problem_id": draw(st.sampled_from(["p0", "p1", "p2", "p3"])),
            "source": draw(text), "source_index": draw(st.integers(0, 2**40)),
            "task": draw(st.sampled_from(["math", "arith"])), "prompt": draw(text),
            "answer": draw(text), "solution": draw(st.none() | text),
            "rollout_id": f"r{i}", "round": draw(st.integers(0, 5)),
            "sample_idx": draw(st.integers(0, 7)), "policy": draw(text),
            "prompt_text": draw(text), "prompt_token_ids": draw(st.lists(int32, max_size=6)),
            "response_text": draw(text), "response_token_ids": draw(st.lists(int32, min_size=n,
                                                                              max_size=n)),
            "behaviour_logprobs": draw(st.lists(float32, min_size=n, max_size=n)),
            "finish_reason": draw(st.sampled_from(["stop", "length"])),
            "temperature": draw(float32), "top_p": draw(float32),
            "seed": draw(st.integers(0, 2**62)),
            "pred_answer": draw(st.none() | text), "reward": draw(float32),
            "correct": draw(st.booleans()), "status": draw(st.sampled_from(["ok", "truncated"])),
        })
    return rows


def as_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=schema_for("rollouts"))


def memory_url() -> str:
    return f"memory://scope-tests/{uuid.uuid4().hex}/rollouts"


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- round trip, idempotence, partial writes (property tests) ---------------------------------
@SETTINGS
@given(rows=rollout_rows(), where=st.sampled_from(["local", "memory"]))
def test_round_trip(rows: list[dict], where: str) -> None:
    table = as_table(rows)
    with tempfile.TemporaryDirectory() as tmp:
        url = str(Path(tmp) / "t") if where == "local" else memory_url()
        manifest = TableStore(url, "rollouts").write(table, CONFIG, stats={"status": {"ok": 1}})
        assert manifest.rows == len(rows)
        assert [f["path"] for f in manifest.files] == [part_name(0, 1)]
        assert read_manifest(url).config == CONFIG
        assert read_arrow(url).equals(table)
        assert scan(url).collect().equals(pl.from_arrow(table))
        assert scan(url).collect().to_dicts() == table.to_pylist()


@SETTINGS
@given(rows=rollout_rows())
def test_rerun_is_idempotent(rows: list[dict]) -> None:
    """Writing the same table twice gives the same bytes, one part file and the same manifest."""
    table = as_table(rows)
    with tempfile.TemporaryDirectory() as tmp:
        url = str(Path(tmp) / "t")
        first = TableStore(url, "rollouts").write(table, CONFIG)
        digest = sha256_file(Path(url) / part_name(0, 1))
        second = TableStore(url, "rollouts").write(table, CONFIG)
        assert sha256_file(Path(url) / part_name(0, 1)) == digest == second.files[0]["sha256"]
        assert first.files == second.files and first.content_hash == second.content_hash
        assert local_files(url) == sorted([MANIFEST, part_name(0, 1), marker_name(0, 1)])
        assert read_arrow(url).num_rows == len(rows)


@SETTINGS
@given(rows=rollout_rows(max_rows=8), fail_after=st.integers(0, 3),
       where=st.sampled_from(["local", "memory"]))
def test_partial_write_is_never_visible(rows: list[dict], fail_after: int, where: str) -> None:
    table = as_table(rows)
    with tempfile.TemporaryDirectory() as tmp:
        url = str(Path(tmp) / "t") if where == "local" else memory_url()
        store = TableStore(url, "rollouts")
        with pytest.raises(RuntimeError, match="boom"):
            with store.part_writer(0, 2, CONFIG) as w:
                for _ in range(fail_after):
                    w.write(table)
                raise RuntimeError("boom")
        folder = Folder(url)
        assert not folder.exists(part_name(0, 2))  # neither the part nor a temp file is left
        assert not folder.exists(marker_name(0, 2))
        if where == "local" and os.path.isdir(url):
            assert local_files(url) == []
        assert store.missing_parts(2, CONFIG) == [part_name(0, 2), part_name(1, 2)]
        with pytest.raises(ShardError, match="no manifest"):
            read_manifest(url)
        with pytest.raises(ShardError, match="no manifest"):
            scan(url)
        with pytest.raises(ShardError, match=part_name(0, 2)):
            store.finalize(2, CONFIG)


def test_failed_rewrite_hides_the_old_part(tmp_path: Path) -> None:
    """A rerun that fails removes the old marker first: a stale part is not taken as done."""
    store = TableStore(str(tmp_path / "t"), "rollouts")
    table = as_table([])
    store.write_part(table, 0, 1, CONFIG)
    assert store.part_done(0, 1, CONFIG)
    with pytest.raises(RuntimeError):
        with store.part_writer(0, 1, CONFIG):
            raise RuntimeError("boom")
    assert not store.part_done(0, 1, CONFIG)
    assert store.missing_parts(1, CONFIG) == [part_name(0, 1)]


def test_part_without_marker_is_unfinished(tmp_path: Path) -> None:
    url = str(tmp_path / "t")
    store = TableStore(url, "rollouts")
    store.write_part(as_table([]), 0, 1, CONFIG)
    os.remove(Path(url) / marker_name(0, 1))
    assert store.missing_parts(1, CONFIG) == [part_name(0, 1)]
    with pytest.raises(ShardError, match="1 of 1 parts missing"):
        store.finalize(1, CONFIG)
    with pytest.raises(ShardError, match=r"no manifest.*1 unfinished part files present"):
        read_arrow(url)


# -- unfinished tables (corrupted and unsafe manifests: tests/test_bad_inputs.py) -------
def test_folder_without_manifest(tmp_path: Path) -> None:
    with pytest.raises(ShardError, match=rf"{tmp_path}: no manifest"):
        scan(str(tmp_path))
    with pytest.raises(ShardError, match="no manifest"):
        read_manifest(str(tmp_path / "does-not-exist"))


def test_wrong_table_schema_is_rejected_on_write(tmp_path: Path) -> None:
    store = TableStore(str(tmp_path / "t"), "problems")
    bad = pa.table({"problem_id": ["a"], "source": ["s"]})
    with pytest.raises(ValueError, match="missing column 'source_index'"):
        store.write(bad, CONFIG)
    assert not (tmp_path / "t" / part_name(0, 1)).exists()


# -- N-way sharded writes -------------------------------------------------------------------
def problems_rows(lo: int, hi: int) -> pa.Table:
    rows = [{"problem_id": f"p{i}", "source": "s", "source_index": i, "task": "math",
             "prompt": f"q{i}", "answer": str(i), "solution": None} for i in range(lo, hi)]
    return pa.Table.from_pylist(rows, schema=schema_for("problems"))


@pytest.mark.parametrize("where", ["local", "memory"])
def test_sharded_write_finalizes_only_when_complete(tmp_path: Path, where: str) -> None:
    url = str(tmp_path / "t") if where == "local" else memory_url()
    store = TableStore(url, "problems")
    store.write_part(problems_rows(0, 5), 0, 3, CONFIG, {"status": {"ok": 5}})
    store.write_part(problems_rows(10, 12), 2, 3, CONFIG, {"status": {"ok": 1, "bad": 1}})
    assert store.missing_parts(3, CONFIG) == [part_name(1, 3)]
    with pytest.raises(ShardError, match=r"1 of 3 parts missing.*part-00001-of-00003.parquet"):
        store.finalize(3, CONFIG)
    with pytest.raises(ShardError, match=r"no manifest.*2 of 3 parts done; missing: "
                                         r"part-00001-of-00003.parquet"):
        read_manifest(url)
    # a writer of another config is refused (scope_data.ownership) and writes nothing
    other = {**CONFIG, "seed": 1}
    with pytest.raises(ValueError, match="unfinished problems table written with another config"):
        store.write_part(problems_rows(5, 10), 1, 3, other)
    assert store.missing_parts(3, CONFIG) == [part_name(1, 3)]
    store.write_part(problems_rows(5, 10), 1, 3, CONFIG, {"status": {"ok": 5}})
    manifest = store.finalize(3, CONFIG)
    assert manifest.rows == 12 and manifest.num_shards == 3
    assert [f["path"] for f in manifest.files] == [part_name(k, 3) for k in range(3)]
    assert manifest.stats == {"status": {"ok": 11, "bad": 1}}
    assert read_arrow(url).column("problem_id").to_pylist() == [f"p{i}" for i in range(12)]
    assert scan(url).select(pl.len()).collect().item() == 12


def test_manifest_records_config_inputs_and_versions(tmp_path: Path) -> None:
    up = TableStore(str(tmp_path / "up"), "problems").write(problems_rows(0, 3), {"a": 1})
    down = TableStore(str(tmp_path / "down"), "problems").write(problems_rows(0, 3), CONFIG,
                                                                 inputs=[up])
    body = manifest_body(str(tmp_path / "down"))
    assert body["table"] == "problems" and body["schema_version"] == SCHEMA_VERSION
    assert body["inputs"] == [up.as_input()] and body["config"] == CONFIG
    assert body["files"][0]["sha256"] == sha256_file(tmp_path / "down" / part_name(0, 1))
    assert "pyarrow" in body["versions"] and "python" in body["versions"]
    assert down.content_hash == up.content_hash  # same rows, same bytes


def test_memory_and_local_give_identical_parts(tmp_path: Path) -> None:
    table = problems_rows(0, 50)
    local = TableStore(str(tmp_path / "t"), "problems").write(table, CONFIG)
    mem_url = memory_url()
    memory = TableStore(mem_url, "problems").write(table, CONFIG)
    assert local.files == memory.files
    fs = fsspec.filesystem("memory")
    assert fs.cat(Folder(mem_url).path(part_name(0, 1))) == (
        tmp_path / "t" / part_name(0, 1)).read_bytes()


# -- the stage runner ---------------------------------------------------------------------
def test_run_stage_resumes_after_a_failed_shard(tmp_path: Path) -> None:
    src, out = str(tmp_path / "problems"), str(tmp_path / "out")
    TableStore(src, "problems").write(problems_rows(0, 40), {"src": 1})
    calls: list[int] = []
    fail = {1}

    def process(rows: pa.Table, k: int) -> tuple[pa.Table, dict]:
        calls.append(k)
        if k in fail:
            raise RuntimeError(f"shard {k} crashed")
        assert all(shard_of(p, 3) == k for p in rows.column("problem_id").to_pylist())
        return rows, {"status": {"ok": rows.num_rows}}

    common = dict(input_url=src, output_url=out, output_table="problems", config={"x": 1},
                  process=process, num_shards=3)
    assert run_stage(**common, shard_index=0).missing == [part_name(1, 3), part_name(2, 3)]
    with pytest.raises(RuntimeError, match="shard 1 crashed"):
        run_stage(**common, shard_index=1)
    partial = run_stage(**common, shard_index=2)
    assert partial.manifest is None and partial.missing == [part_name(1, 3)]
    with pytest.raises(ShardError):
        read_manifest(out)

    fail.clear()
    calls.clear()
    result = run_stage(**common)  # one process resumes: only the missing shard runs
    assert calls == [1] and result.parts_written == 1 and result.parts_skipped == 2
    assert result.manifest is not None and result.manifest.rows == 40
    assert result.manifest.stats == {"status": {"ok": 40}}
    assert sorted(read_arrow(out).column("problem_id").to_pylist()) == sorted(
        f"p{i}" for i in range(40))
    assert result.manifest.inputs[0]["content_hash"] == read_manifest(src).content_hash

    calls.clear()
    again = run_stage(**common)  # nothing left to do
    assert calls == [] and again.parts_written == 0 and again.manifest is not None

    # a changed upstream table changes the config: the finished table is not overwritten
    # (scope_data.ownership), a new output folder runs every shard
    TableStore(src, "problems").write(problems_rows(0, 41), {"src": 1})
    with pytest.raises(ValueError, match="holds a problems table written with another config"):
        run_stage(**common)
    assert calls == [] and read_manifest(out).rows == 40
    rerun = run_stage(**{**common, "output_url": str(tmp_path / "out2")})
    assert sorted(calls) == [0, 1, 2] and rerun.manifest.rows == 41


def grouped_problems(n: int, per: int, interleave: bool = False) -> pa.Table:
    """A rollouts table of `n` problems of `per` rows each (rows of a problem contiguous unless
    `interleave`)."""
    order = [(i, j) for j in range(per) for i in range(n)] if interleave else [
        (i, j) for i in range(n) for j in range(per)]
    rows = [{"problem_id": f"p{i}", "source": "s", "source_index": i, "task": "math",
             "prompt": f"q{i}", "answer": "1", "solution": None, "rollout_id": f"r{i}-{j}",
             "round": 0, "sample_idx": j, "policy": "p", "prompt_text": f"q{i}",
             "prompt_token_ids": [1], "response_text": str(j), "response_token_ids": [j],
             "behaviour_logprobs": [0.0], "finish_reason": "stop", "temperature": 1.0,
             "top_p": 1.0, "seed": j, "pred_answer": str(j), "reward": float(j == 1),
             "correct": j == 1, "status": "ok"} for i, j in order]
    return as_table(rows)


@pytest.mark.parametrize("num_shards", [1, 3])
@pytest.mark.parametrize("interleave", [False, True])
def test_run_stage_streams_batches_of_whole_problems(tmp_path: Path, num_shards: int,
                                                     interleave: bool) -> None:
    """Batches hold every row of their problems; the parts hold the rows of one call over the
    whole shard, in order; a shard whose problems' rows interleave is one batch."""
    src = str(tmp_path / "src")
    TableStore(src, "rollouts").write(grouped_problems(40, 3, interleave), {"src": 1})
    calls: list[tuple[int, list[str]]] = []

    def process(rows: pa.Table, k: int) -> tuple[pa.Table, dict]:
        calls.append((k, rows.column("problem_id").to_pylist()))
        return rows, {"rows": rows.num_rows, "status": {"ok": rows.num_rows}}

    common = dict(input_url=src, output_table="rollouts", config={}, process=process,
                  num_shards=num_shards)
    whole = run_stage(**common, output_url=str(tmp_path / "whole"), batch_rows=None)
    assert len(calls) == num_shards
    calls.clear()
    streamed = run_stage(**common, output_url=str(tmp_path / "streamed"), batch_rows=7)
    assert (len(calls) == num_shards) == interleave
    seen = [pid for _, ids in calls for pid in dict.fromkeys(ids)]
    assert len(seen) == len(set(seen)) == 40  # no problem split across batches
    last = {k: i for i, (k, _) in enumerate(calls)}  # the last batch of a shard may be short
    assert all(len(ids) > 7 - 3 for i, (k, ids) in enumerate(calls) if i != last[k])
    assert streamed.manifest.stats == whole.manifest.stats == {"rows": 120, "status": {"ok": 120}}
    for k in range(num_shards):
        name = part_name(k, num_shards)
        assert pq.read_table(tmp_path / "streamed" / name).equals(
            pq.read_table(tmp_path / "whole" / name))


def test_run_stage_limit_reads_the_first_rows(tmp_path: Path) -> None:
    src = str(tmp_path / "src")
    TableStore(src, "rollouts").write(grouped_problems(40, 3), {"src": 1})
    result = run_stage(input_url=src, output_url=str(tmp_path / "out"), output_table="rollouts",
                       config={}, process=lambda rows, k: (rows, {}), limit=50, batch_rows=8)
    assert result.manifest.rows == 50
    assert read_arrow(str(tmp_path / "out")).equals(read_arrow(src).slice(0, 50))


def test_failed_upload_to_s3_leaves_no_object(s3_bucket: tuple[str, dict]) -> None:
    """Object stores: the upload of a failed part is aborted, not committed by close/__del__."""
    import gc

    url, options = s3_bucket
    store = TableStore(url, "problems", options)
    with pytest.raises(RuntimeError, match="boom"):
        with store.part_writer(0, 1, CONFIG) as w:
            w.write(problems_rows(0, 5))
            raise RuntimeError("boom")
    gc.collect()
    assert not Folder(url, options).exists(part_name(0, 1))
    assert store.missing_parts(1, CONFIG) == [part_name(0, 1)]
