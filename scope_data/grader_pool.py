"""The grader worker pool: math-verify comparisons with a deadline, from any thread.

math-verify's own timeout uses ``signal.alarm`` (main thread only), so it is disabled
(``parsing_timeout=None``, ``timeout_seconds=None``); each comparison runs in a small persistent
pool of worker processes (plain ``python -c`` subprocesses on a socket: no fork next to torch
threads, no re-import of the caller's ``__main__``). The caller waits with a deadline; on timeout
the worker is SIGKILLed, which really stops a runaway sympy computation and frees its memory, and a
fresh worker (~0.5 s start-up, not counted in the timeout) takes its slot on next use. Workers cap
their address space at 4 GiB and, per request, their CPU time at timeout + 5 s, so one orphaned
mid-request by a killed parent still dies (an idle one exits on EOF). Pool size:
``SCOPE_GRADER_WORKERS`` (default ``min(2, cpu_count)``). If no process can be started, calls fall
back to a daemon thread with a deadline: ``grader_timeout`` still comes on time, but the
computation cannot be stopped.
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import socket
import subprocess
import sys
import threading
from functools import lru_cache
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Literal

logger = logging.getLogger(__name__)

PoolOutcome = Literal["grader_timeout", "grader_error"]
_WORKER_START_TIMEOUT_S = 120.0
_WORKER_MEMORY_LIMIT_BYTES = 4 * 1024**3


def _verify_in_process(pred_answer: str, gold: str) -> bool:
    """math-verify comparison without its signal-based timeout (callers bound the time)."""
    from math_verify import parse, verify

    gold_parsed = _parse_cached(gold if "\\boxed" in gold else f"\\boxed{{{gold}}}")
    pred_parsed = parse(f"\\boxed{{{pred_answer}}}", parsing_timeout=None)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))


@lru_cache(maxsize=4096)
def _parse_cached(latex: str) -> Any:
    from math_verify import parse

    return parse(latex, parsing_timeout=None)


def _limit_resources(cpu_budget_s: float | None = None) -> None:
    """Worker limits: address space, no core files, and (per request) a CPU-time cap.

    The CPU cap (SIGXCPU, enforced by the kernel whatever the GIL is doing) only matters when the
    parent died mid-request and so cannot kill the worker: it bounds the orphan's lifetime.
    """
    try:
        import resource

        if cpu_budget_s is None:
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            limit = _WORKER_MEMORY_LIMIT_BYTES
            resource.setrlimit(resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))
            return
        usage = resource.getrusage(resource.RUSAGE_SELF)
        soft = int(usage.ru_utime + usage.ru_stime + cpu_budget_s) + 5
        hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
        if hard != resource.RLIM_INFINITY:
            soft = min(soft, hard)
        resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))
    except (ImportError, ValueError, OSError, OverflowError):
        pass


def _worker_main(conn: Any) -> None:
    """Worker loop: receive (pred, gold, timeout), reply ("ok", bool) or ("error", message).

    Exits on a None request or when the parent goes away (EOF on the socket).
    """
    _limit_resources()
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    import math_verify  # noqa: F401  (import before announcing readiness)

    try:
        conn.send(("ready", None))
        while (request := conn.recv()) is not None:
            pred_answer, gold, timeout = request
            _limit_resources(cpu_budget_s=timeout)
            try:
                reply = ("ok", _verify_in_process(pred_answer, gold))
            except Exception as error:  # report it, keep serving
                reply = ("error", f"{type(error).__name__}: {error}"[:500])
            conn.send(reply)
    except (EOFError, OSError):  # the parent went away
        return


_WORKER_BOOT = (
    "import sys\n"
    "from multiprocessing.connection import Connection\n"
    "from scope_data.grader_pool import _worker_main\n"
    "_worker_main(Connection(int(sys.argv[1])))\n"
)


class _Worker:
    """One grader process (a plain `python -c` subprocess) and a socket to it.

    A subprocess rather than `multiprocessing`: the spawn start method re-imports the caller's
    main module, which breaks scripts without an ``if __name__ == "__main__"`` guard, and fork is
    unsafe next to torch threads.
    """

    def __init__(self) -> None:
        self.owner_pid = os.getpid()
        parent_sock, child_sock = socket.socketpair()
        package_root = str(Path(__file__).resolve().parents[1])
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [package_root, *filter(None, [env.get("PYTHONPATH")])]
        )
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-c", _WORKER_BOOT, str(child_sock.fileno())],
                pass_fds=(child_sock.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                env=env,
            )
        finally:
            child_sock.close()
        self.conn = Connection(parent_sock.detach())
        with _live_workers_lock:
            _live_workers.add(self)
        try:
            ready = self.conn.poll(_WORKER_START_TIMEOUT_S) and self.conn.recv()[0] == "ready"
        except (EOFError, OSError):
            ready = False
        if not ready:
            self.kill()
            raise RuntimeError("grader worker did not start")

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)
        self.conn.close()
        with _live_workers_lock:
            _live_workers.discard(self)


_live_workers: set[_Worker] = set()
_live_workers_lock = threading.Lock()


class _GraderPool:
    """A fixed number of worker slots; a slot's process is (re)started on demand."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._slots: queue.Queue[_Worker | None] = queue.Queue()
        for _ in range(size):
            self._slots.put(None)
        self._processes_unavailable = False

    def run(self, pred_answer: str, gold: str, timeout: float) -> PoolOutcome | bool:
        """True/False for a finished comparison, or a failure status."""
        if self._processes_unavailable:
            return _run_in_thread(pred_answer, gold, timeout)
        worker = self._slots.get()
        try:
            if worker is None:
                try:
                    worker = _Worker()
                except OSError as error:  # e.g. no fork/exec allowed here
                    logger.warning("grader: no worker process (%s); using deadline threads", error)
                    self._processes_unavailable = True
                    return _run_in_thread(pred_answer, gold, timeout)
            worker.conn.send((pred_answer, gold, timeout))
            if not worker.conn.poll(timeout):
                worker.kill()
                worker = None
                return "grader_timeout"
            kind, value = worker.conn.recv()
            return bool(value) if kind == "ok" else "grader_error"
        except (EOFError, OSError, RuntimeError) as error:
            if worker is not None:
                worker.kill()
                worker = None
            logger.warning("grader worker failed: %s", error)
            return "grader_error"
        finally:
            self._slots.put(worker)


def _run_in_thread(pred_answer: str, gold: str, timeout: float) -> PoolOutcome | bool:
    """Fallback: run in a daemon thread and stop waiting at the deadline."""
    outcome: list[PoolOutcome | bool] = []

    def target() -> None:
        try:
            outcome.append(_verify_in_process(pred_answer, gold))
        except Exception:
            outcome.append("grader_error")

    thread = threading.Thread(target=target, daemon=True, name="scope-grader")
    thread.start()
    thread.join(timeout)
    return outcome[0] if outcome else "grader_timeout"


_pool: _GraderPool | None = None
_pool_pid = 0
_pool_lock = threading.Lock()


def get_pool() -> _GraderPool:
    """The process's pool; a forked child gets its own (it must not share the parent's)."""
    global _pool, _pool_pid
    with _pool_lock:
        if _pool is None or _pool_pid != os.getpid():
            default = min(2, os.cpu_count() or 1)
            size = int(os.environ.get("SCOPE_GRADER_WORKERS", default))
            _pool, _pool_pid = _GraderPool(max(1, size)), os.getpid()
        return _pool


def pool_size() -> int:
    """Number of grader worker processes (how many comparisons run concurrently)."""
    return get_pool().size


def shutdown_grader_pool() -> None:
    """Kill this process's grader workers, idle or busy (also registered with atexit).

    Later calls start a fresh pool; a call in flight on a killed worker gets ``grader_error``.
    """
    global _pool
    with _pool_lock:
        _pool = None
        with _live_workers_lock:
            workers = [w for w in _live_workers if w.owner_pid == os.getpid()]
    for worker in workers:
        worker.kill()


atexit.register(shutdown_grader_pool)
