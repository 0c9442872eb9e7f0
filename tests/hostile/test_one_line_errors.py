"""Issue 16, class 7: hostile files, recipes and storage give one clear line naming the file
(exit 1), never a traceback, and leave every folder as it was (file listing and checksums)."""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from cli.main import app
from pipelines.executors.shard_executor import run_stage
from scope_data.shards import ShardError, read_manifest
from tests.helpers_tables import manifest_body, write_manifest_body
from tests.hostile.helpers import one_error_line, snapshot
from tests.test_bad_inputs import write_problems

PART = "part-00000-of-00001.parquet"


def reseal(url: str) -> None:
    """Rewrite the manifest's checksums to match the parts as they now are (a hostile writer)."""
    body = manifest_body(url)
    for entry in body["files"]:
        data = (Path(url) / entry["path"]).read_bytes()
        entry["sha256"], entry["bytes"] = hashlib.sha256(data).hexdigest(), len(data)
    write_manifest_body(url, body)


def truncated(url: str) -> None:
    part = Path(url) / PART
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    reseal(url)


def invalid_utf8(url: str) -> None:
    part = Path(url) / PART
    table = pq.read_table(part)
    col = table.column("prompt").combine_chunks()
    validity, offsets, data = col.buffers()
    raw = bytearray(data.to_pybytes())
    raw[0] = 0xFF
    bad = pa.Array.from_buffers(pa.string(), len(col), [validity, offsets, pa.py_buffer(raw)])
    pq.write_table(table.set_column(table.schema.get_field_index("prompt"), "prompt", bad), part)
    reseal(url)


def _copy_stage(rows: pa.Table, k: int):
    return rows, {"rows": rows.num_rows}


@pytest.mark.parametrize("damage, message", [
    (truncated, rf"t/{PART}: unreadable table \(ArrowInvalid: Parquet magic bytes not found"),
    (invalid_utf8, rf"t(/{PART})?: unreadable (table|Parquet part) \(.*(UTF-8|UTF8)"),
])
def test_resealed_bad_part_is_one_line_for_inspect_and_a_stage(tmp_path, damage, message):
    url = str(tmp_path / "t")
    write_problems(url, 6)
    damage(url)
    before = snapshot(url)
    line = one_error_line(CliRunner().invoke(app, ["inspect", url]))
    assert re.search(message, line), line
    with pytest.raises(ShardError, match=message):
        run_stage(input_url=url, output_url=str(tmp_path / "out"), output_table="problems",
                  config={"copy": 1}, process=_copy_stage)
    assert snapshot(url) == before
    assert snapshot(tmp_path / "out") == {}  # nothing written, not even a folder's metadata


@pytest.mark.parametrize("edit, message", [
    (lambda b: b.update(files=["x"]), r"field 'files\[0\]' is str 'x', expected dict"),
    (lambda b: b["files"][0].update(path=5), r"field 'files\[0\].path' is int 5, expected str"),
    (lambda b: b["files"][0].pop("sha256"), r"files\[0\] has no 'sha256' field"),
    (lambda b: b.pop("table"), r"not a table manifest \(no 'table' field\)"),
    (lambda b: b["files"][0].update(path="."), r"unsafe file path '\.' in the file list"),
    (lambda b: b["files"][0].update(rows=-1), r"field 'files\[0\].rows' is -1, expected a count"),
    (lambda b: b["files"][0].update(sha256="zz"), r"files\[0\].sha256 is not a sha256 hex digest"),
    (lambda b: b.update(rows=True), r"field 'rows' is bool True, expected int"),
])
def test_malformed_manifest_fields_are_one_line_naming_the_manifest(tmp_path, edit, message):
    url = str(tmp_path / "t")
    write_problems(url, 4)
    body = manifest_body(url)
    edit(body)
    write_manifest_body(url, body)
    before = snapshot(url)
    with pytest.raises(ShardError, match=rf"t/\.scope/manifest\.parquet: {message}"):
        read_manifest(url)
    line = one_error_line(CliRunner().invoke(app, ["inspect", url]))
    assert "manifest.parquet: " in line
    assert snapshot(url) == before


@pytest.mark.parametrize("name, data, message", [
    ("p.jsonl.gz", b'{"problem": "1+1?", "answer": "2"}\n',
     r"p\.jsonl\.gz: not a readable gz file \(BadGzipFile: Not a gzipped file"),
    ("p.jsonl.gz", gzip.compress(b'{"problem": "1+1?", "answer": "2"}\n')[:-9],
     r"p\.jsonl\.gz: not a readable gz file \(EOFError: "),
    ("p.jsonl", b'{"id": 99999999999999999999999, "problem": "1+1?", "answer": "2"}\n',
     r"p\.jsonl, line 1: field 'id' is 99999999999999999999999, not an integer index in "
     r"\[0, 2\*\*63\)"),
    ("p.jsonl", b'{"id": -5, "problem": "1+1?", "answer": "2"}\n',
     r"p\.jsonl, line 1: field 'id' is -5, not an integer index"),
    ("p.jsonl", b'{"id": true, "problem": "1+1?", "answer": "2"}\n',
     r"p\.jsonl, line 1: field 'id' is True, not an integer index"),
])
def test_bad_problem_files_are_one_line_and_write_nothing(tmp_path, name, data, message):
    src = tmp_path / "in" / name
    src.parent.mkdir()
    src.write_bytes(data)
    before = snapshot(tmp_path)
    line = one_error_line(CliRunner().invoke(
        app, ["problems", str(src), "--out", str(tmp_path / "out"), "--index-field", "id"]))
    assert re.search(message, line), line
    assert snapshot(tmp_path) == before


BASE = """name: t
algo: grpo
policy: hf:/nowhere
problems: {arith: {count: 4, seed: 1}}
eval: {name: h, arith: {count: 4, seed: 2}}
"""


@pytest.mark.parametrize("change, message", [
    ("rounds: [1]", "rounds must be int, got list"),
    ("rounds: true", "rounds must be int, got bool"),
    ("rounds: 2.9", "rounds must be int, got float"),
    ("seed: {a: 1}", "seed must be int, got dict"),
    ("seed: 99999999999999999999999", r"seed must be in \[0, 2\*\*63\)"),
    ("policy: 123", "policy must be str, got int"),
    ("problems: {arith: {count: '4', seed: 1}}",
     "recipe problems: option count must be int, got str '4'"),
    ("problems: {arith: {count: 4.0, seed: 1}}",
     "recipe problems: option count must be int, got float 4.0"),
    ("problems: {path: 5}", "problems: path must be str, got int 5"),
    ("generate: {n: true}", "recipe generate: option n must be int, got bool True"),
    ("generate: {temperature: '1'}", "recipe generate: option temperature must be float"),
    ("generate: {temperature: .nan}", "--temperature must be a finite number >= 0, got nan"),
    ("evaluate: {n: 0}", "--n must be >= 1"),
    ("tiny: {max_steps: '3'}", "recipe tiny: option max_steps must be int | None"),
])
def test_wrong_recipe_types_are_one_line_and_nothing_is_run(tmp_path, change, message):
    key = change.split(":")[0]
    body = "".join(line + "\n" for line in BASE.splitlines() if not line.startswith(key + ":"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(body + change + "\n")
    args = ["run", str(recipe), "--out", str(tmp_path / "run"), "--dry-run"]
    if key == "tiny":
        recipe.write_text(body.replace("policy: hf:/nowhere", "policy: tiny") + change + "\n")
    line = one_error_line(CliRunner().invoke(app, args))
    assert re.search(message, line), line
    assert not (tmp_path / "run").exists()


def test_unreachable_storage_endpoint_is_one_line(tmp_path):
    pytest.importorskip("s3fs")
    from tests.s3_server import _free_port

    options = {"key": "k", "secret": "s", "config_kwargs": {"retries": {"max_attempts": 1}},
               "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{_free_port()}",
                                 "region_name": "us-east-1"}}
    line = one_error_line(CliRunner().invoke(app, [
        "problems", "arith", "--count", "2", "--out", "s3://b/x",
        "--storage-options", json.dumps(options)]))
    assert line.startswith("error: s3://b/x: cannot reach the storage (EndpointConnectionError: ")
    assert "check the endpoint in --storage-options" in line


def test_missing_bucket_is_one_line_and_never_created(s3_server):
    import boto3

    endpoint = s3_server["client_kwargs"]["endpoint_url"]
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                      aws_access_key_id=s3_server["key"],
                      aws_secret_access_key=s3_server["secret"])
    buckets = sorted(b["Name"] for b in s3.list_buckets()["Buckets"])
    assert "no-such-bucket" not in buckets
    line = one_error_line(CliRunner().invoke(app, [
        "problems", "arith", "--count", "2", "--out", "s3://no-such-bucket/p",
        "--storage-options", json.dumps(s3_server)]))
    assert line == ("error: s3://no-such-bucket/p: bucket 'no-such-bucket' does not exist or is "
                    "not accessible (scope never creates buckets: create it first)")
    assert sorted(b["Name"] for b in s3.list_buckets()["Buckets"]) == buckets


@pytest.mark.parametrize("args, message", [
    (["--count", "99999999999999999999"], r"--count must be in \[1, 10000000\]"),
    (["--steps", "1-99999999999999999999"], r"steps must satisfy 1 <= min <= max <= 1000"),
    (["--modulus", "-5"], r"modulus must be in \[2, "),
])
def test_huge_or_negative_generation_sizes_are_one_line(tmp_path, args, message):
    line = one_error_line(CliRunner().invoke(
        app, ["problems", "arith", "--out", str(tmp_path / "p"), *args]))
    assert re.search(message, line), line
    assert not (tmp_path / "p").exists()
