"""The fields of a table manifest, checked before anything in it is used: a manifest may be
written by a hostile or broken writer (`scope_data.shards.read_manifest` raises the problem as
a ShardError naming the manifest)."""

from __future__ import annotations

import re
from typing import Any

from scope_data.layout import META_DIR
from scope_data.schema import SCHEMAS

MANIFEST_FIELDS: dict[str, type] = {
    "table": str, "files": list, "rows": int, "config": dict, "config_hash": str,
    "inputs": list, "stats": dict, "created": str, "scope_version": str, "versions": dict,
    "num_shards": int}
REQUIRED = ("table", "files", "rows", "config", "config_hash")
FILE_FIELDS: dict[str, type] = {"path": str, "rows": int, "sha256": str, "bytes": int}


def manifest_problem(body: dict[str, Any]) -> str | None:
    """What is wrong with a manifest's fields (the first problem), or None: a field missing or
    of the wrong type (bool is not an int; counts are in [0, 2**63)), an unknown table kind, a
    file entry without path/rows/sha256, a sha256 that is not 64 hex digits, or a file path
    that could point outside the table folder."""
    for name in REQUIRED:
        if name not in body:
            return f"not a table manifest (no {name!r} field)"
    for name, kind in MANIFEST_FIELDS.items():
        if name in body and (problem := _type_problem(name, body[name], kind)):
            return problem
    if body["table"] not in SCHEMAS:
        return f"unknown table kind {body['table']!r:.60} (known: {', '.join(SCHEMAS)})"
    for i, entry in enumerate(body["files"]):
        if problem := _type_problem(f"files[{i}]", entry, dict):
            return problem
        for name, kind in FILE_FIELDS.items():
            if name not in entry and name != "bytes":
                return f"files[{i}] has no {name!r} field"
            if name in entry and (problem := _type_problem(f"files[{i}].{name}", entry[name],
                                                           kind)):
                return problem
        if not re.fullmatch(r"[0-9a-f]{64}", entry["sha256"]):
            return f"files[{i}].sha256 is not a sha256 hex digest"
        if not safe_file_name(entry["path"]):
            return f"unsafe file path {entry['path']!r} in the file list (refused)"
    return None


def safe_file_name(path: str) -> bool:
    """True for a plain file name inside the table folder (no absolute path, `..`, `.`, `~`,
    sub-folder, URL or the metadata folder)."""
    parts = path.replace("\\", "/").split("/")
    return not (not path or path.startswith(("/", "~")) or ":" in path or len(parts) != 1
                or path in (".", "..") or path.startswith(META_DIR))


def _type_problem(name: str, value: Any, kind: type) -> str | None:
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        return f"field {name!r} is {type(value).__name__} {value!r:.60}, expected {kind.__name__}"
    if isinstance(value, int) and not 0 <= value < 1 << 63:
        return f"field {name!r} is {value!r:.60}, expected a count"
    return None
