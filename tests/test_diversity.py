"""pass@k against the closed form; diversity measures on hand-made groups."""

from __future__ import annotations

import itertools
import math

import polars as pl
import pytest

from scope_data.diversity import (
    avg_at_n,
    bleu,
    distinct_n,
    distinct_paths,
    equations,
    group_diversity,
    novel_equation_share,
    pass_at_k,
    path_diversity,
    path_entropy,
    self_bleu,
)


def pass_at(n: int, c: int, k: int) -> float | None:
    return pl.DataFrame({"n": [n], "c": [c]}).select(pass_at_k(k)).item()


def product_reference(n: int, c: int, k: int) -> float:
    """The estimator as a plain Python loop (the stable product, in the same order)."""
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_at_k_matches_closed_form_and_enumeration(n: int) -> None:
    for c in range(n + 1):
        for k in range(1, n + 1):
            closed = 1 - math.comb(n - c, k) / math.comb(n, k)
            assert pass_at(n, c, k) == pytest.approx(closed, abs=1e-12)
            # enumeration: share of k-subsets of n samples (c correct) holding a correct one
            samples = [True] * c + [False] * (n - c)
            subsets = list(itertools.combinations(samples, k))
            assert pass_at(n, c, k) == pytest.approx(
                sum(any(s) for s in subsets) / len(subsets), abs=1e-12
            )


def test_pass_at_k_is_the_product_bit_for_bit() -> None:
    pairs = pl.DataFrame([(n, c) for n in range(1, 41) for c in range(n + 1)],
                         schema=["n", "c"], orient="row")
    for k in range(1, 41):
        got = pairs.select(pass_at_k(k).alias("p"))["p"].to_list()
        want = [product_reference(n, c, k) if k <= n else None
                for n, c in pairs.iter_rows()]
        assert got == want  # exact: same products in the same order


def test_pass_at_k_edge_cases() -> None:
    assert pass_at(4, 0, 4) == 0.0
    assert pass_at(4, 1, 4) == 1.0
    assert pass_at(4, 1, 1) == pytest.approx(0.25)
    assert pass_at(4, 2, 2) == pytest.approx(1 - 1 / 6)
    assert avg_at_n(4, 3) == 0.75
    assert pass_at(4, 5, 1) is None  # c > n
    assert pass_at(4, 1, 5) is None  # k > n
    with pytest.raises(ValueError):
        pass_at_k(0)


ARITH = "1 - 7 = 4\n4 * 7 = 8\n8 + 3 = 1\nAnswer: 1"


def test_identical_responses_have_zero_diversity() -> None:
    group = [ARITH] * 4
    div = group_diversity(group)
    assert div["self_bleu_div"] == pytest.approx(0.0, abs=1e-12)
    assert div["novel_equations"] == 0.0
    # distinct-n counts repeats: 4 copies of n-gram-unique text give exactly 1/4
    toks = ARITH.split()
    assert len(set(toks)) < len(toks)  # "=" repeats, so distinct-1 is lower still
    assert div["distinct_4"] == pytest.approx(0.25)
    assert div["distinct_1"] == pytest.approx(len(set(toks)) / (4 * len(toks)))


def test_distinct_n_hand_computed() -> None:
    group = ["a b c", "a b d"]
    assert distinct_n(group, 1) == pytest.approx(4 / 6)  # a b c d over 6
    assert distinct_n(group, 2) == pytest.approx(3 / 4)  # ab bc bd over 4
    assert distinct_n(group, 3) == pytest.approx(2 / 2)
    assert distinct_n(group, 4) is None
    assert distinct_n(["ab", "ab"], 1, tokens="char") == pytest.approx(2 / 4)


def test_bleu_hand_computed() -> None:
    hyp = "a b c d".split()
    assert bleu(hyp, [hyp]) == pytest.approx(1.0)
    # disjoint vocab: no unigram match -> 0
    assert bleu(hyp, ["x y z w".split()]) == 0.0
    # one substitution: p1 = 3/4, p2 = (2+1)/(3+1), p3 = (1+1)/(2+1), p4 = (0+1)/(1+1)
    ref = "a b c e".split()
    expected = math.exp((math.log(3 / 4) + math.log(3 / 4) + math.log(2 / 3) + math.log(1 / 2)) / 4)
    assert bleu(hyp, [ref]) == pytest.approx(expected)
    # brevity penalty: hypothesis of 2 tokens, closest reference of 4 -> exp(1 - 4/2)
    short = "a b".split()
    p = math.exp((math.log(1.0) + math.log(2 / 2) + math.log(1 / 1) + math.log(1 / 1)) / 4)
    assert bleu(short, [hyp]) == pytest.approx(math.exp(1 - 2) * p)


def test_self_bleu_diversity_orders_groups() -> None:
    same = ["a b c d e"] * 3
    close = ["a b c d e", "a b c d f", "a b c x e"]
    far = ["a b c d e", "f g h i j", "k l m n o"]
    assert self_bleu(same) == pytest.approx(1.0)
    assert self_bleu(far) == 0.0
    assert 0 < self_bleu(close) < 1
    assert self_bleu(["only one"]) is None


def test_equations_extraction() -> None:
    assert equations(ARITH) == {"1-7=4", "4*7=8", "8+3=1"}
    assert equations("so $x = 2y = 6$, and z == 3, a <= b") == {"x=2y", "2y=6"}
    assert equations("no equations here") == set()


def test_novel_equation_share_hand_made() -> None:
    a = "1 + 2 = 3\n3 * 2 = 6"
    b = "1 + 2 = 3\n3 * 2 = 7"  # one shared, one own
    c = "Answer: 5"  # no equation: not averaged
    # a: 1 of 2 novel; b: 1 of 2 novel -> 0.5
    assert novel_equation_share([a, b, c]) == pytest.approx(0.5)
    assert novel_equation_share([a, "9 - 1 = 8"]) == pytest.approx(1.0)
    assert novel_equation_share([c, c]) is None
    assert novel_equation_share([a]) is None


def test_solution_path_diversity_hand_computed() -> None:
    assert distinct_paths([]) == 0 and path_entropy([]) is None
    assert path_diversity(["a"] * 5) == {"distinct_paths": 1, "path_entropy": 0.0}
    assert path_entropy(["a", "b", "c", "d"]) == pytest.approx(2.0)
    # p = (1/2, 1/4, 1/4): H = 0.5 * 1 + 2 * 0.25 * 2 = 1.5 bits
    assert path_diversity(["a", "b", "a", "c"]) == {"distinct_paths": 3, "path_entropy": 1.5}
    assert path_entropy(["x", "y", "y"]) == pytest.approx(
        -(1 / 3) * math.log2(1 / 3) - (2 / 3) * math.log2(2 / 3))
