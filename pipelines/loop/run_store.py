"""An online run folder on an object store (`--run s3://bucket/run`, any fsspec URL).

Every worker (and the launcher) works in a local mirror of the run folder, where the stages run
unchanged on local paths; the object store holds the run as the workers publish it:

- a finished stage is pushed: its output folder first (every file, each upload atomic), the
  round's `train_skipped.json` for a train stage, then its marker `_stages/<stage>.json` last;
  so a marker on the store means its output is complete. A worker killed before the marker
  upload leaves no marker: its restart finds the stage done in its mirror and pushes it again
  (the output prefix is replaced, never appended to), or reruns it from a fresh mirror.
- a stage a worker reads (its input table, the policy version it samples from) is pulled when
  its marker appears on the store with the expected config hash: output folder, then marker.
- a stage of the worker's own role already on the store (pushed by an earlier run of the worker
  on another machine) is pulled instead of being rerun.

Config hashes write run-folder paths as `$RUN_DIR/...`, so every mirror plans the same stages.
`.train.lock` is an object created with a conditional write (`If-None-Match: *`); see
`TrainLock`. Storage options come from `--storage-options` / `$SCOPE_STORAGE_OPTIONS`.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from pipelines.loop.runner import marker_hash
from scope_data.folder import Folder, write_local_atomic

LOCK = ".train.lock"
SKIPPED_TRAIN = "train_skipped.json"  # pipelines.loop.round_stages.SKIPPED_TRAIN


def is_remote(run: str) -> bool:
    """True for a URL of a non-local fsspec store (s3://, gs://, ...)."""
    return "://" in run and not run.startswith("file://")


def default_mirror(url: str, role: str) -> Path:
    """`$SCOPE_CACHE/online/<hash of the url>/<role>`: one local mirror per run and role."""
    from pipelines.tiny.cache import cache_root

    return cache_root() / "online" / hashlib.sha256(url.encode()).hexdigest()[:12] / role


class RunStore:
    """The run folder `url` on its store, mirrored in the local folder `local`."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None, local: Path):
        self.folder = Folder(url, storage_options)
        self.folder.check_bucket()
        self.url, self.local = self.folder.url, local.expanduser().resolve()
        self.local.mkdir(parents=True, exist_ok=True)

    def rel(self, path: Path) -> str:
        return path.relative_to(self.local).as_posix()

    def read_json(self, name: str) -> dict[str, Any] | None:
        """The store's JSON object `name`, or None when it is absent or not yet whole."""
        try:
            return json.loads(self.folder.read_bytes(name, limit=1 << 22))
        except (FileNotFoundError, ValueError):
            return None

    def _outputs(self, marker: Path) -> list[str]:
        """Relative names of what a stage wrote: its output folder (+ a train skip note)."""
        body = json.loads(marker.read_text()) if marker.is_file() else self.read_json(
            self.rel(marker))
        out = (body or {}).get("output") or ""  # the stage's output folder (round_loop)
        if not isinstance(out, str) or not out.startswith("$RUN_DIR/"):
            return []
        out = out.removeprefix("$RUN_DIR/").rstrip("/")
        names = [out]
        if body.get("stage") == "train":
            names.append(f"{out.rpartition('/')[0]}/{SKIPPED_TRAIN}")
        return names

    def pull(self, marker: Path, digest: str) -> bool:
        """Copy a stage done on the store with config hash `digest` into the mirror (output,
        then marker); False when the store does not hold it (yet)."""
        if marker_hash(marker) == digest:
            return True
        name = self.rel(marker)
        body = self.read_json(name)
        if body is None or body.get("config_hash") != digest:
            return False
        fs = self.folder.fs
        for out in self._outputs(marker):
            remote, local = self.folder.path(out), self.local / out
            if local.is_dir():
                import shutil

                shutil.rmtree(local)  # a partial copy of ours (a killed pull or run)
            fs.invalidate_cache(remote)
            if fs.isfile(remote):
                local.parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(remote, str(local))
                continue
            for f in fs.find(remote):
                target = local / Path(f).relative_to(remote.rstrip("/"))
                target.parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(f, str(target))
        write_local_atomic(marker, json.dumps(body, default=str))
        return True

    def push(self, marker: Path) -> None:
        """Publish a stage done in the mirror: output files, then the marker (unless the store
        already holds this marker)."""
        name = self.rel(marker)
        body = json.loads(marker.read_text())
        remote_body = self.read_json(name)
        if remote_body is not None and remote_body.get("config_hash") == body["config_hash"]:
            return
        fs = self.folder.fs
        for out in self._outputs(marker):
            local, remote = self.local / out, self.folder.path(out)
            if self.folder.exists(out):
                fs.rm(remote, recursive=True)  # a killed push's partial copy
            if local.is_file():
                fs.put_file(str(local), remote)
            for root, _, files in os.walk(local):
                for f in files:
                    if not f.endswith(".tmp"):  # a killed writer's temporary
                        path = Path(root) / f
                        fs.put_file(str(path), f"{remote}/{path.relative_to(local).as_posix()}")
        self.folder.write_text(name, json.dumps(body, default=str))

    def push_file(self, name: str) -> None:
        self.folder.write_bytes(name, (self.local / name).read_bytes())

    def pull_file(self, name: str) -> bool:
        if not self.folder.exists(name):
            return False
        write_local_atomic(self.local / name, self.folder.read_bytes(name))
        return True

    def markers(self) -> list[str]:
        """Relative names of the stage markers on the store."""
        fs = self.folder.fs
        fs.invalidate_cache(self.folder.root)
        root = self.folder.root.rstrip("/")
        return sorted(p[len(root) + 1:] for p in fs.glob(f"{root}/*/_stages/*.json"))


class TrainLock:
    """The single-trainer guard of a run folder on an object store: the object `.train.lock`
    holds its owner (host, pid) and a heartbeat time, refreshed every `beat` seconds.

    Taken with a conditional create (`If-None-Match: *`: of two workers creating it at once,
    exactly one succeeds). A lock whose owner is a dead process of this host, or whose heartbeat
    is older than `stale` seconds, is taken over with a conditional overwrite (`If-Match` on its
    ETag: of two workers taking it over, one succeeds). Weakness: a trainer that stalls for
    longer than `stale` (a frozen machine, a network partition) loses its lock to a new one and
    notices only at its next heartbeat; stores without conditional writes (other than S3) are
    refused rather than guarded weakly."""

    def __init__(self, store: RunStore, beat: float = 10.0, stale: float = 60.0):
        self.store, self.beat, self.stale = store, beat, stale
        self.fs, self.path = store.folder.fs, store.folder.path(LOCK)
        self.me = {"host": socket.gethostname(), "pid": os.getpid()}
        self._stop = threading.Event()
        self.lost = False

    def _put(self, **cond: str) -> str:
        body = json.dumps({**self.me, "time": time.time()}).encode()
        bucket, key, _ = self.fs.split_path(self.path)
        out = self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=body, **cond)
        return out["ETag"]

    def __enter__(self) -> TrainLock:
        if "s3" not in self.fs.protocol:
            raise ValueError(f"{self.store.url}: a train lock on this store needs conditional "
                             "writes (S3's If-None-Match); run the trainer on a local run folder")
        try:
            self.etag = self._put(IfNoneMatch="*")
        except Exception as e:
            if not _precondition(e):
                raise
            self.etag = self._take_over()
        self._thread = threading.Thread(target=self._heartbeat, daemon=True)
        self._thread.start()
        return self

    def _take_over(self) -> str:
        info = self.fs.info(self.path, refresh=True)
        held = self.store.read_json(LOCK) or {}
        alive = time.time() - float(held.get("time", 0)) < self.stale and not (
            held.get("host") == self.me["host"] and not _pid_alive(int(held.get("pid", 0))))
        if alive:
            raise RuntimeError(f"{self.store.url} already has a running train worker "
                               f"({held.get('host')} pid {held.get('pid')} holds {LOCK}); a run "
                               "folder takes one trainer")
        try:
            return self._put(IfMatch=info["ETag"])
        except Exception as e:
            if _precondition(e):
                raise RuntimeError(f"{self.store.url}: another train worker took {LOCK} "
                                   "first; a run folder takes one trainer") from None
            raise

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.beat):
            try:
                self.etag = self._put(IfMatch=self.etag)
            except Exception:  # taken over (or unreachable): this trainer must stop
                self.lost = True
                return

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        if not self.lost:
            self.fs.rm(self.path)


def _precondition(e: BaseException) -> bool:
    """A failed condition of a conditional write (s3fs raises it as FileExistsError or OSError)."""
    return isinstance(e, FileExistsError) or "pre-conditions" in str(e) or (
        "PreconditionFailed" in f"{type(e).__name__} {e}")


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
