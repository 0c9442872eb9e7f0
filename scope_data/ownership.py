"""Who may write an output folder: the one owner of that rule (issue 16, classes 1 and 2).

A stage writes only into
- a new or empty folder, or
- a folder holding an unfinished or finished table of the same table kind and config hash
  (its own earlier run: the rerun resumes it),
and never into (or inside) one of its inputs. A writer claims the folder first: it writes
`.scope/claim-<config hash>.parquet`, then lists the claims; a claim of another config means
another writer owns the folder, and the later writer withdraws its own claim and stops (two
writers that claim at the same instant both stop; neither mixes parts into the other's table).
The commit re-checks the claims and every marker's config hash before writing the manifest
(`check_owner`).

Nothing here deletes a file but the caller's own claim.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import posixpath
from collections.abc import Iterable
from dataclasses import dataclass, field

import pyarrow as pa

from scope_data.folder import Folder
from scope_data.hashing import config_hash
from scope_data.layout import (
    BOOKKEEPING_RE,
    LEGACY_MANIFEST,
    MANIFEST,
    META_DIR,
    PART_RE,
    TEMP_RE,
    claim_name,
    record_bytes,
    record_payload,
)

METADATA_LIMIT = 64 << 20


class OutputRefused(ValueError):
    """An output folder this run may not write into; the message names it and why."""


@dataclass
class Survey:
    """What a folder holds, as far as the table layout goes."""

    exists: bool = False
    foreign: list[str] = field(default_factory=list)  # names scope did not write
    legacy: bool = False
    kind: str | None = None                              # the table kind, when known
    claims: set[str] = field(default_factory=set)        # config hashes of claims
    finished: str | None = None                          # the manifest's config hash


def location(url: str, storage_options: dict | None = None) -> tuple[tuple[str, ...], str]:
    """A comparable (protocols, path) of a path or fsspec URL: local paths resolved (links,
    `..`), URLs normalised by fsspec, no trailing slash."""
    folder = Folder(url, storage_options)
    root = folder.root.rstrip("/") or "/"
    if folder.is_local:
        return ("file",), os.path.realpath(os.path.expanduser(root))
    protocol = folder.fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol), root


def refuse_overlap(out: str, inputs: Iterable[str], storage_options: dict | None = None,
                   flag: str = "--out") -> None:
    """OutputRefused when `out` is one of `inputs` or lies inside one."""
    where = location(out, storage_options)
    for url in inputs:
        if not url:
            continue
        there = location(url, storage_options)
        if where[0] != there[0] and not set(where[0]) & set(there[0]):
            continue
        if where[1] == there[1]:
            raise OutputRefused(f"{flag} {out} is the input {url}: a stage never writes over its "
                                "input; use a new --out")
        if where[1].startswith(there[1].rstrip("/") + "/"):
            raise OutputRefused(f"{flag} {out} is inside the input {url}: a stage never writes "
                                "into its input; use a new --out")


def _names(folder: Folder, name: str) -> list[str] | None:
    """The entry names of a sub-folder, None when it does not exist."""
    path = folder.path(name)
    folder.fs.invalidate_cache(path)
    try:
        if not folder.fs.isdir(path):
            if not folder.fs.exists(path):
                return None
            if folder.fs.isfile(path):
                return [""]
            # an object-store prefix a stale cached listing of its parent did not show as a
            # folder (a concurrent shard has just written into it): list it
        return [posixpath.basename(p.rstrip("/")) for p in folder.fs.ls(path, detail=False)
                if p.rstrip("/") != path.rstrip("/")]
    except FileNotFoundError:
        return None


def _record(folder: Folder, name: str) -> dict:
    try:
        return json.loads(record_payload(folder.read_bytes(name, METADATA_LIMIT)))
    except (ValueError, FileNotFoundError, UnicodeDecodeError):
        return {}


def survey(folder: Folder) -> Survey:
    """What `folder` holds: its foreign files, table kind, claims and finished config."""
    top = _names(folder, "")
    if top is None:
        return Survey()
    if top == [""]:  # a file, not a folder
        return Survey(exists=True, foreign=[folder.url])
    found = Survey(exists=True)
    for name in top:
        if name == LEGACY_MANIFEST or (name.startswith("part-") and name.endswith(".json")):
            found.legacy = True
        elif name != META_DIR and not PART_RE.fullmatch(name):
            found.foreign.append(name)
    meta = _names(folder, META_DIR) or []
    for name in meta:
        if BOOKKEEPING_RE.fullmatch(name):
            if name.startswith("claim-"):
                found.claims.add(name[len("claim-"):-len(".parquet")])
        elif not TEMP_RE.fullmatch(name):
            found.foreign.append(f"{META_DIR}/{name}")
    if f"{MANIFEST.split('/')[1]}" in meta:
        body = _record(folder, MANIFEST)
        found.kind, found.finished = body.get("table"), body.get("config_hash")
    for chash in sorted(found.claims):
        if found.kind is None:
            found.kind = _record(folder, claim_name(chash)).get("table")
    return found


def _marker_hashes(folder: Folder) -> dict[str, str]:
    """{marker name: config hash} of the part markers under `.scope/`."""
    out = {}
    for name in _names(folder, META_DIR) or []:
        if name.endswith(".done.parquet") and BOOKKEEPING_RE.fullmatch(name):
            chash = _record(folder, f"{META_DIR}/{name}").get("config_hash")
            if chash:
                out[name] = chash
    return out


def _refuse(folder: Folder, found: Survey, table: str, chash: str) -> None:
    url = folder.url
    if found.legacy:
        raise OutputRefused(f"{url} holds a table in the layout of an older scope "
                            f"({LEGACY_MANIFEST} or part-*.json beside the parts): write to a "
                            "new folder")
    if found.foreign:
        names = ", ".join(repr(n) for n in found.foreign[:3])
        more = f" and {len(found.foreign) - 3} more" if len(found.foreign) > 3 else ""
        raise OutputRefused(
            f"{url} is not empty and is not a {table} table written by scope (it holds {names}"
            f"{more}); a stage writes only into a new or empty folder or its own table: use a "
            "new --out")
    if found.kind is not None and found.kind != table:
        raise OutputRefused(f"{url} holds a {found.kind} table; this stage writes a {table} "
                            "table: use a new --out")
    others = sorted({*found.claims, *([found.finished] if found.finished else [])} - {chash})
    if not others and not found.claims and found.finished is None:
        others = sorted(set(_marker_hashes(folder).values()) - {chash})
    if others:
        state = "a" if found.finished else "an unfinished"
        raise OutputRefused(
            f"{url} holds {state} {table} table written with another config (hash "
            f"{others[0]}, this run {chash}); use a new --out")


def claim_output(folder: Folder, table: str, chash: str, schema: pa.Schema,
                 inputs: Iterable[str] = ()) -> None:
    """Make `folder` this writer's output, or raise OutputRefused naming why it may not be.

    `inputs`: the paths/URLs this run reads (refused as outputs, and so is a folder inside one).
    """
    refuse_overlap(folder.url, inputs, folder.storage_options)
    found = survey(folder)
    _refuse(folder, found, table, chash)
    if chash in found.claims:
        return
    record = {"table": table, "config_hash": chash, "writer": f"{os.getpid()}",
              "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
    folder.write_bytes(claim_name(chash), record_bytes(schema, json.dumps(record).encode()),
                       fsync=False)
    again = survey(folder)  # a writer that claimed meanwhile: the later lister withdraws
    try:
        _refuse(folder, again, table, chash)
    except OutputRefused:
        folder.remove(claim_name(chash))
        raise


def check_owner(folder: Folder, table: str, chash: str) -> None:
    """Before the commit: the folder is still this config's (no other claim, no marker of
    another config, no foreign file); OutputRefused otherwise."""
    found = survey(folder)
    _refuse(folder, found, table, chash)
    stray = sorted(n for n, h in _marker_hashes(folder).items() if h != chash)
    if stray:
        raise OutputRefused(
            f"{folder.url}/{META_DIR}/{stray[0]}: a part marker of another config (another "
            f"writer wrote into this folder); the manifest is not written: use a new --out")


def claim_plain_folder(out: str, kind: str, chash: str, allowed: set[str], record: str,
                       inputs: Iterable[str] = (), storage_options: dict | None = None) -> None:
    """The ownership rule for a folder of plain files (`scope eval`): new or empty, or holding
    only `allowed` names, with `record` (a JSON file whose `config` hashes to `chash`) absent
    or of this config. OutputRefused otherwise."""
    folder = Folder(out, storage_options)
    refuse_overlap(out, inputs, storage_options)
    top = _names(folder, "")
    if top is None:
        return
    if top == [""]:
        raise OutputRefused(f"{out} is a file, not a folder: use a new --out")
    foreign = sorted(n for n in top if n not in allowed)
    if foreign:
        raise OutputRefused(
            f"{out} is not empty and is not a {kind} output (it holds "
            f"{', '.join(repr(n) for n in foreign[:3])}); use a new --out")
    if record in top:
        try:
            body = json.loads(folder.read_bytes(record, METADATA_LIMIT))
            found = config_hash(body["config"])
        except (ValueError, AttributeError, KeyError, TypeError):
            found = None
        if found != chash:
            raise OutputRefused(
                f"{out}/{record} was written by another {kind} (config hash {found}, this run "
                f"{chash}); use a new --out")


def release(folder: Folder, chash: str) -> None:
    """Withdraw this writer's claim when it wrote nothing else (a run that failed before its
    first part leaves the folder as it found it); an unfinished table keeps its claim."""
    if _names(folder, "") != [META_DIR] or _names(folder, META_DIR) != [
            claim_name(chash).split("/")[1]]:
        return
    folder.remove(claim_name(chash))
