"""`scope score`: steps, token offsets, rule:arith first errors, statuses and bad inputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from pipelines.engines.spec import EngineSpec
from pipelines.stages.score import ScoreConfig, run, token_offsets
from scope_data.shards import ShardError, read_arrow, read_manifest
from scope_data.tasks import arith
from tests.helpers_score import arith_rollout_rows, char_tokenizer_dir, write_rollouts
from tests.helpers_tables import manifest_body, write_manifest_body


@pytest.fixture(scope="module")
def rollouts(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    root = tmp_path_factory.mktemp("score")
    tok = char_tokenizer_dir(root / "tok")
    url = str(root / "rollouts")
    write_rollouts(url, arith_rollout_rows(tok, n_problems=40, seed=1))
    return url, tok


def scored_rows(url: str) -> list[dict]:
    return read_arrow(url).to_pylist()


def test_rule_arith_first_errors_equal_the_task_checker(rollouts, tmp_path: Path) -> None:
    url, _ = rollouts
    result = run(ScoreConfig(url, str(tmp_path / "scored"), prm="rule:arith", only_failed=False),
                 quiet=True)
    assert result.manifest is not None and result.manifest.table == "scored"
    rows = scored_rows(str(tmp_path / "scored"))
    assert len(rows) == 160
    checked = unfinished = 0
    for r in rows:
        if not r["response_text"].strip():
            assert r["score_status"] == "no_steps" and r["first_error"] is None
            continue
        assert r["score_status"] == "ok" and r["prm"] == "rule:arith"
        gold = arith.first_error(arith.parse_prompt(r["prompt"]), r["response_text"])
        assert r["first_error"] == gold  # the exact checker's first error, missing steps too
        checked += gold < len(r["steps"])
        if gold == len(r["steps"]):  # unfinished: every written step right, the next missing
            assert not r["correct"] and r["pred_answer"] is None
            unfinished += 1
    assert checked >= 120 and unfinished >= 1
    stats = result.manifest.stats
    assert stats["status"]["ok"] + stats["status"].get("no_steps", 0) == 160
    assert stats["disagree"]["wrong_answer_no_low_step"] == sum(
        1 for r in rows if r["first_error"] == -1 and not r["correct"])


def test_steps_carry_char_and_token_offsets(rollouts, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    url, tok_dir = rollouts
    tok = AutoTokenizer.from_pretrained(tok_dir)
    run(ScoreConfig(url, str(tmp_path / "scored"), only_failed=False), quiet=True)
    for r in scored_rows(str(tmp_path / "scored")):
        ids = r["response_token_ids"]
        previous_end = 0
        for s in r["steps"]:
            assert r["response_text"][s["char_start"] : s["char_end"]] == s["text"]
            assert previous_end <= s["token_start"] <= s["token_end"] <= len(ids)
            assert tok.decode(ids[s["token_start"] : s["token_end"]]).strip() == s["text"]
            previous_end = s["token_end"]
        if r["steps"]:  # the kept prefix before step k is exactly the tokens before it
            k = len(r["steps"]) - 1
            prefix = tok.decode(ids[: r["steps"][k]["token_start"]])
            assert prefix == r["response_text"][: r["steps"][k]["char_start"]]


def test_only_failed_skips_correct_rows_and_resumes(rollouts, tmp_path: Path) -> None:
    url, _ = rollouts
    out = str(tmp_path / "scored")
    first = run(ScoreConfig(url, out), quiet=True)
    rows = scored_rows(out)
    for r in rows:
        if r["correct"]:
            assert r["score_status"] == "skipped" and r["first_error"] is None
            assert r["steps"] and all(s["score"] is None for s in r["steps"])
        elif r["steps"]:
            assert r["score_status"] == "ok" and r["first_error"] is not None
    assert first.parts_written == 1
    again = run(ScoreConfig(url, out), quiet=True)
    assert again.parts_written == 0 and again.parts_skipped == 1


def test_sharded_run_covers_every_row(rollouts, tmp_path: Path) -> None:
    url, _ = rollouts
    out = str(tmp_path / "scored")
    a = run(ScoreConfig(url, out, num_shards=2, shard_index=0), quiet=True)
    assert a.manifest is None and len(a.missing) == 1
    b = run(ScoreConfig(url, out, num_shards=2, shard_index=1), quiet=True)
    assert b.manifest is not None and b.manifest.rows == 160


class NaNPRM:
    """NaN for every second step, else 0.9; and 0.1 for a step reading 'no idea'."""

    spec = EngineSpec("nan", "test")
    max_length = 1 << 30

    def score_batch(self, items):
        return [[0.1 if s == "no idea" else (math.nan if k % 2 else 0.9)
                 for k, s in enumerate(steps)] for _, steps in items]


def test_nan_scores_are_kept_and_never_a_first_error(rollouts, tmp_path: Path) -> None:
    url, _ = rollouts
    out = str(tmp_path / "scored")
    run(ScoreConfig(url, out, only_failed=False), prm=NaNPRM(), quiet=True)
    for r in scored_rows(out):
        texts = [s["text"] for s in r["steps"]]
        if "no idea" in texts:  # step 1 is low (0.1): determined, NaN comes only after it
            assert r["score_status"] == "ok" and r["first_error"] == 1
        elif len(r["steps"]) >= 2:
            assert r["score_status"] == "nan"
            assert r["steps"][1]["score"] is None
            assert r["first_error"] is None  # step 1 unscored: the error could hide there
        elif len(r["steps"]) == 1:  # no low step: -1, or 1 (the missing step) if unfinished
            unfinished = not r["correct"] and r["pred_answer"] is None
            assert r["score_status"] == "ok" and r["first_error"] == (1 if unfinished else -1)
    assert read_manifest(out).stats["status"]["nan"] > 0


def test_long_step_is_truncated_by_a_model_prm(rollouts, tmp_path: Path) -> None:
    from pipelines.tiny.prm import init_tiny_prm

    url, _ = rollouts
    prm_dir = init_tiny_prm(tmp_path / "prm", "tag", max_position_embeddings=512)
    out = str(tmp_path / "scored")
    run(ScoreConfig(url, out, prm=f"hf-tag:{prm_dir}", only_failed=False,
                    prm_options={"device": "cpu"}), quiet=True)
    rows = scored_rows(out)
    long_rows = [r for r in rows if len(r["response_text"]) == 10_000]
    assert long_rows
    for r in long_rows:
        assert len(r["steps"]) == 1 and r["score_status"] == "truncated"
        assert r["steps"][0]["score"] is None and r["first_error"] is None
    normal = [r for r in rows if r["score_status"] == "ok"]
    assert normal and all(0 <= s["score"] <= 1 for r in normal for s in r["steps"])


def test_auto_threshold_on_arith_uses_checker_labels(rollouts, tmp_path: Path) -> None:
    url, _ = rollouts
    out = str(tmp_path / "scored")
    run(ScoreConfig(url, out, threshold="auto", only_failed=False), quiet=True)
    rows = scored_rows(out)
    tau = rows[0]["threshold"]
    assert 0.0 < tau <= 1.0  # 0/1 rule scores: any tau in (0, 1] separates them
    assert read_manifest(out).stats["auto_threshold_rows"] > 100


def test_bad_inputs(rollouts, tmp_path: Path) -> None:
    url, tok_dir = rollouts
    # a rollouts table from a newer schema version
    newer = tmp_path / "newer"
    write_rollouts(str(newer), arith_rollout_rows(tok_dir, n_problems=2))
    write_manifest_body(str(newer), {**manifest_body(str(newer)), "schema_version": 99})
    with pytest.raises(ShardError, match="schema_version 99 is newer"):
        run(ScoreConfig(str(newer), str(tmp_path / "o1")), quiet=True)
    # an unknown PRM spec lists the valid forms
    with pytest.raises(ValueError, match="valid forms: rule:arith, hf-cls:<model>, hf-tag"):
        run(ScoreConfig(url, str(tmp_path / "o2"), prm="prm:foo"), quiet=True)
    with pytest.raises(ValueError, match="--threshold"):
        run(ScoreConfig(url, str(tmp_path / "o3"), threshold="low"), quiet=True)
    # token ids that do not match the text: the error names the rollout
    rows = arith_rollout_rows(tok_dir, n_problems=2)
    rows[1]["response_token_ids"] = rows[1]["response_token_ids"][:-3]
    write_rollouts(str(tmp_path / "misaligned"), rows)
    with pytest.raises(ValueError, match=f"rollout {rows[1]['rollout_id']}"):
        run(ScoreConfig(str(tmp_path / "misaligned"), str(tmp_path / "o4"), only_failed=False),
            quiet=True)
    # a policy whose tokenizer cannot be found asks for --tokenizer
    rows = arith_rollout_rows(tok_dir, n_problems=1)
    for r in rows:
        r["policy"] = "hf:/nonexistent/policy"
    write_rollouts(str(tmp_path / "nopolicy"), rows)
    with pytest.raises(ValueError, match="--tokenizer"):
        run(ScoreConfig(str(tmp_path / "nopolicy"), str(tmp_path / "o5")), quiet=True)
    res = run(ScoreConfig(str(tmp_path / "nopolicy"), str(tmp_path / "o6"),
                          tokenizer=str(tok_dir)), quiet=True)
    assert res.manifest is not None


def test_token_offsets_fallback_decodes_token_by_token(rollouts) -> None:
    from transformers import AutoTokenizer

    _, tok_dir = rollouts
    tok = AutoTokenizer.from_pretrained(tok_dir)
    text = "1 + 2 = 3\nAnswer: 3"
    ids = tok.encode(text, add_special_tokens=False)
    # a BPE-style merge the re-tokeniser would not produce: pretend "3\n" is one token
    offsets = token_offsets(tok, text, ids + [tok.eos_token_id], "r0")
    assert offsets[-1] == (len(text), len(text))
    assert [text[a:b] for a, b in offsets[:-1]] == list(text)


def test_cli_score_and_prm_eval(rollouts, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cli.main import app

    url, _ = rollouts
    out = str(tmp_path / "scored")
    runner = CliRunner()
    res = runner.invoke(app, ["score", "--rollouts", url, "--out", out, "--prm", "rule:arith",
                              "--all"])
    assert res.exit_code == 0, res.output
    assert "rows scored" in res.output and read_manifest(out).table == "scored"
    # prm-eval on the scored table's stored rule scores: exact labels, F1 = 100
    res = runner.invoke(app, ["prm-eval", "--benchmark", out, "--json"])
    assert res.exit_code == 0, res.output
    body = json.loads(res.output)
    assert body["subsets"][0]["f1"] == 100.0 and body["average_f1"] == 100.0
    res = runner.invoke(app, ["score", "--rollouts", url, "--out", out, "--prm", "nope:x"])
    assert res.exit_code == 1 and "valid forms" in res.output


class LengthPRM:
    """Scores a step by its length (deterministic, independent of any model)."""

    spec = EngineSpec("length", "test")
    max_length = 1 << 30

    def score_batch(self, items):
        return [[min(1.0, len(s) / 400) for s in steps] for _, steps in items]


def test_auto_threshold_tuned_on_a_processbench_file(rollouts, tmp_path: Path,
                                                     shared_data: Path) -> None:
    from pipelines.stages.prm_eval import PRMEvalConfig
    from pipelines.stages.prm_eval import run as prm_eval

    url, tok_dir = rollouts
    rows = arith_rollout_rows(tok_dir, n_problems=3)
    for r in rows:
        r["task"] = "math"
    write_rollouts(str(tmp_path / "math"), rows)
    with pytest.raises(ValueError, match="--tune-on"):
        run(ScoreConfig(str(tmp_path / "math"), str(tmp_path / "o1"), threshold="auto"),
            prm=LengthPRM(), quiet=True)
    bench = str(shared_data / "processbench.gsm8k.json")
    res = run(ScoreConfig(str(tmp_path / "math"), str(tmp_path / "o2"), threshold="auto",
                          tune_on=bench), prm=LengthPRM(), quiet=True)
    tuned = prm_eval(PRMEvalConfig([bench], threshold="auto"), prm=LengthPRM()).threshold
    assert res.manifest.config["tuned_threshold"] == pytest.approx(tuned)
    scored = scored_rows(str(tmp_path / "o2"))
    assert all(r["threshold"] == pytest.approx(tuned, rel=1e-6) for r in scored)
    # blank_line segmentation for non-arith tasks: an arith response is a single step
    assert all(len(r["steps"]) <= 1 for r in scored)
