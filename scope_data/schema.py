"""Arrow schemas of the tables that flow between stages (DESIGN.md section 3).

Rows flow forward denormalised: each table carries every column of the table it was built
from plus its own, so any stage's output can be inspected on its own.
"""

from __future__ import annotations

import math

import pyarrow as pa

SCHEMA_VERSION = 1

PROBLEM_FIELDS = [
    pa.field("problem_id", pa.string(), nullable=False),
    pa.field("source", pa.string(), nullable=False),
    pa.field("source_index", pa.int64(), nullable=False),
    pa.field("task", pa.string(), nullable=False),  # "arith", "countdown" or "math"
    pa.field("prompt", pa.string(), nullable=False),
    pa.field("answer", pa.string(), nullable=False),
    pa.field("solution", pa.string()),
]

ROLLOUT_FIELDS = [
    pa.field("rollout_id", pa.string(), nullable=False),
    pa.field("round", pa.int32(), nullable=False),
    pa.field("sample_idx", pa.int32(), nullable=False),
    pa.field("policy", pa.string(), nullable=False),
    pa.field("prompt_text", pa.string(), nullable=False),
    pa.field("prompt_token_ids", pa.list_(pa.int32()), nullable=False),
    pa.field("response_text", pa.string(), nullable=False),
    pa.field("response_token_ids", pa.list_(pa.int32()), nullable=False),
    pa.field("behaviour_logprobs", pa.list_(pa.float32()), nullable=False),
    pa.field("finish_reason", pa.string(), nullable=False),
    pa.field("temperature", pa.float32(), nullable=False),
    pa.field("top_p", pa.float32(), nullable=False),
    pa.field("seed", pa.int64(), nullable=False),
    pa.field("top_k", pa.int32()),  # 0 (or -1) = off; null in tables written before it existed
    pa.field("engine", pa.string()),  # the policy spec's kind: hf | vllm | openai
    pa.field("policy_version", pa.int32()),  # round loop: rounds trained so far; null offline
    pa.field("pred_answer", pa.string()),
    pa.field("reward", pa.float32(), nullable=False),
    pa.field("correct", pa.bool_(), nullable=False),
    pa.field("status", pa.string(), nullable=False),
]

STEP_TYPE = pa.struct(
    [
        pa.field("text", pa.string()),
        pa.field("char_start", pa.int32()),
        pa.field("char_end", pa.int32()),
        pa.field("token_start", pa.int32()),
        pa.field("token_end", pa.int32()),
        pa.field("score", pa.float32()),
    ]
)

STEPS_TYPE = pa.list_(STEP_TYPE)

SCORED_FIELDS = [
    pa.field("steps", STEPS_TYPE, nullable=False),
    pa.field("first_error", pa.int32()),  # -1: no step below threshold; null: not scored
    pa.field("prm", pa.string(), nullable=False),
    pa.field("threshold", pa.float32(), nullable=False),
    pa.field("score_status", pa.string(), nullable=False),
]

CORRECTED_FIELDS = [
    pa.field("kind", pa.string(), nullable=False),  # "policy" | "corrected"
    pa.field("source_rollout_id", pa.string()),
    pa.field("prefix_steps", pa.int32()),
    pa.field("off_policy_start", pa.int32()),  # token index where the teacher suffix begins
    pa.field("teacher", pa.string()),
    pa.field("correct_status", pa.string(), nullable=False),
]

# Columns added after SCHEMA_VERSION 1 was first written: `conform` fills them with nulls when
# an older table lacks them, so those tables still read.
LATER_COLUMNS = frozenset({"top_k", "engine", "policy_version"})

SCHEMAS: dict[str, pa.Schema] = {
    "problems": pa.schema(PROBLEM_FIELDS),
    "rollouts": pa.schema(PROBLEM_FIELDS + ROLLOUT_FIELDS),
    "scored": pa.schema(PROBLEM_FIELDS + ROLLOUT_FIELDS + SCORED_FIELDS),
    "corrected": pa.schema(PROBLEM_FIELDS + ROLLOUT_FIELDS + SCORED_FIELDS + CORRECTED_FIELDS),
}


class SchemaError(ValueError):
    """A table does not match the schema its name promises."""


def schema_for(table_name: str) -> pa.Schema:
    """The Arrow schema of `table_name`; unknown names list the known ones."""
    try:
        return SCHEMAS[table_name]
    except KeyError:
        raise SchemaError(
            f"unknown table {table_name!r}; known tables: {', '.join(SCHEMAS)}"
        ) from None


def validate(table_name: str, table: pa.Table, where: str = "") -> None:
    """Raise SchemaError naming the first missing or mistyped column of `table`.

    Extra columns are allowed (stages may carry more), required ones must have exactly the
    declared type, and non-nullable columns must hold no nulls.
    """
    schema = schema_for(table_name)
    place = f" in {where}" if where else ""
    for field in schema:
        if field.name not in table.column_names:
            raise SchemaError(f"{table_name}{place}: missing column {field.name!r} ({field.type})")
        actual = table.schema.field(field.name).type
        if actual != field.type:
            raise SchemaError(
                f"{table_name}{place}: column {field.name!r} has type {actual}, "
                f"expected {field.type}"
            )
        if not field.nullable and table.column(field.name).null_count:
            raise SchemaError(
                f"{table_name}{place}: column {field.name!r} has "
                f"{table.column(field.name).null_count} null values but may not be null"
            )


# what a failed cast raises: ValueError (pyarrow's own checks, and its ArrowInvalid subclass: a
# value that does not convert), ArrowTypeError and ArrowNotImplementedError (no cast between the
# two types)
CAST_ERRORS = (ValueError, pa.ArrowTypeError, pa.ArrowNotImplementedError)


def conform(table_name: str, table: pa.Table, where: str = "") -> pa.Table:
    """Select and cast `table` to the table's schema (column order and types).

    Columns the schema does not declare are dropped; a missing `LATER_COLUMNS` column is
    filled with nulls (a table written before it existed); any other missing column or a cast
    that would lose data raises SchemaError naming the column.
    """
    schema = schema_for(table_name)
    place = f" in {where}" if where else ""
    for f in schema:
        if f.name in LATER_COLUMNS and f.name not in table.column_names:
            table = table.append_column(f, pa.nulls(table.num_rows, f.type))
        if f.name not in table.column_names:
            raise SchemaError(f"{table_name}{place}: missing column {f.name!r} ({f.type})")
    try:
        return table.select(schema.names).cast(schema)
    except CAST_ERRORS as e:
        raise SchemaError(f"{table_name}{place}: {_cast_fault(schema, table, e)}") from None


def _cast_fault(schema: pa.Schema, table: pa.Table, error: Exception) -> str:
    """Why `table` does not cast to `schema`, naming the first column at fault."""
    for f in schema:
        column = table.column(f.name)
        if not f.nullable and column.null_count:
            return f"column {f.name!r} has {column.null_count} null values but may not be null"
        try:
            column.cast(f.type)
        except CAST_ERRORS as e:
            return f"cannot cast column {f.name!r} ({column.type}) to {f.type}: {e}"
    return f"cannot cast to the schema: {error}"


def empty_table(table_name: str) -> pa.Table:
    """A zero-row table with the table's schema."""
    return schema_for(table_name).empty_table()


def unscored(rows: pa.Table) -> pa.Table:
    """A rollouts table as a scored table whose rows no PRM scored: no steps, first_error null,
    prm "", threshold NaN, score_status ``not_scored``."""
    n = rows.num_rows
    fill = {"steps": pa.array([[]] * n, STEPS_TYPE),
            "first_error": pa.nulls(n, pa.int32()), "prm": pa.array([""] * n, pa.string()),
            "threshold": pa.array([math.nan] * n, pa.float32()),
            "score_status": pa.array(["not_scored"] * n, pa.string())}
    for name, column in fill.items():
        rows = rows.append_column(name, column)
    return conform("scored", rows)
