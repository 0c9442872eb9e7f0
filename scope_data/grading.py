"""Final-answer extraction and verification (the RLVR reward).

`extract_answer` finds a response's final answer (last ``\\boxed{}``/``\\fbox{}``, else the last
``#### X``, else the last ``Answer: X`` line). `grade` / `is_correct` compare it with the gold
answer: first a string fast path, then `math-verify` (``verify(gold, pred)``, gold first, as its
docs require: the comparison is not symmetric).

Timeout mechanism (works from any thread): math-verify's own timeout uses ``signal.alarm`` (main
thread only), so it is disabled (``parsing_timeout=None``, ``timeout_seconds=None``); each
comparison runs in a small persistent pool of worker processes (plain ``python -c``
subprocesses on a socket: no fork next to torch threads, no re-import of the caller's
``__main__``). The caller waits with a deadline; on timeout the worker is SIGKILLed, which really
stops a runaway sympy computation and frees its memory, and a fresh worker (~0.5 s start-up, not
counted in the timeout) takes its slot on next use. Workers cap their address space at 4 GiB
and, per request, their CPU time at timeout + 5 s, so one orphaned mid-request by a killed
parent still dies (an idle one exits on EOF). Pool size: ``SCOPE_GRADER_WORKERS`` (default
``min(2, cpu_count)``). If no process can be started, calls fall back to a daemon thread with a
deadline: ``grader_timeout`` still comes on time, but the computation cannot be stopped.

Results are cached (LRU) on ``(extracted answer, gold, timeout)``, so the G samples of a group
that share an answer are verified once.
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import re
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Literal

logger = logging.getLogger(__name__)

GradeStatus = Literal["ok", "no_answer", "grader_timeout", "grader_error"]

_BOX_RE = re.compile(r"\\(?:boxed|fbox)\b")
_HASH_RE = re.compile(r"^[ \t]*####[ \t]*(\S.*?)[ \t]*$", re.MULTILINE)
_ANSWER_RE = re.compile(
    r"^[ \t>*#_-]*(?:the[ \t]+)?(?:final[ \t]+)?answer[ \t*]*(?:is[ \t*]*)?[:：]"
    r"[ \t*]*(\S.*?)[ \t]*$",
    re.MULTILINE | re.IGNORECASE,
)
_WORKER_START_TIMEOUT_S = 120.0
_WORKER_MEMORY_LIMIT_BYTES = 4 * 1024**3


@dataclass(frozen=True)
class GradeResult:
    """Outcome of grading one response: the extracted answer, the verdict and why."""

    pred_answer: str | None
    correct: bool
    status: GradeStatus


# --------------------------------------------------------------------------- extraction


def _braced_content(text: str, open_index: int) -> str | None:
    """Content of the balanced ``{...}`` group opening at ``text[open_index]``, or None."""
    depth = 0
    index = open_index
    while index < len(text):
        char = text[index]
        if char == "\\":  # skip escaped characters such as \{ and \}
            index += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[open_index + 1 : index]
        index += 1
    return None


def _last_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}`` / ``\\fbox{...}`` (also ``\\boxed 5``)."""
    for match in reversed(list(_BOX_RE.finditer(text))):
        rest_start = match.end()
        stripped = text[rest_start:].lstrip()
        if stripped.startswith("{"):
            content = _braced_content(text, len(text) - len(stripped))
        elif rest_start < len(text) and text[rest_start] == " ":
            bare = re.match(r"[^\s$]+", stripped)  # "\boxed 5$" form
            content = bare.group(0) if bare else None
        else:
            content = None
        if content is not None and content.strip():
            return content.strip()
    return None


def _clean_tail_answer(answer: str) -> str:
    """Strip markdown bold, surrounding ``$`` and a trailing period from a line answer."""
    answer = answer.strip().strip("*").strip()
    previous = None
    while previous != answer:
        previous = answer
        answer = answer.rstrip(".").strip().strip("$").strip()
    return answer


def extract_answer(text: str) -> str | None:
    """The response's final answer string, or None when it states none.

    Priority: the last complete ``\\boxed{...}``/``\\fbox{...}`` (balanced braces), else the last
    ``#### X`` line (GSM8K), else the last ``Answer: X`` line (case-insensitive; also
    ``Final Answer:``, ``**Answer:**``, ``The answer is: X``), with a trailing period and
    surrounding ``$`` stripped.
    """
    if not isinstance(text, str) or not text.strip():
        return None
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed
    for pattern in (_HASH_RE, _ANSWER_RE):
        matches = pattern.findall(text)
        for candidate in reversed(matches):
            cleaned = _clean_tail_answer(candidate)
            if cleaned:
                return cleaned
    return None


def normalize_whitespace(text: str) -> str:
    """Collapse whitespace runs to one space and strip (the fast-path comparison key)."""
    return " ".join(text.split())


# --------------------------------------------------------------------------- worker pool


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
    "from scope_data.grading import _worker_main\n"
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

    def run(self, pred_answer: str, gold: str, timeout: float) -> GradeStatus | bool:
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


def _run_in_thread(pred_answer: str, gold: str, timeout: float) -> GradeStatus | bool:
    """Fallback: run in a daemon thread and stop waiting at the deadline."""
    outcome: list[GradeStatus | bool] = []

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


def _get_pool() -> _GraderPool:
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
    return _get_pool().size


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


# --------------------------------------------------------------------------- grading


class _UncachedGraderError(Exception):
    """Raised through the cache so that a failed comparison is retried next time."""


@lru_cache(maxsize=65536)
def _grade_answer(pred_answer: str, gold: str, timeout: float) -> tuple[bool, GradeStatus]:
    """Cached verdict; verdicts and timeouts are cached, errors (maybe transient) are not."""
    if normalize_whitespace(pred_answer) == normalize_whitespace(gold):
        return True, "ok"
    outcome = _get_pool().run(pred_answer, gold, timeout)
    if outcome == "grader_error":
        raise _UncachedGraderError
    if isinstance(outcome, bool):
        return outcome, "ok"
    return False, outcome


def _gold_to_str(gold_answer: object) -> str | None:
    if isinstance(gold_answer, bool):
        return None
    if isinstance(gold_answer, int | float):
        return str(gold_answer)
    if isinstance(gold_answer, str) and gold_answer.strip():
        return gold_answer.strip()
    return None


def grade(response_text: object, gold_answer: object, timeout: float = 5.0) -> GradeResult:
    """Grade one response against the gold answer; never raises.

    Status: ``ok`` (compared; ``correct`` is the verdict), ``no_answer`` (empty response or no
    extractable answer), ``grader_timeout`` (math-verify ran past ``timeout`` seconds),
    ``grader_error`` (non-string response, missing gold, or the comparison failed). A numeric
    gold (int/float) is compared as its string. Only ``ok`` rows can be correct.
    """
    try:
        gold = _gold_to_str(gold_answer)
        if not isinstance(response_text, str) or gold is None:
            return GradeResult(None, False, "grader_error")
        pred_answer = extract_answer(response_text)
        if pred_answer is None:
            return GradeResult(None, False, "no_answer")
        try:
            correct, status = _grade_answer(pred_answer, gold, float(timeout))
        except _UncachedGraderError:
            return GradeResult(pred_answer, False, "grader_error")
        return GradeResult(pred_answer, correct, status)
    except Exception:  # a bad row must never stop a stage
        logger.warning("grading failed", exc_info=True)
        return GradeResult(None, False, "grader_error")


def is_correct(response_text: object, gold_answer: object, timeout: float = 5.0) -> bool:
    """True when the response's final answer is mathematically equal to the gold answer."""
    return grade(response_text, gold_answer, timeout).correct


def grade_many(
    responses: list[Any], gold_answers: list[Any], timeout: float = 5.0
) -> list[GradeResult]:
    """Grade pairs concurrently, one in flight per grader worker; results in input order."""
    if len(responses) != len(gold_answers):
        raise ValueError(f"{len(responses)} responses but {len(gold_answers)} gold answers")
    with ThreadPoolExecutor(pool_size(), thread_name_prefix="scope-grade") as executor:
        return list(executor.map(lambda r, g: grade(r, g, timeout), responses, gold_answers))
