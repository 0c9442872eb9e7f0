"""Online mode (`scope run --online`, `scope worker`): the same stages as warm worker processes.

K = 0 gives the offline loop's tables and weights; a worker killed with SIGKILL is restarted by
the launcher and the run ends with the same results; a second trainer is refused; K = 1 lets
generation run one round ahead (round r samples from the policy of round r-2); several workers
of a role split its stages by shard, and the worker that completes a table marks the stage."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipelines.loop import online
from pipelines.loop.online import Share, WorkerConfig, _sole_trainer, roles_of, run_worker
from pipelines.loop.recipe import recipe_from_dict
from pipelines.loop.round_loop import RunConfig, run
from pipelines.loop.runner import StageRunner
from tests.test_run import _recipe, _stage_tables, _write


@pytest.fixture(autouse=True)
def _threads(monkeypatch):
    # bit-identical results need one torch thread count in this process and in the workers
    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))


def _weights(run_dir: Path, r: int) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / f"round-{r:04d}" / "train" / "model.safetensors"))


def _same_run(a: Path, b: Path, rounds: int) -> None:
    ta, tb = _stage_tables(a), _stage_tables(b)
    assert ta.keys() == tb.keys() and f"round-{rounds:04d}/generate" in ta
    for key in ta:
        assert ta[key].equals(tb[key]), key
    wa, wb = _weights(a, rounds), _weights(b, rounds)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-6), k


def test_roles_follow_the_algorithm() -> None:
    assert roles_of(recipe_from_dict(_recipe("hf:x", algo="grpo"))) == [
        "generate", "train", "eval"]
    assert roles_of(recipe_from_dict(_recipe("hf:x"))) == [
        "generate", "score", "correct", "train", "eval"]


@pytest.mark.slow
def test_online_k0_equals_offline_and_survives_a_killed_worker(tmp_path, tiny_policy) -> None:
    recipe = _write(tmp_path / "r.yaml", _recipe(f"hf:{tiny_policy}"))
    offline = run(RunConfig(recipe=str(recipe), out=str(tmp_path / "offline"), verbose=False))
    online = run(RunConfig(recipe=str(recipe), out=str(tmp_path / "online"), verbose=False,
                           online=True))
    _same_run(tmp_path / "offline", tmp_path / "online", 2)
    drop = ["run_name"]
    assert offline.metrics.drop(drop).equals(online.metrics.drop(drop))
    assert set(online.workers) == {"generate", "score", "correct", "train", "eval"}
    assert all(w["restarts"] == 0 for w in online.workers.values())

    # SIGKILL the train worker while it trains round 1, then the generate worker once round 1
    # is trained (it is loading round 2's policy or generating): the launcher restarts each,
    # and the run completes with the same tables and weights
    out = tmp_path / "killed"
    killed: dict[str, int] = {}
    when = {"train": out / "round-0001" / "_stages" / "correct.json",
            "generate": out / "round-0001" / "_stages" / "train.json"}

    def kill_workers() -> None:
        deadline = time.time() + 900
        while time.time() < deadline and len(killed) < len(when):
            for role, marker in when.items():
                if role not in killed and marker.exists():
                    for pid in _worker_pids(role, out):
                        os.kill(pid, signal.SIGKILL)
                        killed[role] = pid
            time.sleep(0.05)

    t = threading.Thread(target=kill_workers, daemon=True)
    t.start()
    again = run(RunConfig(recipe=str(recipe), out=str(out), verbose=False, online=True))
    t.join(5)
    assert set(killed) == {"train", "generate"}, f"workers seen running: {killed}"
    assert again.workers["train"]["restarts"] == again.workers["generate"]["restarts"] == 1
    assert "restart 1" in (out / "logs" / "train.log").read_text()
    _same_run(tmp_path / "offline", out, 2)


def _worker_pids(role: str, run_dir: Path) -> list[int]:
    import psutil

    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if "worker" in cmd and role in cmd and str(run_dir) in cmd:
            found.append(p.pid)
    return found


def test_second_trainer_is_refused(tmp_path) -> None:
    with _sole_trainer(tmp_path), pytest.raises(RuntimeError, match="already has a running"):
        with _sole_trainer(tmp_path):
            pass


def test_heap_tidy_scans_the_whole_heap_only_now_and_then(monkeypatch) -> None:
    import gc
    import math
    import weakref

    class Node:
        pass

    monkeypatch.setattr(online, "_last_full_tidy", -math.inf)
    try:
        online.tidy_heap()  # the first tidy is a full one: the heap so far frozen
        a, b = Node(), Node()
        a.other, b.other = b, a  # a cycle, frozen by the next tidy while still referenced
        probe = weakref.ref(a)
        online.tidy_heap()
        assert gc.get_freeze_count() > 0
        del a, b  # now garbage, but only reachable by a full collection of the frozen heap
        online.tidy_heap()
        assert probe() is not None  # an incremental tidy leaves frozen cycles alone
        monkeypatch.setattr(online, "FULL_TIDY_SECONDS", 0.0)  # the next full one is due
        online.tidy_heap()
        assert probe() is None
    finally:
        gc.unfreeze()


def test_linger_ends_with_the_last_train_or_the_launcher(tmp_path, monkeypatch, capsys) -> None:
    runner = StageRunner(tmp_path, True, False, False, role="score")
    marker = tmp_path / "round-0002" / "_stages" / "train.json"
    runner.markers.update({"h1": tmp_path / "round-0001" / "_stages" / "train.json",
                           "h2": marker})
    monkeypatch.setattr(online, "LINGER_POLL_SECONDS", 0.0)
    pids = iter([100, 100, 100])  # the launcher's pid, then gone (the worker re-parented)
    monkeypatch.setattr(online.os, "getppid", lambda: next(pids, 1))
    online._linger(runner)
    assert "until the launcher was gone" in capsys.readouterr().out
    marker.parent.mkdir(parents=True)
    marker.write_text(json.dumps({"config_hash": "h2"}))  # the last round's train is done
    online._linger(runner)
    assert "until $RUN_DIR/round-0002/_stages/train.json was written" in capsys.readouterr().out


def test_online_refuses_dynamic_sampling(tmp_path) -> None:
    body = _recipe("hf:x", algo="grpo", dynamic_sampling={"enable": True},
                   generate={"n": 2, "prompts_per_round": 2})
    with pytest.raises(ValueError, match="dynamic_sampling runs in the offline loop only"):
        run(RunConfig(recipe=recipe_from_dict(body), out=str(tmp_path / "r"), online=True))
    assert not (tmp_path / "r").exists()


def test_worker_errors(tmp_path) -> None:
    with pytest.raises(ValueError, match="unknown worker role"):
        run_worker(WorkerConfig(role="trian", run=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match="scope run RECIPE --online"):
        run_worker(WorkerConfig(role="train", run=str(tmp_path / "none")))


@pytest.mark.slow
def test_online_k1_generates_one_round_ahead(tmp_path, tiny_policy) -> None:
    """K = 1, and rounds 1-2 without evaluation (`every: 0`): the eval worker still waits for
    each round's tables before writing its metrics row."""
    evals = [{"name": "heldout", "arith": {"count": 4, "seed": 12}, "every": 0}]
    body = _recipe(f"hf:{tiny_policy}", algo="grpo", rounds=3, eval=evals)
    recipe = _write(tmp_path / "r.yaml", body)
    out = tmp_path / "k1"
    res = run(RunConfig(recipe=str(recipe), out=str(out), verbose=False, online=True,
                        max_staleness=1))
    assert res.metrics.select("round", "eval_set").rows() == [
        (0, "heldout"), (1, None), (2, None), (3, "heldout")]
    lag = dict(res.metrics.filter(res.metrics["round"] > 0).select("round", "staleness").rows())
    assert lag == {1: 0, 2: 1, 3: 1}  # round r trains on samples of the policy of round r-2
    from scope_data.shards import scan

    def sampled_by(r: int) -> tuple[set[str], set[int]]:
        rows = scan(str(out / f"round-{r:04d}" / "generate")).collect()
        return set(rows["policy"]), set(rows["policy_version"])

    initial = ({f"hf:{tiny_policy}"}, {0})
    assert sampled_by(1) == sampled_by(2) == initial  # rounds 1, 2: the initial policy
    assert sampled_by(3) == ({f"hf:{out / 'round-0001' / 'train'}"}, {1})  # round 3: round 1's
    # the generate worker, done a round ahead, stayed (--linger, from the launcher) until the
    # last round was trained: its exit would have slowed that training
    assert "until $RUN_DIR/round-0003/_stages/train.json was written" in (
        out / "logs" / "generate.log").read_text()


# -- several workers per role, splitting a stage by shard --------------------------------------
def _split_recipe(policy: str, **over) -> dict:
    """The test recipe with generate, score and correct in 2 shards each."""
    return _recipe(policy, generate={"n": 3, "temperature": 1.0, "max_new_tokens": 80,
                                     "num_shards": 2},
                   score={"num_shards": 2}, correct={"max_new_tokens": 80, "num_shards": 2},
                   **over)


@pytest.mark.slow
def test_two_workers_per_role_equal_offline(tmp_path, tiny_policy) -> None:
    """K = 0 with 2 generate, 2 score and 2 correct workers, each running one of the two shards
    of each stage: the same tables and final weights as the offline run of the recipe."""
    from scope_data.shards import read_manifest

    recipe = _write(tmp_path / "r.yaml", _split_recipe(f"hf:{tiny_policy}"))
    run(RunConfig(recipe=str(recipe), out=str(tmp_path / "offline"), verbose=False))
    split = {"generate": 2, "score": 2, "correct": 2}
    res = run(RunConfig(recipe=str(recipe), out=str(tmp_path / "split"), verbose=False,
                        online=True, online_workers=split))
    out = tmp_path / "split"
    _same_run(tmp_path / "offline", out, 2)
    assert set(res.workers) == {"generate-0", "generate-1", "score-0", "score-1", "correct-0",
                                "correct-1", "train", "eval"}
    for role in split:
        table = read_manifest(str(out / "round-0002" / role))
        assert [f["rows"] > 0 for f in table.files] == [True, True]  # both shards hold rows
        for i in range(2):  # each worker ran its share of the stage
            assert f">> round-0002/{role}" in (out / "logs" / f"{role}-{i}.log").read_text()
        assert not (out / "logs" / f"{role}.log").exists()
    assert (out / "logs" / "train.log").is_file()


def _score_stage(tmp_path: Path, num_shards: int):
    from pipelines.stages.score import ScoreConfig
    from tests.helpers_score import arith_rollout_rows, char_tokenizer_dir, write_rollouts

    rollouts = str(tmp_path / "rollouts")
    write_rollouts(rollouts, arith_rollout_rows(char_tokenizer_dir(tmp_path / "tok"), 8))
    return ScoreConfig(rollouts=rollouts, out=str(tmp_path / "run" / "round-0001" / "score"),
                       prm="rule:arith", num_shards=num_shards)


def _worker(tmp_path: Path, index: int, count: int) -> StageRunner:
    return StageRunner(tmp_path / "run", True, False, True, role="score", share=Share(index, count))


def test_a_split_stage_is_marked_by_the_worker_that_completes_it(tmp_path) -> None:
    from pipelines.loop.round_stages import run_score
    from scope_data.shards import is_table, read_manifest, scan

    cfg = _score_stage(tmp_path, 3)
    marker = tmp_path / "run" / "round-0001" / "_stages" / "score.json"
    first = _worker(tmp_path, 1, 2)
    digest = first.stage("round-0001", "score", cfg, [], run_score)
    assert sorted(p.name for p in Path(cfg.out).glob("part-*")) == ["part-00001-of-00003.parquet"]
    assert not is_table(cfg.out) and not marker.exists() and first.ran == []
    last = _worker(tmp_path, 0, 2)  # shards 0 and 2: the table is complete, it marks the stage
    assert last.stage("round-0001", "score", cfg, [], run_score) == digest
    assert last.ran == ["round-0001/score"]
    assert json.loads(marker.read_text())["config_hash"] == digest
    assert read_manifest(cfg.out).rows == 32
    # the same rows as one process running every shard
    whole = replace(cfg, out=str(tmp_path / "whole"))
    run_score(whole)
    assert scan(cfg.out).collect().sort("rollout_id").equals(
        scan(whole.out).collect().sort("rollout_id"))
    # a worker killed after its shard finished the table, before it wrote the marker: on
    # restart any worker finds every part done and the manifest there, and marks the stage
    marker.unlink()
    again = _worker(tmp_path, 1, 2)
    again.stage("round-0001", "score", cfg, [], run_score)
    assert json.loads(marker.read_text())["config_hash"] == digest
    assert again.ran == ["round-0001/score"]
    assert not list(marker.parent.glob("*.tmp"))  # each writer's temporary was renamed
    # the next start skips the marked stage
    done = _worker(tmp_path, 0, 2)
    done.stage("round-0001", "score", cfg, [], run_score)
    assert done.skipped == ["round-0001/score"] and done.ran == []


def test_only_worker_0_clears_a_stale_output(tmp_path) -> None:
    marker = tmp_path / "_stages" / "score.json"
    marker.parent.mkdir()
    marker.write_text(json.dumps({"config_hash": "other"}))
    assert Share(0, 2).clears(marker, "mine")
    found: list[bool] = []
    t = threading.Thread(target=lambda: found.append(Share(1, 2).clears(marker, "mine")),
                         daemon=True)
    t.start()
    time.sleep(0.3)
    assert t.is_alive()  # waits while the marker shows another config's stage
    marker.unlink()  # worker 0 cleared the output, then removed the marker
    t.join(5)
    assert found == [False]
    marker.write_text(json.dumps({"config_hash": "mine"}))  # done meanwhile: nothing to clear
    assert Share(1, 2).clears(marker, "mine") is False
    marker.write_text(json.dumps({"config_hash": "other"}))  # worker 0 never comes: --timeout
    with pytest.raises(TimeoutError, match="for worker 0 of 2 to clear .*score.json"):
        Share(1, 2, timeout=0.2).clears(marker, "mine")


def test_split_refusals(tmp_path) -> None:
    recipe = _write(tmp_path / "r.yaml", _split_recipe("hf:x"))

    def launch(**workers) -> None:
        run(RunConfig(recipe=str(recipe), out=str(tmp_path / "run"), online=True,
                      online_workers=workers))

    with pytest.raises(ValueError, match=r"recipe .*, score: num_shards 2 is less than its 3 "
                       r"workers; set `score: \{num_shards: 3\}`"):
        launch(score=3)
    with pytest.raises(ValueError, match="unknown role 'scorer'"):
        launch(scorer=2)
    with pytest.raises(ValueError, match="generate needs a whole number >= 1, got 0"):
        launch(generate=0)
    with pytest.raises(ValueError, match=r"the train worker runs alone \(--num-workers 1\)"):
        launch(train=2)
    assert not (tmp_path / "run").exists()  # refused before anything was written
    with pytest.raises(ValueError, match="--online-workers needs --online"):
        run(RunConfig(recipe=str(recipe), out=str(tmp_path / "run"), dry_run=True,
                      online_workers={"generate": 2}))
    with pytest.raises(ValueError, match="object store each worker runs in its own mirror"):
        run(RunConfig(recipe=str(recipe), out="s3://bucket/run", online=True,
                      online_workers={"generate": 2}))

    def worker(role: str, index: int, count: int, body: dict | None = None) -> None:
        path = _write(tmp_path / "w.yaml", body or _split_recipe("hf:x"))
        run_worker(WorkerConfig(role=role, run=str(tmp_path / "run"), recipe=str(path),
                                worker_index=index, num_workers=count))

    with pytest.raises(ValueError, match=r"--worker-index 2 is not in \[0, --num-workers 2\)"):
        worker("generate", 2, 2)
    with pytest.raises(ValueError, match=r"--worker-index -1 is not in"):
        worker("generate", -1, 2)
    with pytest.raises(ValueError, match="the eval worker runs alone"):
        worker("eval", 0, 2)
    with pytest.raises(ValueError, match="recipe .*, correct: num_shards 1 is less than its 2"):
        worker("correct", 1, 2, _recipe("hf:x"))
    with pytest.raises(ValueError, match="object store each worker runs in its own mirror"):
        run_worker(WorkerConfig(role="generate", run="s3://bucket/run", worker_index=0,
                                num_workers=2))
    # the loop owns a stage's shard index: a recipe cannot set it
    body = _recipe("hf:x", generate={"n": 2, "shard_index": 0})
    with pytest.raises(ValueError, match=r"\['shard_index'\] are set by the round loop"):
        run(RunConfig(recipe=recipe_from_dict(body), out=str(tmp_path / "d"), dry_run=True))
