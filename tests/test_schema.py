"""Table schemas (scope_data.schema): validate/conform name the offending column."""

from __future__ import annotations

import pyarrow as pa
import pytest

from scope_data.schema import (
    SCHEMAS,
    SchemaError,
    conform,
    empty_table,
    schema_for,
    validate,
)


def problems(**overrides: pa.Array) -> pa.Table:
    cols = {"problem_id": pa.array(["a", "b"]), "source": pa.array(["s", "s"]),
            "source_index": pa.array([0, 1], pa.int64()), "task": pa.array(["math", "math"]),
            "prompt": pa.array(["1+1", "2+2"]), "answer": pa.array(["2", "4"]),
            "solution": pa.array([None, "2+2=4"])}
    cols.update(overrides)
    return pa.table(cols)


def test_valid_table_passes_and_extra_columns_are_allowed() -> None:
    assert validate("problems", problems()) is None
    extra = problems(extra=pa.array([1, 2]))
    assert validate("problems", extra) is None
    conformed = conform("problems", extra)  # conform drops what the schema does not declare
    assert conformed.schema == SCHEMAS["problems"]
    assert conformed.column("prompt").to_pylist() == ["1+1", "2+2"]


def test_missing_column_is_named() -> None:
    table = problems().drop_columns(["answer"])
    message = r"problems in x.parquet: missing column 'answer' \(string\)"
    with pytest.raises(SchemaError, match=message):
        validate("problems", table, where="x.parquet")


def test_mistyped_column_is_named_with_both_types() -> None:
    table = problems(source_index=pa.array([0, 1], pa.int32()))
    with pytest.raises(SchemaError, match="column 'source_index' has type int32, expected int64"):
        validate("problems", table)


def test_nulls_in_a_required_column_are_refused() -> None:
    table = problems(answer=pa.array(["2", None]))
    with pytest.raises(SchemaError, match="column 'answer' has 1 null values"):
        validate("problems", table)
    validate("problems", problems(solution=pa.array([None, None], pa.string())))  # nullable


def test_unknown_table_lists_known_ones() -> None:
    with pytest.raises(SchemaError, match="unknown table 'rollout'.*problems, rollouts"):
        schema_for("rollout")


def test_conform_selects_orders_and_casts() -> None:
    table = problems(source_index=pa.array([0, 1], pa.int32()), extra=pa.array([1, 2]))
    out = conform("problems", table.select(list(reversed(table.column_names))))
    assert out.schema == schema_for("problems")
    assert out.column("source_index").to_pylist() == [0, 1]
    validate("problems", out)


def test_conform_names_missing_column_and_bad_cast() -> None:
    with pytest.raises(SchemaError, match="missing column 'prompt'"):
        conform("problems", problems().drop_columns(["prompt"]))
    with pytest.raises(SchemaError, match="cannot cast"):
        conform("problems", problems(source_index=pa.array(["zero", "one"])))


def test_tables_are_denormalised_supersets() -> None:
    """Each table carries every column of the one it is built from (DESIGN.md section 3)."""
    chain = ["problems", "rollouts", "scored", "corrected"]
    for up, down in zip(chain, chain[1:], strict=False):
        up_fields, down_fields = list(SCHEMAS[up]), list(SCHEMAS[down])
        assert down_fields[: len(up_fields)] == up_fields
    names = [f.name for s in SCHEMAS.values() for f in s]
    for schema in SCHEMAS.values():
        assert len(set(schema.names)) == len(schema.names)
    assert "status" in names and "score_status" in names and "correct_status" in names


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_empty_table_validates(name: str) -> None:
    table = empty_table(name)
    assert table.num_rows == 0 and table.schema == SCHEMAS[name]
    validate(name, table)
