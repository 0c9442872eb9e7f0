"""Sampling metrics of a group of responses to one problem: pass@k, avg@n and diversity.

pass@k (Chen et al. 2021, the unbiased estimator): with n samples of which c are correct,

    pass@k = 1 - C(n - c, k) / C(n, k)

the probability that at least one of k samples drawn without replacement from the n is
correct; avg@n = c / n (the mean accuracy of the n samples).

Diversity of a group y_1..y_G (all measures are in [0, 1], higher = more diverse):

- distinct-n (Li et al. 2016): #unique n-grams / #n-grams, pooled over the group. G identical
  responses whose own n-grams are all distinct score 1/G, not 0 (the measure counts repeats).
- 1 - self-BLEU (Zhu et al. 2018): each response is the hypothesis and the other G-1 the
  references; BLEU-4 with uniform weights, clipped counts against the max over references, the
  brevity penalty of the closest reference length, and add-one smoothing of the n >= 2
  precisions (Lin & Och 2004, "smoothing 2" of Chen & Cherry 2014) so that short responses
  without a shared 4-gram do not collapse to 0. Identical responses give BLEU 1, diversity 0.
- novel equations: a response's equations are the ``lhs = rhs`` fragments of its text
  (chains ``a = b = c`` give ``a=b`` and ``b=c``; whitespace removed; ``==``, ``<=``, ``>=``,
  ``!=`` are not equations). Its novelty is the share of its equations that no other response
  of the group contains; the group's value is the mean over responses with >= 1 equation.
  For the arith task every step line ``1 - 7 = 4`` is one equation.

Solution-path diversity, for tasks with many right answers (countdown): the caller passes the
canonical paths (equal strings = the same solution) of a group's correct responses.
``distinct_paths`` counts the distinct ones; ``path_entropy`` is the Shannon entropy in bits of
their empirical distribution: 0 when all correct responses take one path, log2(c) when c
correct responses take c different paths, None without a correct response.

Tokens are whitespace-separated words (``tokens="word"``) or characters (``"char"``). No
dependency on nltk; pure Python (pass@k: a polars expression over columns n and c).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

import polars as pl

MAX_N = 4


# -- correctness ----------------------------------------------------------------------------
def pass_at_k(k: int, n: str | pl.Expr = "n", c: str | pl.Expr = "c") -> pl.Expr:
    """Unbiased pass@k of each row's `n` samples with `c` correct, 1 - C(n-c, k)/C(n, k),
    computed as the stable product below; null where k > n or c is not in 0..n."""
    if k < 1:
        raise ValueError(f"pass@k needs k >= 1, got {k}")
    n = (pl.col(n) if isinstance(n, str) else n).cast(pl.Int64)
    c = (pl.col(c) if isinstance(c, str) else c).cast(pl.Int64)
    # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i), multiplied in that order
    prod = pl.int_ranges(n - c + 1, n + 1).list.eval((1.0 - k / pl.element()).cum_prod())
    return (
        pl.when((c < 0) | (c > n) | (n < k)).then(None)
        .when(n - c < k).then(1.0)
        .otherwise(1.0 - prod.list.last().fill_null(1.0))
    )


def avg_at_n(n: int, c: int) -> float:
    """avg@n: the share of correct samples."""
    if n < 1 or not 0 <= c <= n:
        raise ValueError(f"avg@n needs n >= 1 and 0 <= c <= n, got n={n} c={c}")
    return c / n


# -- tokens and n-grams ---------------------------------------------------------------------
def tokenize(text: str, tokens: str = "word") -> list[str]:
    """Whitespace words (``word``) or characters without whitespace (``char``)."""
    if tokens == "word":
        return text.split()
    if tokens == "char":
        return [ch for ch in text if not ch.isspace()]
    raise ValueError(f"tokens must be 'word' or 'char', got {tokens!r}")


def ngrams(toks: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(toks[i : i + n]) for i in range(len(toks) - n + 1))


def distinct_n(texts: Sequence[str], n: int, tokens: str = "word") -> float | None:
    """#unique n-grams / #n-grams over the whole group; None when the group has no n-gram."""
    total: Counter[tuple[str, ...]] = Counter()
    for text in texts:
        total.update(ngrams(tokenize(text, tokens), n))
    count = sum(total.values())
    return len(total) / count if count else None


# -- self-BLEU ------------------------------------------------------------------------------
def bleu(hypothesis: Sequence[str], references: Sequence[Sequence[str]], max_n: int = MAX_N
         ) -> float:
    """Smoothed sentence BLEU of one tokenised hypothesis against tokenised references.

    p_1 = clipped 1-gram matches / 1-grams (0 if the hypothesis is empty); for n >= 2,
    p_n = (matches + 1) / (n-grams + 1). BLEU = BP * exp(mean_n log p_n), with
    BP = min(1, exp(1 - r / h)), r the reference length closest to h = len(hypothesis).
    """
    h = len(hypothesis)
    if h == 0 or not references:
        return 0.0
    log_sum = 0.0
    for n in range(1, max_n + 1):
        hyp = ngrams(hypothesis, n)
        best: Counter[tuple[str, ...]] = Counter()
        for ref in references:
            best |= ngrams(ref, n)  # element-wise max over references
        matches = sum(min(c, best[g]) for g, c in hyp.items())
        total = sum(hyp.values())
        if n == 1:
            if matches == 0:
                return 0.0
            p = matches / total
        else:
            p = (matches + 1) / (total + 1)
        log_sum += math.log(p)
    r = min((len(ref) for ref in references), key=lambda length: (abs(length - h), length))
    bp = 1.0 if h >= r else math.exp(1.0 - r / h)
    return bp * math.exp(log_sum / max_n)


def self_bleu(texts: Sequence[str], tokens: str = "word", max_n: int = MAX_N) -> float | None:
    """Mean BLEU of each response against the others; None for fewer than 2 responses."""
    if len(texts) < 2:
        return None
    toks = [tokenize(t, tokens) for t in texts]
    scores = [bleu(toks[i], toks[:i] + toks[i + 1 :], max_n) for i in range(len(toks))]
    return sum(scores) / len(scores)


# -- equations ------------------------------------------------------------------------------
_SPLIT = re.compile(r"\$|\\\(|\\\)|\\\[|\\\]|,|;|\n|\s(?:and|so|then|thus)\s")
_NOT_EQ = re.compile(r"[<>!=]=|=[=>]")


def equations(text: str) -> set[str]:
    """The ``lhs=rhs`` equations of a text, whitespace removed (see the module docstring)."""
    found: set[str] = set()
    for fragment in _SPLIT.split(text):
        if "=" not in fragment or _NOT_EQ.search(fragment):
            continue
        sides = ["".join(s.split()) for s in fragment.split("=")]
        for lhs, rhs in zip(sides, sides[1:], strict=False):
            if lhs and rhs:
                found.add(f"{lhs}={rhs}")
    return found


def novel_equation_share(texts: Sequence[str]) -> float | None:
    """Mean over responses (with >= 1 equation) of the share of its equations no other has.

    None for fewer than 2 responses or when no response has an equation.
    """
    if len(texts) < 2:
        return None
    eqs = [equations(t) for t in texts]
    shares = []
    for i, mine in enumerate(eqs):
        if not mine:
            continue
        others = set().union(*(e for j, e in enumerate(eqs) if j != i))
        shares.append(len(mine - others) / len(mine))
    return sum(shares) / len(shares) if shares else None


def group_diversity(texts: Sequence[str], tokens: str = "word") -> dict[str, float | None]:
    """All diversity measures of one group: distinct_1..4, self_bleu_div, novel_equations."""
    out: dict[str, float | None] = {
        f"distinct_{n}": distinct_n(texts, n, tokens) for n in range(1, MAX_N + 1)
    }
    sb = self_bleu(texts, tokens)
    out["self_bleu_div"] = None if sb is None else 1.0 - sb
    out["novel_equations"] = novel_equation_share(texts)
    return out


DIVERSITY_KEYS = tuple(f"distinct_{n}" for n in range(1, MAX_N + 1)) + (
    "self_bleu_div", "novel_equations",
)


# -- solution paths -------------------------------------------------------------------------
def distinct_paths(paths: Sequence[str]) -> int:
    """The number of distinct canonical solution paths."""
    return len(set(paths))


def path_entropy(paths: Sequence[str]) -> float | None:
    """Shannon entropy (bits) of the distribution of paths; None for no path."""
    if not paths:
        return None
    n = len(paths)
    return sum(c / n * math.log2(n / c) for c in Counter(paths).values())


def path_diversity(paths: Sequence[str]) -> dict[str, float | int | None]:
    """Both solution-path measures of one group: distinct_paths, path_entropy."""
    return {"distinct_paths": distinct_paths(paths), "path_entropy": path_entropy(paths)}


PATH_DIVERSITY_KEYS = ("distinct_paths", "path_entropy")
