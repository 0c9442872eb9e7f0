"""Issue 16, classes 1 and 2: a stage writes only into a new or empty folder or its own table
(same table kind and config), never over or into its input, never deletes what it did not
write; a second writer of another config is refused before writing and at the commit. Every
case checks the file listing and checksums before and after (tests/hostile/helpers.py)."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pyarrow as pa
import pytest

from pipelines.executors.shard_executor import run_stage
from scope_data.folder import Folder
from scope_data.layout import MANIFEST, META_DIR, TEMP_RE, claim_name, part_name
from scope_data.ownership import OutputRefused
from scope_data.schema import SCHEMAS
from scope_data.shards import TableStore, read_arrow, read_manifest, verify
from tests.hostile.helpers import cli, snapshot
from tests.test_bad_inputs import arith_rollouts, problems_rows, tok, tok_dir  # noqa: F401


@pytest.fixture
def rollouts(tmp_path, tok, tok_dir) -> Path:  # noqa: F811
    url = tmp_path / "rollouts"
    TableStore(str(url), "rollouts").write(
        pa.Table.from_pylist(arith_rollouts(tok, tok_dir, 3), schema=SCHEMAS["rollouts"]),
        {"test": 1})
    return url


@pytest.fixture
def scored(tmp_path, rollouts) -> Path:
    url = tmp_path / "scored"
    code, out = cli("score", "--rollouts", rollouts, "--out", url, "--prm", "rule:arith")
    assert code == 0, out
    return url


# -- class 1: data loss through --out -------------------------------------------------------
def test_folder_with_foreign_files_is_refused_and_left_as_it_was(tmp_path, rollouts):
    """Foreign files (a hidden, old `.*.tmp` too) are neither mixed with nor deleted."""
    out = tmp_path / "mine"
    (out / META_DIR).mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    old = time.time() - 3600
    for hidden in (out / ".draft.tmp", out / META_DIR / ".cache.tmp"):
        hidden.write_text("keep me")
        os.utime(hidden, (old, old))
    before = snapshot(tmp_path)
    code, text = cli("score", "--rollouts", rollouts, "--out", out, "--prm", "rule:arith")
    assert code == 1
    assert f"{out} is not empty and is not a scored table written by scope (it holds " in text
    assert "use a new --out" in text
    assert snapshot(tmp_path) == before


def test_stale_temporary_clean_up_deletes_only_names_scope_writes(tmp_path):
    """`.scope/` of a claimed table: a dead writer's part temporary goes, an unrelated old
    `.*.tmp` stays (the clean-up matches our naming, `layout.TEMP_RE`, whole)."""
    meta = tmp_path / "t" / META_DIR
    meta.mkdir(parents=True)
    ours = meta / f".{part_name(0, 1)}.elsewhere-1.{'ab' * 16}.tmp"
    foreign = meta / ".notes.elsewhere-1.abab.tmp"
    old = time.time() - 3600
    for path in (ours, foreign):
        path.write_bytes(b"partial")
        os.utime(path, (old, old))
    assert Folder(str(tmp_path / "t"), temp_dir=META_DIR).remove_stale_temporaries(TEMP_RE) == 1
    assert not ours.exists() and foreign.read_bytes() == b"partial"


@pytest.mark.parametrize("case", ["score-same", "score-inside", "correct-same",
                                  "problems-over-rollouts"])
def test_output_equal_to_or_inside_the_input_is_refused(tmp_path, rollouts, scored, case):
    before = snapshot(tmp_path)
    if case == "score-same":
        code, text = cli("score", "--rollouts", rollouts, "--out", rollouts, "--prm",
                         "rule:arith")
        expected = f"--out {rollouts} is the input {rollouts}: a stage never writes over its input"
    elif case == "score-inside":
        code, text = cli("score", "--rollouts", rollouts, "--out", rollouts / "sub", "--prm",
                         "rule:arith")
        expected = f"--out {rollouts}/sub is inside the input {rollouts}"
    elif case == "correct-same":
        code, text = cli("correct", "--scored", scored, "--out", scored, "--teacher",
                         "oracle:arith")
        expected = f"--out {scored} is the input {scored}"
    else:
        src = tmp_path / "p.jsonl"
        src.write_text("".join(json.dumps({"problem": f"1+{i}", "answer": str(1 + i)}) + "\n"
                               for i in range(3)))
        before = snapshot(tmp_path)
        code, text = cli("problems", src, "--out", rollouts)
        expected = f"{rollouts} holds a rollouts table; this stage writes a problems table"
    assert code == 1 and expected in text, text
    assert snapshot(tmp_path) == before


def test_finished_table_of_another_config_is_not_overwritten(tmp_path, rollouts, scored):
    before = snapshot(tmp_path)
    old = read_manifest(str(scored))
    code, text = cli("score", "--rollouts", rollouts, "--out", scored, "--prm", "rule:arith",
                     "--threshold", "0.3")
    assert code == 1
    assert (f"{scored} holds a scored table written with another config (hash "
            f"{old.config_hash}, this run ") in text and "use a new --out" in text
    assert snapshot(tmp_path) == before
    # the same config resumes (nothing to do) and leaves the table as it was
    code, text = cli("score", "--rollouts", rollouts, "--out", scored, "--prm", "rule:arith")
    assert code == 0, text
    assert snapshot(tmp_path) == before


def test_eval_refuses_a_metrics_json_it_did_not_write(tmp_path):
    out = tmp_path / "eval"
    out.mkdir()
    (out / "metrics.json").write_text(json.dumps({"accuracy": 0.9, "config": {"model": "x"}}))
    problems = tmp_path / "problems"
    TableStore(str(problems), "problems").write(
        pa.Table.from_pylist(problems_rows(2), schema=SCHEMAS["problems"]), {})
    before = snapshot(tmp_path)
    code, text = cli("eval", "--model", "hf:/nonexistent", "--problems", problems, "--out", out)
    assert code == 1
    assert f"{out}/metrics.json was written by another scope eval (config hash " in text
    assert snapshot(tmp_path) == before
    code, text = cli("eval", "--model", "hf:/nonexistent", "--problems", problems, "--out",
                     problems)
    assert code == 1 and f"--out {problems} is the input {problems}" in text
    assert snapshot(tmp_path) == before


# -- class 2: two writers of different configs ------------------------------------------------
def _problems(url: str, n: int = 6) -> None:
    TableStore(url, "problems").write(
        pa.Table.from_pylist(problems_rows(n), schema=SCHEMAS["problems"]), {})


def test_second_writer_of_another_config_is_refused_while_the_first_runs(tmp_path):
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    _problems(src)
    started, release = threading.Event(), threading.Event()
    result: dict = {}

    def slow(rows, k):
        started.set()
        assert release.wait(30)
        return rows, {}

    def first():
        result["a"] = run_stage(input_url=src, output_url=out, output_table="problems",
                                config={"seed": 1}, process=slow)

    thread = threading.Thread(target=first)
    thread.start()
    assert started.wait(30)
    before = snapshot(tmp_path)
    with pytest.raises(OutputRefused, match=rf"{out} holds an unfinished problems table written "
                                            r"with another config \(hash [0-9a-f]{16}, this run "
                                            r"[0-9a-f]{16}\); use a new --out"):
        run_stage(input_url=src, output_url=out, output_table="problems", config={"seed": 2},
                  process=lambda rows, k: (rows, {}))
    assert snapshot(tmp_path) == before  # the refused writer wrote and removed nothing
    release.set()
    thread.join()
    manifest = result["a"].manifest
    assert manifest is not None and manifest.config["seed"] == 1
    verify(manifest)  # the manifest matches its parts
    assert read_arrow(out).num_rows == 6
    assert sorted(os.listdir(Path(out) / META_DIR)) == ["manifest.parquet",
                                                        "part-00000-of-00001.done.parquet"]


def test_commit_refuses_when_another_config_claimed_meanwhile(tmp_path):
    """Two writers that passed the first check at once: the commit sees the other's claim and
    writes no manifest (the other writer's claim and the parts stay)."""
    store = TableStore(str(tmp_path / "t"), "problems")
    rows = pa.Table.from_pylist(problems_rows(4), schema=SCHEMAS["problems"])
    store.write_part(rows, 0, 1, {"seed": 1})
    other = claim_name("0123456789abcdef")
    Folder(store.url).write_bytes(other, b"not ours")
    before = snapshot(tmp_path)
    with pytest.raises(OutputRefused, match="written with another config"):
        store.finalize(1, {"seed": 1})
    assert snapshot(tmp_path) == before and not (tmp_path / "t" / MANIFEST).exists()


def test_run_refuses_a_folder_holding_files_it_did_not_write(tmp_path):
    from pipelines.loop.recipe import recipe_from_dict
    from pipelines.loop.round_loop import RunConfig, run
    from tests.test_run import _recipe

    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    with pytest.raises(FileExistsError, match=r"did not write \(notes.txt\)"):
        run(RunConfig(recipe=recipe_from_dict(_recipe("hf:/models/p")), out=str(out)))
    assert snapshot(out) == before
