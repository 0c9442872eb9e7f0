"""Behaviour/trainer mismatch: TRL's vllm_importance_sampling_* weights by hand, top-k
sampling, the rollout sampling columns, refusals, and the trainer's logged statistics against an
independent computation on hf top_p 0.9 rollouts of the tiny policy."""

from __future__ import annotations

import math
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from pipelines.training.loss import behaviour_weights, metrics_from_sums, mixed_policy_loss
from tests.helpers_train import make_row, write_corrected

NAN = float("nan")
LN = math.log

# 2 sequences x 3 tokens. old - behaviour per token (log of the ratio):
#   seq 0: ln 2, ln 0.5, ln 4   (all on-policy)
#   seq 1: ln 1.5, NaN behaviour (ratio 1, as TRL), teacher token (off-policy)
OLD = [[LN(2.0), LN(0.5), LN(4.0)], [LN(1.5), -1.0, -2.0]]
BEH = [[0.0, 0.0, 0.0], [0.0, NAN, 0.0]]
ON = [[1, 1, 1], [1, 1, 0]]
# token ratios r: [2, 0.5, 4], [1.5, 1]; sequence ratios: 2 * 0.5 * 4 = 4 and 1.5 * 1 = 1.5
EXPECTED = {  # clip_min 0.6, clip_max 3: (weights on on-policy tokens, count outside bounds)
    "token_truncate": ([[2.0, 0.6, 3.0], [1.5, 1.0]], 2),
    "token_mask": ([[2.0, 0.0, 0.0], [1.5, 1.0]], 2),
    "sequence_truncate": ([[3.0] * 3, [1.5] * 2], 1),
    "sequence_mask": ([[0.0] * 3, [1.5] * 2], 1),
}


@pytest.mark.parametrize("mode", list(EXPECTED))
def test_importance_weights_by_hand(mode: str) -> None:
    w, sums = behaviour_weights(torch.tensor(OLD, dtype=torch.float64),
                                torch.tensor(BEH, dtype=torch.float64),
                                torch.tensor(ON, dtype=torch.bool), mode, 0.6, 3.0)
    want, outside = EXPECTED[mode]
    assert w[0].tolist() == pytest.approx(want[0])
    assert w[1, :2].tolist() == pytest.approx(want[1])
    units = [x for row in want for x in row] if mode.startswith("token") else [
        want[0][0], want[1][0]]
    m = metrics_from_sums(sums)
    assert m["is_ratio_mean"] == pytest.approx(sum(units) / len(units))
    assert m["is_ratio_max"] == pytest.approx(max(units))
    assert m["is_ratio_min"] == pytest.approx(min(units))
    assert m["is_outside_fraction"] == pytest.approx(outside / len(units))
    # the 4 on-policy tokens with a behaviour log-prob: d = ln 2, ln .5, ln 4, ln 1.5
    d = [LN(2.0), LN(0.5), LN(4.0), LN(1.5)]
    assert m["sampling_logp_difference_mean"] == pytest.approx(sum(map(abs, d)) / 4)
    assert m["sampling_logp_difference_max"] == pytest.approx(LN(4.0))
    assert m["behaviour_kl_k1"] == pytest.approx(-sum(d) / 4)
    assert m["behaviour_kl_k3"] == pytest.approx(sum(math.exp(x) - x - 1 for x in d) / 4)
    assert m["kept_mass"] == pytest.approx(1.0)


def test_weights_without_bounds_and_kept_mass() -> None:
    """No clip_min and clip_max None in mask mode: nothing is masked; kept mass is
    exp(full - replayed) over the tokens that have a behaviour log-prob."""
    old = torch.tensor([[LN(0.5), LN(0.25)]])
    full = old + torch.tensor([[LN(0.9), LN(0.8)]])
    w, sums = behaviour_weights(old, torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool),
                                "token_mask", None, None, full_logp=full)
    assert w.tolist() == [pytest.approx([0.5, 0.25])]
    assert metrics_from_sums(sums)["kept_mass"] == pytest.approx(0.85)
    with pytest.raises(ValueError, match="unknown vllm_importance_sampling_mode"):
        behaviour_weights(old, old, torch.ones(1, 2, dtype=torch.bool), "token")


def test_is_weight_scales_only_on_policy_tokens() -> None:
    """Ratio 1, A = 1: an on-policy token's loss is -w; the teacher token keeps -p / (p + g)."""
    logp = torch.tensor([[LN(0.5), LN(0.4), LN(0.2)]], dtype=torch.float64)
    common = dict(advantages=torch.tensor([1.0], dtype=torch.float64),
                  mask=torch.ones(1, 3, dtype=torch.float64),
                  off_mask=torch.tensor([[False, False, True]]), shaping_gamma=0.1)
    w = torch.tensor([[3.0, 0.0, 7.0]], dtype=torch.float64)
    loss, _ = mixed_policy_loss(logp, logp, is_weight=w, **common)
    assert loss.item() == pytest.approx((-3.0 - 0.0 - 0.2 / 0.3) / 3)
    loss1, _ = mixed_policy_loss(logp, logp, **common)
    assert loss1.item() == pytest.approx((-1.0 - 1.0 - 0.2 / 0.3) / 3)


def test_process_logits_top_k_then_top_p_by_hand() -> None:
    """vLLM's order: top-k keeps the k largest (renormalised), then top-p on that."""
    from pipelines.engines.hf import process_logits

    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    one = torch.ones(1, 1)
    lq = process_logits(probs.log(), one, one, True, torch.tensor([[3]])).exp()
    assert lq[0].tolist() == pytest.approx([4 / 9, 3 / 9, 2 / 9, 0.0])
    # top-3 renormalised is [.444, .333, .222]; top_p 0.7 keeps the first two
    lq = process_logits(probs.log(), one, torch.full((1, 1), 0.7), True,
                        torch.tensor([[3]])).exp()
    assert lq[0].tolist() == pytest.approx([4 / 7, 3 / 7, 0.0, 0.0])
    off = process_logits(probs.log(), one, one, True, torch.tensor([[0]])).exp()
    assert off[0].tolist() == pytest.approx([0.4, 0.3, 0.2, 0.1])


def test_older_tables_read_with_null_sampling_columns() -> None:
    from scope_data.schema import SCHEMAS, conform
    from tests.helpers_train import to_table

    row = make_row("p", "r", [1, 2], [3, 4], 1.0)
    old = to_table([row]).drop_columns(["top_k", "engine", "policy_version"])
    table = conform("corrected", old)
    assert table.schema.equals(SCHEMAS["corrected"])
    assert table.column("top_k").null_count == 1 and table.column("engine").null_count == 1
    with pytest.raises(ValueError, match="missing column 'top_p'"):
        conform("corrected", old.drop_columns(["top_p"]))


# -- the trainer on hf top_p 0.9 rollouts of the tiny policy -------------------------------------
@pytest.fixture(scope="module")
def nucleus_rollouts(tmp_path_factory: pytest.TempPathFactory, tiny_policy: Path):
    """Rollouts of the tiny policy at T = 1, top_p = 0.9 (generate stage, hf engine)."""
    from pipelines.stages.generate import GenerateConfig, run
    from scope_data.shards import read_arrow
    from tests.helpers_engines import write_problems

    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("mismatch")
    write_problems(str(root / "problems"), n=3)
    run(GenerateConfig(problems=str(root / "problems"), policy=f"hf:{tiny_policy}",
                       out=str(root / "rollouts"), n=2, max_new_tokens=20, seed=3, top_p=0.9),
        quiet=True)
    return root, read_arrow(str(root / "rollouts")).to_pylist()


def corrected_rows(rollouts: list[dict], **overrides: object) -> list[dict]:
    """The rollouts as policy rows of a corrected table, rewards 1, 0 in each group (so every
    group trains)."""
    rows = []
    for r in rollouts:
        row = make_row(r["problem_id"], r["rollout_id"], r["prompt_token_ids"],
                       r["response_token_ids"], float(r["sample_idx"] == 0),
                       logprobs=r["behaviour_logprobs"])
        row.update({"top_p": r["top_p"], "top_k": r["top_k"], "engine": r["engine"],
                    **overrides})
        rows.append(row)
    return rows


def nucleus_logprobs(model, prompt: list[int], response: list[int], top_p: float):  # noqa: ANN201
    """(full, nucleus-renormalised) log-probs of `response`, computed here independently:
    sort, keep the smallest top set of mass >= top_p, renormalise."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + response])).logits[0].double()
    logp = torch.log_softmax(logits[len(prompt) - 1 : -1], -1)
    full, kept = [], []
    for t, y in enumerate(response):
        p = logp[t].exp()
        order = torch.argsort(p, descending=True)
        before = torch.cumsum(p[order], 0) - p[order]
        keep = order[before < top_p]
        full.append(logp[t, y].item())
        kept.append(logp[t, y].item() - math.log(p[keep].sum().item())
                    if y in keep.tolist() else -math.inf)
    return full, kept


@pytest.mark.slow  # the module's rollouts take ~25 s to generate on 2 loaded cores
def test_nucleus_rollouts_record_sampling(nucleus_rollouts) -> None:
    _, rollouts = nucleus_rollouts
    assert {(round(r["top_p"], 4), r["top_k"], r["engine"], r["policy_version"])
            for r in rollouts} == {(0.9, 0, "hf", None)}


@pytest.mark.slow
def test_recompute_with_correction_logs_independent_statistics(
        nucleus_rollouts, tiny_policy: Path) -> None:
    """Train one step on top_p 0.9 rollouts with recompute + token_truncate correction: the
    logged ratio statistics equal w = min(q_trainer(y) / q_engine(y), 3) computed here from the
    table and the model, the kept mass is the nucleus mass (< 1: the bias TRL issue 6789
    describes) and the corrected ratio is ~1 while the uncorrected one would be ~kept mass."""
    from transformers import AutoModelForCausalLM

    from pipelines.training.train import TrainConfig, run

    root, rollouts = nucleus_rollouts
    data = write_corrected(root / "corrected", corrected_rows(rollouts))
    with pytest.raises(ValueError, match="top_p 0.9.*renormalised nucleus"):
        run(TrainConfig(data=data, policy=f"hf:{tiny_policy}", output_dir=str(root / "o0")))
    res = run(TrainConfig(
        data=data, policy=f"hf:{tiny_policy}", output_dir=str(root / "o1"), max_steps=1,
        per_device_train_batch_size=len(rollouts), old_logprobs="recompute",
        vllm_importance_sampling_correction=True, vllm_importance_sampling_mode="token_truncate",
        vllm_importance_sampling_clip_max=3.0))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_policy)).eval()
    ratios, diffs, masses, raw = [], [], [], []
    for r in rollouts:
        full, kept = nucleus_logprobs(model, r["prompt_token_ids"], r["response_token_ids"], 0.9)
        for f, k, b in zip(full, kept, r["behaviour_logprobs"], strict=True):
            ratios.append(min(math.exp(k - b), 3.0))
            raw.append(math.exp(f - b))
            if math.isfinite(k):
                diffs.append(abs(k - b))
                masses.append(math.exp(f - k))
    m = res.metrics.row(0, named=True)
    assert m["is_ratio_mean"] == pytest.approx(sum(ratios) / len(ratios), abs=1e-4)
    assert m["is_ratio_min"] == pytest.approx(min(ratios), abs=1e-4)
    assert m["is_ratio_max"] == pytest.approx(max(ratios), abs=1e-4)
    assert m["sampling_logp_difference_mean"] == pytest.approx(sum(diffs) / len(diffs), abs=1e-5)
    assert m["kept_mass"] == pytest.approx(sum(masses) / len(masses), abs=1e-5)
    assert 0.9 <= m["kept_mass"] < 1.0 and abs(m["is_ratio_mean"] - 1) < 1e-3
    assert sum(raw) / len(raw) == pytest.approx(m["kept_mass"], abs=1e-3)
    assert res.summary["is_ratio_mean"] == pytest.approx(m["is_ratio_mean"])


@pytest.mark.slow
def test_behaviour_mode_refusals(nucleus_rollouts, tiny_policy: Path) -> None:
    """top_k and a table mixing samplers are refused in behaviour mode, naming the values;
    the correction without recompute is refused by the config check."""
    from pipelines.training.train import TrainConfig, run

    root, rollouts = nucleus_rollouts
    mixed = corrected_rows(rollouts, top_p=1.0)
    for row in mixed[: len(mixed) // 2]:
        row["engine"] = "vllm"
    topk = corrected_rows(rollouts, top_p=1.0, top_k=20)

    def train(rows: list[dict], name: str, **kw: object):  # noqa: ANN202
        data = write_corrected(root / name, rows)
        return run(TrainConfig(data=data, policy=f"hf:{tiny_policy}",
                               output_dir=str(root / f"{name}-out"), **kw))

    with pytest.raises(ValueError, match=r"2 different samplers \(engine=hf, temperature=1\.0, "
                       r"top_p=1\.0, top_k=0; engine=vllm, .*--old-logprobs recompute"):
        train(mixed, "mixed")
    with pytest.raises(ValueError, match="top_k 20: their behaviour log-probs are of the "
                       "renormalised top-k set"):
        train(topk, "topk")
    with pytest.raises(ValueError, match="needs --old-logprobs recompute"):
        train(topk, "topk2", vllm_importance_sampling_correction=True)


def test_rollout_schema_has_sampling_columns() -> None:
    from scope_data.schema import SCHEMAS

    schema = SCHEMAS["rollouts"]
    assert schema.field("top_k").type == pa.int32() and schema.field("top_k").nullable
    assert schema.field("engine").type == pa.string()
    assert schema.field("policy_version").type == pa.int32()


def test_hf_top_k_one_is_greedy_with_zero_logprobs(tmp_path: Path) -> None:
    """top_k = 1 keeps only the argmax: the greedy tokens, each with processed log-prob 0; the
    openai engine sends top_k only when it is on (older payloads, hence cache keys, unchanged)."""
    from pipelines.engines.base import GenerationRequest, load_generation_engine
    from pipelines.engines.prompts import render_and_encode
    from tests.helpers_engines import build_random_tiny

    model = build_random_tiny(tmp_path / "model")
    hf = load_generation_engine(f"hf:{model}")
    ids = render_and_encode(hf.tokenizer, ["Mod 10. Start with 1. Add 3."])[1][0]
    greedy, top1 = hf.generate([GenerationRequest(ids, temperature=0.0, max_new_tokens=12),
                                GenerationRequest(ids, top_k=1, max_new_tokens=12, seed=4)])
    assert top1[0].token_ids == greedy[0].token_ids
    assert top1[0].logprobs == [0.0] * len(top1[0].token_ids)
    openai = load_generation_engine("openai:http://127.0.0.1:9/v1#m", tokenizer=str(model))
    assert "top_k" not in openai.payload(GenerationRequest(ids))
    assert openai.payload(GenerationRequest(ids, top_k=5))["top_k"] == 5
