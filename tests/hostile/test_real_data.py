"""Issue 16, class 11: data that is fine gets in. OlympiadBench stores `final_answer` and
`solution` as lists (tests/data/olympiadbench_sample.jsonl has its fields and shapes): a list
answer with `is_multiple_answer` is one answer of several parts, all required; a solution list
holds alternatives (the first is kept)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from scope_data.grading import answer_parts, grade, grade_response
from scope_data.shards import read_arrow, read_manifest
from tests.hostile.helpers import one_error_line, snapshot

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "olympiadbench_sample.jsonl"


def test_olympiadbench_lists_are_ingested_with_their_meaning(tmp_path):
    result = CliRunner().invoke(app, ["problems", str(SAMPLE), "--out", str(tmp_path / "p"),
                                      "--index-field", "id"])
    assert result.exit_code == 0, result.output
    rows = read_arrow(str(tmp_path / "p")).to_pylist()
    assert [r["source_index"] for r in rows] == [1606, 1607, 1608]
    assert [r["answer"] for r in rows] == ['["$x=2$", "$y=1$"]', "55", '["2", "3"]']
    assert [answer_parts(r["answer"]) for r in rows] == [["$x=2$", "$y=1$"], None, ["2", "3"]]
    assert rows[1]["solution"] == r"The sum is $\frac{10 \cdot 11}{2} = 55$."  # the first of 2
    assert rows[0]["prompt"].startswith("Find all pairs $(x, y)$")
    config = read_manifest(str(tmp_path / "p")).config
    assert (config["problem_field"], config["answer_field"], config["solution_field"]) == \
        ("question", "final_answer", "solution")


@pytest.mark.parametrize("response, correct", [
    (r"So $x = 2$ and $y = 1$: \boxed{x=2, y=1}", True),
    (r"\boxed{y=1} and \boxed{x=2}", True),  # the parts in any order
    (r"The final answer is \boxed{x=2}", False),  # one part of two: not the answer
    (r"\boxed{x=2, y=2}", False),
    (r"\boxed{x=2, y=1, z=0}", False),
])
def test_a_multi_part_answer_needs_every_part(response, correct):
    gold = '["$x=2$", "$y=1$"]'
    assert grade(response, gold).correct is correct
    pred, ok, status = grade_response("math", "q", gold, response)
    assert (ok, status) == (correct, "ok") and pred is not None


def test_two_roots_and_a_single_answer_list():
    assert grade(r"The roots are \boxed{2, 3}", '["2", "3"]').correct
    assert not grade(r"The roots are \boxed{2}", '["2", "3"]').correct
    assert grade(r"\boxed{(1,2)}", "(1,2)").correct  # a plain answer is never split


def test_list_answer_without_the_flag_is_refused_naming_the_record(tmp_path):
    src = tmp_path / "in" / "multi.jsonl"
    src.parent.mkdir()
    src.write_text(json.dumps({"question": "Roots of t^2-5t+6?", "final_answer": ["2", "3"]})
                   + "\n")
    before = snapshot(tmp_path)
    line = one_error_line(CliRunner().invoke(app, ["problems", str(src), "--out",
                                                   str(tmp_path / "out")]))
    assert "multi.jsonl, line 1: field 'final_answer' holds 2 answers and the record has no " \
           "`is_multiple_answer: true`" in line
    assert snapshot(tmp_path) == before


def test_solution_field_option(tmp_path):
    src = tmp_path / "s.jsonl"
    src.write_text(json.dumps({"problem": "1+1?", "answer": "2",
                               "rationale": ["1 + 1 = 2.", "Count: two."]}) + "\n")
    result = CliRunner().invoke(app, ["problems", str(src), "--out", str(tmp_path / "p"),
                                      "--solution-field", "rationale"])
    assert result.exit_code == 0, result.output
    (row,) = read_arrow(str(tmp_path / "p")).to_pylist()
    assert row["solution"] == "1 + 1 = 2." and row["answer"] == "2"
