"""An fsspec-backed folder (datatrove's DataFolder idea): relative names in, atomic writes out.

Local disk: write to a temporary name, then rename. Object stores: the upload of the whole
object is the atomic step (a failed upload is discarded, never committed). A bucket is never
created: writing into one that does not exist is a FileNotFoundError naming it; a storage
endpoint that cannot be reached is a StorageError naming the folder (one line each).
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import socket
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import fsspec

_CHUNK = 8 << 20
T = TypeVar("T")
# connection failures of the object-store clients (botocore, aiohttp), matched by class name so
# that no client library is imported here
_UNREACHABLE = {"EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError",
                "ReadTimeoutError", "ClientConnectorError", "ServerDisconnectedError",
                "ConnectionError"}


class StorageError(RuntimeError):
    """The storage behind a folder cannot be reached; the message names the folder."""


def _unreachable(e: BaseException) -> bool:
    return isinstance(e, (ConnectionError, TimeoutError)) or any(
        c.__name__ in _UNREACHABLE for c in type(e).__mro__)


class Folder:
    """An fsspec-backed folder: relative names in, atomic writes where the filesystem allows."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None,
                 temp_dir: str = ""):
        """`temp_dir`: the sub-folder that holds temporary files (default: beside the target)."""
        self.url = str(url).rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **self.storage_options)
        self.is_local = "file" in _protocols(self.fs)
        self.temp_dir = temp_dir

    def path(self, name: str) -> str:
        join = os.path.join if self.is_local else posixpath.join
        return join(self.root, name)

    def _call(self, fn: Callable[[], T]) -> T:
        """`fn()`, with a connection failure of the store raised as one StorageError."""
        try:
            return fn()
        except Exception as e:
            if self.is_local or not _unreachable(e):
                raise
            first = (str(e).strip().splitlines() or [""])[0][:200]
            raise StorageError(f"{self.url}: cannot reach the storage ({type(e).__name__}: "
                               f"{first}); check the endpoint in --storage-options") from None

    def check_bucket(self) -> None:
        """FileNotFoundError when the folder's bucket does not exist (object stores whose paths
        start with a bucket: s3, gcs, ...). Buckets are never created implicitly."""
        split = getattr(self.fs, "split_path", None)
        if self.is_local or split is None or getattr(self, "_bucket_ok", False):
            return
        bucket = split(self.root)[0]
        if not self._call(lambda: self.fs.exists(bucket)):
            raise FileNotFoundError(f"{self.url}: bucket {bucket!r} does not exist or is not "
                                    "accessible (scope never creates buckets: create it first)")
        self._bucket_ok = True

    def exists(self, name: str) -> bool:
        """Asks the store, not a cached listing: other processes write markers and manifests
        (s3fs caches directory listings per filesystem instance, shared within a process)."""
        path = self.path(name)
        self.fs.invalidate_cache(path)
        return self._call(lambda: self.fs.exists(path))

    def read_bytes(self, name: str, limit: int | None = None) -> bytes:
        """The file's bytes; with `limit`, ValueError instead of reading more than `limit`
        bytes (metadata files: a huge file, or a link to /dev/zero, must not exhaust memory)."""
        if self.is_local:
            with open(self.path(name), "rb") as f:
                data = f.read() if limit is None else f.read(limit + 1)
        elif limit is None:
            return self._call(lambda: self.fs.cat_file(self.path(name)))
        else:
            data = self._call(lambda: self.fs.cat_file(self.path(name), start=0, end=limit + 1))
        if limit is not None and len(data) > limit:
            raise ValueError(f"{self.path(name)}: larger than {limit} bytes")
        return data

    def read_text(self, name: str) -> str:
        return self.read_bytes(name).decode("utf-8")

    def write_bytes(self, name: str, data: bytes, fsync: bool = True) -> None:
        """Write `data` so readers see either the old or the whole new content."""
        with self.open_atomic(name, fsync=fsync) as f:
            f.write(data)

    def write_text(self, name: str, text: str, fsync: bool = True) -> None:
        self.write_bytes(name, text.encode("utf-8"), fsync)

    def remove_stale_temporaries(self, ours: re.Pattern[str], older_than_s: float = 600.0
                                 ) -> int:
        """Delete temporary files that killed writers left behind (local disk only).

        Only names that `ours` matches whole are candidates (the caller's own naming: nothing
        else is ever deleted). A file goes when its writer, a process of this host, is gone, or
        when it is older than `older_than_s` (writers on other hosts sharing the disk); a writer
        still running is not disturbed.
        """
        where = self.path(self.temp_dir)
        if not self.is_local or not os.path.isdir(where):
            return 0
        import time

        removed = 0
        for entry in os.scandir(where):
            if not ours.fullmatch(entry.name) or not entry.is_file(follow_symlinks=False):
                continue
            try:  # another job may finish or remove it meanwhile
                if (_writer_gone(entry.name)
                        or time.time() - entry.stat().st_mtime > older_than_s):
                    os.remove(entry.path)
                    removed += 1
            except FileNotFoundError:
                continue
        return removed

    @contextmanager
    def open_atomic(self, name: str, fsync: bool = True) -> Iterator[Any]:
        """A binary file handle whose content appears under `name` only on success.

        `fsync=False` skips flushing to the disk before the rename (part files: their sha256 in
        the marker and manifest catches a file torn by a power loss, and an fsync of hundreds of
        MB costs more than the write).
        """
        if self.is_local:
            writer = f"{_HOST}-{os.getpid()}"  # see _writer_gone
            tmp = self.path(posixpath.join(
                self.temp_dir, f".{posixpath.basename(name)}.{writer}.{uuid.uuid4().hex}.tmp"))
            os.makedirs(os.path.dirname(tmp), exist_ok=True)
            os.makedirs(os.path.dirname(self.path(name)), exist_ok=True)
            try:
                with open(tmp, "wb") as f:
                    yield f
                    f.flush()
                    if fsync:
                        os.fsync(f.fileno())
                os.replace(tmp, self.path(name))
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
        else:
            if getattr(self.fs, "split_path", None) is not None:
                self.check_bucket()  # s3fs's makedirs would create a missing bucket
            else:
                self._call(lambda: self.fs.makedirs(self.root, exist_ok=True))
            # Object stores: the object becomes visible only when the upload completes. On an
            # error the upload is discarded (a `with` block would commit the partial object).
            path = self.path(name)
            f = self.fs.open(path, "wb")
            try:
                yield f
            except BaseException:
                discard = getattr(f, "discard", None)
                if callable(discard):  # s3fs/gcsfs: abort the (multipart) upload
                    discard()
                    try:  # and keep the file's __del__ from flushing what is left
                        f.closed = True
                    except AttributeError:
                        pass
                else:
                    f.close()
                if self.fs.exists(path):  # filesystems (memory://) that commit on open/close
                    self.fs.rm(path)
                raise
            f.close()

    def remove(self, name: str) -> None:
        """Delete ``name`` if present; a concurrent job removing it first is not an error."""
        if self.exists(name):
            try:
                self._call(lambda: self.fs.rm(self.path(name)))
            except FileNotFoundError:
                pass

    def sha256(self, name: str) -> str:
        if self.is_local:  # reads into one reused buffer, hashing without the GIL
            with open(self.path(name), "rb") as f:
                return hashlib.file_digest(f, "sha256").hexdigest()
        digest = hashlib.sha256()

        def read() -> None:
            with self.fs.open(self.path(name), "rb") as f:
                while chunk := f.read(_CHUNK):
                    digest.update(chunk)

        self._call(read)
        return digest.hexdigest()


_HOST = socket.gethostname().replace(".", "_")


def write_local_atomic(path: str | os.PathLike[str], data: str | bytes) -> None:
    """Write a small local file so readers see either the old or the whole new content: a
    uniquely named sibling temporary renamed into place (several writers may race on one name,
    e.g. workers marking one stage; the last rename wins). No fsync: for markers and caches
    that a rerun rewrites (tables go through `Folder.open_atomic`)."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = os.path.join(os.path.dirname(path),
                       f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _writer_gone(temp_name: str) -> bool:
    """True when the temporary file `temp_name` was written by a process of this host that no
    longer runs (names hold `<host>-<pid>` of their writer)."""
    writer = temp_name.rsplit(".", 3)[-3] if temp_name.count(".") >= 3 else ""
    host, _, pid = writer.rpartition("-")
    if host != _HOST or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def _protocols(fs: Any) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


class HashingWriter:
    """File wrapper that hashes and counts bytes as pyarrow writes them."""

    def __init__(self, f: Any):
        self._f = f
        self.digest = hashlib.sha256()
        self.nbytes = 0
        self.closed = False

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        self.digest.update(view)
        self.nbytes += len(view)
        self._f.write(view)
        return len(view)

    def flush(self) -> None:
        self._f.flush()

    def tell(self) -> int:
        return self.nbytes

    def close(self) -> None:  # the owner closes the underlying file
        self.closed = True

    def writable(self) -> bool:
        return True
