"""The mixed on/off-policy loss against hand-computed values (2 sequences x 5 tokens)."""

from __future__ import annotations

import math

import pytest
import torch

from pipelines.training.loss import (
    aggregate,
    entropy_from_logits,
    metrics_from_sums,
    mixed_policy_loss,
    selective_log_softmax,
)

EPS, EPS_HIGH, GAMMA = 0.2, 0.28, 0.1
NAN = float("nan")

# Sequence 0: A = +1; tokens 0-2 on-policy with ratios 1.1 (inside), 1.5 (clipped high),
# 0.5 (below 1-eps but A > 0: unclipped); tokens 3-4 off-policy with p = 0.1 and 0.6.
# Sequence 1: A = -0.5; ratios 0.5 (clipped low), 1.5 (A < 0: unclipped), 1.0, 0.9; token 4 pad.
RATIOS = [[1.1, 1.5, 0.5, None, None], [0.5, 1.5, 1.0, 0.9, None]]
PROBS = [[0.3, 0.4, 0.2, 0.1, 0.6], [0.5, 0.25, 0.7, 0.35, 0.9]]
ADV = [1.0, -0.5]
TOKEN_LOSS = [
    [-1.1, -1.28, -0.5, -0.1 / 0.2, -0.6 / 0.7],
    [0.4, 0.75, 0.5, 0.45, 0.0],
]


def example() -> dict[str, torch.Tensor]:
    logp = torch.tensor(PROBS, dtype=torch.float64).log().requires_grad_(True)
    old = [[math.log(p) - math.log(r) if r else NAN for p, r in zip(ps, rs, strict=True)]
           for ps, rs in zip(PROBS, RATIOS, strict=True)]
    return {
        "logp": logp,
        "old_logp": torch.tensor(old, dtype=torch.float64),
        "advantages": torch.tensor(ADV, dtype=torch.float64),
        "mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]], dtype=torch.float64),
        "off_mask": torch.tensor([[0, 0, 0, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool),
    }


def loss_of(aggregation: str, **kw: object) -> tuple[torch.Tensor, dict, torch.Tensor]:
    ex = example()
    loss, sums = mixed_policy_loss(
        ex["logp"], ex["old_logp"], ex["advantages"], ex["mask"], ex["off_mask"],
        epsilon=EPS, epsilon_high=EPS_HIGH, shaping_gamma=GAMMA, aggregation=aggregation,
        max_length=8, **kw)
    return loss, sums, ex["logp"]


def test_token_mean_value_and_metrics() -> None:
    loss, sums, _ = loss_of("token_mean")
    total = sum(TOKEN_LOSS[0]) + sum(TOKEN_LOSS[1])
    assert loss.item() == pytest.approx(total / 9, abs=1e-12)
    m = metrics_from_sums(sums)
    assert m["clip_fraction"] == pytest.approx(2 / 7)  # seq0 t1 (high), seq1 t0 (low)
    assert m["off_policy_share"] == pytest.approx(2 / 9)
    assert m["shaped_weight"] == pytest.approx((0.5 + 0.6 / 0.7) / 2)
    assert m["off_policy_prob"] == pytest.approx(0.35)
    assert m["tokens"] == 9 and m["sequences"] == 2


def test_seq_mean_and_constant_values() -> None:
    s0, s1 = sum(TOKEN_LOSS[0]), sum(TOKEN_LOSS[1])
    assert loss_of("seq_mean")[0].item() == pytest.approx((s0 / 5 + s1 / 4) / 2, abs=1e-12)
    assert loss_of("constant")[0].item() == pytest.approx((s0 + s1) / (2 * 8), abs=1e-12)
    with pytest.raises(ValueError, match="unknown aggregation"):
        loss_of("sum")


def test_gradients_per_token() -> None:
    loss, _, logp = loss_of("token_mean")
    loss.backward()
    g = logp.grad * 9  # undo the token-mean divisor
    # unclipped on-policy: d(-rho*A)/dlogp = -rho*A; clipped tokens get no gradient
    assert g[0, 0].item() == pytest.approx(-1.1)
    assert g[0, 1].item() == 0.0
    assert g[0, 2].item() == pytest.approx(-0.5)
    assert g[1, 0].item() == 0.0
    assert g[1, 1].item() == pytest.approx(0.75)
    assert g[1, 3].item() == pytest.approx(0.45)
    # off-policy shaping: d(f(p) A)/dlogp = A * gamma * p / (p + gamma)^2 (the loss is minus it)
    for t, p in ((3, 0.1), (4, 0.6)):
        assert g[0, t].item() == pytest.approx(-1.0 * GAMMA * p / (p + GAMMA) ** 2)
    assert g[1, 4].item() == 0.0  # padding
    assert torch.isfinite(logp.grad).all()  # NaN old log-probs never leak


def test_off_policy_gradient_is_autograd_of_shaping_function() -> None:
    for p0, a in ((0.02, 2.0), (0.1, -1.0), (0.9, 0.5)):
        logp = torch.tensor([[math.log(p0)]], dtype=torch.float64, requires_grad=True)
        loss, _ = mixed_policy_loss(
            logp, torch.tensor([[NAN]], dtype=torch.float64), torch.tensor([a]),
            torch.ones(1, 1), torch.ones(1, 1, dtype=torch.bool), shaping_gamma=GAMMA)
        assert loss.item() == pytest.approx(-a * p0 / (p0 + GAMMA))
        loss.backward()
        assert logp.grad.item() == pytest.approx(-a * GAMMA * p0 / (p0 + GAMMA) ** 2)


def test_kl_and_entropy_terms() -> None:
    base, _, _ = loss_of("token_mean")
    ex = example()
    ref = ex["logp"].detach() + 0.3  # l_ref - l = 0.3 on every token
    kl, sums, _ = loss_of("token_mean", ref_logp=ref, beta=0.5)
    k3 = math.exp(0.3) - 0.3 - 1
    assert kl.item() == pytest.approx(base.item() + 0.5 * k3, abs=1e-12)
    assert metrics_from_sums(sums)["kl"] == pytest.approx(k3)
    ent = torch.full((2, 5), 2.0, dtype=torch.float64)
    with_ent, sums, _ = loss_of("token_mean", entropy=ent, entropy_coef=0.01)
    assert with_ent.item() == pytest.approx(base.item() - 0.01 * 2.0, abs=1e-12)
    assert metrics_from_sums(sums)["entropy"] == pytest.approx(2.0)


def test_per_token_advantages_match_broadcast_scalars() -> None:
    ex = example()
    tok_adv = ex["advantages"].unsqueeze(-1).expand(2, 5).clone()
    a, _ = mixed_policy_loss(ex["logp"], ex["old_logp"], tok_adv, ex["mask"], ex["off_mask"],
                             epsilon=EPS, epsilon_high=EPS_HIGH)
    b, _ = mixed_policy_loss(ex["logp"], ex["old_logp"], ex["advantages"], ex["mask"],
                             ex["off_mask"], epsilon=EPS, epsilon_high=EPS_HIGH)
    assert a.item() == pytest.approx(b.item())


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean", "constant"])
def test_micro_batches_with_global_count_equal_full_batch(aggregation: str) -> None:
    torch.manual_seed(0)
    loss = torch.randn(6, 7, dtype=torch.float64)
    mask = (torch.rand(6, 7) > 0.3).double()
    mask[:, 0] = 1
    full = aggregate(loss, mask, aggregation, max_length=7)
    n = mask.sum() if aggregation == "token_mean" else 6
    parts = sum(aggregate(loss[i : i + 2], mask[i : i + 2], aggregation, 7, num_items=n)
                for i in range(0, 6, 2))
    assert parts.item() == pytest.approx(full.item())


def test_selective_log_softmax_and_entropy_match_full_softmax() -> None:
    torch.manual_seed(0)
    logits = torch.randn(5, 3, 11, dtype=torch.float64, requires_grad=True)
    index = torch.randint(0, 11, (5, 3))
    weights = torch.randn(5, 3, dtype=torch.float64)
    for temp in (1.0, 0.7):
        ref = torch.log_softmax(logits / temp, -1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
        got = selective_log_softmax(logits, index, temp, chunk_rows=2)
        assert torch.allclose(got, ref, atol=1e-10)
        g_ref = torch.autograd.grad((ref * weights).sum(), logits)[0]
        g_got = torch.autograd.grad((got * weights).sum(), logits)[0]
        assert torch.allclose(g_got, g_ref, atol=1e-10)
        p = torch.softmax(logits / temp, -1)
        ent = -(p * torch.log_softmax(logits / temp, -1)).sum(-1)
        assert torch.allclose(entropy_from_logits(logits, temp, chunk_rows=3), ent, atol=1e-6)
    assert torch.autograd.gradcheck(
        lambda x: selective_log_softmax(x, index, 0.5, 2), (logits,))
    half = selective_log_softmax(logits.detach().bfloat16(), index)
    assert half.dtype == torch.float32
    assert torch.allclose(half.double(), selective_log_softmax(logits.detach(), index), atol=0.1)
