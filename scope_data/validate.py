"""The value invariants of the table contract, checked when a stage reads a table (issue 16,
class 6). The schema (`scope_data.schema`) checks column names, types and nulls; this module
checks what types cannot say:

- ids non-empty: problem_id everywhere, rollout_id in rollout-bearing tables;
- ids unique: problem_id in a problems table, rollout_id in the others (a duplicate row is a
  duplicate id);
- reward in {0, 1} and equal to `correct`;
- token ids >= 0, and below the vocabulary size when the reader has a tokenizer;
- a problem's rows in one part (every stage shards by problem).

One vectorised polars pass over the manifest's parts (only the columns checked are read); the
first offending row raises TableValueError naming the part file, the row within it and the
field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import polars as pl
import pyarrow as pa

from scope_data.folder import Folder
from scope_data.schema import SchemaError

TOKEN_FIELDS = ("prompt_token_ids", "response_token_ids")


class TableValueError(SchemaError):
    """A table value breaks the contract; the message names file, row and field."""


@dataclass(frozen=True)
class Check:
    field: str
    flag: pl.Expr        # True on an offending row
    message: str         # formatted with the row's values ({value}, {count}, {parts})
    needs: tuple[str, ...] = ()  # other columns the flag reads
    whole: bool = False  # the flag compares rows (read as a projection, not streamed)


def checks(table: str, columns: set[str], vocab_size: int | None = None) -> list[Check]:
    """The invariants of a `table` kind, restricted to the `columns` present."""
    out: list[Check] = []
    ids = ("problem_id",) if table == "problems" else ("problem_id", "rollout_id")
    for name in ids:
        out.append(Check(name, pl.col(name).str.len_bytes() == 0, "empty id"))
    unique = "problem_id" if table == "problems" else "rollout_id"
    out.append(Check(unique, pl.col(unique).is_duplicated(),
                     "{value!r} is not unique ({count} rows carry it)", whole=True))
    if table != "problems":
        reward, correct = pl.col("reward"), pl.col("correct")
        out.append(Check("reward", ~reward.is_in([0.0, 1.0]), "reward {value} is not 0 or 1"))
        out.append(Check("reward", reward != correct.cast(pl.Float32),
                         "reward {value} does not match correct = {correct}", ("correct",)))
        for name in TOKEN_FIELDS:
            out.append(Check(name, pl.col(name).list.min() < 0,
                             "negative token id {min} (token ids are >= 0)"))
            if vocab_size is not None:
                out.append(Check(name, pl.col(name).list.max() >= vocab_size,
                                 f"token id {{max}} is outside the tokenizer's vocabulary "
                                 f"(size {vocab_size})"))
    out.append(Check("problem_id", pl.col("_part").n_unique().over("problem_id") > 1,
                     "problem {value!r} has rows in more than one part ({parts}); a problem's "
                     "rows must all be in one part", whole=True))
    return [c for c in out if {c.field, *c.needs} <= columns]


def check_table(manifest: Any, storage_options: dict[str, Any] | None = None,
                vocab_size: int | None = None) -> None:
    """TableValueError naming the first row (part file, row, field) of the table of `manifest`
    (a `scope_data.shards.Manifest`) that breaks an invariant of its table kind."""
    if not manifest.files:
        return
    folder = Folder(manifest.url, storage_options)
    parts = {f["path"]: _scan_part(folder, f["path"]) for f in manifest.files}
    _check(parts, manifest.table, manifest.url + "/", vocab_size)


def check_rows(table: pa.Table, table_name: str, where: str,
               vocab_size: int | None = None) -> None:
    """`check_table` for rows about to be written as one part (`where`: their origin)."""
    _check({"": pl.from_arrow(table).lazy()}, table_name, where, vocab_size)


def check_token_range(frame: pl.DataFrame, vocab_size: int, where: str) -> None:
    """TableValueError naming the first row of `frame` whose token ids fall outside
    [0, vocab_size) (rows about to meet an embedding table)."""
    columns = [c for c in TOKEN_FIELDS if c in frame.columns]
    flags = [flag for c in columns for flag in (pl.col(c).list.min() < 0,
                                                pl.col(c).list.max() >= vocab_size)]
    if not flags:
        return
    bad = frame.with_row_index("_row").filter(pl.any_horizontal(flags).fill_null(False))
    if bad.height == 0:
        return
    row = bad.row(0, named=True)
    for c in columns:
        ids = [v for v in row[c] if v is not None]
        if ids and (min(ids) < 0 or max(ids) >= vocab_size):
            off = min(ids) if min(ids) < 0 else max(ids)
            raise TableValueError(f"{where}: row {row['_row']} (rollout "
                                  f"{row.get('rollout_id')!r}): field {c!r}: token id {off} is "
                                  f"outside the vocabulary [0, {vocab_size})")


def _check(parts: dict[str, pl.LazyFrame], table: str, where: str,
           vocab_size: int | None) -> None:
    columns = set(next(iter(parts.values())).collect_schema().names())
    found = checks(table, columns, vocab_size)
    # row-local checks stream (token lists are never all in memory), then the checks across
    # rows read only their id columns
    for group in ([c for c in found if not c.whole], [c for c in found if c.whole]):
        if group:
            _first_offence(parts, group, where)


def _first_offence(parts: dict[str, pl.LazyFrame], found: list[Check], where: str) -> None:
    used = sorted({n for c in found for n in (c.field, *c.needs)})
    frames = [lf.select(used).with_row_index("_row").with_columns(_part=pl.lit(name))
              for name, lf in parts.items()]
    flags = [c.flag.fill_null(False).alias(f"_c{i}") for i, c in enumerate(found)]
    bad = (pl.concat(frames).with_columns(flags)
           .filter(pl.any_horizontal(*(f"_c{i}" for i in range(len(found)))))
           .head(1).collect(engine="streaming"))
    if bad.height == 0:
        return
    row = bad.row(0, named=True)
    check = found[next(i for i in range(len(found)) if row[f"_c{i}"])]
    value = row[check.field]
    detail: dict[str, Any] = {"value": value, "correct": row.get("correct")}
    if "{count}" in check.message or "{parts}" in check.message:
        same = pl.concat(frames).filter(pl.col(check.field) == value)
        detail["count"], detail["parts"] = same.select(
            pl.len(), pl.col("_part").unique().sort().str.join(", ")).collect().row(0)
    if isinstance(value, list):
        ints = [v for v in value if v is not None]
        detail.update(min=min(ints, default=None), max=max(ints, default=None))
    raise TableValueError(f"{where}{row['_part']}: row {row['_row']}: field {check.field!r}: "
                          + check.message.format(**detail))


def _scan_part(folder: Folder, name: str) -> pl.LazyFrame:
    if folder.is_local:
        return pl.scan_parquet(folder.path(name))
    import pyarrow.dataset as ds
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    filesystem = PyFileSystem(FSSpecHandler(folder.fs))
    return pl.scan_pyarrow_dataset(ds.dataset(folder.path(name), format="parquet",
                                              filesystem=filesystem))
