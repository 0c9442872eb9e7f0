"""Online mode with the run folder on an object store (`pipelines.loop.run_store`), against a
moto S3 server on 127.0.0.1: every worker a separate OS process working in its own local mirror,
the train worker and a generate worker SIGKILLed mid-run and restarted, the same tables and
weights as the offline run; the S3 train lock refuses a second trainer and takes over a dead
one's."""

from __future__ import annotations

import os
import re
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

from pipelines.loop.round_loop import RunConfig, run
from tests.test_online import _weights
from tests.test_run import _recipe, _stage_tables, _write


@pytest.fixture(autouse=True)
def _threads(monkeypatch, tmp_path):
    # bit-identical results need one torch thread count in this process and in the workers
    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))
    monkeypatch.setenv("SCOPE_CACHE", str(tmp_path / "cache"))  # the workers' local mirrors


def _download(fs, url: str, to: Path) -> list[str]:
    root = url.removeprefix("s3://").rstrip("/")
    keys = [k[len(root) + 1:] for k in fs.find(root)]
    for k in keys:
        (to / k).parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(f"{root}/{k}", str(to / k))
    return keys


@pytest.mark.slow
def test_s3_run_folder_with_killed_workers_equals_offline(tmp_path, tiny_policy,
                                                          s3_bucket) -> None:
    import s3fs

    url, options = s3_bucket
    fs = s3fs.S3FileSystem(**options)
    recipe = _write(tmp_path / "r.yaml", _recipe(f"hf:{tiny_policy}", algo="grpo"))
    run(RunConfig(recipe=str(recipe), out=str(tmp_path / "offline"), verbose=False))

    # SIGKILL the train worker once round 1's rollouts are on S3 (it is pulling them or
    # training), then the generate worker once round 1's policy is (it is pulling it or
    # generating round 2); the launcher restarts each in the same mirror
    killed: dict[str, int] = {}
    root = url.removeprefix("s3://")
    when = {"train": f"{root}/round-0001/_stages/generate.json",
            "generate": f"{root}/round-0001/_stages/train.json"}

    def kill_workers() -> None:
        deadline = time.time() + 900
        while time.time() < deadline and len(killed) < len(when):
            for role, key in when.items():
                fs.invalidate_cache()
                if role not in killed and fs.exists(key):
                    for pid in _worker_pids(role, url):
                        os.kill(pid, signal.SIGKILL)
                        killed[role] = pid
            time.sleep(0.1)

    t = threading.Thread(target=kill_workers, daemon=True)
    t.start()
    res = run(RunConfig(recipe=str(recipe), out=url, verbose=False, online=True,
                        storage_options=options))
    t.join(5)
    assert set(killed) == {"train", "generate"}, f"workers seen running: {killed}"
    assert res.workers["train"]["restarts"] == res.workers["generate"]["restarts"] == 1
    assert res.workers["eval"]["restarts"] == 0
    assert sorted(set(res.metrics["round"].to_list())) == [0, 1, 2]
    # the restarted train worker trained round 1 from disk and round 2 on the kept trainer
    log = Path(res.workers["train"]["log"]).read_text()
    assert "trainer continued in memory 1, loaded from disk 1" in log, log[-2000:]

    copy = tmp_path / "from-s3"
    keys = _download(fs, url, copy)
    assert not [k for k in keys if k.endswith(".tmp") or "tmp-train" in k], keys
    assert ".train.lock" not in keys  # released at the end
    # the same tables (none lost, none duplicated) and weights as the offline run; rollouts
    # name the policy folder in the worker's mirror (its copy of the run folder)
    mirror = re.escape(os.environ["SCOPE_CACHE"]) + r"/online/[0-9a-f]{12}/(generate|eval)"
    offline, online = _stage_tables(tmp_path / "offline"), _stage_tables(copy)
    assert offline.keys() == online.keys() and "round-0002/generate" in online
    for key, df in online.items():
        if "policy" in df.columns:
            df = df.with_columns(df["policy"].str.replace(mirror, "RUN"))
        assert offline[key].equals(df), key
    wa, wb = _weights(tmp_path / "offline", 2), _weights(copy, 2)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-6), k


def _worker_pids(role: str, url: str) -> list[int]:
    import psutil

    return [p.pid for p in psutil.process_iter(["cmdline"])
            if {"worker", role, url} <= set(p.info["cmdline"] or [])]


def test_s3_train_lock(s3_bucket, tmp_path) -> None:
    from pipelines.loop.run_store import LOCK, RunStore, TrainLock

    url, options = s3_bucket
    store = RunStore(url, options, tmp_path / "mirror")
    with TrainLock(store):
        body = store.read_json(LOCK)
        assert body["pid"] == os.getpid()
        with pytest.raises(RuntimeError, match="already has a running train worker"):
            TrainLock(store).__enter__()
    assert not store.folder.exists(LOCK)  # released
    # a lock left by a dead process of this host (a SIGKILLed trainer) is taken over
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    store.folder.write_text(LOCK, f'{{"host": "{socket.gethostname()}", '
                                  f'"pid": {int(dead.stdout)}, "time": {time.time()}}}')
    with TrainLock(store) as lock:
        assert store.read_json(LOCK)["pid"] == os.getpid() and not lock.lost
