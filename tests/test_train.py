"""The trainer on a random-init tiny Qwen2: update direction, outputs, bad input, CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import polars as pl
import pytest

from tests.helpers_engines import build_random_tiny
from tests.helpers_train import make_row, scope_group, token_logprobs, write_corrected

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object, object]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    path = build_random_tiny(tmp_path_factory.mktemp("tiny") / "policy")
    return path, AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path)


def config(data: str, policy: Path, out: Path, **kw: object):  # noqa: ANN201
    from pipelines.training.train import TrainConfig

    opts = {"max_steps": 1, "per_device_train_batch_size": 8, "learning_rate": 1e-3,
            "seed": 0, **kw}
    return TrainConfig(data=data, policy=f"hf:{policy}", output_dir=str(out), **opts)


def load(path: Path | str):  # noqa: ANN201
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path)).eval()


def test_collated_logprobs_equal_unpadded(tiny) -> None:
    """Left-padded prompts + position ids give exactly the unpadded per-token log-probs."""
    from pipelines.training.data import Collator, ResponseDataset, response_logprobs
    from scope_data.assembly import assemble
    from tests.helpers_train import to_table

    path, tok, model = tiny
    rows = scope_group(tok, model, "3") + scope_group(tok, model, "12")  # prompts differ in length
    ds = ResponseDataset(assemble(to_table(rows)).rows, max_length=64)
    batch = Collator(ds, tok.pad_token_id)([ds[i] for i in range(len(ds))])
    with torch.no_grad():
        lp, _ = response_logprobs(model.eval(), batch)
    for b, r in enumerate(ds.rows):
        ref = token_logprobs(model, r.prompt, r.response)
        assert lp[b, : len(ref)].tolist() == pytest.approx(ref, abs=1e-4)


def test_one_step_scope_direction_and_outputs(tiny, tmp_path: Path) -> None:
    from pipelines.training.train import run

    path, tok, model = tiny
    # failed responses and the teacher suffix (no spaces: the failed texts have them) use
    # disjoint characters apart from EOS, so the test isolates
    # the two gradient terms (shared tokens would get both pushes)
    rows = scope_group(tok, model, "4", fail_texts=["qqqq zzzz", "zqzq qzqz", "abab cdcd"],
                       fix_text="abab1234567890")
    data = write_corrected(tmp_path / "corrected", rows)
    fix = rows[-1]
    start = fix["off_policy_start"]
    failed = rows[0]  # stays in the group with reward 0: negative advantage
    before_fix = token_logprobs(model, fix["prompt_token_ids"], fix["response_token_ids"])
    before_fail = token_logprobs(model, failed["prompt_token_ids"], failed["response_token_ids"])

    # At random init every token has p ~ 1/vocab << gamma = 0.1, where the shaped weight
    # f'(p) ~ p/gamma is tiny and the on-policy terms' side effects win; gamma = p makes the
    # off-policy push comparable (f' = 1/4) so the test sees each term's own direction.
    result = run(config(data, path, tmp_path / "out", algo="scope", shaping_gamma=0.01))
    new = load(tmp_path / "out")
    after_fix = token_logprobs(new, fix["prompt_token_ids"], fix["response_token_ids"])
    after_fail = token_logprobs(new, failed["prompt_token_ids"], failed["response_token_ids"])
    # off-policy suffix (A > 0); its final EOS is left out: the failed responses end with the
    # same EOS token and push it down harder than the shaped weight f'(p) pushes it up
    assert sum(after_fix[start:-1]) > sum(before_fix[start:-1]) + 1e-3
    assert sum(after_fail) < sum(before_fail) - 1e-3  # on-policy response, A < 0

    out = tmp_path / "out"
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    metrics = pl.read_parquet(out / "train_metrics.parquet")
    assert metrics.height == result.steps == 1
    assert {"loss", "clip_fraction", "off_policy_share", "entropy", "grad_norm",
            "learning_rate", "shaped_weight", "kl"} <= set(metrics.columns)
    m = metrics.row(0, named=True)
    n_tok = sum(len(r["response_token_ids"]) for r in rows[1:])  # rows[2] was replaced
    n_off = len(fix["response_token_ids"]) - start
    assert m["tokens"] == n_tok and m["off_policy_share"] == pytest.approx(n_off / n_tok)
    assert m["clip_fraction"] == 0.0  # behaviour log-probs are exact: ratio 1 at step 1
    assert math.isfinite(m["grad_norm"]) and m["grad_norm"] > 0
    manifest = json.loads((out / "train_manifest.json").read_text())
    from scope_data.shards import read_manifest

    assert manifest["inputs"][0]["content_hash"] == read_manifest(data).content_hash
    assert manifest["config"]["algo"] == "scope" and manifest["summary"]["steps"] == 1
    assert "torch" in manifest["versions"]


def test_zero_advantage_weights_do_not_move_and_run_refuses(tiny, tmp_path: Path) -> None:
    from pipelines.training.train import fit, run
    from scope_data.assembly import assemble
    from tests.helpers_train import to_table

    path, tok, model = tiny
    rows = scope_group(tok, model, "5")
    for r in rows:
        r["reward"], r["correct"] = 1.0, True
    assembled = assemble(to_table(rows), keep_zero_groups=True)
    assert assembled.rows["advantage"].to_list() == [0.0] * 3
    fit(config("unused", path, tmp_path / "zero"), assembled.rows)
    new = load(tmp_path / "zero")
    for (name, p0), p1 in zip(model.state_dict().items(), new.state_dict().values(), strict=True):
        assert torch.equal(p0, p1), name

    data = write_corrected(tmp_path / "corrected", rows)
    with pytest.raises(ValueError, match="every group has zero advantage"):
        run(config(data, path, tmp_path / "refused"))
    assert not (tmp_path / "refused").exists()


def test_steps_per_round_truncation_and_recompute(tiny, tmp_path: Path) -> None:
    from pipelines.training.train import run

    path, tok, model = tiny
    rows = [r for p in ("1", "2") for r in scope_group(tok, model, p)]
    for r in rows:  # behaviour log-probs unusable: recompute must not read them
        if r["kind"] == "policy":
            r["behaviour_logprobs"] = [float("nan")] * len(r["behaviour_logprobs"])
    data = write_corrected(tmp_path / "corrected", rows)
    with pytest.raises(ValueError, match="behaviour log-prob of on-policy token 0"):
        run(config(data, path, tmp_path / "bad"))
    res = run(config(data, path, tmp_path / "out", max_steps=-1, num_train_epochs=2,
                     per_device_train_batch_size=1, gradient_accumulation_steps=3,
                     old_logprobs="recompute", max_length=12, loss_type="seq_mean",
                     beta=0.1, entropy_coef=0.01))
    assert res.steps == 2 * 6 // 3  # 6 responses, global batch 3, 2 epochs
    assert res.summary["truncated_responses"] == 6  # every response is longer than 12
    m = res.metrics.row(0, named=True)
    assert m["clip_fraction"] == 0.0 and m["kl"] == pytest.approx(0.0, abs=1e-6)
    assert res.metrics["tokens"].to_list() == [36.0] * 4
    assert res.metrics["kl"][-1] > 0  # the policy moved away from the reference


def test_nan_loss_stops_with_step_and_rollouts(tiny, tmp_path: Path) -> None:
    from pipelines.training.train import run
    from pipelines.training.trainer import NonFiniteLossError

    path, tok, model = tiny
    broken = load(path)
    with torch.no_grad():
        broken.model.norm.weight[0] = float("nan")
    broken.save_pretrained(tmp_path / "broken")
    tok.save_pretrained(tmp_path / "broken")
    rows = scope_group(tok, model, "8")
    data = write_corrected(tmp_path / "corrected", rows)
    with pytest.raises(NonFiniteLossError, match=r"step 1; rollout ids .*"
                       + rows[0]["rollout_id"]):
        run(config(data, tmp_path / "broken", tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_bad_inputs(tiny, tmp_path: Path) -> None:
    from pipelines.engines.spec import trainable_path
    from pipelines.training.train import TrainConfig, run
    from scope_data.schema import empty_table
    from scope_data.shards import TableStore

    path, tok, model = tiny

    TableStore(str(tmp_path / "empty"), "corrected").write(empty_table("corrected"), {})
    with pytest.raises(ValueError, match="table is empty"):
        run(config(str(tmp_path / "empty"), path, tmp_path / "o1"))
    rows = scope_group(tok, model, "9")
    rows[-1]["off_policy_start"] = None
    data = write_corrected(tmp_path / "c", rows)
    with pytest.raises(ValueError, match=rows[-1]["rollout_id"] + ".*off_policy_start"):
        run(config(data, path, tmp_path / "o2"))
    with pytest.raises(ValueError, match="loss_type"):
        TrainConfig(data=data, policy=str(path), output_dir="x", loss_type="sum").check()
    with pytest.raises(ValueError, match="no trainable weights"):
        trainable_path("rule:arith")
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep")
    with pytest.raises(ValueError, match="refusing to overwrite"):
        run(config(data, path, tmp_path / "precious"))


def test_lora_without_peft_is_a_clear_error(tiny, tmp_path: Path) -> None:
    try:
        import peft  # noqa: F401
        pytest.skip("peft is installed")
    except ImportError:
        pass
    from pipelines.training.train import run

    path, tok, model = tiny
    data = write_corrected(tmp_path / "c", scope_group(tok, model, "2"))
    with pytest.raises(RuntimeError, match="needs peft"):
        run(config(data, path, tmp_path / "o", lora=True))


def test_grpo_trains_from_rollouts_table(tiny, tmp_path: Path) -> None:
    from pipelines.training.train import run
    from scope_data.schema import conform
    from scope_data.shards import TableStore
    from tests.helpers_train import to_table

    path, tok, model = tiny
    rows = scope_group(tok, model, "2")[:3]
    rows[0]["reward"], rows[0]["correct"] = 1.0, True
    TableStore(str(tmp_path / "rollouts"), "rollouts").write(
        conform("rollouts", to_table(rows)), {})
    res = run(config(str(tmp_path / "rollouts"), path, tmp_path / "o", algo="grpo"))
    assert res.metrics["off_policy_share"].to_list() == [0.0]
    with pytest.raises(ValueError, match="cannot train algo 'scope'"):
        run(config(str(tmp_path / "rollouts"), path, tmp_path / "o2", algo="scope"))


def test_cli_train(tiny, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cli.main import app

    path, tok, model = tiny
    data = write_corrected(tmp_path / "c", scope_group(tok, model, "3"))
    runner = CliRunner()
    ok = runner.invoke(app, ["train", "--data", data, "--policy", f"hf:{path}", "--out",
                             str(tmp_path / "o"), "--algo", "luffy", "--lr", "1e-3",
                             "--max-steps", "1", "--loss-type", "constant"])
    assert ok.exit_code == 0, ok.output
    assert "clip_fraction" in ok.output and "off_policy_share" in ok.output
    assert (tmp_path / "o" / "model.safetensors").is_file()
    rows = [make_row("p", f"r{i}", [5, 6], [7, 8], 1.0) for i in range(2)]
    zero = write_corrected(tmp_path / "z", rows)
    bad = runner.invoke(app, ["train", "--data", zero, "--policy", str(path), "--out",
                              str(tmp_path / "o3")])
    assert bad.exit_code == 1 and "zero advantage" in " ".join(bad.output.split())
    assert not (tmp_path / "o3").exists()


def test_prm_dense_trains_all_failed_group_with_token_advantages(tiny, tmp_path: Path) -> None:
    from pipelines.training.train import run

    path, tok, model = tiny
    rows = scope_group(tok, model, "6")[:3]  # three failed policy rollouts, no correction
    for r, score in zip(rows, (0.9, 0.2, 0.6), strict=True):
        r["steps"] = [{"text": "s", "char_start": 0, "char_end": 1, "token_start": 0,
                       "token_end": 5, "score": score}]
    data = write_corrected(tmp_path / "c", rows)
    with pytest.raises(ValueError, match="zero advantage"):
        run(config(data, path, tmp_path / "grpo", algo="grpo"))
    res = run(config(data, path, tmp_path / "dense", algo="prm_dense", prm_alpha=2.0))
    assert res.summary["groups_trained"] == 1 and res.steps == 1
    assert res.metrics["grad_norm"][0] > 0


@pytest.mark.parametrize("column, value, message", [
    ("top_p", 0.9, "top_p 0.9.*renormalised nucleus.*--old-logprobs recompute"),
    ("temperature", 0.7, "temperature 0.7 but the trainer computes log-probs at 1"),
])
def test_behaviour_logprobs_of_other_sampling_are_refused(tiny, tmp_path: Path, column: str,
                                                          value: float, message: str) -> None:
    """Behaviour log-probs are pi_old only for full-vocabulary sampling at the trainer's
    temperature; others are refused unless the old log-probs are recomputed."""
    from pipelines.training.train import run

    path, tok, model = tiny
    rows = scope_group(tok, model, "7")
    for row in rows:
        row[column] = value
    data = write_corrected(tmp_path / "c", rows)
    with pytest.raises(ValueError, match=message):
        run(config(data, path, tmp_path / "o1"))
    result = run(config(data, path, tmp_path / "o2", old_logprobs="recompute"))
    assert result.steps == 1


def test_trl_loss_type_names_and_gspo(tiny, tmp_path: Path) -> None:
    """TRL's loss_type names train exactly as the aggregation they map to; GSPO's sequence-level
    ratio is a different update on the same batch."""
    from safetensors.torch import load_file

    from pipelines.training.train import run

    path, tok, model = tiny
    data = write_corrected(tmp_path / "c", scope_group(tok, model, "5", n_fail=3))

    def weights(name: str, **kw: object) -> dict:
        run(config(data, path, tmp_path / name, **kw))
        return load_file(str(tmp_path / name / "model.safetensors"))

    def same(a: dict, b: dict) -> bool:
        return all(torch.equal(a[k], b[k]) for k in a)

    token_mean = weights("tm")
    assert same(weights("dapo", loss_type="dapo"), token_mean)
    assert same(weights("grpo", loss_type="grpo"), weights("sm", loss_type="seq_mean"))
    # at ratio 1 (step one) GSPO's gradient equals PPO's under token_mean; by step two the
    # policy has moved, the ratios differ per token, and the sequence-level ratio differs
    two = {"max_steps": 2, "per_device_train_batch_size": 2, "learning_rate": 1e-2}
    gspo = weights("gspo", importance_sampling_level="sequence", **two)
    assert not same(gspo, weights("ppo", **two))
