"""Problem ingestion (scope_data.problems): the public data sets, arith, bad input."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cli.cmd_problems import parse_steps
from scope_data.hashing import stable_id
from scope_data.problems import arith_table, ingest, source_name, write_arith
from scope_data.shards import read_arrow, read_manifest
from scope_data.tasks.arith import parse_prompt


def last_boxed(text: str) -> str:
    """Content of the last \\boxed{...} (balanced braces), written independently of grading."""
    start = text.rindex("\\boxed{") + len("\\boxed{")
    depth, i = 1, start
    while depth:
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        i += 1
    return text[start : i - 1].strip()


def file_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# -- the public data sets (Must show) -------------------------------------------------------
@pytest.mark.parametrize(("name", "count", "problem_key"), [
    ("math500.test", 500, "problem"), ("aime24.test", 30, "problem"),
    ("amc23.test", 40, "problem"),
])
def test_answer_field_sets(shared_data: Path, tmp_path: Path, name: str, count: int,
                           problem_key: str) -> None:
    src = shared_data / f"{name}.jsonl"
    result = ingest(str(src), str(tmp_path / "p"))
    table = read_arrow(str(tmp_path / "p"))
    rows = file_rows(src)
    assert result.rows == table.num_rows == count == len(rows) and result.skipped == 0
    assert result.source == name and set(table.column("source").to_pylist()) == {name}
    assert table.column("answer").to_pylist() == [str(r["answer"]) for r in rows]
    assert table.column("prompt").to_pylist() == [r[problem_key] for r in rows]
    assert table.column("source_index").to_pylist() == list(range(count))
    assert set(table.column("task").to_pylist()) == {"math"}
    if "solution" in rows[0]:
        assert table.column("solution").to_pylist() == [r["solution"] for r in rows]
    ids = table.column("problem_id").to_pylist()
    assert ids[0] == stable_id(name, 0, rows[0][problem_key]) and len(set(ids)) == count


def test_amc_float_answers_keep_the_files_text(shared_data: Path, tmp_path: Path) -> None:
    ingest(str(shared_data / "amc23.test.jsonl"), str(tmp_path / "p"))
    answers = read_arrow(str(tmp_path / "p")).column("answer").to_pylist()
    assert answers[0] == "27.0" and all(a.endswith(".0") for a in answers)


def test_gsm8k(shared_data: Path, tmp_path: Path) -> None:
    src = shared_data / "gsm8k.test.jsonl"
    result = ingest(str(src), str(tmp_path / "p"))
    table = read_arrow(str(tmp_path / "p"))
    rows = file_rows(src)
    assert result.rows == 1319 == table.num_rows and result.fields.answer_from == "gsm8k"
    assert table.column("answer").to_pylist() == [
        r["answer"].split("\n#### ")[-1].strip() for r in rows]
    assert table.column("prompt").to_pylist() == [r["question"] for r in rows]
    solutions = table.column("solution").to_pylist()
    assert all("####" not in s and s for s in solutions)
    assert [s + "\n#### " + a for s, a in zip(solutions, table.column("answer").to_pylist(),
                                              strict=True)] == [r["answer"] for r in rows]


def test_minerva_answers_are_the_last_boxed(shared_data: Path, tmp_path: Path) -> None:
    src = shared_data / "minerva_math.test.jsonl"
    result = ingest(str(src), str(tmp_path / "p"))
    table = read_arrow(str(tmp_path / "p"))
    rows = file_rows(src)
    assert result.rows == 272 == table.num_rows and result.fields.answer_from == "boxed"
    assert table.column("answer").to_pylist() == [last_boxed(r["solution"]) for r in rows]
    assert table.column("answer").to_pylist()[0] == "1.6"


def test_ingest_is_deterministic(shared_data: Path, tmp_path: Path) -> None:
    src = str(shared_data / "aime24.test.jsonl")
    a = ingest(src, str(tmp_path / "a")).manifest
    b = ingest(src, str(tmp_path / "b")).manifest
    assert a.content_hash == b.content_hash and a.config_hash == b.config_hash
    assert a.config["input_sha256"] and a.stats == {"status": {"ok": 30, "skipped_invalid": 0}}


def test_limit(shared_data: Path, tmp_path: Path) -> None:
    result = ingest(str(shared_data / "math500.test.jsonl"), str(tmp_path / "p"), limit=7)
    full = ingest(str(shared_data / "math500.test.jsonl"), str(tmp_path / "f"))
    assert result.rows == 7
    assert (read_arrow(str(tmp_path / "p")).column("problem_id").to_pylist()
            == read_arrow(str(tmp_path / "f")).column("problem_id").to_pylist()[:7])
    assert full.rows == 500


# -- arith ----------------------------------------------------------------------------------
def test_arith_generation_is_deterministic(tmp_path: Path) -> None:
    a = write_arith(str(tmp_path / "a"), count=50, seed=3, steps=(2, 4), modulus=7)
    b = write_arith(str(tmp_path / "b"), count=50, seed=3, steps=(2, 4), modulus=7)
    c = write_arith(str(tmp_path / "c"), count=50, seed=4, steps=(2, 4), modulus=7)
    assert a.manifest.content_hash == b.manifest.content_hash != c.manifest.content_hash
    table = read_arrow(str(tmp_path / "a"))
    assert table.num_rows == 50 and set(table.column("task").to_pylist()) == {"arith"}
    assert len(set(table.column("prompt").to_pylist())) == 50
    for row in table.to_pylist():
        problem = parse_prompt(row["prompt"])
        assert problem.modulus == 7 and 2 <= len(problem.ops) <= 4
        assert row["answer"] == problem.answer and row["solution"] == problem.solution
        assert row["problem_id"] == stable_id("arith:seed=3", row["source_index"], row["prompt"])
    assert a.manifest.config["steps"] == [2, 4]


def test_arith_excludes_and_counts() -> None:
    first = arith_table(20, seed=0)
    held_out = set(first.column("prompt").to_pylist())
    other = arith_table(20, seed=0, exclude_prompts=held_out)
    assert not held_out & set(other.column("prompt").to_pylist())
    with pytest.raises(ValueError, match="only .* distinct arith problems"):
        arith_table(50, seed=0, steps=(1, 1), modulus=2)
    assert parse_steps("3-6") == (3, 6) and parse_steps("4") == (4, 4)
    with pytest.raises(ValueError, match="--steps"):
        parse_steps("6-3")


# -- other formats --------------------------------------------------------------------------
ROWS = [{"q": f"What is {i}+{i}?", "a": str(2 * i), "id": i} for i in range(5)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_field_overrides_and_json_list(tmp_path: Path) -> None:
    src = tmp_path / "custom.json"
    src.write_text(json.dumps(ROWS))
    with pytest.raises(ValueError, match=r"custom.json: cannot tell which field holds the problem"
                                         r" text \(fields: q, a, id\); pass --problem-field"):
        ingest(str(src), str(tmp_path / "x"))
    result = ingest(str(src), str(tmp_path / "p"), problem_field="q", answer_field="a")
    table = read_arrow(str(tmp_path / "p"))
    assert result.source == "custom" and result.format == "json"
    assert table.column("prompt").to_pylist() == [r["q"] for r in ROWS]
    assert table.column("answer").to_pylist() == [r["a"] for r in ROWS]


def test_json_dict_of_columns_and_wrapper(tmp_path: Path) -> None:
    cols = tmp_path / "cols.json"
    cols.write_text('{"problem": ["a", "b"], "answer": [1, 2.50]}')  # numbers as written
    ingest(str(cols), str(tmp_path / "c"))
    assert read_arrow(str(tmp_path / "c")).column("answer").to_pylist() == ["1", "2.50"]
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"data": [{"problem": "x", "answer": "y"}]}))
    assert ingest(str(wrapped), str(tmp_path / "w")).rows == 1


def test_parquet_and_gzip_inputs(tmp_path: Path) -> None:
    rows = [{"problem": r["q"], "answer": r["a"], "solution": None} for r in ROWS]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "set.parquet")
    result = ingest(str(tmp_path / "set.parquet"), str(tmp_path / "p"))
    assert result.format == "parquet" and result.source == "set" and result.rows == 5
    with gzip.open(tmp_path / "set.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    gz = ingest(str(tmp_path / "set.jsonl.gz"), str(tmp_path / "g"))
    assert gz.source == "set" and gz.manifest.content_hash == result.manifest.content_hash


def test_saved_datasets_folder(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    rows = [{"question": r["q"], "answer": f"{r['q']}\n#### {r['a']}"} for r in ROWS]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    result = ingest(str(tmp_path / "saved"), str(tmp_path / "p"))
    assert result.format == "datasets" and result.source == "saved"
    assert read_arrow(str(tmp_path / "p")).column("answer").to_pylist() == [r["a"] for r in ROWS]
    # a folder of data files goes through `load_dataset` (offline), splits from file names
    (tmp_path / "folder").mkdir()
    write_jsonl(tmp_path / "folder" / "test.jsonl", rows)
    assert ingest(str(tmp_path / "folder"), str(tmp_path / "f"), split="test").rows == 5
    with pytest.raises(ValueError, match="not a file and not a loadable"):
        ingest(str(tmp_path / "folder"), str(tmp_path / "g"), split="validation")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.jsonl: no such file"):
        ingest(str(tmp_path / "nope.jsonl"), str(tmp_path / "p"))


# -- invalid rows ---------------------------------------------------------------------------
BAD = [{"problem": "ok 1", "answer": "1"}, {"problem": "ok 2", "answer": "2"},
       {"problem": "no answer", "answer": None}, {"problem": "  ", "answer": "3"},
       {"problem": "ok 5", "answer": "5"}]


def test_invalid_rows_error_naming_file_line_and_field(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "bad.jsonl", BAD)
    with pytest.raises(ValueError, match=rf"{src}, line 3: no answer \(field 'answer'\)"):
        ingest(str(src), str(tmp_path / "p"))
    assert not (tmp_path / "p").exists()  # nothing half-written
    json_src = tmp_path / "bad.json"
    json_src.write_text(json.dumps([BAD[0], BAD[3]]))
    with pytest.raises(ValueError, match=rf"{json_src}, index 1: no problem text \(field "
                                         "'problem'\\)"):
        ingest(str(json_src), str(tmp_path / "q"))
    pq.write_table(pa.Table.from_pylist(BAD), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=r"bad.parquet, row 2: no answer"):
        ingest(str(tmp_path / "bad.parquet"), str(tmp_path / "r"))


def test_skip_invalid_counts_in_manifest(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "bad.jsonl", BAD)
    result = ingest(str(src), str(tmp_path / "p"), skip_invalid=True)
    assert result.rows == 3 and result.skipped == 2
    assert result.skipped_examples[0].endswith("line 3: no answer (field 'answer')")
    manifest = read_manifest(str(tmp_path / "p"))
    assert manifest.stats == {"status": {"ok": 3, "skipped_invalid": 2}}
    table = read_arrow(str(tmp_path / "p"))
    assert table.column("prompt").to_pylist() == ["ok 1", "ok 2", "ok 5"]
    assert table.column("source_index").to_pylist() == [0, 1, 4]  # positions in the file


def test_gsm8k_row_without_hash_line(tmp_path: Path) -> None:
    rows = [{"question": "a", "answer": "x\n#### 1"}, {"question": "b", "answer": "#### 2"},
            {"question": "c", "answer": "no final line"}]
    src = write_jsonl(tmp_path / "g.jsonl", rows[:2] * 3 + rows[2:])
    with pytest.raises(ValueError, match=r"line 7: no '#### <answer>' line in field 'answer'"):
        ingest(str(src), str(tmp_path / "p"))


def test_minerva_style_row_without_boxed(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "m.jsonl", [{"problem": "p", "solution": "so \\boxed{4}"},
                                             {"problem": "q", "solution": "no box"}])
    with pytest.raises(ValueError, match=r"line 2: no answer \(no \\boxed\{\} in field "
                                         "'solution'\\)"):
        ingest(str(src), str(tmp_path / "p"))


def test_non_utf8_names_file_and_line(tmp_path: Path) -> None:
    src = tmp_path / "latin1.jsonl"
    src.write_bytes(b'{"problem": "a", "answer": "1"}\n{"problem": "caf\xe9", "answer": "2"}\n')
    with pytest.raises(ValueError, match=rf"{src}, line 2: not valid UTF-8"):
        ingest(str(src), str(tmp_path / "p"))
    json_src = tmp_path / "latin1.json"
    json_src.write_bytes(b'[\n{"problem": "a", "answer": "1"},\n{"problem": "\xe9", "answer": 2}]')
    with pytest.raises(ValueError, match=rf"{json_src}, line 3: not valid UTF-8"):
        ingest(str(json_src), str(tmp_path / "q"))


def test_bad_json_line(tmp_path: Path) -> None:
    src = tmp_path / "broken.jsonl"
    src.write_text('{"problem": "a", "answer": "1"}\n\n{"problem": "b", "answer"\n')
    with pytest.raises(ValueError, match=rf"{src}, line 3: not valid JSON"):
        ingest(str(src), str(tmp_path / "p"))


def test_duplicate_problem_ids_name_both_lines(tmp_path: Path) -> None:
    rows = [{"idx": 0, "problem": "same", "answer": "1"}, {"idx": 1, "problem": "other",
                                                           "answer": "2"},
            {"idx": 0, "problem": "same", "answer": "1"}]
    src = write_jsonl(tmp_path / "dup.jsonl", rows)
    with pytest.raises(ValueError, match=rf"duplicate problem_id .*{src}, line 1 and {src}, "
                                         "line 3"):
        ingest(str(src), str(tmp_path / "p"), index_field="idx")
    assert ingest(str(src), str(tmp_path / "q")).rows == 3  # positions differ: distinct ids


def test_source_name() -> None:
    assert source_name("/a/b/math500.test.jsonl") == "math500.test"
    assert source_name("s3://bucket/x/train.parquet") == "train"
    assert source_name("data.jsonl.gz") == "data"
    assert source_name("/a/folder/") == "folder"


def test_round_batches_walk_shuffled_epochs_and_wrap() -> None:
    """3 rounds of 4 over 10 problems: rounds 1-2 and the first 2 of round 3 are epoch 0 in
    its shuffled order; round 3 wraps into epoch 1 (another order), which rounds 3-5 cover.
    A batch never holds an id twice. Deterministic, whatever the table's row order."""
    from scope_data.rounds import round_batch

    ids = [f"p{i}" for i in range(10)]
    r1, r2, r3, r4, r5 = (round_batch(ids, r, 4, seed=7) for r in range(1, 6))
    epoch0 = r1 + r2 + r3[:2]
    assert sorted(epoch0) == ids and epoch0 != ids  # each problem once, shuffled
    assert all(len(set(b)) == 4 for b in (r1, r2, r3, r4, r5))
    assert set(r3 + r4 + r5) == set(ids)  # epoch 1 (r3's tail on) covers the table again
    assert r3[2:] + r4 != epoch0[:6]  # in another order
    assert [r1, r2, r3] == [round_batch(ids[::-1], r, 4, seed=7) for r in (1, 2, 3)]
    assert round_batch(ids, 1, 4, seed=8) != r1
    with pytest.raises(ValueError, match="prompts_per_round must be in 1..10"):
        round_batch(ids, 1, 11, seed=7)


def test_generate_takes_the_rounds_batch(tmp_path: Path) -> None:
    """`scope generate --prompts-per-round K --round R` reads exactly round R's batch."""
    import polars as pl

    from pipelines.executors.shard_executor import input_batches
    from pipelines.stages.generate import GenerateConfig, _round_problems
    from scope_data.rounds import round_batch
    from scope_data.shards import read_manifest, scan

    write_arith(str(tmp_path / "p"), count=10, seed=3)
    ids = scan(str(tmp_path / "p")).select("problem_id").collect()["problem_id"].to_list()
    for r in (1, 2, 3):
        cfg = GenerateConfig(problems=str(tmp_path / "p"), policy="hf:x", out="o", round=r,
                             prompts_per_round=4, prompt_seed=5)
        batch = _round_problems(cfg)
        assert batch == round_batch(ids, r, 4, seed=5)
        rows = pl.concat(pl.from_arrow(b) for b in input_batches(
            read_manifest(str(tmp_path / "p")), 0, 1, problem_ids=batch))
        assert sorted(rows["problem_id"].to_list()) == sorted(batch)
