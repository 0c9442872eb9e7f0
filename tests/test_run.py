"""`scope run`: recipes, dry runs, and a run killed with SIGKILL in round 2 then resumed."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
import yaml

from pipelines.loop.recipe import load_recipe, recipe_from_dict
from pipelines.loop.round_loop import RunConfig, run

ROOT = Path(__file__).resolve().parents[1]


def _recipe(policy: str, **over) -> dict:
    body = {
        "name": "t", "algo": "scope", "seed": 3, "rounds": 2, "policy": policy,
        "prm": "rule:arith", "teacher": "oracle:arith",
        "problems": {"arith": {"count": 6, "seed": 11}},
        "eval": [{"name": "heldout", "arith": {"count": 4, "seed": 12}}],
        "generate": {"n": 3, "temperature": 1.0, "max_new_tokens": 80},
        "correct": {"max_new_tokens": 80},
        "train": {"learning_rate": 1e-3, "per_device_train_batch_size": 8, "max_length": 96,
                  "use_cpu": True},
        "evaluate": {"n": 2, "temperature": 1.0, "max_new_tokens": 80},
    }
    body.update(over)
    return body


def _write(path: Path, body: dict) -> Path:
    path.write_text(yaml.safe_dump(body))
    return path


def test_recipe_errors(tmp_path) -> None:
    with pytest.raises(ValueError, match="unknown key"):
        recipe_from_dict({**_recipe("hf:x"), "rouns": 2})
    with pytest.raises(ValueError, match="algo"):
        recipe_from_dict(_recipe("hf:x", algo="ppo"))
    with pytest.raises(ValueError, match="exactly one of"):
        recipe_from_dict(_recipe("hf:x", problems={"count": 3}))
    with pytest.raises(ValueError, match=r"problems: unknown key\(s\) \['every'\]"):
        recipe_from_dict(_recipe("hf:x", problems={"arith": {"count": 3}, "every": 2}))
    with pytest.raises(FileNotFoundError, match="arith-tiny"):
        load_recipe(str(tmp_path / "missing.yaml"))
    bundled = load_recipe("arith-tiny")
    assert bundled.policy == "tiny" and bundled.eval[0]["name"] == "heldout"
    assert load_recipe("qwen2.5-math-7b").generate["n"] == 8


def test_unknown_stage_option_is_named(tmp_path) -> None:
    recipe = recipe_from_dict(_recipe("hf:x", generate={"n": 2, "temprature": 1.0}))
    with pytest.raises(ValueError, match="temprature.*valid"):
        run(RunConfig(recipe=recipe, out=str(tmp_path / "r"), dry_run=True))


@pytest.mark.parametrize("algo,stages", [
    ("grpo", ["generate", "train"]),
    ("prm_dense", ["generate", "score", "train"]),
    ("luffy", ["generate", "correct", "train"]),  # no PRM: correct reads the rollouts
    ("scope", ["generate", "score", "correct", "train"]),
])
def test_dry_run_prints_stage_commands(tmp_path, algo, stages) -> None:
    from typer.testing import CliRunner

    from cli.main import app

    launch = {"train": "accelerate launch -m cli.main"}
    recipe = _write(tmp_path / "r.yaml", _recipe("hf:/models/p", algo=algo, launch=launch))
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["run", str(recipe), "--out", str(out), "--dry-run"])
    assert res.exit_code == 0, res.output
    assert not out.exists()  # nothing written
    printed = res.output.strip().splitlines()
    verbs = [line.split()[1] if line.startswith("scope") else line.split()[4]
             for line in printed]
    assert verbs == ["problems", "problems", "eval"] + (stages + ["eval"]) * 2
    assert printed[0].startswith("scope problems arith --out ") and "--count 6" in printed[0]
    train = [line for line in printed if " train " in line]
    assert train[0].startswith("accelerate launch -m cli.main train --data ")
    assert f"--out {out.resolve()}/round-0001/train" in train[0] and "--lr 0.001" in train[0]
    gen2 = next(line for line in printed if "round-0002/generate" in line)
    assert f"--policy hf:{out.resolve()}/round-0001/train" in gen2 and "--round 2" in gen2
    if algo == "luffy":
        assert any(line.startswith("scope correct") and "--mode luffy" in line
                   for line in printed)
    # every printed flag exists on its command (no unknown options): parse with the real CLI
    for line in printed:
        if line.startswith("scope generate") or line.startswith("scope eval"):
            words = shlex.split(line.split("  #")[0])[1:]
            words[words.index("--out") + 1] = str(tmp_path / "x")
            check = CliRunner().invoke(app, [*words, "--help"])
            assert check.exit_code == 0, (line, check.output)


@pytest.mark.slow
def test_dry_run_commands_run_and_reproduce_the_run(tmp_path, tiny_policy: Path) -> None:
    """Every command `scope run --dry-run` prints (problems, generate, score, correct, train,
    eval) runs as printed, in order, and writes the same tables as `scope run` itself."""
    from typer.testing import CliRunner

    from cli.main import app
    recipe = _write(tmp_path / "r.yaml", _recipe(f"hf:{tiny_policy}", rounds=1))
    by_hand, looped = tmp_path / "hand", tmp_path / "loop"
    res = CliRunner().invoke(app, ["run", str(recipe), "--out", str(by_hand), "--dry-run"])
    assert res.exit_code == 0, res.output
    printed = [line.split("  #")[0] for line in res.output.strip().splitlines()]
    kinds = [shlex.split(line)[1] for line in printed]
    assert kinds == ["problems", "problems", "eval", "generate", "score", "correct", "train",
                     "eval"]
    for line in printed:
        words = shlex.split(line)[1:]
        done = CliRunner().invoke(app, words)
        assert done.exit_code == 0, (line, done.output)
    run(RunConfig(recipe=str(recipe), out=str(looped), verbose=False))
    hand, loop = _stage_tables(by_hand), _stage_tables(looped)
    assert set(hand) == set(loop) and len(hand) >= 7
    for name in ("round-0001/generate", "round-0001/score", "round-0001/correct"):
        cols = ["rollout_id", "response_token_ids", "correct"]
        assert hand[name].select(cols).equals(loop[name].select(cols)), name


def _stage_tables(run_dir: Path) -> dict[str, pl.DataFrame]:
    from scope_data.layout import MANIFEST
    from scope_data.shards import scan

    tables = {}
    for manifest in sorted(run_dir.rglob(MANIFEST)):
        folder = manifest.parent.parent  # <table>/.scope/manifest.parquet
        rel = str(folder.relative_to(run_dir))
        df = scan(str(folder)).collect()
        if "policy" in df.columns:  # the policy spec names its checkpoint folder in this run
            df = df.with_columns(pl.col("policy").str.replace(str(run_dir.resolve()), "RUN",
                                                              literal=True))
        tables[rel] = df.sort(df.columns[0], *(["rollout_id"] if "rollout_id" in df.columns
                                                else []))
    return tables


@pytest.mark.slow
def test_kill_in_round_2_then_resume_matches_uninterrupted(tmp_path, tiny_policy) -> None:
    import torch

    # results are bit-identical only at one torch thread count (float sums change order), and
    # earlier tests may have changed this process's count: pin it here and in the subprocess
    threads = torch.get_num_threads()
    recipe_file = _write(tmp_path / "r.yaml", _recipe(f"hf:{tiny_policy}"))
    # uninterrupted run, in process
    ref = run(RunConfig(recipe=str(recipe_file), out=str(tmp_path / "ref"), verbose=False))
    assert sorted(ref.metrics["round"].to_list()) == [0, 1, 2]
    _assert_carried(tmp_path / "ref")

    # the same run in a subprocess, killed with SIGKILL once round 2 has started
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "run", str(recipe_file), "--out", str(out)],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    marker = out / "round-0002" / "_stages" / "generate.json"
    deadline = time.time() + 600
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert marker.exists(), "the run never reached round 2"
    assert not (out / "round-0002" / "_stages" / "eval-heldout.json").exists(), \
        "the run finished before it could be killed"

    # without --resume the folder is refused; with it the run completes
    with pytest.raises(FileExistsError, match="--resume"):
        run(RunConfig(recipe=str(recipe_file), out=str(out), verbose=False))
    resumed = run(RunConfig(recipe=str(recipe_file), out=str(out), resume=True, verbose=False))
    assert "round-0001/train" in resumed.skipped and "round-0002/generate" in resumed.skipped
    assert "round-0002/eval-heldout" in resumed.ran

    # final tables and metrics equal the uninterrupted run's
    a, b = _stage_tables(tmp_path / "ref"), _stage_tables(out)
    assert a.keys() == b.keys() and "round-0002/eval/heldout/rollouts" in a
    for key in a:
        assert a[key].equals(b[key]), key
    drop = ["run_name"]
    assert ref.metrics.drop(drop).equals(resumed.metrics.drop(drop))

    # a changed option reruns only what depends on it (here: every evaluation)
    changed = _recipe(f"hf:{tiny_policy}")
    changed["evaluate"] = {**changed["evaluate"], "temperature": 0.7}
    again = run(RunConfig(recipe=str(_write(tmp_path / "r2.yaml", changed)), out=str(out),
                          resume=True, verbose=False))
    assert sorted(again.ran) == ["round-0000/eval-heldout", "round-0001/eval-heldout",
                                 "round-0002/eval-heldout"]
    assert "round-0002/train" in again.skipped


def test_carried_state_options_in_the_plan(tmp_path) -> None:
    """Round 2 continues round 1's trainer state; fixed_steps_per_round sets every round's
    max_steps and the whole run's schedule; carry_state false trains each round afresh."""
    train = {"learning_rate": 1e-3, "per_device_train_batch_size": 8,
             "lr_scheduler_type": "cosine", "use_cpu": True}

    def trains(**extra) -> list:
        recipe = recipe_from_dict(_recipe("hf:/models/p", rounds=3, train={**train, **extra}))
        res = run(RunConfig(recipe=recipe, out=str(tmp_path / "r"), dry_run=True))
        return [c for kind, c in res.plan if kind == "train"]

    carried = trains()
    out = tmp_path.resolve() / "r"
    assert [c.resume_from for c in carried] == [
        None, f"{out}/round-0001/train", f"{out}/round-0002/train"]
    # 6 problems x 3 samples, batch 8: 3 steps a round at most, 3 rounds
    assert {c.schedule_steps for c in carried} == {9} and carried[0].max_steps == -1
    fixed = trains(fixed_steps_per_round=2)
    assert {(c.max_steps, c.schedule_steps) for c in fixed} == {(2, 6)}
    fresh = trains(carry_state=False)
    assert {(c.resume_from, c.schedule_steps) for c in fresh} == {(None, -1)}
    with pytest.raises(ValueError, match="fixed_steps_per_round or max_steps"):
        trains(fixed_steps_per_round=2, max_steps=3)
    with pytest.raises(ValueError, match=r"\['resume_from'\] are set by the round loop"):
        trains(resume_from="elsewhere")
    with pytest.raises(ValueError, match="unknown option.*valid: .*carry_state"):
        trains(carry_sate=False)



def _assert_carried(run_dir: Path) -> None:
    """Round 2's trainer continued round 1's state: its steps count on from round 1's."""
    import json

    r1, r2 = (run_dir / f"round-000{r}" / "train" for r in (1, 2))
    m1, m2 = (json.loads((r / "train_manifest.json").read_text()) for r in (r1, r2))
    assert (r1 / "trainer_state" / "optimizer.pt").is_file()
    assert (r2 / "trainer_state" / "optimizer.pt").is_file()
    steps1 = m1["trainer_state"]["global_step"]
    assert m1["trainer_state"]["start_step"] == 0 and steps1 >= 1
    assert m2["trainer_state"]["resume_from"] == str(r1.resolve())
    assert m2["trainer_state"]["start_step"] == steps1
    assert m2["trainer_state"]["global_step"] == steps1 + m2["summary"]["steps"]
    logged = pl.read_parquet(r2 / "train_metrics.parquet")["step"].to_list()
    assert logged == list(range(steps1 + 1, steps1 + 1 + len(logged)))


def test_eval_every_skips_rounds_in_the_plan(tmp_path) -> None:
    """`every: K` evaluates a set at round 0, every K-th round and the last; `every: 0` only at
    the ends. Unknown eval keys and negative values are refused."""
    evals = [{"name": "heldout", "arith": {"count": 4, "seed": 12}, "every": 2},
             {"name": "hard", "arith": {"count": 4, "seed": 13, "steps": [7, 8]}, "every": 0}]
    recipe = recipe_from_dict(_recipe("hf:/models/p", rounds=5, eval=evals))
    result = run(RunConfig(recipe=recipe, out=str(tmp_path / "r"), dry_run=True,
                           verbose=False))
    evaluated = [c.out.split("/")[-3:] for kind, c in result.plan if kind == "eval"]
    rounds = {name: [int(rd.split("-")[1]) for rd, _, n in evaluated if n == name]
              for name in ("heldout", "hard")}
    assert rounds == {"heldout": [0, 2, 4, 5], "hard": [0, 5]}
    with pytest.raises(ValueError, match=r"eval\[0\]: unknown key\(s\) \['evry'\]"):
        recipe_from_dict(_recipe("hf:/p", eval=[{"name": "h", "arith": {"count": 1},
                                                 "evry": 2}]))
    with pytest.raises(ValueError, match="every must be >= 0"):
        recipe_from_dict(_recipe("hf:/p", eval=[{"name": "h", "arith": {"count": 1},
                                                 "every": -1}]))


def test_rounds_without_evaluation_keep_their_training_row(tmp_path, tiny_policy) -> None:
    """With `every: 0` round 1 is not evaluated: metrics.parquet still has its training figures
    (a row with a null eval_set), so budgets and the tracker's step count include it."""
    from pipelines.loop.report import budget_table, load_runs, round_rows

    evals = [{"name": "heldout", "arith": {"count": 4, "seed": 12}, "every": 0}]
    out = tmp_path / "r"
    result = run(RunConfig(recipe=recipe_from_dict(_recipe(f"hf:{tiny_policy}", eval=evals)),
                           out=str(out), verbose=False))
    m = result.metrics.sort("round")
    assert m.select("round", "eval_set").rows() == [(0, "heldout"), (1, None), (2, "heldout")]
    assert not (out / "round-0001" / "eval").exists()
    steps = m.filter(pl.col("round") > 0)["train_steps"].to_list()
    assert all(s >= 1 for s in steps)
    df = load_runs([str(out)])
    assert round_rows(df)["round"].to_list() == [0, 1, 2]
    assert f"| scope | {sum(steps):,.0f} |" in budget_table(df)
