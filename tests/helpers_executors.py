"""Shared helpers of the executor tests: a real Ray head on loopback (started and stopped here)
and a stage function that fails once on one shard."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def ray_head(num_cpus: int = 2) -> Iterator[str]:
    """`ray start --head --block` on 127.0.0.1 in its own session; yields the GCS address.
    Teardown stops it (SIGTERM, then SIGKILL of its process group): only processes started
    here are touched."""
    port = _free_port()
    tmp = tempfile.mkdtemp(prefix="rs", dir="/tmp")  # short: Ray's socket paths are bounded
    # RAY_AUTH_MODE=disabled: a loopback test cluster, whatever ~/.ray/auth_token may hold
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    log = open(Path(tmp) / "ray-start.log", "w")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
         f"--port={port}", f"--num-cpus={num_cpus}", "--num-gpus=0",
         "--node-ip-address=127.0.0.1", "--disable-usage-stats", "--include-dashboard=false",
         f"--temp-dir={tmp}"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"ray start failed: {(Path(tmp) / 'ray-start.log').read_text()}")
            time.sleep(0.5)
        yield address
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()


FAIL_SHARD = 1


def generate_failing_once(marker: str, cfg: Any) -> Any:
    """`generate.run(cfg)`, except that shard FAIL_SHARD raises on its first try (the marker
    file records that it did)."""
    from pipelines.stages import generate

    if cfg.shard_index == FAIL_SHARD:
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            pass
        else:
            raise RuntimeError("injected failure: shard 1 fails on its first try")
    return generate.run(cfg, quiet=True)
