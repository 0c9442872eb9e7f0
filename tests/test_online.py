"""Online mode (`scope run --online`, `scope worker`): the same stages as warm worker processes.

K = 0 gives the offline loop's tables and weights; a worker killed with SIGKILL is restarted by
the launcher and the run ends with the same results; a second trainer is refused; K = 1 lets
generation run one round ahead (round r samples from the policy of round r-2)."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipelines.loop.online import WorkerConfig, _sole_trainer, roles_of, run_worker
from pipelines.loop.recipe import recipe_from_dict
from pipelines.loop.round_loop import RunConfig, run
from tests.test_run import _recipe, _stage_tables, _write

pytestmark = pytest.mark.slow


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
