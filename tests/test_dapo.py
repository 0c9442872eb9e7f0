"""DAPO's data-side pieces, wired: soft overlong punishment and truncated-completion masking
through assembly and the trainer, and dynamic sampling's group selection and loop."""

from __future__ import annotations

import shutil
from pathlib import Path

import polars as pl
import pytest

from scope_data.assembly import assemble
from scope_data.dynamic_sampling import filter_groups, sampling_done, sampling_stats
from tests.helpers_train import make_row, to_table, write_corrected


def _row(problem: str, k: int, length: int, reward: float, finish: str = "stop") -> dict:
    row = make_row(problem, f"{problem}-{k}", [5, 6], [7 + (k + i) % 5 for i in range(length)],
                   reward, correct_status="not_scored")
    row["finish_reason"] = finish
    return row


# p1: rewards 1, 1, 0; lengths 4, 7, 8 (the last cut at the limit). p2: both correct,
# lengths 4 and 9 (cut): equal rewards, a zero-advantage group without the punishment.
ROWS = [_row("p1", 0, 4, 1.0), _row("p1", 1, 7, 1.0), _row("p1", 2, 8, 0.0, "length"),
        _row("p2", 0, 4, 1.0), _row("p2", 1, 9, 1.0, "length")]


def test_overlong_punishment_shapes_rewards_before_advantages() -> None:
    plain = assemble(to_table(ROWS), algo="grpo", estimator="dr_grpo")
    assert plain.rows["rollout_id"].to_list() == ["p1-0", "p1-1", "p1-2"]  # p2: zero group
    assert plain.rows["advantage"].to_list() == pytest.approx([1 / 3, 1 / 3, -2 / 3])
    assert plain.rows["overlong_penalty"].to_list() == [0.0] * 3
    assert plain.rows["truncated"].to_list() == [False, False, True]

    # Lmax = 8, Lcache = 2: free up to 6 tokens; 7 -> -0.5, 8 -> -1, 9 (> Lmax) -> -1
    a = assemble(to_table(ROWS), algo="grpo", estimator="dr_grpo", soft_punish_cache=2,
                 max_completion_len=8)
    assert a.rows["overlong_penalty"].to_list() == [0.0, -0.5, -1.0, 0.0, -1.0]
    # shaped p1 rewards 1, 0.5, -1 (mean 1/6); p2 1, 0 (mean 1/2); the verifier reward is kept
    assert a.rows["advantage"].to_list() == pytest.approx([5 / 6, 1 / 3, -7 / 6, 0.5, -0.5])
    assert a.rows["reward"].to_list() == [1.0, 1.0, 0.0, 1.0, 1.0]
    assert a.rows["truncated"].to_list() == [False, False, True, False, True]
    assert a.stats["responses_overlong_penalised"] == 3
    assert a.stats["responses_truncated"] == 2
    assert a.stats["groups_zero_advantage"] == 0
    # grpo scaling divides by each group's shaped-reward std (ddof 1)
    g = assemble(to_table(ROWS), algo="grpo", soft_punish_cache=2, max_completion_len=8)
    assert g.rows["advantage"][3] == pytest.approx(0.5 / (0.5 ** 0.5 + 1e-4))
    with pytest.raises(ValueError, match="soft_punish_cache must be in"):
        assemble(to_table(ROWS), soft_punish_cache=9, max_completion_len=8)


def test_masked_truncation_keeps_group_statistics() -> None:
    pytest.importorskip("torch")
    from pipelines.training.data import Collator, ResponseDataset

    rows = assemble(to_table(ROWS), algo="grpo", estimator="dr_grpo", soft_punish_cache=2,
                    max_completion_len=8).rows
    # max_length 8 cuts p2-1 (9 tokens, also finish "length"); p1-2 finished with "length"
    ds = ResponseDataset(rows, max_length=8, mask_truncated=True)
    assert (ds.truncated, ds.masked) == (1, 2)
    batch = Collator(ds, pad_token_id=0)([ds[i] for i in range(len(ds))])
    assert batch["response_mask"].sum(-1).tolist() == [4, 7, 0, 4, 0]
    # advantages are those of the whole groups (masked rows took part in the means)
    assert batch["advantages"][:, 0].tolist() == pytest.approx([5 / 6, 1 / 3, -7 / 6, 0.5,
                                                                -0.5])
    off = ResponseDataset(rows, max_length=8)
    assert off.masked == 0
    assert Collator(off, 0)([off[i] for i in range(5)])["response_mask"].sum(-1).tolist() == [
        4, 7, 8, 4, 8]


def test_train_masked_rows_are_out_of_the_loss(tmp_path: Path) -> None:
    """Under token_mean, masking a truncated row gives the update of dropping it after the
    advantages were computed with it; the summary counts it and the penalised rows."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    from pipelines.training.train import TrainConfig, fit, run
    from tests.helpers_engines import build_random_tiny

    policy = build_random_tiny(tmp_path / "policy")
    torch.set_num_threads(2)

    def cfg(out: str, **kw: object) -> TrainConfig:
        return TrainConfig(data=write_corrected(tmp_path / "c", ROWS) if out == "run" else "-",
                           policy=f"hf:{policy}", output_dir=str(tmp_path / out), algo="grpo",
                           advantage="dr_grpo", max_steps=1, per_device_train_batch_size=8,
                           learning_rate=1e-2, max_length=16, use_cpu=True, **kw)

    result = run(cfg("run", mask_truncated_completions=True, soft_punish_cache=2,
                     max_completion_len=8))
    assert result.summary["truncated_masked"] == 2
    assert result.summary["overlong_penalised"] == 3
    assert result.summary["tokens"] == 4 + 7 + 4  # masked rows carry no loss tokens
    rows = assemble(to_table(ROWS), algo="grpo", estimator="dr_grpo", soft_punish_cache=2,
                    max_completion_len=8).rows
    fit(cfg("dropped"), rows.filter(~pl.col("truncated")))
    a = load_file(str(tmp_path / "run" / "model.safetensors"))
    b = load_file(str(tmp_path / "dropped" / "model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    init = load_file(str(policy / "model.safetensors"))
    assert any(not torch.allclose(a[k], init[k], atol=1e-4) for k in a)  # it did train
    with pytest.raises(ValueError, match="soft_punish_cache must be in 0..16"):
        cfg("bad", soft_punish_cache=17).check()


def _groups(spec: list[tuple[int, str, bool]]) -> pl.DataFrame:
    return pl.DataFrame(spec, schema={"batch": pl.Int32, "problem_id": pl.String,
                                      "nonzero": pl.Boolean}, orient="row").with_columns(
        rollouts=pl.lit(4), tokens=pl.lit(100))


# three sampling batches of 3 problems; b comes back in batch 2 (past an epoch end), c comes
# back in batch 3 and only then has a non-zero advantage
BATCHES = [[(1, "a", False), (1, "b", True), (1, "c", False)],
           [(2, "d", True), (2, "b", True), (2, "e", False)],
           [(3, "f", True), (3, "c", True), (3, "h", True)]]


def _simulate(target: int, cap: int) -> pl.DataFrame:
    """The loop's decisions: draw batch after batch until `sampling_done`."""
    drawn: list[tuple[int, str, bool]] = []
    for batch in BATCHES:
        drawn += batch
        if sampling_done(_groups(drawn), target, cap):
            break
    return _groups(drawn)


def test_dynamic_sampling_selection() -> None:
    groups = _simulate(target=4, cap=5)
    sel = filter_groups(groups, 4)
    picked = sel.filter("selected").select("batch", "problem_id").rows()
    assert picked == [(1, "b"), (2, "d"), (3, "f"), (3, "c")]  # b once; h beyond the target
    assert sampling_stats(groups, 4) == {
        "target_groups": 4, "sampling_batches": 3, "groups_generated": 9, "groups_nonzero": 6,
        "groups_selected": 4, "groups_short": 0, "rollouts": 36, "generated_tokens": 900}
    # two groups after batch 2 (b, d): target 2 stops there
    assert _simulate(target=2, cap=5)["batch"].n_unique() == 2
    # the cap stops the round short of its target; every drawn batch is in the budget
    capped = _simulate(target=4, cap=2)
    stats = sampling_stats(capped, 4)
    assert (stats["sampling_batches"], stats["groups_selected"], stats["groups_short"],
            stats["rollouts"]) == (2, 2, 2, 24)
    assert sampling_done(_groups(BATCHES[0]), 1, 5)
    with pytest.raises(ValueError, match="lacks columns"):
        filter_groups(groups.drop("nonzero"), 1)


def test_dynamic_sampling_recipe_errors() -> None:
    from pipelines.loop.recipe import recipe_from_dict
    from tests.test_run import _recipe

    with pytest.raises(ValueError, match="needs generate.prompts_per_round"):
        recipe_from_dict(_recipe("hf:x", dynamic_sampling={"max_num_gen_batches": 2}))
    with pytest.raises(ValueError, match="unknown key.*max_num_gen_batches"):
        recipe_from_dict(_recipe("hf:x", dynamic_sampling={"max_batches": 2}))
    with_ppr = _recipe("hf:x", dynamic_sampling={"max_num_gen_batches": 0})
    with_ppr["generate"]["prompts_per_round"] = 2
    with pytest.raises(ValueError, match="max_num_gen_batches must be >= 1"):
        recipe_from_dict(with_ppr)
    with_ppr["dynamic_sampling"] = {"enable": False, "max_num_gen_batches": 2}
    assert recipe_from_dict(with_ppr).dynamic_sampling == {}


@pytest.mark.slow
def test_dynamic_sampling_run_and_resume(tmp_path: Path, tiny_policy: Path) -> None:
    """Two grpo rounds with dynamic sampling on the tiny world: every batch a normal table,
    the trained groups exactly the selected non-zero ones, every rollout in the budget, the
    second round's batches continuing the epoch order, and a resume that reruns nothing."""
    import json

    from pipelines.loop.recipe import recipe_from_dict
    from pipelines.loop.round_loop import RunConfig, run
    from scope_data.shards import read_manifest, scan
    from tests.test_run import _recipe

    body = _recipe(f"hf:{tiny_policy}", algo="grpo", dynamic_sampling={"max_num_gen_batches": 3},
                   eval=[{"name": "heldout", "arith": {"count": 2, "seed": 12}}])
    body["generate"]["prompts_per_round"] = 2
    body["evaluate"]["n"] = 1
    recipe = recipe_from_dict(body)
    out = tmp_path / "run"
    res = run(RunConfig(recipe=recipe, out=str(out), verbose=False))
    metrics = res.metrics.filter(pl.col("round") > 0).sort("round")
    first = 1
    for r, m in zip((1, 2), metrics.iter_rows(named=True), strict=True):
        rd = out / f"round-{r:04d}"
        gens = [rd / "generate"] + sorted(rd.glob("batch-*/generate"))
        assert len(gens) == m["sampling_batches"] <= 3
        batches = [json.loads((rd / "_stages" / f"generate{'' if k == 1 else f'-b{k:02d}'}.json")
                              .read_text())["config"]["prompt_batch"]
                   for k in range(1, len(gens) + 1)]
        assert batches == list(range(first, first + len(gens)))  # the next slices of the order
        first += len(gens)
        rolls = [scan(str(g)).collect() for g in gens]
        assert m["rollouts"] == sum(t.height for t in rolls) == 6 * len(gens)
        assert m["generated_tokens"] == sum(
            int(t["response_token_ids"].list.len().sum()) for t in rolls)
        sel = read_manifest(str(rd / "select"))
        assert sel.table == "rollouts" and sel.stats["sampling_batches"] == len(gens)
        picked = sel.config["select"]["groups"]
        rows = scan(str(rd / "select")).collect()
        assert sorted(rows["problem_id"].unique()) == sorted(p for _, p in picked)
        rewards = rows.group_by("problem_id").agg(pl.col("reward").n_unique())
        if picked:  # a selected group always has unequal rewards
            assert (rewards["reward"] > 1).all() and len(picked) <= 2
            assert m["groups_trained"] == m["groups_selected"] == len(picked)
        assert m["groups_short"] == 2 - m["groups_selected"]
        # stopping rule: the target was met, or the cap was reached
        assert m["groups_selected"] == 2 or len(gens) == 3
    again = run(RunConfig(recipe=recipe, out=str(out), resume=True, verbose=False))
    assert again.ran == [] and "round-0002/select" in again.skipped
    assert again.metrics.drop("run_name").equals(res.metrics.drop("run_name"))
    # as if killed while selecting: round 2's last batch marker and the select table gone
    rd = out / "round-0002"
    last = metrics["sampling_batches"][1]
    tag = "" if last == 1 else f"-b{last:02d}"
    (rd / "_stages" / f"generate{tag}.json").unlink()
    (rd / "_stages" / "select.json").unlink()
    shutil.rmtree(rd / "select")
    resumed = run(RunConfig(recipe=recipe, out=str(out), resume=True, verbose=False))
    assert resumed.ran == [f"round-0002/generate{tag}", "round-0002/select"]
    assert "round-0002/train" in resumed.skipped  # same selection, same hash
    assert resumed.metrics.drop("run_name").equals(res.metrics.drop("run_name"))


def test_dynamic_sampling_dry_run_plans_batch_one(tmp_path: Path) -> None:
    from pipelines.loop.recipe import recipe_from_dict
    from pipelines.loop.round_loop import RunConfig, run
    from tests.test_run import _recipe

    body = _recipe("hf:/models/p", dynamic_sampling={"max_num_gen_batches": 3})
    body["generate"]["prompts_per_round"] = 2
    plan = run(RunConfig(recipe=recipe_from_dict(body), out=str(tmp_path / "dry"),
                         dry_run=True)).plan
    assert [kind for kind, _ in plan] == ["problems", "problems", "eval"] + [
        "generate", "score", "correct", "train", "eval"] * 2
    gens = [c for kind, c in plan if kind == "generate"]
    assert [(g.round, g.prompt_batch) for g in gens] == [(1, 1), (2, 2)]
    trains = [c for kind, c in plan if kind == "train"]
    assert trains[0].data.endswith("round-0001/select")
    assert not (tmp_path / "dry").exists()


def test_scope_judges_groups_after_correction(tmp_path: Path) -> None:
    """An all-failed group whose failed rollout got an accepted correction has non-zero
    advantage for scope (what it salvages), not for grpo (which ignores corrections)."""
    from pipelines.loop.sampling import judge
    from pipelines.training.train import TrainConfig

    fail = [_row("p1", 0, 3, 0.0), _row("p1", 1, 4, 0.0)]
    fix = make_row("p1", "p1-fix", [5, 6], [7, 8, 9, 10, 11], 1.0, kind="corrected",
                   source="p1-1", off_policy_start=2)
    rows = [*fail, fix, _row("p2", 0, 3, 0.0), _row("p2", 1, 3, 0.0),
            _row("p3", 0, 2, 1.0), _row("p3", 1, 6, 1.0)]
    table = write_corrected(tmp_path / "c", rows)
    for algo, want in (("scope", [True, False, False]), ("grpo", [False, False, False])):
        cfg = TrainConfig(data="", policy="hf:x", output_dir="o", algo=algo)
        got = judge(cfg, table, 1)
        assert got["problem_id"].to_list() == ["p1", "p2", "p3"]
        assert got["nonzero"].to_list() == want, algo
        # the budget counts the generated (policy) rows only: 2 rollouts each, their tokens
        assert got["rollouts"].to_list() == [2, 2, 2]
        assert got["tokens"].to_list() == [7, 6, 8]
    # the soft overlong punishment (free up to 2 tokens) separates responses of different
    # lengths: p1 (3, 4 tokens) and p3 (2, 6) get a gradient under grpo, p2 (3, 3) does not
    cfg = TrainConfig(data="", policy="hf:x", output_dir="o", algo="grpo", soft_punish_cache=4,
                      max_completion_len=6)
    assert judge(cfg, table, 1)["nonzero"].to_list() == [True, False, True]
