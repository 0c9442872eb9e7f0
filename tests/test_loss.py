"""The mixed on/off-policy loss against hand-computed values (2 sequences x 5 tokens), and the
GRPO-family options: GSPO, TRL loss_type names, truncated-completion masking, overlong penalty."""

from __future__ import annotations

import math

import pytest
import torch

from pipelines.training.loss import (
    LOSS_TYPES,
    aggregate,
    aggregation_of,
    entropy_from_logits,
    mask_truncated_completions,
    metrics_from_sums,
    mixed_policy_loss,
    overlong_penalty,
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


# -- the GRPO loss family ----------------------------------------------------------------------
def reference_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor,
                   mask: torch.Tensor, off_mask: torch.Tensor, aggregation: str,
                   max_length: int) -> torch.Tensor:
    """The loss as it was before the GSPO and loss_type options: same operations, same order."""
    mask = mask.to(logp.dtype)
    off = off_mask.bool() & mask.bool()
    on = ~off_mask.bool() & mask.bool()
    adv = adv.to(logp.dtype)
    adv = adv.unsqueeze(-1).expand_as(logp) if adv.dim() == 1 else adv
    old = torch.where(on, old_logp.to(logp.dtype), logp.detach())
    ratio = torch.exp(logp - old)
    on_loss = -torch.min(ratio * adv, torch.clamp(ratio, 1 - EPS, 1 + EPS_HIGH) * adv)
    p = torch.exp(logp)
    masked = torch.where(off, -(p / (p + GAMMA)) * adv, on_loss) * mask
    if aggregation == "token_mean":
        return masked.sum() / mask.sum().clamp(min=1)
    if aggregation == "seq_mean":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1)).sum() / mask.shape[0]
    return masked.sum() / (mask.shape[0] * max_length)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean", "constant"])
def test_defaults_reproduce_the_old_loss_bit_for_bit(dtype: torch.dtype, aggregation: str) -> None:
    torch.manual_seed(3)
    logp0 = (-3 * torch.rand(6, 13)).to(dtype)
    old = logp0.float() + 0.3 * torch.randn(6, 13)
    off = torch.rand(6, 13) > 0.6
    old[off] = NAN
    adv, mask = torch.randn(6), (torch.rand(6, 13) > 0.2).float()
    grads = []
    for new in (True, False):
        logp = logp0.clone().requires_grad_(True)
        if new:
            loss, _ = mixed_policy_loss(logp, old, adv, mask, off, epsilon=EPS,
                                        epsilon_high=EPS_HIGH, shaping_gamma=GAMMA,
                                        aggregation=aggregation, max_length=16)
        else:
            loss = reference_loss(logp, old, adv, mask, off, aggregation, 16)
        loss.backward()
        grads.append((loss.detach(), logp.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_gspo_sequence_ratio_value_and_gradient() -> None:
    # Sequence 0: on-policy ratios 1.1, 1.5, 0.5 -> s_0 = (1.1 * 1.5 * 0.5)^(1/3) = 0.825^(1/3)
    # = 0.9380, inside [0.8, 1.28]: L = -s_0 on tokens 0-2; off-policy tokens 3-4 unchanged.
    # Sequence 1: ratios 0.5, 1.5, 1.0, 0.9 -> s_1 = 0.675^(1/4) = 0.9064, A = -0.5: L = 0.5 s_1.
    s0, s1 = 0.825 ** (1 / 3), 0.675 ** 0.25
    rows = [[-s0] * 3 + TOKEN_LOSS[0][3:], [0.5 * s1] * 4 + [0.0]]
    loss, sums, logp = loss_of("seq_mean", importance_sampling_level="sequence")
    assert loss.item() == pytest.approx((sum(rows[0]) / 5 + sum(rows[1]) / 4) / 2, abs=1e-12)
    assert metrics_from_sums(sums)["clip_fraction"] == 0.0
    loss, _, logp = loss_of("token_mean", importance_sampling_level="sequence")
    assert loss.item() == pytest.approx((sum(rows[0]) + sum(rows[1])) / 9, abs=1e-12)
    loss.backward()
    g = logp.grad * 9
    # d s_i / d l_u = s_i / |O_i|, summed over the |O_i| tokens that carry s_i: -A s_i per token
    assert g[0, :3].tolist() == pytest.approx([-s0] * 3)
    assert g[1, :4].tolist() == pytest.approx([0.5 * s1] * 4)
    for t, p in ((3, 0.1), (4, 0.6)):  # LUFFY shaping as at token level
        assert g[0, t].item() == pytest.approx(-1.0 * GAMMA * p / (p + GAMMA) ** 2)


def test_gspo_clips_whole_sequences() -> None:
    # Row 0, A = +1: log-ratios 0.4, 0.2 -> s = e^0.3 = 1.350 > 1.28: L = -1.28 on both, no
    #   gradient (token level: only token 0, e^0.4 = 1.492, is clipped; token 1 has -e^0.2).
    # Row 1, A = -1: log-ratios -0.5, -0.1 -> s = e^-0.3 = 0.741 < 0.8: L = -min(-s, -0.8) = 0.8
    #   on both, no gradient (token level: token 0, e^-0.5 = 0.607, clipped; token 1 +e^-0.1).
    # Row 2, A = +2: off-policy p = 0.1, 0.4 (no on-policy token, s = 1 unused):
    #   L = -2 * 0.1/0.2 = -1.0 and -2 * 0.4/0.5 = -1.6 at both levels.
    logp0 = torch.tensor([[-1.0, -2.0], [-1.0, -2.0], [math.log(0.1), math.log(0.4)]],
                         dtype=torch.float64)
    old = torch.tensor([[-1.4, -2.2], [-0.5, -1.9], [NAN, NAN]], dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0, 2.0], dtype=torch.float64)
    mask, off = torch.ones(3, 2), torch.tensor([[0, 0], [0, 0], [1, 1]], dtype=torch.bool)
    out = {}
    for level in ("sequence", "token"):
        logp = logp0.clone().requires_grad_(True)
        loss, sums = mixed_policy_loss(logp, old, adv, mask, off, epsilon=EPS,
                                       epsilon_high=EPS_HIGH, shaping_gamma=GAMMA,
                                       importance_sampling_level=level)
        loss.backward()
        out[level] = (loss.item(), logp.grad * 6, metrics_from_sums(sums)["clip_fraction"])
    loss, g, clip = out["sequence"]
    assert loss == pytest.approx((-1.28 * 2 + 0.8 * 2 - 1.0 - 1.6) / 6, abs=1e-12)
    assert g[:2].abs().max().item() == 0.0 and clip == 1.0
    assert g[2].tolist() == pytest.approx([-2 * GAMMA * 0.1 / 0.2**2, -2 * GAMMA * 0.4 / 0.5**2])
    loss, g, clip = out["token"]
    assert loss == pytest.approx((-1.28 - math.exp(0.2) + 0.8 + math.exp(-0.1) - 2.6) / 6)
    assert [g[0, 1].item(), g[1, 1].item()] == pytest.approx([-math.exp(0.2), math.exp(-0.1)])
    assert clip == 0.5
    with pytest.raises(ValueError, match="importance_sampling_level"):
        loss_of("token_mean", importance_sampling_level="group")


def test_trl_loss_type_names() -> None:
    assert LOSS_TYPES == {"grpo": "seq_mean", "bnpo": "token_mean", "dr_grpo": "constant",
                          "dapo": "token_mean"}
    for trl_name, ours in LOSS_TYPES.items():
        assert aggregation_of(trl_name) == ours and aggregation_of(ours) == ours
        assert loss_of(trl_name)[0].item() == loss_of(ours)[0].item()
    s0, s1 = sum(TOKEN_LOSS[0]), sum(TOKEN_LOSS[1])
    assert loss_of("grpo")[0].item() == pytest.approx((s0 / 5 + s1 / 4) / 2, abs=1e-12)
    assert loss_of("dr_grpo")[0].item() == pytest.approx((s0 + s1) / (2 * 8), abs=1e-12)
    # dapo: token sum over the global token count of the optimizer step, e.g. 9 here + 27 in
    # other micro-batches
    assert loss_of("dapo", num_items=36)[0].item() == pytest.approx((s0 + s1) / 36, abs=1e-12)
    with pytest.raises(ValueError, match="unknown aggregation 'gspo'"):
        aggregation_of("gspo")


def test_mask_truncated_completions() -> None:
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0]], dtype=torch.float32)
    want = [[1, 1, 1], [0, 0, 0], [1, 0, 0]]
    assert mask_truncated_completions(mask, ["stop", "length", None]).tolist() == want
    assert mask_truncated_completions(mask, torch.tensor([False, True, False])).tolist() == want
    # Sequence 1 of the example truncated: token mean over sequence 0's 5 tokens only.
    ex = example()
    m = mask_truncated_completions(ex["mask"], ["stop", "length"])
    loss, sums = mixed_policy_loss(ex["logp"], ex["old_logp"], ex["advantages"], m,
                                   ex["off_mask"], epsilon=EPS, epsilon_high=EPS_HIGH)
    assert loss.item() == pytest.approx(sum(TOKEN_LOSS[0]) / 5, abs=1e-12)
    assert metrics_from_sums(sums)["sequences"] == 1


def test_overlong_penalty() -> None:
    # Lmax = 20, Lcache = 4: free up to 16, then (16 - L) / 4 down to -1 at 20, -1 beyond
    lengths = [10, 16, 17, 18, 20, 21, 30]
    assert overlong_penalty(lengths, 20, 4).tolist() == [0, 0, -0.25, -0.5, -1, -1, -1]
    assert overlong_penalty(torch.tensor([18]), 20, 4, penalty_factor=0.5).tolist() == [-0.25]
    for bad in (0, 21):
        with pytest.raises(ValueError, match="overlong_buffer_len"):
            overlong_penalty(lengths, 20, bad)
