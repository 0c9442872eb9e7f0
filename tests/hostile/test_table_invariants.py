"""Issue 16, class 6: table values that break the contract are refused when a stage reads the
table (`scope_data.validate`), with one line naming the part file, the row and the field; the
input is left as it was and no output is written."""

from __future__ import annotations

import math

import polars as pl
import pyarrow as pa
import pytest

from scope_data.layout import part_name
from scope_data.schema import SCHEMAS
from scope_data.shards import ShardError, TableStore, read_manifest
from scope_data.validate import TableValueError, check_table, check_token_range
from tests.hostile.helpers import cli, snapshot
from tests.test_bad_inputs import (  # noqa: F401
    arith_rollouts,
    edit_manifest,
    problems_rows,
    tok,
    tok_dir,
)

PART = part_name(0, 1)


def _edit(rows: list[dict], case: str) -> list[dict]:
    rows = [dict(r) for r in rows]
    if case == "reward-range":
        rows[2]["reward"] = 0.5
    elif case == "reward-vs-correct":
        rows[3]["reward"], rows[3]["correct"] = 1.0, False
    elif case == "reward-nan":
        rows[1]["reward"] = math.nan
    elif case == "duplicate-id":
        rows[4]["rollout_id"] = rows[1]["rollout_id"]
    elif case == "duplicate-row":
        rows.append(dict(rows[0]))
    elif case == "empty-id":
        rows[2]["rollout_id"] = ""
    elif case == "negative-token":
        rows[3]["prompt_token_ids"] = [5, -7, 2]
    return rows


CASES = {
    "reward-range": f"{PART}: row 2: field 'reward': reward 0.5 is not 0 or 1",
    "reward-vs-correct": f"{PART}: row 3: field 'reward': reward 1.0 does not match correct = "
                         "False",
    "reward-nan": f"{PART}: row 1: field 'reward': reward nan is not 0 or 1",
    "duplicate-id": f"{PART}: row 1: field 'rollout_id': ",
    "duplicate-row": f"{PART}: row 0: field 'rollout_id': ",
    "empty-id": f"{PART}: row 2: field 'rollout_id': empty id",
    "negative-token": f"{PART}: row 3: field 'prompt_token_ids': negative token id -7",
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_rollout_values_are_refused_naming_file_row_and_field(tmp_path, tok, tok_dir,  # noqa: F811
                                                                  case):
    url = tmp_path / "rollouts"
    rows = _edit(arith_rollouts(tok, tok_dir, 3), case)
    TableStore(str(url), "rollouts").write(pa.Table.from_pylist(rows, SCHEMAS["rollouts"]), {})
    before = snapshot(tmp_path)
    code, text = cli("score", "--rollouts", url, "--out", tmp_path / "scored", "--prm",
                     "rule:arith")
    assert code == 1 and f"{url}/{CASES[case]}" in text, text
    if case.startswith("duplicate"):
        assert "is not unique (2 rows carry it)" in text
    assert snapshot(tmp_path) == before and not (tmp_path / "scored").exists()


def test_a_problem_split_across_two_parts_is_refused(tmp_path, tok, tok_dir):  # noqa: F811
    url = str(tmp_path / "rollouts")
    rows = pa.Table.from_pylist(arith_rollouts(tok, tok_dir, 2), SCHEMAS["rollouts"])
    store = TableStore(url, "rollouts")
    store.write_part(rows.slice(0, 3), 0, 2, {})  # problem 1's two rows: one in each part
    store.write_part(rows.slice(3), 1, 2, {})
    store.finalize(2, {})
    pid = rows.column("problem_id")[2].as_py()
    with pytest.raises(TableValueError, match=rf"{url}/part-00000-of-00002.parquet: row 2: field "
                                              rf"'problem_id': problem '{pid}' has rows in more "
                                              r"than one part \(part-00000-of-00002.parquet, "
                                              r"part-00001-of-00002.parquet\)"):
        check_table(read_manifest(url))


def test_problems_with_a_duplicate_problem_id_are_refused_by_generate(tmp_path):
    url = tmp_path / "problems"
    rows = problems_rows(4)
    rows[3]["problem_id"] = rows[0]["problem_id"]  # two prompts, one id
    TableStore(str(url), "problems").write(pa.Table.from_pylist(rows, SCHEMAS["problems"]), {})
    before = snapshot(tmp_path)
    code, text = cli("generate", "--problems", url, "--policy", "hf:/nonexistent", "--out",
                     tmp_path / "r")
    assert code == 1
    assert (f"{url}/{PART}: row 0: field 'problem_id': '{rows[0]['problem_id']}' is not unique "
            "(2 rows carry it)") in text, text
    assert snapshot(tmp_path) == before and not (tmp_path / "r").exists()


def test_manifest_listing_a_part_twice_is_refused(tmp_path):
    url = str(tmp_path / "problems")
    TableStore(url, "problems").write(
        pa.Table.from_pylist(problems_rows(3), SCHEMAS["problems"]), {})
    edit_manifest(url, files=lambda b: b["files"].append(dict(b["files"][0])))
    before = snapshot(tmp_path)
    with pytest.raises(ShardError, match=rf"lists part '{PART}' twice \(refused: its rows would "
                                         r"be read twice\)"):
        read_manifest(url)
    code, text = cli("generate", "--problems", url, "--policy", "hf:/nonexistent", "--out",
                     tmp_path / "r")
    assert code == 1 and f"lists part '{PART}' twice" in text
    assert snapshot(tmp_path) == before


def test_token_ids_outside_the_vocabulary_are_refused(tmp_path, tok, tok_dir):  # noqa: F811
    url = str(tmp_path / "rollouts")
    rows = arith_rollouts(tok, tok_dir, 2)
    rows[1]["response_token_ids"] = [*rows[1]["response_token_ids"][:-1], 5000]
    TableStore(url, "rollouts").write(pa.Table.from_pylist(rows, SCHEMAS["rollouts"]), {})
    check_table(read_manifest(url))  # no vocabulary given: in range
    with pytest.raises(TableValueError, match=rf"{url}/{PART}: row 1: field "
                                              r"'response_token_ids': token id 5000 is outside "
                                              r"the tokenizer's vocabulary \(size 1000\)"):
        check_table(read_manifest(url), vocab_size=1000)
    frame = pl.DataFrame(rows).select("rollout_id", "prompt_token_ids", "response_token_ids")
    with pytest.raises(TableValueError, match=r"training rows: row 1 \(rollout '[0-9a-f]+'\): "
                                              r"field 'response_token_ids': token id 5000 is "
                                              r"outside the vocabulary \[0, 1000\)"):
        check_token_range(frame, 1000, "training rows")
    check_token_range(frame, 6000, "training rows")
