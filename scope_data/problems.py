"""Ingest problem sets into the `problems` table (`scope problems`).

Sources: JSONL / JSON / Parquet files (local or any fsspec URL, `.gz` etc. inferred), a folder
written by `datasets.Dataset.save_to_disk`, a Hugging Face dataset name (`load_dataset(name,
subset, split=...)`, offline when cached), or generated `arith` / `countdown` problems.

Field detection (overridable with `problem_field` / `answer_field`):
- problem text: the first of `problem`, `question`, `prompt`, `query`, `input`, `instruction`;
- answer: the first of `answer`, `final_answer`, `gt_answer`, `ground_truth`, `target`; when
  most answer values hold a `#### N` line (GSM8K) the answer is N and the text before it is the
  solution; with no answer field the answer is the last `\\boxed{}` of `solution` (Minerva);
- solution: the `solution` field when present (or `solution_field`).
Answers are kept as the file's text (`27.0` stays `27.0`; JSON numbers keep their literal).

List-valued fields keep the dataset's meaning (OlympiadBench stores both as lists): an answer
list of one item is that item; a list of several with `is_multiple_answer: true` is ONE answer
made of several parts, all required, stored as a JSON array of strings (`["3", "5"]`, which
`scope_data.grading.answer_parts` reads back); several items without that flag are refused (the
record does not say whether all parts or any one is meant). A solution list holds alternative
solutions: the first non-empty one is kept.

`problem_id = stable_id(source, source_index, prompt)`, with `source` the file stem
(`math500.test`) or the dataset name and `source_index` the record's 0-based position (or the
value of `index_field`). A record with no problem text or no answer raises ValueError naming the
file, line/index and field, unless `skip_invalid` (then it is counted in the manifest stats as
`{"status": {"skipped_invalid": k}}`).
"""

from __future__ import annotations

import gzip
import json
import lzma
import math
import re
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import fsspec
import pyarrow as pa

from scope_data.generated_problems import (  # noqa: F401  (re-exported: scope problems)
    arith_table,
    countdown_table,
    write_arith,
    write_countdown,
)
from scope_data.hashing import sha256_hex, stable_id
from scope_data.ownership import refuse_overlap
from scope_data.schema import schema_for
from scope_data.shards import Manifest, TableStore
from scope_data.validate import check_rows

PROBLEM_FIELDS = ("problem", "question", "prompt", "query", "input", "instruction")
ANSWER_FIELDS = ("answer", "final_answer", "gt_answer", "ground_truth", "target")
SOLUTION_FIELD = "solution"
MULTIPLE_ANSWER_FLAG = "is_multiple_answer"  # OlympiadBench: the answer list is one answer's parts
INDEX_LIMIT = 1 << 63  # source_index is an int64 column
FILE_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet",
                ".pq": "parquet"}
_COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst", ".zip")
_GSM8K_RE = re.compile(r"^[ \t]*####[ \t]*(.*?)[ \t]*$", re.MULTILINE)


@dataclass
class Record:
    """One input record and where it came from (for error messages)."""

    where: str  # e.g. "data/x.jsonl, line 12"
    index: int  # 0-based position among the source's records
    data: dict[str, Any]


@dataclass
class FieldMap:
    """Which input fields give the problem, answer and solution, and how the answer is read."""

    problem: str
    answer: str | None  # None: the answer is the last \boxed{} of the solution
    solution: str | None
    answer_from: str  # "field" | "gsm8k" (text after '#### ') | "boxed" (in the solution)


@dataclass
class ProblemsResult:
    """What an ingest wrote; the CLI prints it."""

    manifest: Manifest
    output: str
    source: str
    rows: int
    skipped: int
    format: str
    fields: FieldMap | None = None
    skipped_examples: list[str] = field(default_factory=list)


class _InvalidRow(ValueError):
    pass


# -- reading sources ---------------------------------------------------------------------------
def source_name(src: str) -> str:
    """The `source` of a file: its name without format and compression suffixes."""
    name = PurePosixPath(src.rstrip("/").replace("\\", "/")).name
    for suffix in _COMPRESSIONS:
        name = name.removesuffix(suffix)
    for suffix in FILE_FORMATS:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def file_format(src: str) -> str | None:
    name = src.rstrip("/").lower()
    for suffix in _COMPRESSIONS:
        name = name.removesuffix(suffix)
    return next((fmt for suffix, fmt in FILE_FORMATS.items() if name.endswith(suffix)), None)


def _decode(data: bytes, where: str, line_of: int = 0) -> str:
    """UTF-8 text (a leading BOM dropped); ValueError naming the line of the first bad byte."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = line_of or data.count(b"\n", 0, e.start) + 1
        raise ValueError(
            f"{where}, line {line}: not valid UTF-8 (byte 0x{data[e.start]:02x} at offset "
            f"{e.start}); re-encode the file as UTF-8"
        ) from None


def read_jsonl(data: bytes, path: str) -> list[Record]:
    records = []
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        text = _decode(raw if lineno > 1 else raw.removeprefix(b"\xef\xbb\xbf"), path, lineno)
        where = f"{path}, line {lineno}"
        try:
            obj = json.loads(text, parse_float=str)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        records.append(Record(where, len(records), obj))
    return records


def read_json(data: bytes, path: str) -> list[Record]:
    """A JSON list of objects, a {"data"/"rows"/...: [...]} wrapper or a dict of columns."""
    text = _decode(data, path)
    try:
        obj = json.loads(text, parse_float=str)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON Lines under a .json name
            return read_jsonl(data, path)
        raise ValueError(f"{path}, line {e.lineno}: not valid JSON ({e.msg})") from None
    if isinstance(obj, dict):
        lists = {k: v for k, v in obj.items() if isinstance(v, list)}
        if len(lists) == 1 and all(isinstance(r, dict) for r in next(iter(lists.values()))):
            obj = next(iter(lists.values()))
        elif lists and len(lists) == len(obj) and len({len(v) for v in lists.values()}) == 1:
            n = len(next(iter(lists.values())))
            obj = [{k: v[i] for k, v in lists.items()} for i in range(n)]
    if not isinstance(obj, list):
        raise ValueError(f"{path}: expected a JSON list of objects (or a dict of columns)")
    records = []
    for i, row in enumerate(obj):
        if not isinstance(row, dict):
            raise ValueError(f"{path}, index {i}: expected a JSON object, got {type(row).__name__}")
        records.append(Record(f"{path}, index {i}", i, row))
    return records


def _table_records(table: Any, where: str) -> list[Record]:
    rows = table.to_pylist() if isinstance(table, pa.Table) else list(table)
    return [Record(f"{where}, row {i}", i, row) for i, row in enumerate(rows)]


def load_records(
    src: str, split: str = "test", subset: str | None = None,
    storage_options: dict[str, Any] | None = None,
) -> tuple[list[Record], str, str]:
    """(records, format, fingerprint) of a file, a saved `datasets` folder or a dataset name."""
    fmt = file_format(src)
    fs, path = fsspec.core.url_to_fs(src, **(storage_options or {}))
    if fs.isdir(path):
        if not (fs.exists(f"{path}/state.json") or fs.exists(f"{path}/dataset_dict.json")):
            # a folder of data files: `datasets` infers the splits from the file names
            records, _, fingerprint = _load_hub_dataset(src, split, subset)
            return records, "datasets", fingerprint
        import datasets

        ds = datasets.load_from_disk(src, storage_options=storage_options)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"{src}: no split {split!r}; splits: {', '.join(ds)}")
            ds = ds[split]
        return _table_records(ds, src), "datasets", ds._fingerprint
    if fs.exists(path):
        if fmt is None:
            raise ValueError(f"{src}: unknown file type; expected one of "
                             f"{', '.join(FILE_FORMATS)} (optionally compressed)")
        try:
            with fsspec.open(src, "rb", compression="infer", **(storage_options or {})) as f:
                data = f.read()
        except (gzip.BadGzipFile, EOFError, zlib.error, lzma.LZMAError) as e:
            raise ValueError(f"{src}: not a readable {src.rsplit('.', 1)[-1]} file "
                             f"({type(e).__name__}: {e}); is it really compressed?") from None
        if fmt == "parquet":
            import pyarrow.parquet as pq

            try:
                table = pq.read_table(pa.BufferReader(data))
            except pa.ArrowInvalid as e:
                raise ValueError(f"{src}: not a readable Parquet file ({e})") from None
            return _table_records(table, src), fmt, sha256_hex(data)
        reader = read_jsonl if fmt == "jsonl" else read_json
        return reader(data, src), fmt, sha256_hex(data)
    if fmt is not None or "://" in src:
        raise FileNotFoundError(f"{src}: no such file")
    return _load_hub_dataset(src, split, subset)


def _load_hub_dataset(name: str, split: str, subset: str | None) -> tuple[list[Record], str, str]:
    import datasets

    try:
        ds = datasets.load_dataset(name, subset, split=split)
    except Exception as e:  # datasets raises many types (offline, missing split, bad name)
        raise ValueError(
            f"{name}: not a file and not a loadable (or cached) Hugging Face dataset "
            f"(split {split!r}{f', subset {subset!r}' if subset else ''}): "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
            "(offline: set HF_HUB_OFFLINE=1 to use only the local cache)"
        ) from None
    return _table_records(ds, f"{name}[{split}]"), "hub", ds._fingerprint


# -- records -> problems -----------------------------------------------------------------------
def detect_fields(
    records: Sequence[Record], where: str, problem_field: str | None = None,
    answer_field: str | None = None, solution_field: str | None = None,
) -> FieldMap:
    """Pick the problem/answer/solution fields from the records' keys (see the module doc)."""
    keys: dict[str, None] = {}
    for r in records[:100]:
        keys.update(dict.fromkeys(r.data))
    shown = ", ".join(keys) or "none"
    problem = problem_field or next((k for k in PROBLEM_FIELDS if k in keys), None)
    if problem is None:
        raise ValueError(f"{where}: cannot tell which field holds the problem text "
                         f"(fields: {shown}); pass --problem-field")
    answer = answer_field or next((k for k in ANSWER_FIELDS if k in keys), None)
    solution = solution_field or (
        SOLUTION_FIELD if SOLUTION_FIELD in keys and SOLUTION_FIELD != answer else None)
    if answer is None:
        if solution is None:
            raise ValueError(f"{where}: cannot tell which field holds the answer "
                             f"(fields: {shown}); pass --answer-field")
        return FieldMap(problem, None, solution, "boxed")
    sample = [v for r in records[:50] if isinstance(v := r.data.get(answer), str)]
    if sample and 2 * sum(bool(_GSM8K_RE.search(v)) for v in sample) > len(sample):
        return FieldMap(problem, answer, solution, "gsm8k")
    return FieldMap(problem, answer, solution, "field")


def _text(value: Any, where: str, name: str) -> str | None:
    """A field as text (numbers as written), None when absent/empty; lists/dicts are invalid."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, (list, dict, tuple)):
        raise _InvalidRow(f"{where}: field {name!r} holds a {type(value).__name__}, not text")
    text = str(value)
    return text if text.strip() else None


def _answer_text(data: dict[str, Any], where: str, name: str) -> str | None:
    """The answer field as text; a list is one item, or the parts of one answer (a JSON array)
    when the record says `is_multiple_answer` (see the module doc)."""
    value = data.get(name)
    if not isinstance(value, (list, tuple)):
        return _text(value, where, name)
    parts = [p for v in value if (p := _text(v, where, f"{name}[]")) is not None]
    if len(parts) <= 1:
        return parts[0] if parts else None
    if data.get(MULTIPLE_ANSWER_FLAG) is not True:
        raise _InvalidRow(f"{where}: field {name!r} holds {len(parts)} answers and the record "
                          f"has no `{MULTIPLE_ANSWER_FLAG}: true` (are all parts required, or "
                          "any one?); pick one with --answer-field or fix the record")
    return json.dumps(parts, ensure_ascii=False)


def _solution_text(value: Any, where: str, name: str) -> str | None:
    """The solution field as text; a list holds alternative solutions: the first non-empty."""
    if isinstance(value, (list, tuple)):
        return next((t for v in value if (t := _text(v, where, f"{name}[]")) is not None), None)
    return _text(value, where, name)


def problem_row(rec: Record, fields: FieldMap, source: str, index_field: str | None = None
                ) -> dict[str, Any]:
    """One problems-table row; raises _InvalidRow naming the record and field."""
    from scope_data.grading import extract_answer

    data, where = rec.data, rec.where
    prompt = _text(data.get(fields.problem), where, fields.problem)
    if prompt is None:
        raise _InvalidRow(f"{where}: no problem text (field {fields.problem!r})")
    solution = (_solution_text(data.get(fields.solution), where, fields.solution)
                if fields.solution else None)
    if fields.answer_from == "boxed":
        answer = extract_answer(solution) if solution else None
        if answer is None:
            raise _InvalidRow(f"{where}: no answer (no \\boxed{{}} in field {fields.solution!r})")
    else:
        answer = _answer_text(data, where, fields.answer)
        if answer is None:
            raise _InvalidRow(f"{where}: no answer (field {fields.answer!r})")
        if fields.answer_from == "gsm8k":
            matches = list(_GSM8K_RE.finditer(answer))
            if not matches or not matches[-1].group(1):
                raise _InvalidRow(f"{where}: no '#### <answer>' line in field {fields.answer!r}")
            solution = answer[: matches[-1].start()].rstrip() or solution
            answer = matches[-1].group(1)
    index = rec.index
    if index_field is not None:
        value = data.get(index_field)
        try:
            if isinstance(value, bool) or isinstance(value, float) and not value.is_integer():
                raise TypeError(value)
            index = int(value)
        except (TypeError, ValueError):
            index = -1
        if not 0 <= index < INDEX_LIMIT:
            raise _InvalidRow(f"{where}: field {index_field!r} is {value!r:.40}, not an integer "
                              "index in [0, 2**63)")
    return {"problem_id": stable_id(source, index, prompt), "source": source,
            "source_index": index, "task": "math", "prompt": prompt, "answer": answer,
            "solution": solution}


def build_problems(
    records: Iterable[Record], fields: FieldMap, source: str, skip_invalid: bool = False,
    limit: int | None = None, index_field: str | None = None,
) -> tuple[pa.Table, list[str]]:
    """(problems table, messages of the skipped records); duplicates of a problem_id raise."""
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    seen: dict[str, str] = {}
    for rec in records:
        if limit is not None and len(rows) >= limit:
            break
        try:
            row = problem_row(rec, fields, source, index_field)
        except _InvalidRow as e:
            if not skip_invalid:
                raise ValueError(f"{e} (pass --skip-invalid to skip such rows)") from None
            skipped.append(str(e))
            continue
        if (first := seen.get(row["problem_id"])) is not None:
            raise ValueError(f"duplicate problem_id {row['problem_id']} (same source, index and "
                             f"problem text): {first} and {rec.where}")
        seen[row["problem_id"]] = rec.where
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=schema_for("problems")), skipped


def ingest(
    src: str, out: str, *, problem_field: str | None = None, answer_field: str | None = None,
    solution_field: str | None = None, split: str = "test", subset: str | None = None,
    source: str | None = None, index_field: str | None = None, skip_invalid: bool = False,
    limit: int | None = None, storage_options: dict[str, Any] | None = None,
) -> ProblemsResult:
    """Read `src`, build the problems table and write it to `out` (one part + manifest)."""
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    refuse_overlap(out, [src], storage_options)  # before reading: fail fast
    records, fmt, fingerprint = load_records(src, split, subset, storage_options)
    if not records:
        raise ValueError(f"{src}: no records")
    if source is None:
        source = src if fmt == "hub" else source_name(src)
        if fmt == "hub" and subset:
            source = f"{source}:{subset}"
    fields = detect_fields(records, src, problem_field, answer_field, solution_field)
    table, skipped = build_problems(records, fields, source, skip_invalid, limit, index_field)
    if table.num_rows == 0:
        raise ValueError(f"{src}: no valid rows ({len(skipped)} skipped; first: {skipped[0]})")
    config = {"src": src, "source": source, "format": fmt, "input_sha256": fingerprint,
              "problem_field": fields.problem, "answer_field": fields.answer,
              "solution_field": fields.solution, "answer_from": fields.answer_from,
              "split": split if fmt in ("datasets", "hub") else None, "subset": subset,
              "index_field": index_field, "skip_invalid": skip_invalid, "limit": limit}
    stats = {"status": {"ok": table.num_rows, "skipped_invalid": len(skipped)}}
    check_rows(table, "problems", f"{src} (as the problems table)")
    manifest = TableStore(out, "problems", storage_options).write(table, config, stats=stats,
                                                                  reads=[src])
    return ProblemsResult(manifest, manifest.url, source, table.num_rows, len(skipped), fmt,
                          fields, skipped[:5])
