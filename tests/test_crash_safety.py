"""Crash safety (issue 8, item 3): a stage killed with SIGKILL at random points leaves nothing
half-written visible to readers, a rerun completes it, and the result equals an uninterrupted
run; two concurrent runs of one shard job end with one consistent part file.

Kill points are drawn from seeded RNGs relative to what the child has done so far (its first
temporary file / completion marker appearing), so they land before, inside and between parts.
"""

from __future__ import annotations

import json
import os
import posixpath
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from scope_data.folder import Folder
from scope_data.layout import MANIFEST, META_DIR, record_payload
from scope_data.shards import ShardError, read_arrow, read_manifest
from tests.proc_write_part import BATCH, big_table

ROOT = Path(__file__).resolve().parents[1]
WRITER = ROOT / "tests" / "proc_write_part.py"
BIG_ROWS = 240_000


def child_env(storage_options: dict | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("SCOPE_STORAGE_OPTIONS", None)
    if storage_options:
        env["SCOPE_STORAGE_OPTIONS"] = json.dumps(storage_options)
    return env


def names(url: str, options: dict | None) -> set[str]:
    """The files of the table folder and of its bookkeeping folder (`.scope/<name>`)."""
    folder = Folder(url, options)
    found = set()
    for sub in ("", META_DIR):
        path = folder.path(sub)
        folder.fs.invalidate_cache(path)  # other processes write here
        if folder.fs.exists(path):
            found |= {posixpath.join(sub, Path(p.rstrip("/")).name)
                      for p in folder.fs.ls(path, detail=False)}
    return found - {META_DIR}


def marker(folder: Folder, name: str) -> dict:
    return json.loads(record_payload(folder.read_bytes(name)))


def kill_at_random_point(cmd: list[str], env: dict, url: str, options: dict | None,
                         rng: random.Random, span: float, progress_lines: int = 0) -> None:
    """Start `cmd` and SIGKILL it at a random point.

    With `progress_lines` (the child prints one line per batch written), the kill comes a few
    milliseconds after a random one of those lines, i.e. inside a part. Otherwise a quarter of
    the seeds kill before the child wrote anything, the rest a random time (up to `span` s)
    after its first file appeared in the output folder.
    """
    out = subprocess.PIPE if progress_lines else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.DEVNULL, text=True)
    if progress_lines:
        target = rng.randrange(progress_lines)
        for _ in range(target + 1):
            if not proc.stdout.readline():
                break
        time.sleep(rng.uniform(0, 0.05))
    else:
        frac = rng.random()
        if frac < 0.25:
            time.sleep(frac * 4 * 2.0)
        else:
            while not names(url, options) and proc.poll() is None:
                time.sleep(0.01)
            time.sleep((frac - 0.25) / 0.75 * span)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def assert_nothing_partial_visible(url: str, options: dict | None) -> bool:
    """Readers see no table, and every completion marker stands for a complete part file.

    Returns True when the child finished before the kill (a complete table is then fine)."""
    folder = Folder(url, options)
    present = names(url, options)
    if MANIFEST in present:
        return True
    with pytest.raises(ShardError, match="no manifest .*; the stage that writes this table has "
                                         "not finished"):
        read_manifest(url, options)
    for name in sorted(present):
        if name.endswith(".done.parquet"):
            done = marker(folder, name)
            assert done["path"] in present, f"marker {name} without its part"
            assert folder.sha256(done["path"]) == done["sha256"], f"{name}: torn part"
            with folder.fs.open(folder.path(done["path"]), "rb") as f:
                assert pq.ParquetFile(f).metadata.num_rows == done["rows"]
    return False


def assert_consistent(url: str, options: dict | None, leftovers_ok: bool = False) -> None:
    """Every part file the manifest lists matches its marker and the manifest. Temporary files
    of killed writers (hidden `.scope/.part-*.tmp` names, never listed) are allowed with
    `leftovers_ok`; clean exits leave none."""
    manifest = read_manifest(url, options)
    folder = Folder(url, options)
    for entry in manifest.files:
        done = marker(folder, f"{META_DIR}/{entry['path'][: -len('.parquet')]}.done.parquet")
        assert done["sha256"] == entry["sha256"] == folder.sha256(entry["path"])
    leftovers = [n for n in names(url, options) if n.endswith(".tmp")]
    assert all(n.startswith(f"{META_DIR}/.part-") for n in leftovers)
    assert leftovers_ok or not leftovers


# --------------------------------------------------------------------------- the shard store


@pytest.fixture(params=["local", "s3"])
def location(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "big"), None
    url, options = request.getfixturevalue("s3_bucket")
    return f"{url}/big", options


@pytest.mark.slow
def test_store_killed_while_writing_big_parts_leaves_nothing_visible(location):
    url, options = location
    env = child_env(options)
    cmd = [sys.executable, str(WRITER), url, str(BIG_ROWS), "2"]
    expected = big_table(BIG_ROWS)
    killed_inside = 0
    for seed in range(4):
        rng = random.Random(seed)
        kill_at_random_point(cmd, env, url, options, rng, span=0,
                             progress_lines=BIG_ROWS // BATCH)
        if assert_nothing_partial_visible(url, options):
            break
        killed_inside += 1
    assert killed_inside >= 2  # the kills really interrupted the writer
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert read_arrow(url, options).equals(expected)
    assert_consistent(url, options, leftovers_ok=True)


@pytest.mark.slow
def test_concurrent_runs_of_one_shard_job_end_with_one_consistent_part(location):
    url, options = location
    env = child_env(options)
    base = [sys.executable, str(WRITER), url, str(BIG_ROWS // 2), "2"]
    procs = [subprocess.Popen(base + ["0"], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()
    assert MANIFEST not in names(url, options)
    done = subprocess.run(base + ["1"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    parts = sorted(n for n in names(url, options) if n.startswith("part-"))
    assert parts == ["part-00000-of-00002.parquet", "part-00001-of-00002.parquet"]
    assert_consistent(url, options)
    assert read_arrow(url, options).equals(big_table(BIG_ROWS // 2))


# --------------------------------------------------------------------------- generate (hf)


@pytest.fixture(scope="module")
def gen_inputs(tmp_path_factory):
    """A problems table and a tiny random-init policy (deterministic sampling with seeds)."""
    from tests.helpers_engines import build_random_tiny, write_problems

    root = tmp_path_factory.mktemp("gen")
    write_problems(str(root / "problems"), n=6, seed=1)
    return root / "problems", build_random_tiny(root / "policy")


def generate_cmd(problems: Path, policy: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "cli.main", "generate", "--problems", str(problems),
            "--policy", f"hf:{policy}", "--out", str(out), "--n", "2", "--max-new-tokens", "24",
            "--seed", "7", "--num-shards", "3", "--batch-size", "2", *extra]


def sorted_rows(url: str) -> list[dict]:
    return sorted(read_arrow(url).to_pylist(), key=lambda r: r["rollout_id"])


@pytest.mark.slow
def test_generate_killed_at_random_points_then_rerun_equals_uninterrupted(tmp_path, gen_inputs):
    problems, policy = gen_inputs
    env = child_env()
    ref = tmp_path / "ref"
    t0 = time.monotonic()
    done = subprocess.run(generate_cmd(problems, policy, ref), env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    reference = sorted_rows(str(ref))
    assert len(reference) == 12
    span = max(0.5, (time.monotonic() - t0) * 0.3)
    interrupted = 0
    for seed in range(3):
        out = tmp_path / f"run{seed}"
        kill_at_random_point(generate_cmd(problems, policy, out), env, str(out), None,
                             random.Random(100 + seed), span)
        interrupted += not assert_nothing_partial_visible(str(out), None)
        # rerun in the same environment (thread count included: float sums are then bitwise
        # equal); it regenerates only the parts without a marker
        again = subprocess.run(generate_cmd(problems, policy, out), env=env,
                               capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stderr
        assert read_manifest(str(out)).rows == 12
        assert sorted_rows(str(out)) == reference
        assert_consistent(str(out), None, leftovers_ok=True)
    assert interrupted >= 2


@pytest.mark.slow
def test_two_concurrent_generate_jobs_of_one_shard_agree(tmp_path, gen_inputs):
    problems, policy = gen_inputs
    env = child_env()
    out = tmp_path / "r"
    cmd = generate_cmd(problems, policy, out, "--shard-index", "1")
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()
    assert sorted(str(n.relative_to(out)) for n in out.glob("**/part-00001-*")) == [
        ".scope/part-00001-of-00003.done.parquet", "part-00001-of-00003.parquet"]
    done = marker(Folder(str(out)), ".scope/part-00001-of-00003.done.parquet")
    assert Folder(str(out)).sha256(done["path"]) == done["sha256"]
    assert pq.read_table(out / done["path"]).num_rows == done["rows"] > 0
    assert not list(out.glob(".scope/.*.tmp"))
